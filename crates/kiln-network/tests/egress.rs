//! Sandbox networking without a VM: a "guest" namespace stands in for the VM, joined to the
//! sandbox namespace by a veth whose sandbox end is named like the tap (`tap0`), so every
//! rule applies as it does to a real guest. Egress ends in a "test internet" namespace this
//! test makes (HTTP-ish servers on TEST-NET addresses, decoys for cloud metadata and a LAN
//! address that record anything that arrives); nothing goes to the machine's uplink.
//! Needs root, as the whole suite does; removes everything it makes, also on failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use kiln_net::netns::NetNs;
use kiln_network::policy::{Destination, EgressPolicy};
use kiln_network::Network;
use kiln_testinfra::internet::{reach, Reach, Server, LAN, METADATA, OTHER_WEB, WEB};

/// The test internet, the daemon's networking on it, and sandbox namespaces with "guests".
struct World {
    internet: kiln_testinfra::internet::TestInternet,
    network: Option<Network>,
}

impl World {
    fn new(index: u8) -> World {
        let internet = kiln_testinfra::internet::TestInternet::new(index);
        let network = Network::open(internet.network_config()).expect("network");
        World {
            internet,
            network: Some(network),
        }
    }

    fn network(&self) -> &Network {
        self.network.as_ref().expect("network")
    }

    /// A sandbox namespace wired with `policy`, and the guest namespace behind its `tap0`.
    fn sandbox(&self, name: &str, policy: &EgressPolicy) -> (NetNs, NetNs, kiln_network::Link) {
        kiln_testinfra::internet::wired_sandbox(self.network(), &self.internet.tag, name, policy)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(network) = self.network.take() {
            network.shutdown();
        }
    }
}

fn policy(internet: bool, allow: &[&str], deny: &[&str]) -> EgressPolicy {
    let parse = |list: &[&str]| {
        list.iter()
            .map(|e| Destination::parse(e).expect("entry"))
            .collect()
    };
    EgressPolicy {
        internet,
        allow_out: parse(allow),
        deny_out: parse(deny),
        bandwidth_mbit: None,
        max_connections: None,
    }
}

fn web(port: u16) -> SocketAddr {
    SocketAddr::from((WEB, port))
}

