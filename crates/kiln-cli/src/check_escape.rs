//! `kiln check escape`: escape probes from inside guests, each as root and as an unprivileged
//! user, each with a negative control that proves the probe notices success.
//!
//! The check runs a daemon of its own (`kiln serve`, this binary) whose only uplink is a
//! decoy namespace it makes: test servers, the cloud metadata address (169.254.169.254), an
//! RFC 1918 "LAN" address, a recorder that notes where each arrival came from, and a DNS
//! server with names that rebind to the decoys. A fake host service listens on every host
//! address. Probes target the host's own addresses, the decoys and a neighbour sandbox,
//! never the machine's uplink. Every decoy is read before and after every probe: anything
//! that arrived is an escape. After each probe the daemon and the neighbour's agent must
//! answer (the neighbour's listener count is a file read through it).
//!
//! Verdicts: *blocked* (the probe got nothing and its sandbox still works), *contained* (the
//! probe broke its own sandbox or acted only inside it; host and neighbour unaffected),
//! *ESCAPED*, *HOST AFFECTED*; *NOT BLOCKED* when an unprivileged user got as far as acting
//! inside the guest, *INCONCLUSIVE* when the shared prober broke. A control that does not
//! notice is *MISSED*. Any of these fails the check.
//! Probes run in the guest's Python, started once per sandbox and user as a probe server
//! (see [`ASK_SERVER`]). Needs root (namespaces, the daemon's networking).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_api::types::{ExecResultBody, SandboxBody, SandboxList};
use kiln_net::netns::NetNs;
use kiln_testinfra::internet::{TestInternet, LAN, METADATA, WEB};
use reqwest::Method;
use serde::Serialize;
use serde_json::{json, Value};

use crate::check_cmd::delete;
use crate::check_daemon::{BakeCache, Daemon, DaemonInputs};
use crate::client_cmd::Client;
use crate::escape_witness::{interface_with, tap_received, Capture, HostDecoy, Recorder};

/// The probes' script, run by the guest's Python.
const SCRIPT: &str = include_str!("escape_probes.py");
/// Where it is put in each guest.
const SCRIPT_PATH: &str = "/tmp/kiln-probe.py";
/// Asks the probe server of the exec's user (`escape_probes.py serve`, started once per
/// sandbox and user: Python's start takes seconds under TCG) to run probe `$1` with the
/// JSON arguments `$2`, and prints its report. Waits up to 30 s for the server to be ready.
/// A probe whose process ends without a report (it crashed, or was killed) fails the exec,
/// as the probe's own process failing did when each probe was an exec of its own.
const ASK_SERVER: &str = r#"in=/tmp/kiln-probe-$(id -u).in
n=0
while [ ! -p "$in" ]; do
  n=$((n + 1))
  [ "$n" -le 600 ] || { echo "no probe server at $in" >&2; exit 3; }
  sleep 0.05
done
reply=$(mktemp -u /tmp/kiln-probe-reply.XXXXXX)
mkfifo -m 600 "$reply" || exit 3
trap 'rm -f "$reply"' EXIT
printf '%s %s %s\n' "$reply" "$1" "$2" > "$in"
report=$(cat "$reply")
[ -n "$report" ] || { echo "the probe's process ended without a report" >&2; exit 4; }
printf '%s\n' "$report"
"#;
/// The recorder's TCP and UDP port on [`WEB`].
const RECORDER_PORT: u16 = 7002;
/// The neighbour's listener (in its guest, not exposed).
const NEIGHBOUR_PORT: u16 = 8000;
/// Every guest's gateway (fixed at bake, docs/networking.md).
const GATEWAY: &str = "172.31.255.1";
/// Every guest's MAC address.
const GUEST_MAC: &str = "02:6b:69:6c:6e:01";
/// The unprivileged user probes also run as.
const UNPRIVILEGED: &str = "nobody";

/// Options of `kiln check escape`.
#[derive(Debug, Clone, clap::Args)]
pub struct EscapeOptions {
    /// Template of the sandboxes (its guest must have Python 3 and iproute2).
    #[arg(long, default_value = "python")]
    pub template: String,
    #[command(flatten)]
    pub inputs: DaemonInputs,
    /// Each probe as root only (the quick profile); by default also as an unprivileged user.
    #[arg(long)]
    pub root_only: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How a probe's result is judged beyond the decoys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judge {
    /// The guest's own report: reached or not.
    Guest,
    /// Datagrams or a connection carrying a token reach the recorder: from any address but
    /// the sandbox's egress address they are an escape (an impersonation); the control's
    /// must arrive.
    Recorder,
    /// ARP claims: the host's or the neighbour's neighbour table learning the guest's MAC is
    /// an escape; the control's frames must reach the sandbox's tap.
    Arp,
    /// Packets with a source of the guest's choosing: any that leaves the sandbox's
    /// namespace with a source other than its link's is an escape (seen on the host's end of
    /// the link); the control's own-address packets must be seen there and reach the
    /// recorder.
    Spoof,
}

/// One probe.
#[derive(Debug, Clone)]
struct Probe {
    name: &'static str,
    function: &'static str,
    args: Value,
    control: Value,
    judge: Judge,
    /// Whether it may break its sandbox (run in a fresh one as root).
    destructive: bool,
    /// Whether its sandbox is asked to run a command after it even when the probe's own call
    /// failed (reported, not judged: a hung guest costs the check's daemon's 6 s agent
    /// timeout).
    answers_after: bool,
}

