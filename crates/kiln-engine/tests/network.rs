//! Sandbox networking with real guests (QEMU, TCG here): egress through a test internet
//! namespace the test makes (never the machine's uplink), by each sandbox's policy, changed
//! live; decoys and the host unreachable; the guest's identity fixed, also in a fork's child
//! and after a pause and resume; nothing left after, also after 50 sandboxes made and destroyed.

use std::time::Duration;

use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};
use kiln_network::policy::{Destination, EgressPolicy};
use kiln_testinfra::internet::{TestInternet, LAN, METADATA, OTHER_WEB, WEB};

/// Connects from the guest with bash's /dev/tcp and prints the server's greeting, or
/// `refused` (with how long the attempt took, so a silent drop would show).
async fn connect(sandbox: &Sandbox, host: std::net::Ipv4Addr, port: u16) -> String {
    let script = format!(
        "start=$(date +%s%N); if timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}; head -n1 <&3'; then :; \
         else echo \"refused after $(( ($(date +%s%N) - start) / 1000000 )) ms\"; fi"
    );
    kiln_testinfra::sh(sandbox.agent(), &script).await
}

fn refused_quickly(outcome: &str) -> bool {
    outcome
        .strip_prefix("refused after ")
        .and_then(|ms| ms.trim_end_matches(" ms").parse::<u64>().ok())
        .is_some_and(|ms| ms < 4000)
}

fn policy(internet: bool, allow: &[&str]) -> EgressPolicy {
    EgressPolicy {
        internet,
        allow_out: allow
            .iter()
            .map(|e| Destination::parse(e).expect("entry"))
            .collect(),
        deny_out: Vec::new(),
        bandwidth_mbit: None,
        max_connections: None,
    }
}

/// An engine with networking by `config`, the base template baked and a VMM pre-started.
struct World {
    engine: Engine,
    network: std::sync::Arc<kiln_network::Network>,
    template: kiln_engine::BakedTemplate,
    _cleanup: kiln_testinfra::internet::ShutdownOnDrop,
    _data: tempfile::TempDir,
}