#[test]
fn egress_follows_the_policy_and_never_reaches_the_host_or_other_sandboxes() {
    let world = World::new(0);
    let network = world.network();

    // Internet on: the test internet answers, and sees the host's egress address (NAT).
    let (a_ns, a, a_link) = world.sandbox("a", &policy(true, &[], &[]));
    assert_eq!(
        reach(&a, web(7000)),
        Reach::Greeted(format!("hello from {WEB}:7000"))
    );
    assert_eq!(
        reach(&a, SocketAddr::from((OTHER_WEB, 7000))),
        Reach::Greeted(format!("hello from {OTHER_WEB}:7000"))
    );

    // Always denied, whatever the policy: metadata, a LAN address, the host's own addresses
    // (its egress address, the daemon's service address off its ports), other sandboxes.
    // Each fails at connect, and nothing arrives at a decoy.
    let host_listener = TcpListener::bind(("0.0.0.0", 0)).expect("a host service");
    let host_port = host_listener.local_addr().expect("port").port();
    for target in [
        SocketAddr::from((METADATA, 7000)),
        SocketAddr::from((LAN, 7000)),
        SocketAddr::from((world.internet.host_end, host_port)),
        SocketAddr::from((network.service_address(), host_port)),
        SocketAddr::from((network.service_address(), 22)),
        SocketAddr::from((a_link.host, host_port)),
    ] {
        assert_eq!(reach(&a, target), Reach::Refused, "{target}");
    }
    assert_eq!(
        world.internet.hits(METADATA),
        0,
        "nothing reached the metadata decoy"
    );
    assert_eq!(world.internet.hits(LAN), 0, "nothing reached the LAN decoy");
    let (b_ns, b, b_link) = world.sandbox("b", &policy(true, &[], &[]));
    let b_server = Server::start(&b, SocketAddr::from((kiln_net::GUEST_ADDRESS, 7000)));
    assert_eq!(
        reach(&a, SocketAddr::from((b_link.sandbox, 7000))),
        Reach::Refused
    );
    assert_eq!(
        reach(&a, SocketAddr::from((b_link.host, 7000))),
        Reach::Refused
    );
    assert_eq!(b_server.hits(), 0, "sandbox a never reached sandbox b");
    // Negative control: the daemon (root, on the host) does reach b through its link.
    let greeting = {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((b_link.sandbox, 7000)),
            Duration::from_secs(3),
        )
        .expect("the daemon reaches the guest");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).expect("greeting");
        String::from_utf8_lossy(&buf[..n]).trim().to_owned()
    };
    assert_eq!(
        greeting,
        format!("hello from {}:7000", kiln_net::GUEST_ADDRESS)
    );
    drop(b_server);

    // Internet off: only what is allowed; deny wins over allow.
    let closed = policy(false, &["198.51.100.0/24"], &["198.51.100.10"]);
    network.apply(&b_ns, &closed).expect("apply");
    assert_eq!(reach(&b, web(7000)), Reach::Refused, "deny wins");
    assert_eq!(
        reach(&b, SocketAddr::from((OTHER_WEB, 7000))),
        Reach::Refused,
        "not allowed"
    );
    network
        .apply(&b_ns, &policy(false, &["198.51.100.0/24"], &[]))
        .expect("apply");
    assert!(matches!(reach(&b, web(7000)), Reach::Greeted(_)), "allowed");
    assert_eq!(
        reach(&b, SocketAddr::from((OTHER_WEB, 7000))),
        Reach::Refused
    );
    // Allowing what is always denied is refused.
    let err = network
        .apply(&b_ns, &policy(false, &["169.254.169.254"], &[]))
        .expect_err("always denied");
    assert!(err.to_string().contains("always denied"), "{err}");

    // A live change cuts an established connection to a destination now denied, and
    // keeps one that is still allowed.
    let (other_port, cut) = b
        .run_in(|| {
            let mut other_port = TcpStream::connect_timeout(&web(7001), Duration::from_secs(3))?;
            let mut cut = TcpStream::connect_timeout(&web(7000), Duration::from_secs(3))?;
            for s in [&mut other_port, &mut cut] {
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf)?;
            }
            Ok((other_port, cut))
        })
        .expect("two connections");
    network
        .apply(
            &b_ns,
            &policy(false, &["198.51.100.0/24"], &["198.51.100.10/32"]),
        )
        .expect("deny the web server");
    // Both connections go to the now denied address: both are cut (the echo shows it).
    let echo = |mut s: &TcpStream| -> bool {
        s.write_all(b"ping\n").is_ok() && {
            let mut buf = [0u8; 16];
            matches!(s.read(&mut buf), Ok(n) if n > 0)
        }
    };
    assert!(
        !echo(&cut),
        "an established connection to a now denied address is cut"
    );
    assert!(!echo(&other_port), "so is one to another port of it");
    network
        .apply(&b_ns, &policy(true, &[], &[]))
        .expect("open again");
    let live = b
        .run_in(|| {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from((OTHER_WEB, 7000)),
                Duration::from_secs(3),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf)?;
            Ok(s)
        })
        .expect("connection");
    network
        .apply(&b_ns, &policy(true, &[], &["198.51.100.0/24"]))
        .expect("deny another range");
    assert!(
        echo(&live),
        "a connection to a still allowed address survives a change"
    );

    // IPv6 is off for sandboxes.
    let v6 = b
        .run_in(|| {
            Ok(TcpStream::connect_timeout(
                &"[2001:db8::1]:80".parse().expect("v6"),
                Duration::from_secs(2),
            )
            .is_err())
        })
        .expect("guest");
    assert!(v6, "no IPv6 path");

    // Taking the namespace down and releasing the link leaves nothing of it.
    let (a_if, b_if) = (
        network.host_interface(a_link.slot),
        network.host_interface(b_link.slot),
    );
    drop(a_ns);
    drop(b_ns);
    drop(a);
    drop(b);
    network.release(a_link);
    network.release(b_link);
    assert_eq!(network.links_in_use(), 0);
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains(&a_if) && !links.contains(&b_if), "{links}");
}

#[test]
fn fifty_wire_and_release_cycles_leave_nothing() {
    let world = World::new(1);
    let network = world.network();
    for i in 0..50 {
        let (ns, guest, link) = world.sandbox(&format!("c{i}"), &policy(true, &[], &[]));
        if i % 10 == 0 {
            assert!(
                matches!(reach(&guest, web(7000)), Reach::Greeted(_)),
                "cycle {i}"
            );
        }
        drop(ns);
        drop(guest);
        network.release(link);
    }
    assert_eq!(network.links_in_use(), 0);
    let prefix = format!("{}-", world.internet.tag);
    let links = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned();
    assert!(
        !links.lines().any(|l| l.contains(&format!("{prefix}v"))),
        "veths left: {links}"
    );
    let namespaces = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{prefix}c"))
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(namespaces, 0);
    let conntrack = std::process::Command::new("conntrack")
        .args(["-L", "-s", &network.config().pool.to_string()])
        .output()
        .expect("conntrack");
    assert!(
        String::from_utf8_lossy(&conntrack.stdout).trim().is_empty(),
        "no tracked connection of the pool is left: {}",
        String::from_utf8_lossy(&conntrack.stdout)
    );
}