impl Probe {
    fn new(name: &'static str, function: &'static str, args: Value, control: Value) -> Probe {
        Probe {
            name,
            function,
            args,
            control,
            judge: Judge::Guest,
            destructive: false,
            answers_after: false,
        }
    }

    fn judged(mut self, judge: Judge) -> Probe {
        self.judge = judge;
        self
    }

    fn destructive(mut self) -> Probe {
        self.destructive = true;
        self
    }

    fn answers_after(mut self) -> Probe {
        self.answers_after = true;
        self
    }
}

/// What the probes aim at, learnt from the check's daemon and the host.
#[derive(Debug, Clone)]
struct Targets {
    api_port: u16,
    decoy_port: u16,
    service: Ipv4Addr,
    pool: String,
    /// The prober's link: the host's end.
    link_host: Ipv4Addr,
    /// The neighbour's link: the host's end and the sandbox's end.
    neighbour_host: Ipv4Addr,
    neighbour_link: Ipv4Addr,
    /// The egress interface's address (what the decoy internet sees sandboxes as).
    egress: Ipv4Addr,
    /// The test DNS server in the decoy namespace.
    dns: Ipv4Addr,
    /// An address of the host on its own uplink, if it has one.
    uplink: Option<Ipv4Addr>,
    /// The prober's VMM's monitor socket on the host.
    monitor: String,
}

fn probes(t: &Targets) -> Vec<Probe> {
    let web = WEB.to_string();
    // A connect that gets through ends at the first bytes its server sends (the test server
    // greets at once and keeps the connection open: reading to its end would wait out the
    // read timeout); probe and control run the same code.
    let reach_web = json!({"host": web, "port": 7000, "until_data": true});
    let tcp = |host: String, port: u16| json!({"host": host, "port": port, "until_data": true});
    let http = |host: String, name: &str, expect: &str| {
        json!({"host": host, "port": 80, "expect": expect,
               "send": format!("GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n")})
    };
    // A TCP connect to a host and port, its control the same to a test server.
    let reach = |name: &'static str, host: String, port: u16| {
        Probe::new(name, "connect", tcp(host, port), reach_web.clone())
    };
    // A probe that acts inside its guest (as root, in a sandbox of its own); its control
    // runs it dry (shows it has the access it needs, changes nothing).
    let inside = |name: &'static str, function: &'static str, args: Value| {
        Probe::new(name, function, args, json!({"dry": true})).destructive()
    };
    let mut list = vec![
        reach("daemon API on the guest's gateway", GATEWAY.into(), t.api_port),
        reach("host service on the guest's gateway", GATEWAY.into(), t.decoy_port),
        reach("host service on the daemon's service address", t.service.to_string(), t.decoy_port),
        reach("host service on the host's end of the link", t.link_host.to_string(), t.decoy_port),
        reach("host service on the egress address", t.egress.to_string(), t.decoy_port),
        Probe::new(
            "host loopback (daemon API) by a hand-made frame",
            "frame_syn",
            json!({"dst": "127.0.0.1", "port": t.api_port}),
            json!({"dst": web, "port": 7000}),
        ),
        Probe::new(
            "host loopback (host service) by a hand-made frame",
            "frame_syn",
            json!({"dst": "127.0.0.1", "port": t.decoy_port}),
            json!({"dst": web, "port": 7000}),
        ),
        Probe::new(
            "cloud metadata 169.254.169.254",
            "connect",
            http(METADATA.to_string(), "169.254.169.254", "hello from"),
            http(web.clone(), "web.test", "hello from"),
        ),
        Probe::new(
            "cloud metadata by DNS rebinding",
            "resolve_connect",
            json!({"name": "rebind.test", "port": 80}),
            json!({"name": "web.test", "port": 80}),
        ),
        Probe::new(
            "cloud metadata through the egress proxy",
            "connect",
            http(t.service.to_string(), "169.254.169.254", "hello from 169.254"),
            http(t.service.to_string(), "web.test", "hello from"),
        ),
        reach("RFC 1918 LAN address", LAN.to_string(), 7000),
        Probe::new(
            "LAN by DNS rebinding",
            "resolve_connect",
            json!({"name": "lan.test", "port": 7000}),
            json!({"name": "web.test", "port": 7000}),
        ),
        Probe::new(
            "LAN through the egress proxy",
            "connect",
            http(t.service.to_string(), "lan.test", "hello from 10.99"),
            http(t.service.to_string(), "web.test", "hello from"),
        ),
        Probe::new(
            "DNS rebinding asked of another server",
            "dns_direct",
            json!({"server": t.dns.to_string(), "name": "rebind.test", "forbidden": METADATA.to_string()}),
            json!({"server": t.dns.to_string(), "name": "web.test", "forbidden": web}),
        ),
        reach("neighbour sandbox by its link address", t.neighbour_link.to_string(), NEIGHBOUR_PORT),
        reach("neighbour sandbox by its host-side address", t.neighbour_host.to_string(), NEIGHBOUR_PORT),
        Probe::new(
            "every sandbox address of the pool",
            "scan",
            json!({"cidr": t.pool, "port": NEIGHBOUR_PORT}),
            json!({"cidr": "198.51.100.0/28", "port": 7000, "until_first": true}),
        ),
        Probe::new(
            "IPv6 neighbours on the link",
            "ipv6_neighbours",
            json!({}),
            json!({"dst": "::1", "own_counts": true}),
        ),
        Probe::new(
            "ARP claims for the gateway and the neighbour",
            "arp_claim",
            json!({"claim": [GATEWAY, t.neighbour_link.to_string(), t.neighbour_host.to_string(), t.link_host.to_string()]}),
            json!({"claim": ["172.31.255.2"]}),
        )
        .judged(Judge::Arp),
        Probe::new(
            "IP spoofing (neighbour, LAN and host sources)",
            "udp_spoof",
            json!({"src": [t.neighbour_link.to_string(), LAN.to_string(), t.egress.to_string()],
                   "dst": web, "port": RECORDER_PORT, "token": "spoof"}),
            json!({"src": ["172.31.255.2"], "dst": web, "port": RECORDER_PORT, "token": "spoof-control"}),
        )
        .judged(Judge::Spoof),
        Probe::new(
            "packets of no connection (left untranslated by NAT)",
            "invalid_packets",
            json!({"dst": web, "port": RECORDER_PORT}),
            json!({"valid": true, "dst": web, "port": RECORDER_PORT, "token": "invalid-control"}),
        )
        .judged(Judge::Spoof),
        Probe::new(
            "host's other devices and vsock",
            "host_channels",
            json!({"allowed": [1, 2, 3], "ports": ["kiln.agent"]}),
            json!({"allowed": [], "ports": []}),
        ),
        Probe::new(
            "VMM monitor socket by its host path",
            "unix_socket",
            json!({"path": t.monitor}),
            json!({"path": t.monitor, "listen": true}),
        ),
        Probe::new(
            "MAC spoofing",
            "mac_spoof",
            json!({"mac": "02:00:5e:00:53:01", "host": web, "port": RECORDER_PORT, "token": "mac"}),
            json!({"mac": GUEST_MAC, "host": web, "port": RECORDER_PORT, "token": "mac-control"}),
        )
        .judged(Judge::Recorder)
        .destructive(),
        inside("garbage into virtio queues through /dev/mem", "devmem_poke", json!({"seed": 7})),
        inside("garbage to the chipset's I/O ports", "ioport_poke", json!({"seed": 7})),
        Probe::new(
            "console flood",
            "console_flood",
            json!({"seconds": 5}),
            json!({"seconds": 0.2, "dry": true}),
        )
        .destructive(),
        inside("garbage to the host's agent client", "agent_garbage", json!({"seed": 7}))
        .answers_after(),
        inside("a guest that never answers", "agent_hang", json!({})),
        inside("guest kernel crash", "kernel_panic", json!({})),
        inside("raw writes over the root disk", "disk_overwrite", json!({"mib": 16})),
    ];
    if let Some(uplink) = t.uplink {
        list.insert(
            5,
            reach(
                "host service on the host's uplink address",
                uplink.to_string(),
                t.decoy_port,
            ),
        );
    }
    list
}

