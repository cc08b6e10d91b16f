//! The egress proxy that enforces names on HTTP and TLS. Under a policy that lists names, a
//! sandbox's connections to ports 80 and 443 (outside its allowed CIDRs) are sent here. The
//! proxy reads the HTTP `Host` header or the TLS server name (SNI; the TLS session itself
//! passes through untouched, end to end), checks it against the sandbox's policy, resolves
//! it itself and connects to the address it resolved (never to the one the guest asked
//! for: a spoofed name cannot reach another address), refusing addresses no sandbox may
//! reach (so no DNS rebinding to the host, the metadata service or the LAN). A name the
//! policy does not allow is reset. A policy change closes the proxied connections whose
//! names it no longer allows.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::Network;

/// Most bytes read before the name is known.
const MAX_HEAD: usize = 16 << 10;
/// How long a client may take to send them.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Proxied connections per sandbox at once.
pub(crate) const MAX_PER_SANDBOX: usize = 512;

/// Which protocol a listener reads names from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Plain HTTP: the `Host` header.
    Http,
    /// TLS: the ClientHello's server name.
    Tls,
}

impl Kind {
    fn port(self) -> u16 {
        match self {
            Kind::Http => 80,
            Kind::Tls => 443,
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Accepts proxied connections on `listener` until the task is dropped.
pub(crate) async fn serve(network: Arc<Network>, listener: TcpListener, kind: Kind) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let network = Arc::clone(&network);
        tokio::spawn(async move {
            if let Err(why) = proxy(&network, stream, peer, kind).await {
                tracing::debug!(%peer, why, "egress proxy refused a connection");
            }
        });
    }
}

/// Closes `stream` with a reset (the guest sees its connection refused, not a clean end).
fn reset(stream: TcpStream) {
    // A zero linger time never blocks: the close sends a reset at once.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn proxy(
    network: &Network,
    mut stream: TcpStream,
    peer: SocketAddr,
    kind: Kind,
) -> Result<(), String> {
    let SocketAddr::V4(peer) = peer else {
        return Err("not IPv4".into());
    };
    let Some(sandbox) = network.sandbox_at(*peer.ip()) else {
        reset(stream);
        return Err("not a sandbox".into());
    };
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_name(&mut stream, kind)).await {
        Ok(Ok(head)) => head,
        Ok(Err(why)) => {
            reset(stream);
            return Err(why);
        }
        Err(_) => {
            reset(stream);
            return Err("no name in time".into());
        }
    };
    let (name, bytes) = head;
    if !sandbox.policy().allows_name(&name) {
        reset(stream);
        return Err(format!("`{name}` is not allowed"));
    }
    let Some(guard) = sandbox.track(&name) else {
        reset(stream);
        return Err("too many proxied connections".into());
    };
    let candidates = crate::dns::resolve(network.upstreams(), &name).await;
    let policy = sandbox.policy();
    let denied_nets = crate::policy::EgressPolicy::nets(&policy.deny_out);
    let address = candidates.iter().map(|(ip, _)| *ip).find(|ip| {
        !network.always_denied().contains(*ip)
            && !denied_nets.iter().any(|n| n.contains(ip))
            && !network.is_local(*ip)
    });
    let Some(address) = address else {
        reset(stream);
        return Err(format!("`{name}` resolves to nothing a sandbox may reach"));
    };
    let upstream = match connect(network.service_address(), address, kind.port()).await {
        Ok(upstream) => upstream,
        Err(e) => {
            reset(stream);
            return Err(format!("connecting to {name} ({address}): {e}"));
        }
    };
    let mut upstream = upstream;
    use tokio::io::AsyncWriteExt;
    upstream
        .write_all(&bytes)
        .await
        .map_err(|e| e.to_string())?;
    let relay = async {
        let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
    };
    tokio::select! {
        () = relay => {}
        () = guard.cut() => {}
    }
    Ok(())
}

/// Connects to `address:port` from the service address, so the connection leaves by the
/// daemon's routing table and egress interface like a sandbox's own.
async fn connect(source: Ipv4Addr, address: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        socket.connect(SocketAddr::from((address, port))),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Reads from `stream` until the name it is for is known; returns it (lowercase, no port)
/// and every byte read.
async fn read_name(stream: &mut TcpStream, kind: Kind) -> Result<(String, Vec<u8>), String> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before naming a host".into());
        }
        bytes.extend_from_slice(&buf[..n]);
        let found = match kind {
            Kind::Http => http_host(&bytes)?,
            Kind::Tls => tls_server_name(&bytes)?,
        };
        if let Some(name) = found {
            return Ok((name, bytes));
        }
        if bytes.len() > MAX_HEAD {
            return Err("no name in the first 16 KiB".into());
        }
    }
}

/// The `Host` of an HTTP request head, once complete (`None`: more bytes needed).
pub(crate) fn http_host(bytes: &[u8]) -> Result<Option<String>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("not HTTP: {e}")),
    }
    let host = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .ok_or("an HTTP request without Host")?;
    let host = std::str::from_utf8(host.value).map_err(|_| "a Host that is not text")?;
    Ok(Some(normalise(host)?))
}

/// The server name of a TLS ClientHello, once complete (`None`: more bytes needed).
pub(crate) fn tls_server_name(bytes: &[u8]) -> Result<Option<String>, String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    while !reader.is_empty() {
        acceptor.read_tls(&mut reader).map_err(|e| e.to_string())?;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let name = accepted
                .client_hello()
                .server_name()
                .ok_or("a TLS ClientHello without a server name")?
                .to_owned();
            Ok(Some(normalise(&name)?))
        }
        Ok(None) => Ok(None),
        Err((e, _)) => Err(format!("not TLS: {e}")),
    }
}

/// A host name as policies compare them: lowercase, no port, no trailing dot; an address
/// literal is refused (names only here: addresses are the firewall's).
fn normalise(host: &str) -> Result<String, String> {
    let host = host.trim();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() || name.parse::<Ipv4Addr>().is_ok() || name.starts_with('[') {
        return Err(format!("`{host}` is not a host name"));
    }
    Ok(name)
}

/// A proxied connection, listed in its sandbox (so a policy change can cut it).
#[derive(Debug)]
pub(crate) struct Tracked {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) cut: Arc<tokio::sync::Notify>,
}

impl Tracked {
    pub(crate) fn new(name: &str) -> Tracked {
        Tracked {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_owned(),
            cut: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_read_from_http_heads() {
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHo"), Ok(None));
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: Example.TEST:8080\r\n\r\n"),
            Ok(Some("example.test".into()))
        );
        assert!(http_host(b"GET / HTTP/1.1\r\n\r\n").is_err(), "no Host");
        assert!(http_host(b"\x16\x03\x01garbage\r\n\r\n").is_err());
        assert!(http_host(b"GET / HTTP/1.1\r\nHost: 203.0.113.5\r\n\r\n").is_err());
    }

    #[test]
    fn server_names_are_read_from_client_hellos() {
        // A real client's ClientHello (openssl), read off a local socket.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let mut client = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "Web.Test",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl");
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        let name = loop {
            use std::io::Read;
            let n = stream.read(&mut buf).expect("read");
            assert!(n > 0, "the client hung up");
            bytes.extend_from_slice(&buf[..n]);
            if let Some(name) = tls_server_name(&bytes).expect("a ClientHello") {
                break name;
            }
        };
        let _ = client.kill();
        let _ = client.wait();
        assert_eq!(name, "web.test");
        assert_eq!(tls_server_name(&bytes[..20]), Ok(None), "more needed");
        assert!(tls_server_name(b"GET / HTTP/1.1\r\n\r\n").is_err());
    }
}
