//! Opening a session: handshake on the raw byte stream, then HTTP/2.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use kiln_proto::handshake::{nonce_from_bytes, Hello, LineBuffer, Welcome};
use kiln_proto::stream::Prefixed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ClientError;

/// A byte stream to an agent.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

/// A boxed transport.
pub type BoxedTransport = Pin<Box<dyn Transport>>;

/// Timeouts and limits of a client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Longest wait for the agent's welcome.
    pub handshake_timeout: Duration,
    /// The hello is sent again at this interval until answered (after a restore the first
    /// one may be swallowed by a session that was live in the snapshot).
    pub hello_interval: Duration,
    /// Bytes of non-welcome data tolerated during the handshake.
    pub max_handshake_bytes: usize,
    /// Longest wait for the answer to a unary call or the start of a stream, and for each
    /// step of a file transfer: the agent taking the next piece of an upload, answering once
    /// the upload is complete (plus a second per 4 MiB uploaded, for its sync), or sending the next piece of a download. A transfer as a whole
    /// may take longer, as long as it keeps moving. Exec output streams have no such bound (a
    /// quiet process is legitimately silent); a dead peer is caught by the keep-alive.
    pub call_timeout: Duration,
    /// While a call is open and nothing has been received for this long, the client pings the
    /// agent; the session is dropped if a ping goes unanswered as long (a dead or wedged
    /// agent).
    pub keepalive: Duration,
    /// Once the client has sent the agent something to act on (a request, stdin, a window
    /// update) and received nothing for this long, it pings the agent, and again at this
    /// interval until the agent says anything. The ping wakes a guest that missed a wakeup:
    /// Linux's virtio_console sometimes does not announce arrived bytes, and a request then
    /// waited unread until the host sent something more (seen under TCG: over 10 s, about one
    /// run in eight of the engine's abuse test). A call owed nothing (a quiet process's exec
    /// stream) and an idle session send no such pings.
    pub ping_after: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            handshake_timeout: Duration::from_secs(10),
            hello_interval: Duration::from_millis(100),
            max_handshake_bytes: 1 << 20,
            call_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(15),
            ping_after: Duration::from_secs(1),
        }
    }
}

/// Sends hellos until the agent answers with a welcome for this session's nonce.
/// Returns the stream positioned after the welcome line.
pub async fn handshake<S>(
    io: S,
    config: &ClientConfig,
) -> Result<(Prefixed<S>, Welcome), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    handshake_as(io, config, kiln_proto::PROTOCOL_VERSION).await
}

/// [`handshake`] for a host speaking protocol `version` (tests play hosts of other versions).
async fn handshake_as<S>(
    mut io: S,
    config: &ClientConfig,
    version: u32,
) -> Result<(Prefixed<S>, Welcome), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let nonce = nonce_from_bytes(rand::random());
    let hello = Hello {
        version,
        nonce: nonce.clone(),
    }
    .to_line();
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let mut lines = LineBuffer::new();
    let mut received = 0usize;
    let mut buf = [0u8; 4096];
    // Sends are bounded too: a peer that reads nothing (a VMM whose guest never opened the
    // port) fills the stream's buffer, and a write would then wait for ever.
    let timed_out = || ClientError::Timeout {
        what: "agent handshake",
        after: config.handshake_timeout,
    };
    tokio::time::timeout_at(deadline, send_line(&mut io, &hello))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| ClientError::Handshake(format!("sending hello: {e}")))?;
    loop {
        while let Some(line) = lines.next_line() {
            match Welcome::parse(&line) {
                Some(Ok(welcome)) if welcome.nonce == nonce => {
                    if !kiln_proto::accepts_version(version, welcome.protocol) {
                        return Err(ClientError::IncompatibleVersion {
                            agent: welcome.protocol,
                        });
                    }
                    return Ok((Prefixed::new(lines.take_rest(), io), welcome));
                }
                Some(Err(e)) => tracing::debug!(error = %e, "ignoring malformed welcome"),
                _ => {}
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(timed_out());
        }
        let wait = config.hello_interval.min(deadline - now);
        match tokio::time::timeout(wait, io.read(&mut buf)).await {
            Ok(Ok(0)) => {
                return Err(ClientError::Handshake("the agent closed the stream".into()));
            }
            Ok(Ok(n)) => {
                received += n;
                if received > config.max_handshake_bytes {
                    return Err(ClientError::Protocol(format!(
                        "{received} bytes without a welcome"
                    )));
                }
                lines.push(&buf[..n]);
            }
            Ok(Err(e)) => return Err(ClientError::Handshake(format!("reading welcome: {e}"))),
            Err(_elapsed) => tokio::time::timeout_at(deadline, send_line(&mut io, &hello))
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| ClientError::Handshake(format!("sending hello: {e}")))?,
        }
    }
}