/// A run of a probe's script in a guest.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
struct GuestReport {
    reached: bool,
    detail: String,
    /// It did what it tries inside its own guest (wrote to a device, stopped the agent).
    #[serde(default)]
    acted: bool,
    /// The exec running it failed: the probe broke its sandbox's agent, or its guest.
    #[serde(skip)]
    exec_failed: bool,
}

/// What arrived where it must not, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Decoys {
    counts: BTreeMap<&'static str, usize>,
    /// Recorder arrivals: (source, token).
    recorded: Vec<(Ipv4Addr, String)>,
    /// Neighbour-table entries with the guest's MAC, on the host and in the neighbour's
    /// namespace.
    arp: Vec<String>,
}

impl Decoys {
    /// What reached a decoy between `self` and `after`: decoy hits, recorder arrivals from
    /// anywhere but the sandboxes' egress address `egress`, MACs learnt.
    fn arrivals_until(&self, after: &Decoys, egress: Ipv4Addr) -> Vec<String> {
        let mut evidence = Vec::new();
        for (name, count) in &after.counts {
            let was = self.counts.get(name).copied().unwrap_or_default();
            if *count > was {
                evidence.push(format!("{} arrival(s) at the {name} decoy", count - was));
            }
        }
        for (source, token) in after.recorded.iter().skip(self.recorded.len()) {
            if *source != egress {
                evidence.push(format!(
                    "{token:?} arrived from {source}, not the sandbox's egress address"
                ));
            }
        }
        for entry in after.arp.iter().filter(|e| !self.arp.contains(e)) {
            evidence.push(format!("the guest's MAC learnt: {entry}"));
        }
        evidence
    }
}

