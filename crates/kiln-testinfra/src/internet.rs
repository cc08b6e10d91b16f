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
/// The ports where they greet (`hello from <address>:<port>`) and echo.
pub const PORTS: [u16; 2] = [7000, 7001];
/// Where they answer HTTP (`hello from <address>:80 for <host>`), and HTTPS (the same, for the
/// TLS server name) once [`TestInternet::start_https`] ran.
pub const HTTP_PORT: u16 = 80;
/// HTTPS.
pub const HTTPS_PORT: u16 = 443;
/// Where [`TestInternet::start_sink`] discards whatever it is sent (on [`WEB`]).
pub const DISCARD_PORT: u16 = 9;
/// Where [`TestInternet::start_iperf3`] runs an iperf3 server (on [`WEB`]).
pub const IPERF3_PORT: u16 = 5201;

/// Names the test internet's DNS server answers (with [`TestInternet::start_dns`]), each
/// with every name below it: `web.test` and `*.web.test` → [`WEB`], `other.test` →
/// [`OTHER_WEB`], and two that try to rebind to a decoy.
pub const NAMES: [(&str, Ipv4Addr); 4] = [
    ("web.test", WEB),
    ("other.test", OTHER_WEB),
    ("rebind.test", METADATA),
    ("lan.test", LAN),
];

/// Runs `ip` with `args` (split on spaces); panics if it fails.
pub fn ip(args: &str) {
    let status = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("ip");
    assert!(status.success(), "ip {args}");
}

/// A TCP server in a namespace: greets every connection with `hello from <addr>`, then
/// echoes (or, as an HTTP server, answers every request with that line and the request's
/// `Host`, keeping the connection open); counts connections.
#[derive(Debug)]
pub struct Server {
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Listens on `addr` inside `ns` (HTTP if `addr`'s port is [`HTTP_PORT`], a discard
    /// server reading to the end without answering if it is [`DISCARD_PORT`]).
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
                        if addr.port() == HTTP_PORT {
                            std::thread::spawn(move || serve_http(stream, addr, &s));
                        } else if addr.port() == DISCARD_PORT {
                            std::thread::spawn(move || discard(stream));
                        } else {
                            std::thread::spawn(move || serve(stream, addr, &s));
                        }
                    }
                    Err(_) => wait_readable(&listener, 100),
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

/// Waits until `listener` has a connection to accept or `timeout_ms` passed (so the accept
/// loop answers at once and still sees its stop flag).
fn wait_readable(listener: &TcpListener, timeout_ms: i32) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, timeout_ms) };
}

fn discard(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
}

fn serve_http(mut stream: TcpStream, addr: SocketAddr, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
        let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&request[..end]).into_owned();
        request.drain(..end + 4);
        let host = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("host")
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default();
        let body = format!("hello from {addr} for {host}\n");
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
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

/// A namespace standing in for a VM behind sandbox namespace `sandbox`: joined to it by a
/// veth whose sandbox end is named like the guest's tap (`tap0`, with the gateway address),
/// with the guest's fixed address and route, so every rule of the sandbox's namespace
/// applies to it as to a real guest.
pub fn fake_guest(sandbox: &NetNs, name: &str) -> NetNs {
    let guest = NetNs::create(name).expect("guest namespace");
    ip(&format!(
        "-n {} link add {} type veth peer name eth0 netns {}",
        sandbox.name(),
        kiln_net::TAP_NAME,
        guest.name()
    ));
    ip(&format!(
        "-n {} addr add {}/{} dev {}",
        sandbox.name(),
        kiln_net::GATEWAY_ADDRESS,
        kiln_net::PREFIX_LEN,
        kiln_net::TAP_NAME
    ));
    ip(&format!(
        "-n {} link set {} up",
        sandbox.name(),
        kiln_net::TAP_NAME
    ));
    ip(&format!(
        "-n {} addr add {}/{} dev eth0",
        guest.name(),
        kiln_net::GUEST_ADDRESS,
        kiln_net::PREFIX_LEN
    ));
    ip(&format!("-n {} link set eth0 up", guest.name()));
    ip(&format!("-n {} link set lo up", guest.name()));
    ip(&format!(
        "-n {} route add default via {}",
        guest.name(),
        kiln_net::GATEWAY_ADDRESS
    ));
    guest
}

