//! A "test internet" for networking tests: a network namespace the test makes and uses as
//! the daemon's only uplink, with servers on TEST-NET addresses and decoys (cloud metadata,
//! a LAN address) that count whatever reaches them. Sandbox traffic in a test ends here,
//! never at the machine's uplink. Everything is removed on drop, also when a test fails.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_net::netns::NetNs;

/// A web-ish server of the test internet.
pub const WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// Another one.
pub const OTHER_WEB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The cloud metadata decoy.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// A decoy on an RFC 1918 "LAN" address.
pub const LAN: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

/// Every address of the test internet that runs servers.
pub const ADDRESSES: [Ipv4Addr; 4] = [WEB, OTHER_WEB, METADATA, LAN];
/// The ports they listen on.
pub const PORTS: [u16; 2] = [80, 7000];

/// Runs `ip` with `args` (split on spaces); panics if it fails.
pub fn ip(args: &str) {
    let status = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("ip");
    assert!(status.success(), "ip {args}");
}

/// A TCP server in a namespace: greets every connection with `hello from <addr>`, then
/// echoes; counts connections.
#[derive(Debug)]
pub struct Server {
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Server {
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = ns
            .run_in(move || {
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .expect("listen");
        let (h, s) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        h.fetch_add(1, Ordering::SeqCst);
                        let s = s.clone();
                        std::thread::spawn(move || serve(stream, addr, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Server { hits, stop }
    }

    /// Connections so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn serve(mut stream: TcpStream, addr: SocketAddr, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.write_all(format!("hello from {addr}\n").as_bytes());
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a connection attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Reach {
    /// Connected and greeted with this line.
    Greeted(String),
    /// Refused or unreachable at connect.
    Refused,
    /// Timed out (silently dropped: never acceptable for a denied destination).
    TimedOut,
}

/// Connects to `addr` from inside `ns` and reads the greeting.
pub fn reach(ns: &NetNs, addr: SocketAddr) -> Reach {
    ns.run_in(move || {
        Ok(
            match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                Ok(mut stream) => {
                    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                    let mut buf = [0u8; 128];
                    let n = stream.read(&mut buf).unwrap_or(0);
                    Reach::Greeted(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Reach::TimedOut,
                Err(_) => Reach::Refused,
            },
        )
    })
    .expect("thread in the namespace")
}

/// The test internet and the host's link to it.
#[derive(Debug)]
pub struct TestInternet {
    /// Prefix of every name this test makes (at most 7 characters).
    pub tag: String,
    /// The host's end of the link: the daemon's egress interface.
    pub egress_interface: String,
    /// Its address (what the test internet sees sandboxes as, after masquerading).
    pub host_end: Ipv4Addr,
    /// The test internet's end: the daemon's egress gateway.
    pub gateway: Ipv4Addr,
    index: u8,
    servers: Vec<Server>,
    ns: Option<NetNs>,
}

impl TestInternet {
    /// A test internet of its own for test number `index` (0..=1) of this process: names,
    /// and the link's subnet differ per index, so tests run side by side.
    pub fn new(index: u8) -> TestInternet {
        let tag = format!(
            "k{:04x}{}",
            std::process::id() % 0xffff,
            char::from(b'a' + index)
        );
        let host_end = Ipv4Addr::new(192, 0, 2, 126 + 128 * index);
        let gateway = Ipv4Addr::new(192, 0, 2, 1 + 128 * index);
        let ns = NetNs::create(&format!("{tag}-inet")).expect("test internet namespace");
        let egress_interface = format!("{tag}e");
        let mut internet = TestInternet {
            tag,
            egress_interface,
            host_end,
            gateway,
            index,
            servers: Vec::new(),
            ns: None,
        };
        ip(&format!(
            "link add {} type veth peer name uplink netns {}",
            internet.egress_interface,
            ns.name()
        ));
        internet.ns = Some(ns);
        ip(&format!(
            "addr add {host_end}/25 dev {}",
            internet.egress_interface
        ));
        ip(&format!("link set {} up", internet.egress_interface));
        let n = internet.namespace().name().to_owned();
        ip(&format!("-n {n} addr add {gateway}/25 dev uplink"));
        ip(&format!("-n {n} link set uplink up"));
        ip(&format!("-n {n} link set lo up"));
        for addr in ADDRESSES {
            ip(&format!("-n {n} addr add {addr}/32 dev lo"));
        }
        ip(&format!("-n {n} route add default via {host_end}"));
        for addr in ADDRESSES {
            for port in PORTS {
                let server = Server::start(internet.namespace(), SocketAddr::from((addr, port)));
                internet.servers.push(server);
            }
        }
        internet
    }

    /// The test internet's namespace (to run more servers in).
    pub fn namespace(&self) -> &NetNs {
        self.ns.as_ref().expect("namespace")
    }

    /// Connections that reached `addr` (any port).
    pub fn hits(&self, addr: Ipv4Addr) -> usize {
        let index = ADDRESSES
            .iter()
            .position(|a| *a == addr)
            .expect("a test internet address");
        (0..PORTS.len())
            .map(|p| self.servers[index * PORTS.len() + p].hits())
            .sum()
    }

    /// The daemon's network configuration for this test internet: its own pool, prefix and
    /// routing table.
    pub fn network_config(&self) -> kiln_network::NetworkConfig {
        let pid = std::process::id();
        let index = self.index;
        kiln_network::NetworkConfig {
            pool: format!("10.252.{}.0/24", (pid % 125) * 2 + u32::from(index))
                .parse()
                .expect("pool"),
            prefix: format!("{}-", self.tag),
            egress_interface: Some(self.egress_interface.clone()),
            egress_gateway: Some(self.gateway),
            route_table: 7300 + (pid % 250) * 2 + u32::from(index),
            ..kiln_network::NetworkConfig::new()
        }
    }
}

impl Drop for TestInternet {
    fn drop(&mut self) {
        self.servers.clear();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.egress_interface])
            .status();
        self.ns.take();
    }
}