/// One run's verdict.
#[derive(Debug, Clone, Serialize)]
struct Run {
    verdict: String,
    detail: String,
    evidence: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct ProbeReport {
    probe: String,
    seconds: f64,
    root: Run,
    unprivileged: Run,
    control: Run,
}

#[derive(Debug, Serialize)]
struct EscapeReport {
    template: String,
    probes: Vec<ProbeReport>,
    template_intact_after: bool,
    neighbour_listener_alive_after: bool,
    sandboxes_left: usize,
    seconds: f64,
    passed: bool,
}

/// Runs the check. Returns whether it passed.
pub async fn escape(options: &EscapeOptions) -> Result<bool> {
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "kiln check escape makes namespaces and runs a daemon with networking: run it as root"
    );
    let started = Instant::now();
    let mut internet = tokio::task::spawn_blocking(|| {
        let mut internet = TestInternet::new(0);
        internet.start_dns();
        internet
    })
    .await?;
    let recorder = Recorder::start(internet.namespace(), SocketAddr::from((WEB, RECORDER_PORT)))?;
    let host_decoy = HostDecoy::start()?;
    let network = internet.network_config();
    let daemon = EscapeDaemon::start(options, &network, internet.gateway).await?;
    let outcome = run(
        options,
        &daemon,
        &mut internet,
        &recorder,
        &host_decoy,
        &network,
    )
    .await;
    let stopped = daemon.daemon.stop();
    drop(internet);
    let failed = !matches!(&outcome, Ok(report) if report.passed) || stopped.is_err();
    if failed {
        // The daemon's log goes with its directory: kept for whoever looks into it.
        let kept = std::env::temp_dir().join(format!("kiln-escape-{}.log", std::process::id()));
        if std::fs::copy(daemon._dir.path().join("daemon.log"), &kept).is_ok() {
            eprintln!(
                "escape: the check's daemon's log is kept in {}",
                kept.display()
            );
        }
    }
    let mut report = outcome?;
    stopped?;
    report.seconds = started.elapsed().as_secs_f64();
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(report.passed)
}

/// Facts about one sandbox on the host.
#[derive(Debug, Clone)]
struct Sandbox {
    id: String,
    namespace: String,
    link_host: Ipv4Addr,
    link_guest: Ipv4Addr,
    /// The index of the host's end of its link (where what it sends leaves its namespace).
    host_interface: u32,
}

