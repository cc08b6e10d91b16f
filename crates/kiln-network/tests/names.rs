//! Names in egress policies, enforced for real: the daemon's resolver (names not allowed do
//! not resolve, rebinding answers are stripped), the HTTP and TLS proxy (Host and server
//! name checked, the proxy's own resolution used, so a spoofed name cannot reach another
//! address), resolved addresses let through for other ports, QUIC refused, other DNS
//! redirected, a live change cutting proxied connections. A "guest" namespace stands in for
//! the VM; the test internet (dnsmasq, HTTP and HTTPS servers, decoys) is a namespace the
//! test makes. Needs root, as the whole suite does.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use kiln_net::netns::NetNs;
use kiln_network::policy::{Destination, EgressPolicy};
use kiln_network::Network;
use kiln_testinfra::dns::ask;
use kiln_testinfra::internet::{reach, Reach, TestInternet, METADATA, OTHER_WEB, WEB};

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

struct World {
    internet: TestInternet,
    network: Option<std::sync::Arc<Network>>,
    runtime: tokio::runtime::Runtime,
    _certs: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let mut internet = TestInternet::new(0);
        let upstream = internet.start_dns();
        let certs = tempfile::tempdir().expect("dir");
        internet.start_https(certs.path());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let network = std::sync::Arc::new(
            Network::open(kiln_network::NetworkConfig {
                dns_upstreams: vec![upstream],
                ..internet.network_config()
            })
            .expect("network"),
        );
        network.start(runtime.handle()).expect("services");
        World {
            internet,
            network: Some(network),
            runtime,
            _certs: certs,
        }
    }

    fn network(&self) -> &Network {
        self.network.as_ref().expect("network")
    }

    fn sandbox(&self, name: &str, policy: &EgressPolicy) -> (NetNs, NetNs, kiln_network::Link) {
        kiln_testinfra::internet::wired_sandbox(self.network(), &self.internet.tag, name, policy)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(network) = self.network.take() {
            network.shutdown();
        }
        let _ = &self.runtime;
    }
}

/// The guest's resolver: the gateway, as in a real guest's resolv.conf.
fn resolver() -> SocketAddr {
    SocketAddr::from((kiln_net::GATEWAY_ADDRESS, 53))
}