impl World {
    async fn new(config: kiln_network::NetworkConfig) -> World {
        let data = tempfile::tempdir().expect("data dir");
        let engine = Engine::new(EngineConfig {
            network: Some(config),
            ..EngineConfig::new(data.path())
        })
        .expect("engine");
        let network = engine.network().expect("networking").clone();
        let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
            .await
            .expect("build");
        let template = engine.bake(&images).await.expect("bake");
        engine.prestart(&template);
        World {
            engine,
            _cleanup: kiln_testinfra::internet::ShutdownOnDrop(network.clone()),
            network,
            template,
            _data: data,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_reach_the_test_internet_by_their_policy_and_nothing_else() {
    let mut internet = TestInternet::new(0);
    let upstream = internet.start_dns();
    let world = World::new(kiln_network::NetworkConfig {
        dns_upstreams: vec![upstream],
        ..internet.network_config()
    })
    .await;
    let (engine, network, template) = (&world.engine, &world.network, world.template.clone());

    // Internet on (the default): the test internet answers.
    let a = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    assert_eq!(a.egress(), Some(EgressPolicy::open(true)));
    assert_eq!(
        connect(&a, WEB, 7000).await,
        format!("hello from {WEB}:7000")
    );
    // Decoys and the host fail at connect; nothing arrives.
    for (host, port) in [
        (METADATA, 7000),
        (LAN, 7000),
        (internet.host_end, 22),
        (network.service_address(), 22),
    ] {
        let outcome = connect(&a, host, port).await;
        assert!(refused_quickly(&outcome), "{host}:{port}: {outcome}");
    }
    assert_eq!(internet.hits(METADATA) + internet.hits(LAN), 0);
    // The guest's identity is the template's in every sandbox.
    let identity = "ip -4 -o addr show eth0 | awk '{print $4}'; cat /sys/class/net/eth0/address; cat /etc/resolv.conf";
    let seen = kiln_testinfra::sh(a.agent(), identity).await;
    assert!(seen.contains("172.31.255.2/30"), "{seen}");
    assert!(seen.contains(kiln_net::GUEST_MAC), "{seen}");
    assert!(seen.contains("nameserver 172.31.255.1"), "{seen}");
    // Names resolve through kiln's resolver, and HTTP by name goes through.
    assert_eq!(
        kiln_testinfra::sh(a.agent(), "getent hosts web.test | awk '{print $1}'").await,
        WEB.to_string()
    );
    let http = kiln_testinfra::sh(
        a.agent(),
        r#"bash -c 'exec 3<>/dev/tcp/web.test/80; printf "GET / HTTP/1.1\r\nHost: web.test\r\n\r\n" >&3; while IFS= read -r -t 5 line <&3; do case $line in hello*) echo "$line"; break;; esac; done'"#,
    )
    .await;
    assert_eq!(http, format!("hello from {WEB}:80 for web.test"));

    // Internet off, one range allowed; then changed live.
    let b = engine
        .create(
            &template,
            CreateOptions {
                network: Some(policy(false, &["203.0.113.0/24"])),
                ..CreateOptions::default()
            },
        )
        .await
        .expect("create");
    assert_eq!(
        kiln_testinfra::sh(b.agent(), identity).await,
        seen,
        "same identity"
    );
    assert!(refused_quickly(&connect(&b, WEB, 7000).await));
    assert_eq!(
        connect(&b, OTHER_WEB, 7000).await,
        format!("hello from {OTHER_WEB}:7000")
    );
    b.set_egress(policy(true, &[])).expect("open");
    assert_eq!(
        connect(&b, WEB, 7000).await,
        format!("hello from {WEB}:7000")
    );
    let err = b
        .set_egress(policy(false, &["169.254.169.254"]))
        .expect_err("always denied");
    assert!(err.to_string().contains("always denied"), "{err}");
    assert_eq!(
        b.egress(),
        Some(policy(true, &[])),
        "a refused policy changes nothing"
    );

    // A guest cannot reach another sandbox, by its link address or by its own.
    let a_link = a.link().expect("a link");
    let outcome = connect(&b, a_link.sandbox, 7000).await;
    assert!(refused_quickly(&outcome), "{outcome}");

    // A fork's child and a resumed sandbox keep working networking: the same guest identity
    // in a namespace of their own, and the policy in force.
    b.set_egress(policy(false, &["203.0.113.0/24"]))
        .expect("close");
    let (mut children, _) = engine
        .fork(&b, 1, CreateOptions::default())
        .await
        .expect("fork");
    let child = children.pop().expect("a child");
    assert_ne!(child.netns(), b.netns(), "a namespace of its own");
    assert_eq!(child.egress(), b.egress(), "the parent's policy");
    assert_eq!(kiln_testinfra::sh(child.agent(), identity).await, seen);
    b.pause().await.expect("pause");
    b.resume().await.expect("resume");
    for sandbox in [&child, &b] {
        assert_eq!(
            connect(sandbox, OTHER_WEB, 7000).await,
            format!("hello from {OTHER_WEB}:7000"),
            "{}",
            sandbox.id()
        );
        let outcome = connect(sandbox, WEB, 7000).await;
        assert!(refused_quickly(&outcome), "{}: {outcome}", sandbox.id());
    }

    // Everything goes with the sandboxes.
    let namespaces: Vec<String> = [&a, &b, &child]
        .iter()
        .filter_map(|s| s.netns().map(str::to_owned))
        .collect();
    for sandbox in [a, b, child] {
        sandbox.destroy().await.expect("destroy");
    }
    engine.shutdown_prestarted().await;
    assert_eq!(network.links_in_use(), 0, "every link given back");
    for ns in &namespaces {
        assert!(
            !std::path::Path::new("/run/netns").join(ns).exists(),
            "{ns} left"
        );
    }
    engine.close_network();
    let tables = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains(&internet.tag),
        "the host table is gone"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Lines of `program args` that mention `needle`.
fn lines_with(program: &str, args: &[&str], needle: &str) -> Vec<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    // A failed listing prints nothing: it must not pass for an empty one.
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sandboxes_made_and_destroyed_leave_nothing_behind() {
    let internet = TestInternet::new(1);
    let config = internet.network_config();
    let (pool, prefix, route_table) = (config.pool, config.prefix.clone(), config.route_table);
    let world = World::new(config).await;
    let (engine, network, template) = (&world.engine, &world.network, world.template.clone());

    let mut gone = Vec::new();
    for cycle in 0..50 {
        // Every fifth with limits, so their shaping and counting go with the sandbox too.
        let limited = EgressPolicy {
            bandwidth_mbit: Some(100),
            max_connections: Some(64),
            ..EgressPolicy::open(true)
        };
        let sandbox = engine
            .create(
                &template,
                CreateOptions {
                    network: (cycle % 5 == 0).then_some(limited),
                    ..CreateOptions::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("create {cycle}: {e}"));
        if cycle % 10 == 0 {
            assert_eq!(
                connect(&sandbox, WEB, 7000).await,
                format!("hello from {WEB}:7000"),
                "cycle {cycle}"
            );
        }
        let link = sandbox.link().expect("a link");
        gone.push((
            sandbox.netns().expect("netns").to_owned(),
            network.host_interface(link.slot),
            sandbox.pid().expect("a VMM"),
            sandbox.cgroup_dirs(),
        ));
        sandbox.destroy().await.expect("destroy");
    }
    engine.shutdown_prestarted().await;

    assert_eq!(network.links_in_use(), 0, "every link given back");
    for (netns, host_if, pid, cgroups) in &gone {
        assert!(
            !std::path::Path::new("/run/netns").join(netns).exists(),
            "{netns} left"
        );
        assert!(
            !std::path::Path::new("/sys/class/net")
                .join(host_if)
                .exists(),
            "{host_if} left"
        );
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "VMM {pid} left"
        );
        for dir in cgroups {
            assert!(!dir.exists(), "{} left", dir.display());
        }
    }
    // Nothing of this daemon's names, pool or table anywhere on the host (the test
    // internet's own namespace and link aside).
    let ours = |name: &str| name.starts_with(&prefix) && !name.ends_with("-inet");
    let links: Vec<String> = lines_with("ip", &["-o", "link"], "")
        .into_iter()
        .filter(|line| {
            let name = line.split(": ").nth(1).unwrap_or_default();
            ours(name.split('@').next().unwrap_or_default())
        })
        .collect();
    assert_eq!(links, Vec::<String>::new());
    let namespaces: Vec<String> = lines_with("ip", &["netns", "list"], "")
        .into_iter()
        .filter(|line| ours(line.split_whitespace().next().unwrap_or_default()))
        .collect();
    assert_eq!(namespaces, Vec::<String>::new());
    let pool_text = pool.to_string();
    for flag in ["-s", "-d"] {
        assert_eq!(
            lines_with("conntrack", &["-L", flag, &pool_text], ""),
            Vec::<String>::new(),
            "tracked connections of the pool ({flag})"
        );
    }
    engine.close_network();
    let table = route_table.to_string();
    assert_eq!(
        lines_with("ip", &["route", "show", "table", &table], ""),
        Vec::<String>::new(),
        "routes of table {table}"
    );
    assert_eq!(
        lines_with("ip", &["rule", "list"], &format!("lookup {table}")),
        Vec::<String>::new()
    );
    assert_eq!(
        lines_with("nft", &["list", "tables"], &internet.tag),
        Vec::<String>::new()
    );
}

/// The flags of host interface lines (`ip -o link`) naming `needle`: `<BROADCAST,UP,...>`.
fn link_flags(needle: &str) -> Vec<Vec<String>> {
    lines_with("ip", &["-o", "link", "show"], needle)
        .iter()
        .map(|line| {
            let flags = line
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .map_or("", |(flags, _)| flags);
            flags.split(',').map(str::to_owned).collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warmed_guest_is_held_closed_until_its_create_gives_it_its_own_identity() {
    let internet = TestInternet::new(2);
    let config = internet.network_config();
    // The hosts' ends of sandbox links (the test internet's own link has the prefix too).
    let links = format!("{}v", config.prefix);
    let world = World::new(config).await;
    let (engine, template) = (&world.engine, world.template.clone());
    // The pre-started VMM is listed once its guest has been restored and run.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while engine.prestarted_pids().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no warmed VMM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its link to the host is down: nothing of a running guest gets in or out.
    let waiting = link_flags(&links);
    assert_eq!(waiting.len(), 1, "one link, the waiting VMM's: {waiting:?}");
    assert!(!waiting[0].contains(&"UP".to_owned()), "{waiting:?}");

    let metadata = std::collections::BTreeMap::from([("purpose".to_owned(), "warm".to_owned())]);
    let sandbox = engine
        .create(
            &template,
            CreateOptions {
                metadata: metadata.clone(),
                ..CreateOptions::default()
            },
        )
        .await
        .expect("create");
    assert!(
        sandbox
            .timings()
            .phases
            .iter()
            .any(|(name, _)| name == "take warmed VMM"),
        "{:?}",
        sandbox.timings().phases
    );
    // Its own name, clock and metadata; the warm-up's command is not among its processes.
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let seen = kiln_testinfra::sh(sandbox.agent(), "hostname; cat /etc/hostname; date +%s").await;
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[..2], [sandbox.id(), sandbox.id()], "{seen}");
    let guest_now: u64 = lines[2].parse().expect("date");
    assert!(
        guest_now.abs_diff(host_now) <= 5,
        "guest {guest_now}, host {host_now}"
    );
    assert_eq!(
        sandbox.agent().info().await.expect("info").metadata,
        metadata
    );
    assert!(
        sandbox
            .agent()
            .processes()
            .await
            .expect("processes")
            .is_empty(),
        "no process of the warm-up listed"
    );
    // Its link is open: the test internet answers.
    assert_eq!(
        connect(&sandbox, WEB, 7000).await,
        format!("hello from {WEB}:7000")
    );
    let open = link_flags(&format!("{links}{}@", sandbox.link().expect("link").slot.0));
    assert!(open[0].contains(&"UP".to_owned()), "{open:?}");

    sandbox.destroy().await.expect("destroy");
    engine.shutdown_prestarted().await;
    assert_eq!(link_flags(&links), Vec::<Vec<String>>::new(), "links left");
}