async fn run(
    options: &EscapeOptions,
    daemon: &EscapeDaemon,
    internet: &mut TestInternet,
    recorder: &Recorder,
    host_decoy: &HostDecoy,
    network: &kiln_network::NetworkConfig,
) -> Result<EscapeReport> {
    let client = daemon.daemon.client(&daemon.key);
    let checker = Checker {
        client: &client,
        template: &options.template,
        prefix: &network.prefix,
        last: Mutex::new(None),
        servers: Mutex::new(BTreeSet::new()),
    };
    eprintln!("escape: a neighbour, a prober and a control sandbox ...");
    let neighbour = checker.sandbox().await?;
    checker
        .exec(&neighbour.id, "root", &["sh", "-c", ": > /tmp/hits"])
        .await?;
    let listener = client
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{}/exec", neighbour.id),
        )
        .json(&json!({"command": ["python3", "-c", NEIGHBOUR_LISTENER], "background": true}));
    client.send(listener).await?;
    let prober = checker.sandbox().await?;
    let control = checker.sandbox().await?;
    // Their probe servers start (Python, seconds under TCG) while the decoys are proved.
    checker.start_server(&prober, "root").await?;
    checker.start_server(&control, "root").await?;
    if !options.root_only {
        checker.start_server(&prober, UNPRIVILEGED).await?;
    }
    // The decoys record: proved once from the host before any probe.
    let mut recorded = false;
    for _ in 0..50 {
        if knock(&neighbour.namespace) {
            recorded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(recorded, "the neighbour's listener never answered");
    drop(TcpStream::connect(("127.0.0.1", host_decoy.port)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = checker
        .decoys(internet, recorder, host_decoy, &neighbour)
        .await?;
    ensure!(
        baseline.counts.get("neighbour listener") == Some(&1) && host_decoy.count() == 1,
        "the decoys did not record the host's own connections: {baseline:?}"
    );
    let checksum = checker
        .exec(&neighbour.id, "root", &["md5sum", "/usr/bin/python3"])
        .await?
        .detail;
    let targets = Targets {
        api_port: daemon.daemon.port,
        decoy_port: host_decoy.port,
        service: network_service(network),
        pool: network.pool.to_string(),
        link_host: prober.link_host,
        neighbour_host: neighbour.link_host,
        neighbour_link: neighbour.link_guest,
        egress: internet.host_end,
        dns: internet.gateway,
        uplink: uplink_address(),
        monitor: monitor_path(&daemon.daemon.data_dir, &prober.id),
    };
    let mut reports = Vec::new();
    for probe in probes(&targets) {
        eprintln!("escape: {}", probe.name);
        let probe_started = Instant::now();
        let unprivileged = if options.root_only {
            Run {
                verdict: "not run".into(),
                detail: "--root-only".into(),
                evidence: Vec::new(),
            }
        } else {
            checker
                .attempt(
                    &probe,
                    &probe.args,
                    UNPRIVILEGED,
                    &prober,
                    &neighbour,
                    internet,
                    recorder,
                    host_decoy,
                )
                .await?
        };
        let root = if probe.destructive {
            let victim = checker.sandbox().await?;
            let run = checker
                .attempt(
                    &probe,
                    &probe.args,
                    "root",
                    &victim,
                    &neighbour,
                    internet,
                    recorder,
                    host_decoy,
                )
                .await?;
            // What the guest could make the host keep: its console log is capped.
            let console = console_bytes(&daemon.daemon.data_dir, &victim.id);
            let mut run = run;
            run.detail = format!(
                "{}; console log on the host {} KiB",
                run.detail,
                console >> 10
            );
            if console > 2 * kiln_vmm::output::CONSOLE_LOG_CAP {
                run.verdict = "HOST AFFECTED".into();
                run.evidence
                    .push(format!("the console log grew to {console} bytes"));
            }
            let started = Instant::now();
            let destroyed = delete(&client, &victim.id).await;
            match destroyed {
                Ok(()) => run,
                Err(e) => Run {
                    verdict: "HOST AFFECTED".into(),
                    detail: format!(
                        "its sandbox could not be destroyed after {:.1} s: {e:#}",
                        started.elapsed().as_secs_f64()
                    ),
                    evidence: run.evidence,
                },
            }
        } else {
            checker
                .attempt(
                    &probe,
                    &probe.args,
                    "root",
                    &prober,
                    &neighbour,
                    internet,
                    recorder,
                    host_decoy,
                )
                .await?
        };
        let control_run = checker
            .control(&probe, &control, &neighbour, internet, recorder, host_decoy)
            .await?;
        reports.push(ProbeReport {
            probe: probe.name.to_owned(),
            seconds: probe_started.elapsed().as_secs_f64(),
            root,
            unprivileged,
            control: control_run,
        });
    }
    // The neighbour's listener still records (or its zero counts proved nothing).
    let before_knock = checker
        .decoys(internet, recorder, host_decoy, &neighbour)
        .await?;
    let knocked = knock(&neighbour.namespace);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_knock = checker
        .decoys(internet, recorder, host_decoy, &neighbour)
        .await?;
    let listener_alive = knocked
        && after_knock.counts.get("neighbour listener")
            > before_knock.counts.get("neighbour listener");
    // The template and the neighbour are as they were: a new sandbox runs, the neighbour's
    // files read the same.
    let fresh = checker.sandbox().await?;
    let intact = checker
        .exec(&fresh.id, "root", &["md5sum", "/usr/bin/python3"])
        .await
        .is_ok_and(|r| r.detail == checksum)
        && checker
            .exec(&neighbour.id, "root", &["md5sum", "/usr/bin/python3"])
            .await
            .is_ok_and(|r| r.detail == checksum);
    for sandbox in [&fresh, &prober, &control, &neighbour] {
        delete(&client, &sandbox.id).await?;
    }
    let left = client
        .json::<SandboxList>(client.request(Method::GET, "/v1/sandboxes?limit=500"))
        .await?
        .sandboxes
        .len();
    let passed = intact
        && listener_alive
        && left == 0
        && reports.iter().all(|r| {
            [&r.root, &r.unprivileged]
                .iter()
                .all(|run| matches!(run.verdict.as_str(), "blocked" | "contained" | "not run"))
                && r.control.verdict == "noticed"
        });
    Ok(EscapeReport {
        template: options.template.clone(),
        probes: reports,
        template_intact_after: intact,
        neighbour_listener_alive_after: listener_alive,
        sandboxes_left: left,
        seconds: 0.0,
        passed,
    })
}

/// Connects to the neighbour's listener from inside its namespace (as the host could):
/// whether it was reached. The listener's count must rise by one.
fn knock(namespace: &str) -> bool {
    let Some(ns) = NetNs::existing(namespace) else {
        return false;
    };
    let hit = ns
        .run_in(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from(([172, 31, 255, 2], NEIGHBOUR_PORT)),
                Duration::from_secs(1),
            )
        })
        .is_ok();
    // The namespace is the daemon's: this handle must not remove it.
    ns.detach();
    hit
}

/// The neighbour's listener: notes every connection in `/tmp/hits`.
const NEIGHBOUR_LISTENER: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000))
s.listen(64)
while True:
    c, a = s.accept()
    with open("/tmp/hits", "a") as f:
        f.write(a[0] + "\n")
    c.close()
"#;

/// The pool's first address: the daemon's service address.
fn network_service(network: &kiln_network::NetworkConfig) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(network.pool.network()) + 1)
}

/// The host's address on the interface of its main default route, if it has one.
fn uplink_address() -> Option<Ipv4Addr> {
    let words = |args: &[&str]| -> Option<Vec<String>> {
        let output = std::process::Command::new("ip").args(args).output().ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        Some(text.split_whitespace().map(str::to_owned).collect())
    };
    let after = |words: &[String], key: &str| -> Option<String> {
        words.iter().skip_while(|w| *w != key).nth(1).cloned()
    };
    let device = after(&words(&["-4", "-o", "route", "show", "default"])?, "dev")?;
    let addr = words(&[
        "-4", "-o", "addr", "show", "dev", &device, "scope", "global",
    ])?;
    after(&addr, "inet")?.split('/').next()?.parse().ok()
}

/// Bytes of the sandbox's console log (and its rotated copy) on the host.
fn console_bytes(data_dir: &std::path::Path, id: &str) -> u64 {
    let run = data_dir.join("sandboxes").join(id).join("run");
    ["console.log", "console.log.1"]
        .iter()
        .filter_map(|name| std::fs::metadata(run.join(name)).ok())
        .map(|m| m.len())
        .sum()
}