/// iperf3's measured rate from the guest namespace to the test internet's server, in Mbit/s:
/// what the guest sends, or with `download` what it receives. Under a connection limit, an
/// earlier run's connections may still be closing (and counted) for a moment, and the server
/// still ending that run: a run refused, reset or told the server is busy is tried again, for
/// up to 5 s.
fn iperf3_mbit(guest: &NetNs, download: bool) -> f64 {
    let mut tries = 0;
    loop {
        let mut command = std::process::Command::new("ip");
        command.args(["netns", "exec", guest.name(), "iperf3", "-c"]);
        command.arg(kiln_testinfra::internet::WEB.to_string());
        command.args(["-t", "2", "-J"]);
        if download {
            command.arg("-R");
        }
        let output = command.output().expect("iperf3");
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("iperf3 JSON");
        if let Some(rate) = report["end"]["sum_received"]["bits_per_second"].as_f64() {
            assert!(output.status.success(), "{report}");
            return rate / 1e6;
        }
        let error = report["error"].as_str().unwrap_or_default();
        // Refused or reset by the limit, or the server still ending the last run.
        if tries < 50 {
            eprintln!("iperf3 could not run ({error}); trying again");
            tries += 1;
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        panic!("no rate in iperf3's report: {error:?}");
    }
}

#[test]
fn bandwidth_and_connection_limits_hold_and_can_be_lifted() {
    let mut world = World::new(2);
    world.internet.start_iperf3();
    let limited = EgressPolicy {
        bandwidth_mbit: Some(8),
        max_connections: Some(3),
        ..policy(true, &[], &[])
    };
    let (ns, guest, link) = world.sandbox("l", &limited);
    let network = world.network();

    // Both ways shaped to 8 Mbit/s (a burst of 32 KiB on top).
    for download in [false, true] {
        let rate = iperf3_mbit(&guest, download);
        eprintln!(
            "under 8 Mbit/s, {}: {rate:.2} Mbit/s",
            if download { "down" } else { "up" }
        );
        assert!(
            (2.0..10.0).contains(&rate),
            "{rate:.1} Mbit/s {}",
            if download { "down" } else { "up" }
        );
    }

    // Three connections at once, a fourth refused at connect; one closed makes room. The
    // iperf3 runs' connections may still be closing (and counted) for a moment: a connect
    // refused meanwhile is tried again, for up to 5 s.
    let open = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let mut tries = 0;
                loop {
                    let connected = guest
                        .run_in(|| TcpStream::connect_timeout(&web(7000), Duration::from_secs(3)));
                    match connected {
                        Err(e)
                            if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 50 =>
                        {
                            tries += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        connected => break connected.expect("connects"),
                    }
                }
            })
            .collect()
    };
    let mut held = open(3);
    assert_eq!(reach(&guest, web(7000)), Reach::Refused);
    held.pop();
    // The closed one leaves the count once its side is shut (FIN seen both ways).
    let mut again = Reach::Refused;
    for _ in 0..50 {
        again = reach(&guest, web(7000));
        if again != Reach::Refused {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(matches!(again, Reach::Greeted(_)), "{again:?}");

    // Lifted live: full speed, and more connections than before.
    network.apply(&ns, &policy(true, &[], &[])).expect("lifted");
    let rate = iperf3_mbit(&guest, true);
    eprintln!("limit lifted, down: {rate:.0} Mbit/s");
    assert!(rate > 50.0, "{rate:.1} Mbit/s after lifting the limit");
    held.extend(open(5));
    assert_eq!(held.len(), 7);
    let qdiscs = std::process::Command::new("tc")
        .args(["qdisc", "show", "dev", &network.host_interface(link.slot)])
        .output()
        .expect("tc");
    assert!(
        !String::from_utf8_lossy(&qdiscs.stdout).contains("tbf"),
        "{}",
        String::from_utf8_lossy(&qdiscs.stdout)
    );
    // Out of range is refused.
    for bad in [
        EgressPolicy {
            bandwidth_mbit: Some(0),
            ..policy(true, &[], &[])
        },
        EgressPolicy {
            max_connections: Some(0),
            ..policy(true, &[], &[])
        },
    ] {
        assert!(network.apply(&ns, &bad).is_err(), "{bad:?}");
    }
    drop(held);
    drop(guest);
    drop(ns);
    network.release(link);
}

/// `nft ARGS` in sandbox namespace `ns`: its output, or its error.
fn nft_in(ns: &NetNs, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "nft"])
        .args(args)
        .output()
        .expect("nft");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The rules of chain `chain` in sandbox namespace `ns`, or nft's error.