/// A sandbox namespace `<tag>-<name>` wired by `network` with `policy`, and a fake guest
/// (`<tag>-g<name>`) behind it.
pub fn wired_sandbox(
    network: &kiln_network::Network,
    tag: &str,
    name: &str,
    policy: &kiln_network::policy::EgressPolicy,
) -> (NetNs, NetNs, kiln_network::Link) {
    let ns = NetNs::create(&format!("{tag}-{name}")).expect("sandbox namespace");
    let guest = fake_guest(&ns, &format!("{tag}-g{name}"));
    let link = network.wire(&ns, policy).expect("wire");
    (ns, guest, link)
}

/// Removes a daemon's host networking set-up when dropped, so a test that fails half-way
/// leaves no table, rule or address behind (a daemon itself keeps it on SIGTERM).
#[derive(Debug)]
pub struct ShutdownOnDrop(pub std::sync::Arc<kiln_network::Network>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shutdown();
    }
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
    /// Processes run inside (DNS, HTTPS), killed by their pids on drop.
    processes: Vec<std::process::Child>,
    ns: Option<NetNs>,
}

impl TestInternet {
    /// A test internet of its own for test number `index` (0..=3) of this process: names,
    /// and the link's subnet differ per index, so tests run side by side.
    pub fn new(index: u8) -> TestInternet {
        assert!(index < 4, "test internets are numbered 0 to 3");
        let tag = format!(
            "k{:04x}{}",
            std::process::id() % 0xffff,
            char::from(b'a' + index)
        );
        let host_end = Ipv4Addr::new(192, 0, 2, 62 + 64 * index);
        let gateway = Ipv4Addr::new(192, 0, 2, 1 + 64 * index);
        let ns = NetNs::create(&format!("{tag}-inet")).expect("test internet namespace");
        let egress_interface = format!("{tag}e");
        let mut internet = TestInternet {
            tag,
            egress_interface,
            host_end,
            gateway,
            index,
            servers: Vec::new(),
            processes: Vec::new(),
            ns: None,
        };
        ip(&format!(
            "link add {} type veth peer name uplink netns {}",
            internet.egress_interface,
            ns.name()
        ));
        internet.ns = Some(ns);
        ip(&format!(
            "addr add {host_end}/26 dev {}",
            internet.egress_interface
        ));
        ip(&format!("link set {} up", internet.egress_interface));
        let n = internet.namespace().name().to_owned();
        ip(&format!("-n {n} addr add {gateway}/26 dev uplink"));
        ip(&format!("-n {n} link set uplink up"));
        ip(&format!("-n {n} link set lo up"));
        for addr in ADDRESSES {
            ip(&format!("-n {n} addr add {addr}/32 dev lo"));
        }
        ip(&format!("-n {n} route add default via {host_end}"));
        for addr in ADDRESSES {
            for port in PORTS.iter().copied().chain([HTTP_PORT]) {
                let server = Server::start(internet.namespace(), SocketAddr::from((addr, port)));
                internet.servers.push(server);
            }
        }
        internet
    }