/// Where the sandbox's VMM's monitor socket is on the host (the probe looks for it from the
/// guest).
fn monitor_path(data_dir: &std::path::Path, id: &str) -> String {
    data_dir
        .join("sandboxes")
        .join(id)
        .join("run/qmp.sock")
        .display()
        .to_string()
}

struct Checker<'a> {
    client: &'a Client,
    template: &'a str,
    prefix: &'a str,
    /// The decoys as last read (after the previous probe: the next one's "before").
    last: Mutex<Option<Decoys>>,
    /// The sandboxes and users whose probe server runs.
    servers: Mutex<BTreeSet<(String, String)>>,
}

impl Checker<'_> {
    /// A sandbox with the probes' script in it, and its link's addresses.
    async fn sandbox(&self) -> Result<Sandbox> {
        let request = self
            .client
            .request(Method::POST, "/v1/sandboxes")
            .json(&json!({"template": self.template, "ttl_secs": 1200}))
            .timeout(CALL_TIMEOUT);
        let id = self.client.json::<SandboxBody>(request).await?.id;
        let upload = self
            .client
            .request(Method::PUT, &format!("/v1/sandboxes/{id}/files/content"))
            .query(&[("path", SCRIPT_PATH)])
            .body(SCRIPT)
            .timeout(CALL_TIMEOUT);
        self.client.send(upload).await?;
        self.exec(&id, "root", &["chmod", "0755", SCRIPT_PATH])
            .await?;
        let namespace = format!("{}{id}", self.prefix);
        let output = std::process::Command::new("ip")
            .args(["-n", &namespace, "-4", "-o", "addr", "show", "dev", "up0"])
            .output()
            .context("ip")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let link_guest: Ipv4Addr = text
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next()?.parse().ok())
            .with_context(|| format!("no link address in {namespace}: {text}"))?;
        let link_host = Ipv4Addr::from(u32::from(link_guest) & !1);
        Ok(Sandbox {
            id,
            namespace,
            link_host,
            link_guest,
            host_interface: interface_with(link_host)?,
        })
    }

    /// Runs `argv` as `user`; the exec's error, if any, as an unreached report.
    async fn exec(&self, id: &str, user: &str, argv: &[&str]) -> Result<GuestReport> {
        let request = self
            .client
            .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
            .timeout(Duration::from_secs(90))
            .json(&json!({"command": argv, "user": user, "cwd": "/tmp", "timeout_ms": 30_000}));
        let result: ExecResultBody = self.client.json(request).await?;
        ensure!(
            result.exit_code == Some(0),
            "`{}` exited {:?}: {}",
            argv.join(" "),
            result.exit_code,
            result.stderr
        );
        Ok(GuestReport {
            detail: result.stdout.trim().to_owned(),
            ..GuestReport::default()
        })
    }

    /// Starts the probe server of `user` in `sandbox` unless it runs; the first probe's
    /// exec waits until it is ready.
    async fn start_server(&self, sandbox: &Sandbox, user: &str) -> Result<()> {
        let key = (sandbox.id.clone(), user.to_owned());
        if self.servers.lock().expect("servers").contains(&key) {
            return Ok(());
        }
        let request = self
            .client
            .request(Method::POST, &format!("/v1/sandboxes/{}/exec", sandbox.id))
            .timeout(CALL_TIMEOUT)
            .json(&json!({
                "command": ["python3", SCRIPT_PATH, "serve"],
                "user": user,
                "cwd": "/tmp",
                "background": true,
            }));
        self.client.send(request).await?;
        self.servers.lock().expect("servers").insert(key);
        Ok(())
    }

    /// The probe's script in a guest; an exec that fails is a probe that did not get through.
    async fn probe(
        &self,
        sandbox: &Sandbox,
        user: &str,
        function: &str,
        args: &Value,
    ) -> GuestReport {
        let args = args.to_string();
        let ran = match self.start_server(sandbox, user).await {
            Ok(()) => {
                self.exec(
                    &sandbox.id,
                    user,
                    &["sh", "-c", ASK_SERVER, "sh", function, &args],
                )
                .await
            }
            Err(e) => Err(e.context("starting the probe server")),
        };
        match ran {
            Ok(report) => serde_json::from_str(report.detail.lines().last().unwrap_or(""))
                .unwrap_or(GuestReport {
                    detail: format!("no report: {}", report.detail),
                    ..GuestReport::default()
                }),
            Err(e) => GuestReport {
                detail: format!("the exec failed: {e:#}"),
                exec_failed: true,
                ..GuestReport::default()
            },
        }
    }

    /// Counts at every decoy.
    async fn decoys(
        &self,
        internet: &TestInternet,
        recorder: &Recorder,
        host_decoy: &HostDecoy,
        neighbour: &Sandbox,
    ) -> Result<Decoys> {
        let mut counts = BTreeMap::new();
        counts.insert("metadata 169.254.169.254", internet.hits(METADATA));
        counts.insert("LAN 10.99.0.1", internet.hits(LAN));
        counts.insert("host service", host_decoy.count());
        // A file read, not an exec: no process to start in the guest (a third of a second
        // under TCG, twice per probe).
        let hits = self
            .client
            .send(
                self.client
                    .request(
                        Method::GET,
                        &format!(
                            "/v1/sandboxes/{}/files/content?path=/tmp/hits",
                            neighbour.id
                        ),
                    )
                    .timeout(CALL_TIMEOUT),
            )
            .await
            .context("the neighbour does not answer")?
            .bytes()
            .await
            .context("the neighbour's count")?;
        counts.insert(
            "neighbour listener",
            hits.iter().filter(|&&byte| byte == b'\n').count(),
        );
        let mut arp = Vec::new();
        for namespace in [None, Some(neighbour.namespace.as_str())] {
            let mut command = std::process::Command::new("ip");
            if let Some(ns) = namespace {
                command.args(["-n", ns]);
            }
            let output = command
                .args(["neigh", "show"])
                .output()
                .context("ip neigh")?;
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                // Every guest has the same MAC: the neighbour's own guest is no claim.
                let own_guest = namespace.is_some() && line.starts_with("172.31.255.2 ");
                if line.contains(GUEST_MAC) && !own_guest {
                    // Address and MAC only: the entry's state changes by itself.
                    let address = line.split_whitespace().next().unwrap_or_default();
                    arp.push(format!(
                        "{}: {address} {GUEST_MAC}",
                        namespace.unwrap_or("host")
                    ));
                }
            }
        }
        Ok(Decoys {
            counts,
            recorded: recorder.arrivals(),
            arp,
        })
    }

    /// The decoys before a run: as the previous run left them, so nothing that arrives
    /// between runs goes unseen.
    async fn before(
        &self,
        internet: &TestInternet,
        recorder: &Recorder,
        host_decoy: &HostDecoy,
        neighbour: &Sandbox,
    ) -> Result<Decoys> {
        let last = self.last.lock().expect("decoys").take();
        match last {
            Some(decoys) => Ok(decoys),
            None => self.decoys(internet, recorder, host_decoy, neighbour).await,
        }
    }

    /// One probe as `user` in `sandbox`, judged.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        probe: &Probe,
        args: &Value,
        user: &str,
        sandbox: &Sandbox,
        neighbour: &Sandbox,
        internet: &TestInternet,
        recorder: &Recorder,
        host_decoy: &HostDecoy,
    ) -> Result<Run> {
        let before = self
            .before(internet, recorder, host_decoy, neighbour)
            .await?;
        let capture = Capture::open(sandbox.host_interface)?;
        let report = self.probe(sandbox, user, probe.function, args).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut evidence = Vec::new();
        let captured = capture.take();
        for source in captured.sources {
            if source != sandbox.link_guest {
                evidence.push(format!(
                    "a packet from {source} left the sandbox's namespace"
                ));
            }
        }
        if captured.dropped > 0 {
            evidence.push(format!(
                "the capture on the host's end of the link missed {} packets: what left is not known",
                captured.dropped
            ));
        }
        let health = self
            .client
            .send(
                self.client
                    .request(Method::GET, "/v1/health")
                    .timeout(CALL_TIMEOUT),
            )
            .await;
        if let Err(e) = &health {
            evidence.push(format!("the daemon does not answer: {e:#}"));
        }
        let after = match self.decoys(internet, recorder, host_decoy, neighbour).await {
            Ok(after) if health.is_ok() => after,
            Ok(_) => {
                return Ok(Run {
                    verdict: "HOST AFFECTED".into(),
                    detail: report.detail,
                    evidence,
                })
            }
            Err(e) => {
                evidence.push(format!("{e:#}"));
                return Ok(Run {
                    verdict: "HOST AFFECTED".into(),
                    detail: report.detail,
                    evidence,
                });
            }
        };
        *self.last.lock().expect("decoys") = Some(after.clone());
        evidence.extend(before.arrivals_until(&after, internet.host_end));
        let acted_inside = after
            .recorded
            .iter()
            .skip(before.recorded.len())
            .any(|(source, _)| *source == internet.host_end);
        let mut detail = report.detail.clone();
        let mut answers = None;
        if probe.answers_after && user == "root" {
            let answered = self.answers(sandbox).await;
            detail = format!("{detail}; runs a command after: {answered}");
            answers = Some(answered);
        }
        if probe.judge == Judge::Guest && report.reached {
            evidence.push(format!("the probe reached its target: {}", report.detail));
        }
        let own_sandbox = probe.destructive && user == "root";
        let verdict = if !evidence.is_empty() {
            "ESCAPED"
        } else if report.exec_failed && !own_sandbox {
            // The shared prober broke (or the probe did not run): later probes in it would
            // prove nothing.
            "INCONCLUSIVE"
        } else if acted_inside
            || report.acted
            || report.exec_failed
            || (own_sandbox
                && !match answers {
                    Some(answered) => answered,
                    None => self.answers(sandbox).await,
                })
        {
            // An unprivileged user must not get as far as acting inside the guest.
            if user == "root" {
                "contained"
            } else {
                "NOT BLOCKED"
            }
        } else {
            "blocked"
        };
        Ok(Run {
            verdict: verdict.into(),
            detail,
            evidence,
        })
    }

    /// Whether the sandbox still runs a command (bounded: a hung guest costs the daemon's
    /// agent timeout).
    async fn answers(&self, sandbox: &Sandbox) -> bool {
        self.exec(&sandbox.id, "root", &["true"]).await.is_ok()
    }

    /// The probe's negative control, as root: it must notice what it was pointed at, and
    /// nothing may reach a decoy meanwhile.
    async fn control(
        &self,
        probe: &Probe,
        sandbox: &Sandbox,
        neighbour: &Sandbox,
        internet: &TestInternet,
        recorder: &Recorder,
        host_decoy: &HostDecoy,
    ) -> Result<Run> {
        let before = self
            .before(internet, recorder, host_decoy, neighbour)
            .await?;
        let rx_before = tap_received(&sandbox.namespace);
        let capture = Capture::open(sandbox.host_interface)?;
        let report = self
            .probe(sandbox, "root", probe.function, &probe.control)
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let recorded = recorder.arrivals().len() > before.recorded.len();
        let noticed = match probe.judge {
            Judge::Guest => report.reached,
            Judge::Recorder => recorded,
            Judge::Arp => tap_received(&sandbox.namespace) >= rx_before + 5,
            // The capture sees what leaves the namespace, and the recorder gets it.
            Judge::Spoof => recorded && capture.take().sources.contains(&sandbox.link_guest),
        };
        let after = self
            .decoys(internet, recorder, host_decoy, neighbour)
            .await?;
        *self.last.lock().expect("decoys") = Some(after.clone());
        let evidence = before.arrivals_until(&after, internet.host_end);
        let verdict = if !evidence.is_empty() {
            "ESCAPED"
        } else if noticed {
            "noticed"
        } else {
            "MISSED"
        };
        Ok(Run {
            verdict: verdict.into(),
            detail: report.detail,
            evidence,
        })
    }
}