fn chain_in(ns: &NetNs, table: &str, chain: &str) -> Result<String, String> {
    nft_in(ns, &["list", "chain", "inet", table, chain])
}

#[test]
fn untranslated_packets_are_dropped_and_adopted_namespaces_get_the_guards_too() {
    let world = World::new(3);
    let network = world.network();
    let open = policy(true, &[], &[]);
    let (ns, guest, link) = world.sandbox("adopted", &open);
    let table = network.config().table();
    // What conntrack finds invalid skips source NAT, and is dropped after it. The control:
    // the guest's own connections are translated, so nothing is dropped.
    assert!(matches!(reach(&guest, web(7000)), Reach::Greeted(_)));
    assert_eq!(untranslated_drops(&ns, &table), 0);
    unsolicited_echo_reply(&guest, WEB);
    assert_eq!(
        untranslated_drops(&ns, &table),
        1,
        "an echo reply to no request skips source NAT and is dropped after it"
    );
    // One to an address no policy opens is refused before: it never reaches the chain.
    unsolicited_echo_reply(&guest, METADATA);
    assert_eq!(untranslated_drops(&ns, &table), 1);
    // As an earlier daemon left it: no chain `spoofed` or `untranslated`.
    for chain in ["spoofed", "untranslated"] {
        assert!(chain_in(&ns, &table, chain).is_ok(), "{chain} is made");
        nft_in(&ns, &["delete", "chain", "inet", &table, chain]).expect("delete");
        assert!(
            chain_in(&ns, &table, chain).is_err(),
            "the control: {chain} is gone"
        );
    }
    // The daemon restarts (a new one, which knows no link yet) and adopts the namespace:
    // the chains are back, each with its one rule.
    let restarted = Network::open(world.internet.network_config()).expect("network");
    let adopted = restarted.adopt(&ns, &open).expect("adopt");
    assert_eq!(adopted, link);
    let spoofed = chain_in(&ns, &table, "spoofed").expect("spoofed is back");
    assert_eq!(
        spoofed.matches("saddr != 172.31.255.2 drop").count(),
        1,
        "{spoofed}"
    );
    let untranslated = chain_in(&ns, &table, "untranslated").expect("untranslated is back");
    assert_eq!(
        untranslated.matches("counter packets").count(),
        1,
        "{untranslated}"
    );
    assert!(matches!(reach(&guest, web(7000)), Reach::Greeted(_)));
    drop(ns);
    drop(guest);
    restarted.release(adopted);
}

/// Packets the chain `untranslated` of `ns` dropped.
fn untranslated_drops(ns: &NetNs, table: &str) -> u64 {
    let chain = chain_in(ns, table, "untranslated").expect("chain");
    chain
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {chain}"))
}

/// Sends an ICMP echo reply (to no request: conntrack finds it invalid) from `guest` to
/// `to`, through a raw socket.
fn unsolicited_echo_reply(guest: &NetNs, to: std::net::Ipv4Addr) {
    use nix::sys::socket::{
        sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
    };
    use std::os::fd::AsRawFd;
    guest
        .run_in(move || {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::empty(),
                SockProtocol::Icmp,
            )?;
            // Type 0 (echo reply), code 0, checksum, id, sequence 1, 8 bytes of data.
            let mut packet = vec![0u8, 0, 0, 0, 0x6b, 0x6e, 0, 1];
            packet.extend_from_slice(b"kilnkiln");
            let sum: u32 = packet
                .chunks(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum();
            let folded = (sum & 0xffff) + (sum >> 16);
            let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
            packet[2..4].copy_from_slice(&checksum.to_be_bytes());
            let address = SockaddrIn::from(std::net::SocketAddrV4::new(to, 0));
            sendto(fd.as_raw_fd(), &packet, &address, MsgFlags::empty())?;
            Ok(())
        })
        .expect("sending from the guest");
}