async fn send_line<S: AsyncWrite + Unpin>(io: &mut S, line: &str) -> std::io::Result<()> {
    io.write_all(line.as_bytes()).await?;
    io.flush().await
}

/// Opens transports to one agent; called again to reconnect.
pub trait Connector: Send + Sync + std::fmt::Debug {
    /// Opens a new byte stream to the agent.
    fn connect(
        &self,
    ) -> Pin<Box<dyn std::future::Future<Output = io::Result<BoxedTransport>> + Send + '_>>;
}

/// Connects to an agent listening on a unix socket.
#[derive(Debug, Clone)]
pub struct UnixConnector {
    path: std::path::PathBuf,
}

impl UnixConnector {
    /// A connector for the socket at `path`.
    pub fn new(path: impl Into<std::path::PathBuf>) -> UnixConnector {
        UnixConnector { path: path.into() }
    }
}

impl Connector for UnixConnector {
    fn connect(
        &self,
    ) -> Pin<Box<dyn std::future::Future<Output = io::Result<BoxedTransport>> + Send + '_>> {
        Box::pin(async move {
            let stream = tokio::net::UnixStream::connect(&self.path).await?;
            Ok(Box::pin(stream) as BoxedTransport)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fast() -> ClientConfig {
        ClientConfig {
            handshake_timeout: Duration::from_millis(500),
            hello_interval: Duration::from_millis(20),
            max_handshake_bytes: 64 * 1024,
            ..ClientConfig::default()
        }
    }

    /// Reads the host's hello nonce from the agent end.
    async fn read_hello(agent: &mut tokio::io::DuplexStream) -> Hello {
        let mut lines = LineBuffer::new();
        let mut buf = [0u8; 256];
        loop {
            while let Some(line) = lines.next_line() {
                if line.is_empty() {
                    continue;
                }
                return Hello::parse(&line).expect("a hello");
            }
            let n = agent.read(&mut buf).await.expect("read");
            lines.push(&buf[..n]);
        }
    }

    fn welcome(nonce: &str, protocol: u32) -> String {
        Welcome {
            protocol,
            nonce: nonce.into(),
            agent_version: "x".into(),
            boot_id: "b".into(),
            initialized: false,
        }
        .to_line()
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_times_out() {
        // 64 bytes of buffer and nobody reading: the hellos soon cannot be written.
        let (host_end, _agent_end) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let result = handshake(host_end, &fast()).await;
        assert!(
            matches!(result, Err(ClientError::Timeout { .. })),
            "{:?}",
            result.map(|r| r.1)
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn ignores_stale_welcomes_and_keeps_bytes_after_the_right_one() {
        let (host, mut agent) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { handshake(host, &fast()).await });
        let hello = read_hello(&mut agent).await;
        let stale = welcome(&nonce_from_bytes([9; 16]), 1);
        agent.write_all(b"\n\x00garbage\n").await.expect("write");
        agent.write_all(stale.as_bytes()).await.expect("write");
        agent
            .write_all(welcome(&hello.nonce, 1).as_bytes())
            .await
            .expect("write");
        agent.write_all(b"h2 bytes").await.expect("write");
        let (mut stream, w) = task.await.expect("no panic").expect("handshake");
        assert_eq!(w.nonce, hello.nonce);
        let mut rest = [0u8; 8];
        stream.read_exact(&mut rest).await.expect("rest kept");
        assert_eq!(&rest, b"h2 bytes");
    }

    #[tokio::test]
    async fn resends_hello_until_answered() {
        let (host, mut agent) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { handshake(host, &fast()).await });
        let first = read_hello(&mut agent).await;
        let second = read_hello(&mut agent).await;
        assert_eq!(first, second, "the same session's hello is repeated");
        agent
            .write_all(welcome(&first.nonce, 1).as_bytes())
            .await
            .expect("write");
        task.await.expect("no panic").expect("handshake");
    }

    #[tokio::test]
    async fn rejects_incompatible_versions() {
        let (host, mut agent) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { handshake(host, &fast()).await });
        let hello = read_hello(&mut agent).await;
        agent
            .write_all(welcome(&hello.nonce, kiln_proto::PROTOCOL_VERSION + 1).as_bytes())
            .await
            .expect("write");
        assert!(matches!(
            task.await.expect("no panic"),
            Err(ClientError::IncompatibleVersion { .. })
        ));
    }

    /// Plays an agent speaking `agent` to a host speaking `host`.
    async fn handshake_between(host: u32, agent: u32) -> Result<Welcome, ClientError> {
        let (host_end, mut agent_end) = tokio::io::duplex(1 << 16);
        let task =
            tokio::spawn(async move { handshake_as(host_end, &fast(), host).await.map(|r| r.1) });
        let hello = read_hello(&mut agent_end).await;
        assert_eq!(hello.version, host);
        agent_end
            .write_all(welcome(&hello.nonce, agent).as_bytes())
            .await
            .expect("write");
        task.await.expect("no panic")
    }

    #[tokio::test]
    async fn accepts_an_agent_one_version_behind_but_not_two() {
        // A host with two versions before it, whatever the current version is.
        let host = kiln_proto::FIRST_PROTOCOL_VERSION + 2;
        let welcome = handshake_between(host, host - 1)
            .await
            .expect("an agent one version behind is accepted");
        assert_eq!(welcome.protocol, host - 1);
        assert!(matches!(
            handshake_between(host, host - 2).await,
            Err(ClientError::IncompatibleVersion { agent }) if agent == host - 2
        ));
    }

    #[tokio::test]
    async fn the_current_host_accepts_its_previous_version_if_there_is_one() {
        let current = kiln_proto::PROTOCOL_VERSION;
        let previous = handshake_between(current, current - 1).await;
        if current > kiln_proto::FIRST_PROTOCOL_VERSION {
            assert_eq!(previous.expect("previous version").protocol, current - 1);
        } else {
            // Nothing came before the first version: a welcome claiming one is refused.
            assert!(matches!(
                previous,
                Err(ClientError::IncompatibleVersion { .. })
            ));
        }
        if current >= 2 {
            assert!(matches!(
                handshake_between(current, current - 2).await,
                Err(ClientError::IncompatibleVersion { .. })
            ));
        }
        assert_eq!(
            handshake_between(current, current)
                .await
                .expect("current version")
                .protocol,
            current
        );
    }

    #[tokio::test]
    async fn silent_agent_times_out() {
        let (host, _agent) = tokio::io::duplex(1 << 16);
        let result = handshake(host, &fast()).await;
        assert!(matches!(result, Err(ClientError::Timeout { .. })));
    }

    #[tokio::test]
    async fn flood_without_welcome_is_cut_off() {
        let (host, mut agent) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { handshake(host, &fast()).await });
        let flood = tokio::spawn(async move {
            let junk = vec![b'x'; 4096];
            while agent.write_all(&junk).await.is_ok() {}
        });
        assert!(matches!(
            task.await.expect("no panic"),
            Err(ClientError::Protocol(_))
        ));
        flood.abort();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever an agent sends, the handshake ends (success only with the right nonce)
        /// without panicking.
        #[test]
        fn arbitrary_agent_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let (host, mut agent) = tokio::io::duplex(1 << 16);
                let task = tokio::spawn(async move { handshake(host, &fast()).await });
                let _ = agent.write_all(&bytes).await;
                drop(agent);
                let result = task.await.expect("no panic");
                prop_assert!(result.is_err());
                Ok(())
            })?;
        }
    }
}