/// Longest a call to the check's daemon that is not an exec may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The check's own daemon, with the decoy namespace as its only uplink, a key and the
/// template baked.
struct EscapeDaemon {
    daemon: Daemon,
    key: String,
    _dir: tempfile::TempDir,
}

impl EscapeDaemon {
    async fn start(
        options: &EscapeOptions,
        network: &kiln_network::NetworkConfig,
        dns: Ipv4Addr,
    ) -> Result<EscapeDaemon> {
        let dir = tempfile::Builder::new().prefix("kiln-escape.").tempdir()?;
        let mut extra: Vec<String> = [
            "--network",
            "on",
            "--network-pool",
            &network.pool.to_string(),
            "--name-prefix",
            &network.prefix,
            "--route-table",
            &network.route_table.to_string(),
            "--egress-interface",
            network.egress_interface.as_deref().unwrap_or_default(),
            "--dns-upstream",
            &format!("{dns}:53"),
            "--default-template",
            &options.template,
            // A probe that silences its agent costs this long (its exec's stream ends when
            // the agent misses a keep-alive ping, sent every 3 s), not the default 30 s; the
            // probes' own calls answer in a second or two, and agents answer pings in
            // milliseconds even under abuse (`kiln check abuse`).
            "--agent-call-timeout-secs",
            "6",
        ]
        .map(String::from)
        .to_vec();
        if let Some(gateway) = network.egress_gateway {
            extra.extend(["--egress-gateway".to_owned(), gateway.to_string()]);
        }
        let bakes = BakeCache::new(&options.inputs);
        let seeded = bakes.seed(&dir.path().join("state"), &options.template);
        let daemon = Daemon::start(
            &options.inputs,
            &dir.path().join("state"),
            &dir.path().join("daemon.log"),
            &extra,
        )
        .await?;
        let key = daemon.key("escape-check")?;
        eprintln!(
            "escape: baking {} for the check's daemon{} ...",
            options.template,
            crate::check_daemon::kept_note(seeded)
        );
        daemon
            .bake(&daemon.client(&key), &options.template)
            .await
            .with_context(|| daemon.log_tail())?;
        bakes.keep(&daemon.data_dir, &options.template);
        Ok(EscapeDaemon {
            daemon,
            key,
            _dir: dir,
        })
    }
}