    /// Runs a DNS server (dnsmasq) on the gateway address answering [`NAMES`]; the daemon's
    /// upstream in a test. Stopped on drop.
    pub fn start_dns(&mut self) -> SocketAddr {
        let mut args = vec![
            "--no-daemon".to_owned(),
            "--conf-file=/dev/null".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--bind-interfaces".to_owned(),
            format!("--listen-address={}", self.gateway),
            "--pid-file=".to_owned(),
            "--local-ttl=60".to_owned(),
        ];
        for (name, address) in NAMES {
            args.push(format!("--address=/{name}/{address}"));
        }
        let child = self.spawn_inside("dnsmasq", &args, false);
        self.processes.push(child);
        let server = SocketAddr::from((self.gateway, 53));
        // Ready once it answers.
        for _ in 0..100 {
            if std::net::UdpSocket::bind(("0.0.0.0", 0))
                .and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(100)))?;
                    s.send_to(&crate::dns::query("web.test", 1), server)?;
                    let mut buf = [0u8; 512];
                    s.recv(&mut buf)
                })
                .is_ok()
            {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("dnsmasq did not answer on {server}");
    }

    /// Runs a discard server on [`WEB`]:[`DISCARD_PORT`] (for throughput); stopped on drop.
    pub fn start_sink(&mut self) -> SocketAddr {
        let addr = SocketAddr::from((WEB, DISCARD_PORT));
        // After the servers `hits` counts, so their indices hold.
        self.servers.push(Server::start(self.namespace(), addr));
        addr
    }

    /// Runs an iperf3 server on [`WEB`]:[`IPERF3_PORT`]; stopped on drop.
    pub fn start_iperf3(&mut self) -> SocketAddr {
        let addr = SocketAddr::from((WEB, IPERF3_PORT));
        let args = ["-s", "-B", &WEB.to_string(), "-p", &IPERF3_PORT.to_string()].map(String::from);
        let child = self.spawn_inside("iperf3", &args, false);
        self.processes.push(child);
        // Ready once it listens (a probe connection would count as a client).
        let listening = format!(":{IPERF3_PORT:04X} 00000000:0000 0A");
        for _ in 0..100 {
            let tcp = self
                .namespace()
                .run_in(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))
                .unwrap_or_default();
            if tcp.contains(&listening) {
                return addr;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("iperf3 did not listen on {addr}");
    }

    /// Runs an HTTPS server (Python's ssl, a self-signed certificate for `*.test`) on every
    /// address of the test internet, answering `hello from <address>:443 for <server name>`.
    /// Stopped on drop.
    pub fn start_https(&mut self, dir: &std::path::Path) {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let status = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test",
            ])
            .args([
                "-addext",
                "subjectAltName=DNS:*.test,DNS:web.test,DNS:other.test",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "making a test certificate");
        let script = format!(
            r#"
import socket, ssl, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({cert:?}, {key:?})
names = {{}}
def note(sock, name, _ctx):
    names[id(sock)] = name
ctx.sni_callback = note
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 443))
srv.listen(64)
END = b"\r\n\r\n"
def serve(conn):
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
        data = b""
        while END not in data:
            more = tls.recv(4096)
            if not more:
                return
            data += more
        addr = tls.getsockname()
        body = "hello from %s:%d for %s\n" % (addr[0], addr[1], names.get(id(tls), "?"))
        head = "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        tls.sendall((head + body).encode())
        tls.close()
    except Exception:
        pass
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#,
            cert = cert.display().to_string(),
            key = key.display().to_string(),
        );
        let mut child = self.spawn_inside("python3", &["-c".to_owned(), script], true);
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("python starts");
        assert_eq!(line.trim(), "ready", "the HTTPS server starts");
        self.processes.push(child);
    }

    /// Starts `program args` inside; its standard output piped if `piped`.
    fn spawn_inside(&self, program: &str, args: &[String], piped: bool) -> std::process::Child {
        let stdout = if piped {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        };
        self.command_inside(program, args)
            .stdout(stdout)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// `program args` to run inside the test internet's namespace.
    fn command_inside(&self, program: &str, args: &[String]) -> std::process::Command {
        let mut command = self.namespace().command(program).expect("namespace");
        command.args(args);
        command
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
        let per_address = PORTS.len() + 1;
        (0..per_address)
            .map(|p| self.servers[index * per_address + p].hits())
            .sum()
    }

    /// The daemon's network configuration for this test internet: its own pool, prefix and
    /// routing table.
    pub fn network_config(&self) -> kiln_network::NetworkConfig {
        let pid = std::process::id();
        let index = self.index;
        kiln_network::NetworkConfig {
            pool: format!("10.252.{}.0/24", (pid % 62) * 4 + u32::from(index))
                .parse()
                .expect("pool"),
            prefix: format!("{}-", self.tag),
            egress_interface: Some(self.egress_interface.clone()),
            egress_gateway: Some(self.gateway),
            route_table: 7300 + (pid % 125) * 4 + u32::from(index),
            ..kiln_network::NetworkConfig::new()
        }
    }
}

impl Drop for TestInternet {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.servers.clear();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.egress_interface])
            .status();
        self.ns.take();
    }
}