/// Runs curl inside `guest` for `url`, mapping the URL's host to `address` (the guest's own
/// choice of where to connect); returns its output or its failure.
fn curl(
    guest: &NetNs,
    url: &str,
    host: &str,
    port: u16,
    address: Ipv4Addr,
) -> Result<String, String> {
    let mut command = guest.command("curl").expect("namespace");
    command.args([
        "-sS",
        "-k",
        "--max-time",
        "10",
        "--noproxy",
        "*",
        "--resolve",
        &format!("{host}:{port}:{address}"),
        url,
    ]);
    let output = command.output().expect("curl");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[test]
fn names_are_enforced_by_the_resolver_and_the_proxy() {
    let world = World::new();
    let network = world.network();

    // Internet on, one name denied.
    let (_a_ns, a, _) = world.sandbox("a", &policy(true, &[], &["bad.web.test"]));
    let answer = ask(&a, resolver(), "web.test").expect("an answer");
    assert_eq!(answer.addresses, vec![WEB], "{answer:?}");
    let answer = ask(&a, resolver(), "bad.web.test").expect("an answer");
    assert_eq!(answer.code, "Refused", "a denied name does not resolve");
    // Rebinding toward the metadata service or the LAN: the address is stripped.
    for name in ["rebind.test", "lan.test"] {
        let answer = ask(&a, resolver(), name).expect("an answer");
        assert!(answer.addresses.is_empty(), "{name}: {answer:?}");
    }
    // Other DNS servers are redirected to kiln's resolver (the denied name stays denied).
    let elsewhere = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 53), 53));
    let answer = ask(&a, elsewhere, "bad.web.test").expect("redirected to kiln's resolver");
    assert_eq!(answer.code, "Refused");
    // HTTP and HTTPS by name through the proxy; the denied name is reset.
    assert_eq!(
        curl(&a, "http://web.test/", "web.test", 80, WEB),
        Ok(format!("hello from {WEB}:80 for web.test"))
    );
    assert_eq!(
        curl(&a, "https://web.test/", "web.test", 443, WEB),
        Ok(format!("hello from {WEB}:443 for web.test"))
    );
    let denied = curl(&a, "https://bad.web.test/", "bad.web.test", 443, WEB);
    assert!(
        denied.is_err(),
        "a denied name over TLS is refused: {denied:?}"
    );
    let denied = curl(&a, "http://bad.web.test/", "bad.web.test", 80, WEB);
    assert!(
        denied.is_err(),
        "a denied name over HTTP is refused: {denied:?}"
    );
    // QUIC cannot carry a name past the proxy: refused under a name list.
    let quic = a
        .run_in(|| {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
            socket.connect((WEB, 443))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send(b"quic")?;
            let mut buf = [0u8; 16];
            Ok(socket.recv(&mut buf).map_err(|e| e.kind()))
        })
        .expect("guest");
    assert!(
        matches!(
            quic,
            Err(std::io::ErrorKind::ConnectionRefused) | Err(std::io::ErrorKind::HostUnreachable)
        ),
        "QUIC is refused at once: {quic:?}"
    );

    // Internet off, names allowed: `web.test`, and every name below `other.test` (not the
    // apex).
    let allowed = policy(false, &["web.test", "*.other.test"], &[]);
    let (b_ns, b, _) = world.sandbox("b", &allowed);
    assert_eq!(
        ask(&b, resolver(), "web.test").expect("answer").addresses,
        vec![WEB]
    );
    assert_eq!(
        ask(&b, resolver(), "x.other.test")
            .expect("answer")
            .addresses,
        vec![OTHER_WEB]
    );
    assert_eq!(
        ask(&b, resolver(), "other.test").expect("answer").code,
        "NXDomain",
        "not the apex"
    );
    assert_eq!(
        ask(&b, resolver(), "elsewhere.test").expect("answer").code,
        "NXDomain"
    );
    // A spoofed destination: the guest dials another address with an allowed name; the
    // proxy connects to the name's own address.
    assert_eq!(
        curl(&b, "http://web.test/", "web.test", 80, OTHER_WEB),
        Ok(format!("hello from {WEB}:80 for web.test"))
    );
    assert_eq!(
        curl(&b, "https://web.test/", "web.test", 443, METADATA),
        Ok(format!("hello from {WEB}:443 for web.test")),
        "a spoofed server name cannot reach another address"
    );
    assert!(curl(&b, "https://elsewhere.test/", "elsewhere.test", 443, WEB).is_err());
    // Another port of an allowed name's address: reachable once kiln resolved the name;
    // an address nobody resolved is not.
    assert_eq!(
        reach(&b, SocketAddr::from((WEB, 7000))),
        Reach::Greeted(format!("hello from {WEB}:7000"))
    );
    assert_eq!(
        reach(&b, SocketAddr::from((METADATA, 7000))),
        Reach::Refused
    );
    assert_eq!(
        world.internet.hits(METADATA),
        0,
        "nothing reached the decoy"
    );

    // A live change cuts a proxied connection to a name the new policy denies.
    let mut kept = b
        .run_in(|| {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((WEB, 80)), Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")?;
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf)?;
            assert!(String::from_utf8_lossy(&buf[..n]).contains("for web.test"));
            Ok(s)
        })
        .expect("a proxied connection");
    network
        .apply(&b_ns, &policy(false, &["*.other.test"], &[]))
        .expect("apply");
    let after = kept
        .write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
        .and_then(|()| {
            let mut buf = [0u8; 256];
            kept.read(&mut buf)
        });
    assert!(
        matches!(after, Ok(0) | Err(_)),
        "the proxied connection to a now denied name is cut: {after:?}"
    );
    assert_eq!(
        ask(&b, resolver(), "web.test").expect("answer").code,
        "NXDomain"
    );
}