fn print_report(report: &EscapeReport) {
    println!(
        "escape probes ({} template, {:.0} s):",
        report.template, report.seconds
    );
    println!(
        "{:<50} {:<13} {:<13} {:<8} {:>6}",
        "probe", "as root", "as nobody", "control", "s"
    );
    for p in &report.probes {
        println!(
            "{:<50} {:<13} {:<13} {:<8} {:>6.1}",
            p.probe, p.root.verdict, p.unprivileged.verdict, p.control.verdict, p.seconds
        );
    }
    for p in &report.probes {
        for (who, run) in [
            ("root", &p.root),
            ("nobody", &p.unprivileged),
            ("control", &p.control),
        ] {
            let bad = !matches!(
                run.verdict.as_str(),
                "blocked" | "contained" | "noticed" | "not run"
            );
            if bad {
                println!(
                    "{}, {who}: {} ({}) {:?}",
                    p.probe, run.verdict, run.detail, run.evidence
                );
            }
        }
    }
    println!(
        "template and neighbour intact after: {}",
        report.template_intact_after
    );
    println!(
        "the neighbour's listener still records after: {}",
        report.neighbour_listener_alive_after
    );
    println!("sandboxes left: {}", report.sandboxes_left);
    println!(
        "result: {}",
        if report.passed { "passed" } else { "FAILED" }
    );
}
