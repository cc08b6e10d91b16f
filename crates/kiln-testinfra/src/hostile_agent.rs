//! A fake guest agent that misbehaves, for the host client's tests and `kiln check fuzz`: it
//! answers the handshake correctly, then writes whatever it is told to (bytes that are not
//! HTTP/2, or HTTP/2 responses from a handler). [`fuzz_exec_streams`] drives the real host
//! client against hostile exec streams for a number of frames and reports how it ended.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_agent_client::{AgentClient, ClientConfig, ClientError, UnixConnector};
use kiln_proto::frame::{Frame, FrameKind};
use kiln_proto::handshake::{Hello, LineBuffer, Welcome};
use kiln_proto::messages::{AgentError, Command, ErrorKind, ExecEvent, ExecRequest, ExitStatus};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response body of the fake agent.
pub type Body = BoxBody<Bytes, Infallible>;

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// What the fake agent does after a correct handshake.
#[derive(Clone)]
pub enum Behaviour {
    /// Writes these bytes instead of speaking HTTP/2, then keeps the stream open and silent.
    Raw(Vec<u8>),
    /// Serves HTTP/2 with this handler.
    Http(Handler),
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Behaviour::Raw(bytes) => write!(f, "Raw({} bytes)", bytes.len()),
            Behaviour::Http(_) => f.write_str("Http(..)"),
        }
    }
}

/// Serves HTTP/2 with `handler`.
pub fn http<F, Fut>(handler: F) -> Behaviour
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    Behaviour::Http(Arc::new(move |req| Box::pin(handler(req))))
}

/// A body of `bytes`.
pub fn body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A 200 response of `bytes`.
pub fn ok(bytes: impl Into<Bytes>) -> Response<Body> {
    Response::new(body(bytes))
}

/// A fake agent on a Unix socket in a directory of its own (removed when it is dropped).
#[derive(Debug)]
pub struct FakeAgent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl FakeAgent {
    /// Listens, and behaves as `behaviour` on every connection.
    pub async fn start(behaviour: Behaviour) -> std::io::Result<FakeAgent> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&socket)?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, behaviour.clone()));
            }
        });
        Ok(FakeAgent { _dir: dir, socket })
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A host client of it with short timeouts (2 s handshake, 500 ms calls).
    pub fn client(&self) -> AgentClient {
        let config = ClientConfig {
            handshake_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_millis(500),
            keepalive: Duration::from_secs(1),
            ..ClientConfig::default()
        };
        AgentClient::new(Arc::new(UnixConnector::new(&self.socket)), config)
    }
}

async fn serve(mut stream: tokio::net::UnixStream, behaviour: Behaviour) {
    let mut lines = LineBuffer::new();
    let mut buf = [0u8; 1024];
    let hello = loop {
        if let Some(hello) = lines.next_line().and_then(|l| Hello::parse(&l)) {
            break hello;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => lines.push(&buf[..n]),
        }
    };
    let welcome = Welcome {
        protocol: kiln_proto::PROTOCOL_VERSION,
        nonce: hello.nonce,
        agent_version: "fake".into(),
        boot_id: "fake".into(),
        initialized: true,
    };
    if stream
        .write_all(welcome.to_line().as_bytes())
        .await
        .is_err()
    {
        return;
    }
    match behaviour {
        Behaviour::Raw(bytes) => {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.read(&mut buf).await;
            std::future::pending::<()>().await;
        }
        Behaviour::Http(handler) => {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    }
}

/// One exec stream of a hostile agent, from `seed`: a start, then up to 2,000 frames (in a
/// third of the streams only output, of any size up to 512 bytes; in the others also
/// control messages that do not belong, frames the host never receives, JSON that is not
/// JSON), then an exit, an error, nothing, or bytes that are not a frame. Returns the stream
/// and how many frames it holds.
pub fn hostile_exec_stream(seed: u64) -> (Vec<u8>, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Frame::control(&ExecEvent::Started { pid: 7 })
        .encode()
        .to_vec();
    let random_bytes = |rng: &mut rand::rngs::StdRng, most: usize| {
        let mut bytes = vec![0u8; rng.gen_range(0..=most)];
        rng.fill(&mut bytes[..]);
        bytes
    };
    let count = rng.gen_range(1..2000u64);
    let clean = rng.gen_range(0..3) == 0;
    for _ in 0..count {
        let pick = if clean { 0 } else { rng.gen_range(0..100) };
        let frame = match pick {
            0..=69 => {
                let kind = if rng.gen() {
                    FrameKind::Stdout
                } else {
                    FrameKind::Stderr
                };
                Frame::new(kind, random_bytes(&mut rng, 512).into())
            }
            70..=79 => Frame::control(&ExecEvent::OutputDropped { bytes: rng.gen() }),
            80..=84 => Frame::new(FrameKind::Stdin, random_bytes(&mut rng, 64).into()),
            85..=89 => Frame::new(FrameKind::Data, random_bytes(&mut rng, 64).into()),
            90..=94 => Frame::new(FrameKind::Control, random_bytes(&mut rng, 64).into()),
            _ => Frame::control(&ExecEvent::Started { pid: rng.gen() }),
        };
        out.extend_from_slice(&frame.encode());
    }
    match if clean { 0 } else { rng.gen_range(0..100) } {
        0..=49 => out.extend_from_slice(
            &Frame::control(&ExecEvent::Exited {
                status: ExitStatus {
                    code: Some(rng.gen()),
                    signal: None,
                },
                timed_out: false,
            })
            .encode(),
        ),
        50..=69 => out.extend_from_slice(
            &Frame::control(&ExecEvent::Error(AgentError::new(ErrorKind::Io, "hostile"))).encode(),
        ),
        70..=84 => {}
        _ => out.extend_from_slice(&random_bytes(&mut rng, 64)),
    }
    (out, count + 2)
}

/// How [`fuzz_exec_streams`] went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FrameFuzzReport {
    /// The first stream's seed (stream `n` has seed `seed + n`).
    pub seed: u64,
    /// Frames the fake agent sent.
    pub frames: u64,
    /// Exec streams (one call of the client each).
    pub streams: u64,
    /// Calls that ended in a result (an exit, with the output bounded).
    pub answered: u64,
    /// Calls that ended in a protocol or agent error.
    pub refused: u64,
    /// Calls that ended otherwise: a panic, a hang past 10 s, an error of the wrong kind,
    /// output past its bound (each is a failure).
    pub wrong: u64,
    /// The first few of those.
    pub first_wrong: Vec<String>,
    /// Growth of this process's resident memory from the 20th call to the end, in KiB.
    pub rss_grown_kib: u64,
    /// Seconds taken.
    pub secs: f64,
}

