//! A guest that misses a wakeup: Linux's virtio_console sometimes does not announce bytes that
//! arrived, and the agent reads a request only once the host sends something more. The
//! transport here plays that guest: once armed, it holds what the host writes until a later
//! write, more than a burst apart, arrives. The client's ping, a second after a request that
//! got no answer, is that later write; a client that never pings waits out its call timeout
//! (the negative control, which also proves the transport really holds the request). A call
//! that is open but owed nothing gets no pings, so its guest sleeps.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use kiln_agent_client::{AgentClient, BoxedTransport, ClientConfig, ClientError, Connector};
use kiln_proto::frame::Frame;
use kiln_proto::messages::{Command, ExecEvent, ExecRequest};
use kiln_testinfra::hostile_agent::{http, ok, FakeAgent};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes this close to the first held one belong to the same request and are held with it.
const BURST: Duration = Duration::from_millis(200);

/// Whether the next write is held, how many holds a later write released, and everything
/// the host wrote.
#[derive(Debug, Default)]
struct Deafness {
    armed: AtomicBool,
    released: AtomicUsize,
    written: std::sync::Mutex<Vec<u8>>,
}

impl Deafness {
    fn written(&self) -> Vec<u8> {
        self.written.lock().expect("written").clone()
    }
}

/// The client's pings in `bytes`: HTTP/2 PING frames (type 6, no ACK flag).
fn pings(bytes: &[u8]) -> usize {
    bytes
        .windows(5)
        .filter(|w| w[..4] == [0, 0, 8, 6] && w[4] & 1 == 0)
        .count()
}

/// A unix stream whose writes, once armed, wait for a later write.
struct Deaf {
    inner: tokio::net::UnixStream,
    deafness: Arc<Deafness>,
    /// Held bytes and when the hold began.
    held: Option<(Vec<u8>, Instant)>,
    /// Released bytes not yet written to `inner`.
    pending: Vec<u8>,
}

impl Deaf {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Deaf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deaf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        this.deafness
            .written
            .lock()
            .expect("written")
            .extend_from_slice(buf);
        match this.held.take() {
            Some((mut held, since)) if since.elapsed() < BURST => {
                held.extend_from_slice(buf);
                this.held = Some((held, since));
            }
            Some((held, _)) => {
                this.deafness.released.fetch_add(1, Ordering::SeqCst);
                this.pending = held;
                this.pending.extend_from_slice(buf);
                let _ = this.drain(cx)?;
            }
            None if this.deafness.armed.swap(false, Ordering::SeqCst) => {
                this.held = Some((buf.to_vec(), Instant::now()));
            }
            None => return Pin::new(&mut this.inner).poll_write(cx, buf),
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[derive(Debug)]
struct DeafConnector {
    socket: std::path::PathBuf,
    deafness: Arc<Deafness>,
}

impl Connector for DeafConnector {
    fn connect(
        &self,
    ) -> Pin<Box<dyn std::future::Future<Output = io::Result<BoxedTransport>> + Send + '_>> {
        Box::pin(async move {
            let inner = tokio::net::UnixStream::connect(&self.socket).await?;
            Ok(Box::pin(Deaf {
                inner,
                deafness: self.deafness.clone(),
                held: None,
                pending: Vec::new(),
            }) as BoxedTransport)
        })
    }
}

/// A client of `agent` through a [`Deaf`] transport.
fn deaf_client(agent: &FakeAgent, ping_after: Duration) -> (AgentClient, Arc<Deafness>) {
    let deafness = Arc::new(Deafness::default());
    let config = ClientConfig {
        call_timeout: Duration::from_secs(3),
        ping_after,
        ..ClientConfig::default()
    };
    let connector = DeafConnector {
        socket: agent.socket().to_path_buf(),
        deafness: deafness.clone(),
    };
    (AgentClient::new(Arc::new(connector), config), deafness)
}

/// Makes one call on a live session whose request the guest misses; returns its outcome,
/// how long it took and how many holds were released.
async fn missed_call(
    agent: &FakeAgent,
    ping_after: Duration,
) -> (Result<bool, ClientError>, Duration, usize) {
    let (client, deafness) = deaf_client(agent, ping_after);
    assert!(client.exists("/").await.expect("a call the guest hears"));
    deafness.armed.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let outcome = client.exists("/").await;
    (
        outcome,
        start.elapsed(),
        deafness.released.load(Ordering::SeqCst),
    )
}

#[tokio::test]
async fn the_ping_after_a_silent_second_wakes_a_guest_that_missed_a_request() {
    let agent = FakeAgent::start(http(|_req| async { ok(r#"{"exists":true}"#) }))
        .await
        .expect("fake agent");
    let ((pinged, pinged_took, pinged_released), (unpinged, unpinged_took, _)) = tokio::join!(
        missed_call(&agent, Duration::from_secs(1)),
        missed_call(&agent, Duration::from_secs(60)),
    );

    // Negative control: without a ping the missed request is never read.
    let err = unpinged.expect_err("a client that never pings waits out its call timeout");
    assert!(
        matches!(err, ClientError::Timeout { .. }),
        "{err:?} after {unpinged_took:?}"
    );

    assert!(
        pinged.expect("the ping wakes the guest, which then answers"),
        "exists"
    );
    assert_eq!(pinged_released, 1, "the request was held until the ping");
    assert!(
        pinged_took >= Duration::from_millis(900) && pinged_took < Duration::from_secs(3),
        "answered {pinged_took:?} after the call: the ping comes after 1 s of silence"
    );
}

/// A body that sends `first` and then stays open, silent.
struct OpenBody(Option<Bytes>);

impl hyper::body::Body for OpenBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.0.take() {
            Some(bytes) => Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes)))),
            None => Poll::Pending,
        }
    }
}

#[tokio::test]
async fn a_call_owed_nothing_is_not_pinged_and_unanswered_stdin_is() {
    // An agent whose process starts and then says nothing, and which never reads stdin.
    let agent = FakeAgent::start(http(|_req| async {
        let started = Frame::control(&ExecEvent::Started { pid: 7 }).encode();
        hyper::Response::new(OpenBody(Some(started)).boxed())
    }))
    .await
    .expect("fake agent");
    let ping_after = Duration::from_millis(300);
    let (client, deafness) = deaf_client(&agent, ping_after);
    let session = client
        .exec(ExecRequest::new(Command::Argv(vec!["cat".into()])))
        .await
        .expect("the exec starts");

    // The process is quiet and the host sent nothing since its start: nothing is sent.
    let before = deafness.written().len();
    tokio::time::sleep(ping_after * 6).await;
    let during = deafness.written();
    assert_eq!(
        during.len(),
        before,
        "the host wrote {} bytes to a session owed nothing ({} pings)",
        during.len() - before,
        pings(&during[before..])
    );

    // Stdin the process does not answer: one ping, which the agent acknowledges (it was
    // awake), and no more. Also the control that the count above would have seen pings.
    session.input().stdin(b"hello\n").await.expect("stdin");
    tokio::time::sleep(ping_after * 4).await;
    let after = deafness.written();
    let rung = pings(&after[during.len()..]);
    assert_eq!(
        rung,
        1,
        "pings in {:?} after unanswered stdin",
        ping_after * 4
    );
}