impl FrameFuzzReport {
    /// Growth allowed of resident memory (the client holds at most one call's bounded
    /// output at a time).
    pub const RSS_BOUND_KIB: u64 = 32 << 10;

    fn wrong(&mut self, what: String) {
        self.wrong += 1;
        if self.first_wrong.len() < 5 {
            self.first_wrong.push(what);
        }
    }

    /// No wrong ending, both endings seen (the fuzz reached both paths), memory bounded.
    pub fn passed(&self) -> bool {
        self.wrong == 0
            && self.answered > 0
            && self.refused > 0
            && self.rss_grown_kib < Self::RSS_BOUND_KIB
    }
}

/// Resident memory of this process, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the real host client against a fake agent whose exec streams are
/// [`hostile_exec_stream`]s (from `seed` on) until it has sent `frames` frames. Every call
/// must end in a result with its output bounded, or in a protocol or agent error, within
/// 10 s and without a panic; the process's memory must stay bounded.
pub async fn fuzz_exec_streams(frames: u64, seed: u64) -> std::io::Result<FrameFuzzReport> {
    const OUTPUT_LIMIT: usize = 64 << 10;
    let sent = Arc::new(AtomicU64::new(0));
    let next_seed = Arc::new(AtomicU64::new(seed));
    let agent = {
        let (sent, next_seed) = (sent.clone(), next_seed.clone());
        FakeAgent::start(http(move |_req| {
            let (stream, count) = hostile_exec_stream(next_seed.fetch_add(1, Ordering::SeqCst));
            sent.fetch_add(count, Ordering::SeqCst);
            async move { ok(stream) }
        }))
        .await?
    };
    let client = Arc::new(agent.client());
    let started = Instant::now();
    let mut report = FrameFuzzReport {
        seed,
        ..FrameFuzzReport::default()
    };
    let mut rss_at_start = None;
    while sent.load(Ordering::SeqCst) < frames {
        let call = {
            let client = client.clone();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    client.run(
                        ExecRequest::new(Command::Argv(vec!["true".into()])),
                        OUTPUT_LIMIT,
                    ),
                )
                .await
            })
        };
        report.streams += 1;
        match call.await {
            Ok(Ok(Ok(result))) => {
                if result.stdout.len() + result.stderr.len() <= 2 * OUTPUT_LIMIT + 1024 {
                    report.answered += 1;
                } else {
                    let len = result.stdout.len() + result.stderr.len();
                    report.wrong(format!("{len} bytes of output past the limit"));
                }
            }
            Ok(Ok(Err(ClientError::Protocol(_) | ClientError::Agent(_)))) => report.refused += 1,
            Ok(Ok(Err(other))) => report.wrong(format!("an error of the wrong kind: {other}")),
            Ok(Err(_)) => report.wrong("no end within 10 s".into()),
            Err(e) => report.wrong(format!("the call panicked: {e}")),
        }
        // Measured once the client's buffers and the runtime have grown to their working size.
        if report.streams == 20 {
            rss_at_start = Some(rss_kib());
        }
    }
    report.frames = sent.load(Ordering::SeqCst);
    report.rss_grown_kib = rss_kib().saturating_sub(rss_at_start.unwrap_or_else(rss_kib));
    report.secs = started.elapsed().as_secs_f64();
    Ok(report)
}
