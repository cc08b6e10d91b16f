//! Host-side client of kiln's guest agent.
//!
//! [`AgentClient`] holds one session (handshake + HTTP/2) over a [`Connector`]'s transport
//! and opens a new one when the old one is gone, so it survives agent restarts and VM
//! restores. Every byte from the agent is treated as hostile: lines, frames and JSON bodies
//! are size-limited, unary calls, the start of streams and every step of a file transfer
//! have timeouts (see [`ClientConfig::call_timeout`]), and malformed input becomes an error,
//! never a panic.

mod doorbell;
mod error;
pub mod local;
mod session;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use kiln_proto::frame::{Frame, FrameKind, DATA_CHUNK, MAX_FRAME_PAYLOAD};
use kiln_proto::handshake::Welcome;
use kiln_proto::messages::{
    AgentError, AgentInfo, ConnectRequest, ConnectTarget, Empty, ErrorKind, ExecEvent, ExecInput,
    ExecRequest, ExistsResponse, ExitStatus, FileReadEvent, FileReadRequest, FileStat,
    FileWriteEnd, FileWriteResponse, FileWriteStart, InitRequest, InitResponse, KillAllResponse,
    ListRequest, ListResponse, MkdirRequest, PathRequest, PostRestoreRequest, PostRestoreResponse,
    ProcessInfo, ProcessList, ProcessSelector, PtySize, RemoveRequest, RenameRequest,
    ShutdownAction, ShutdownRequest, SignalRequest,
};
use kiln_proto::routes;
use kiln_proto::stream::{frame_channel, FrameReader, FrameSender};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use error::ClientError;
pub use session::{handshake, BoxedTransport, ClientConfig, Connector, Transport, UnixConnector};

type Body = BoxBody<Bytes, Infallible>;

/// A live session.
#[derive(Debug)]
struct Session {
    sender: SendRequest<Body>,
    welcome: Welcome,
}

/// A client of one agent. Cheap to share behind an `Arc`; calls may run concurrently.
#[derive(Debug)]
pub struct AgentClient {
    connector: Arc<dyn Connector>,
    config: ClientConfig,
    session: tokio::sync::Mutex<Option<Session>>,
}

impl AgentClient {
    /// A client that connects through `connector` on first use.
    pub fn new(connector: Arc<dyn Connector>, config: ClientConfig) -> AgentClient {
        AgentClient {
            connector,
            config,
            session: tokio::sync::Mutex::new(None),
        }
    }

    /// A client of the agent listening on the unix socket at `path`.
    pub fn unix(path: impl Into<std::path::PathBuf>) -> AgentClient {
        AgentClient::new(Arc::new(UnixConnector::new(path)), ClientConfig::default())
    }

    /// The client's configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Opens a session now (if none is live) and returns the agent's welcome.
    pub async fn connect(&self) -> Result<Welcome, ClientError> {
        let mut session = self.session.lock().await;
        Ok(self.live_session(&mut session).await?.welcome.clone())
    }

    /// Drops the current session; the next call opens a new one (e.g. after a restore).
    pub async fn disconnect(&self) {
        *self.session.lock().await = None;
    }

    async fn live_session<'a>(
        &self,
        slot: &'a mut Option<Session>,
    ) -> Result<&'a mut Session, ClientError> {
        if slot.as_ref().is_some_and(|s| s.sender.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(self.open_session().await?);
        }
        slot.as_mut()
            .ok_or_else(|| ClientError::Disconnected("no session".into()))
    }

    async fn open_session(&self) -> Result<Session, ClientError> {
        let transport = bounded("connect", self.config.handshake_timeout, async {
            self.connector.connect().await.map_err(ClientError::Connect)
        })
        .await?;
        let (stream, welcome) = handshake(transport, &self.config).await?;
        let stream = doorbell::install(stream, self.config.ping_after);
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .max_frame_size(256 * 1024)
            .max_header_list_size(64 * 1024)
            .keep_alive_interval(self.config.keepalive)
            .keep_alive_timeout(self.config.keepalive)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "agent session ended");
            }
        });
        tracing::debug!(boot_id = %welcome.boot_id, version = %welcome.agent_version, "agent session open");
        Ok(Session { sender, welcome })
    }

    /// Queues a request on the live session, opening one if needed, and returns the future of
    /// its response head. Waiting for room on the session is bounded by the call timeout;
    /// waiting for the head is left to the caller, which knows when the agent can answer.
    async fn start_request(
        &self,
        route: &str,
        body: Body,
    ) -> Result<impl Future<Output = Result<Response<Incoming>, ClientError>>, ClientError> {
        let mut sender = {
            let mut slot = self.session.lock().await;
            self.live_session(&mut slot).await?.sender.clone()
        };
        let request = Request::post(format!("http://agent{route}"))
            .body(body)
            .map_err(|e| ClientError::Protocol(format!("building request: {e}")))?;
        bounded("agent call", self.config.call_timeout, async {
            Ok(sender.ready().await?)
        })
        .await?;
        let response = sender.send_request(request);
        Ok(async move { Ok(response.await?) })
    }

    /// Sends one request whose answer the agent gives right away (a unary call or the start
    /// of a stream) and waits at most the call timeout for the response head.
    async fn send(&self, route: &str, body: Body) -> Result<Response<Incoming>, ClientError> {
        let response = self.start_request(route, body).await?;
        bounded("agent call", self.config.call_timeout, response).await
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        route: &str,
        request: &Req,
    ) -> Result<Resp, ClientError> {
        self.call_within(route, request, self.config.call_timeout)
            .await
    }

    /// A unary call whose answer may take up to `answer_within` to start (the agent works
    /// before it answers); reading the answer is bounded by the call timeout.
    async fn call_within<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        route: &str,
        request: &Req,
        answer_within: Duration,
    ) -> Result<Resp, ClientError> {
        let json = serde_json::to_vec(request)
            .map_err(|e| ClientError::Protocol(format!("encoding request: {e}")))?;
        let response = self
            .start_request(route, Full::new(Bytes::from(json)).boxed())
            .await?;
        let response = bounded("agent call", answer_within, response).await?;
        bounded(
            "agent response",
            self.config.call_timeout,
            read_json(response),
        )
        .await
    }

    /// Agent version, uptime, load, memory and disk use.
    pub async fn info(&self) -> Result<AgentInfo, ClientError> {
        self.call(routes::INFO, &Empty {}).await
    }

    /// The init call, made once after a cold boot.
    pub async fn init(&self, request: &InitRequest) -> Result<InitResponse, ClientError> {
        self.call(routes::INIT, request).await
    }

    /// The post-restore call, made after every restore or fork.
    pub async fn post_restore(
        &self,
        request: &PostRestoreRequest,
    ) -> Result<PostRestoreResponse, ClientError> {
        self.call(routes::POST_RESTORE, request).await
    }

    /// Asks the guest to power off or reboot.
    pub async fn shutdown(&self, action: ShutdownAction) -> Result<(), ClientError> {
        self.call::<_, Empty>(routes::SHUTDOWN, &ShutdownRequest { action })
            .await
            .map(drop)
    }

    /// Starts a process and returns its stream.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, ClientError> {
        self.open_exec_stream(routes::EXEC, ExecInput::Start(request))
            .await
    }

    /// Runs a process to completion, keeping at most `output_limit` bytes of each of stdout
    /// and stderr (the rest is counted and dropped).
    pub async fn run(
        &self,
        request: ExecRequest,
        output_limit: usize,
    ) -> Result<ExecResult, ClientError> {
        self.exec(request).await?.collect(output_limit).await
    }

    /// Re-attaches to a process started earlier (its kept output is replayed first).
    pub async fn attach(&self, process: ProcessSelector) -> Result<ExecSession, ClientError> {
        self.open_exec_stream(routes::ATTACH, ExecInput::Attach { process })
            .await
    }

    async fn open_exec_stream(
        &self,
        route: &str,
        first: ExecInput,
    ) -> Result<ExecSession, ClientError> {
        let (input, body) = frame_channel(16);
        input
            .send(&Frame::control(&first))
            .await
            .map_err(|e| ClientError::Disconnected(e.to_string()))?;
        let response = self.send(route, body.boxed()).await?;
        let mut output = framed_response(response).await?;
        let first = bounded("exec start", self.config.call_timeout, async {
            output.next().await.map_err(protocol_error)
        })
        .await?;
        match first.map(|f| f.parse_control::<ExecEvent>()) {
            Some(Ok(ExecEvent::Started { pid })) => Ok(ExecSession {
                input,
                output,
                pid,
                done: false,
            }),
            Some(Ok(ExecEvent::Error(e))) => Err(e.into()),
            Some(Ok(other)) => Err(ClientError::Protocol(format!(
                "expected started, got {other:?}"
            ))),
            Some(Err(e)) => Err(protocol_error(e)),
            None => Err(ClientError::Protocol(
                "exec stream ended before it started".into(),
            )),
        }
    }

    /// Processes started through the agent.
    pub async fn processes(&self) -> Result<Vec<ProcessInfo>, ClientError> {
        Ok(self
            .call::<_, ProcessList>(routes::PROCESSES, &Empty {})
            .await?
            .processes)
    }

    /// Kills every user process of the guest (all but the agent); returns how many, once
    /// they are gone. The agent may take up to [`kiln_proto::KILL_ALL_WAIT`] to see them go.
    pub async fn kill_all(&self) -> Result<u32, ClientError> {
        let answer_within = self.config.call_timeout + kiln_proto::KILL_ALL_WAIT;
        Ok(self
            .call_within::<_, KillAllResponse>(routes::KILL_ALL, &Empty {}, answer_within)
            .await?
            .killed)
    }

    /// Opens a byte stream to a socket inside the guest (a service the template started).
    pub async fn connect_to(&self, target: ConnectTarget) -> Result<GuestConnection, ClientError> {
        let (input, body) = frame_channel(16);
        input
            .send(&Frame::control(&ConnectRequest { target }))
            .await
            .map_err(|e| ClientError::Disconnected(e.to_string()))?;
        let response = self.send(routes::CONNECT, body.boxed()).await?;
        let output = framed_response(response).await?;
        Ok(GuestConnection { input, output })
    }

    /// Writes `stdin` to a process started earlier (from outside its own stream), then, as
    /// asked, closes its stdin and resizes its terminal; succeeds once the agent applied all.
    pub async fn input(
        &self,
        process: ProcessSelector,
        stdin: &[u8],
        close_stdin: bool,
        resize: Option<PtySize>,
    ) -> Result<(), ClientError> {
        let mut body = Vec::with_capacity(stdin.len() + 256);
        let mut push = |frame: Frame| body.extend_from_slice(&frame.encode());
        push(Frame::control(&ExecInput::Attach { process }));
        for chunk in stdin.chunks(DATA_CHUNK) {
            push(Frame::new(FrameKind::Stdin, Bytes::copy_from_slice(chunk)));
        }
        if close_stdin {
            push(Frame::control(&ExecInput::StdinEof));
        }
        if let Some(size) = resize {
            push(Frame::control(&ExecInput::Resize(size)));
        }
        let response = self
            .send(routes::INPUT, Full::new(Bytes::from(body)).boxed())
            .await?;
        bounded(
            "agent response",
            self.config.call_timeout,
            read_json::<Empty>(response),
        )
        .await
        .map(drop)
    }

    /// Sends `signal` to a process group.
    pub async fn signal(&self, process: ProcessSelector, signal: i32) -> Result<(), ClientError> {
        self.call::<_, Empty>(routes::SIGNAL, &SignalRequest { process, signal })
            .await
            .map(drop)
    }

    /// Streams a file from the guest into `sink`; returns the bytes copied.
    ///
    /// The download may take as long as it needs, but each piece of it must arrive within the
    /// call timeout: an agent that stops sending fails the call instead of hanging it. Time
    /// spent writing into `sink` does not count.
    pub async fn read_file_to<W: AsyncWrite + Unpin>(
        &self,
        request: FileReadRequest,
        sink: &mut W,
    ) -> Result<u64, ClientError> {
        self.open_file(request).await?.copy_to(sink).await
    }

    /// Opens a file in the guest for download: returns once the agent has opened it (or
    /// failed to), so a missing file or a directory is an error before any byte is sent.
    pub async fn open_file(&self, request: FileReadRequest) -> Result<FileDownload, ClientError> {
        let json = serde_json::to_vec(&request)
            .map_err(|e| ClientError::Protocol(format!("encoding request: {e}")))?;
        let response = self
            .send(routes::FILE_READ, Full::new(Bytes::from(json)).boxed())
            .await?;
        let mut download = FileDownload {
            frames: framed_response(response).await?,
            idle: self.config.call_timeout,
            size: 0,
            limit: request.limit,
        };
        let frame = download.next_frame().await?;
        if frame.kind != FrameKind::Control {
            return Err(ClientError::Protocol(format!(
                "unexpected {:?} frame before the file was opened",
                frame.kind
            )));
        }
        match frame.parse_control().map_err(protocol_error)? {
            FileReadEvent::Opened { size } => download.size = size,
            FileReadEvent::Error(e) => return Err(e.into()),
            other => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
        Ok(download)
    }

    /// Reads a whole file into memory, failing if it is larger than `max_bytes`.
    pub async fn read_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, ClientError> {
        let request = FileReadRequest {
            path: path.to_owned(),
            offset: 0,
            limit: Some(max_bytes.saturating_add(1)),
        };
        let mut sink = Vec::new();
        self.read_file_to(request, &mut sink).await?;
        if sink.len() as u64 > max_bytes {
            return Err(ClientError::Agent(AgentError::new(
                ErrorKind::InvalidArgument,
                format!("{path} is larger than {max_bytes} bytes"),
            )));
        }
        Ok(sink)
    }

    /// Streams `source` into a file in the guest, replacing it atomically once complete.
    ///
    /// The agent answers only once the whole file is written and synced, so the upload as a
    /// whole has no deadline. Its progress does: the agent must take each piece within the
    /// call timeout (time spent reading `source` does not count), and must answer within the
    /// call timeout plus a second per 4 MiB uploaded once the last piece is queued (the sync
    /// of a large file takes time).
    pub async fn write_file_from<R: AsyncRead + Unpin>(
        &self,
        start: FileWriteStart,
        source: &mut R,
    ) -> Result<u64, ClientError> {
        let idle = self.config.call_timeout;
        let (input, body) = frame_channel(16);
        let response = self.start_request(routes::FILE_WRITE, body.boxed()).await?;
        tokio::pin!(response);
        let upload = upload(input, &start, source, idle);
        tokio::pin!(upload);
        let (sent, written) = tokio::select! {
            // Polled first: once the last frame is queued, the upload has finished.
            biased;
            sent = &mut upload => match sent {
                Ok(sent) => (sent, write_answer(&mut response, upload_answer_limit(idle, sent)).await?),
                // The agent closed the stream before taking all of it; its answer says why.
                Err(closed @ ClientError::Disconnected(_)) => {
                    return Err(match write_answer(response, idle).await {
                        Err(reason @ ClientError::Agent(_)) => reason,
                        _ => closed,
                    });
                }
                Err(e) => return Err(e),
            },
            // The agent answered before it had the whole file: normally an error that explains
            // why it stopped reading.
            response = &mut response => {
                let written = write_answer(std::future::ready(response), idle).await?;
                (upload.await?, written)
            }
        };
        if written.size != sent {
            return Err(ClientError::Protocol(format!(
                "agent wrote {} bytes of {sent}",
                written.size
            )));
        }
        Ok(sent)
    }

    /// Writes `data` to a file in the guest (atomic replace).
    pub async fn write_file(&self, path: &str, data: &[u8]) -> Result<u64, ClientError> {
        let start = FileWriteStart::new(path);
        self.write_file_from(start, &mut &data[..]).await
    }

    /// Lists a directory down to `depth` levels.
    pub async fn list(&self, path: &str, depth: u32) -> Result<ListResponse, ClientError> {
        self.call(
            routes::FILE_LIST,
            &ListRequest {
                path: path.to_owned(),
                depth,
            },
        )
        .await
    }

    /// Metadata of a path (symlinks not followed).
    pub async fn stat(&self, path: &str) -> Result<FileStat, ClientError> {
        self.call(
            routes::FILE_STAT,
            &PathRequest {
                path: path.to_owned(),
            },
        )
        .await
    }

    /// Whether a path exists.
    pub async fn exists(&self, path: &str) -> Result<bool, ClientError> {
        let response: ExistsResponse = self
            .call(
                routes::FILE_EXISTS,
                &PathRequest {
                    path: path.to_owned(),
                },
            )
            .await?;
        Ok(response.exists)
    }

    /// `mkdir -p`.
    pub async fn mkdir(&self, request: &MkdirRequest) -> Result<(), ClientError> {
        self.call::<_, Empty>(routes::FILE_MKDIR, request)
            .await
            .map(drop)
    }

    /// Removes a path (`recursive` for directory trees).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        let request = RemoveRequest {
            path: path.to_owned(),
            recursive,
        };
        self.call::<_, Empty>(routes::FILE_REMOVE, &request)
            .await
            .map(drop)
    }

    /// Renames a path.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), ClientError> {
        let request = RenameRequest {
            from: from.to_owned(),
            to: to.to_owned(),
        };
        self.call::<_, Empty>(routes::FILE_RENAME, &request)
            .await
            .map(drop)
    }
}

/// Sends a file write stream into `input`: the start frame, the bytes of `source`, the end
/// frame. Each frame must be taken by the session within `idle`, so an agent that stops reading
/// fails the upload while a slow one that keeps reading does not. Returns the bytes sent.
async fn upload<R: AsyncRead + Unpin>(
    input: FrameSender,
    start: &FileWriteStart,
    source: &mut R,
    idle: Duration,
) -> Result<u64, ClientError> {
    let send = |frame: Frame| {
        let input = &input;
        bounded("file upload progress", idle, async move {
            Ok(input.send(&frame).await?)
        })
    };
    send(Frame::control(start)).await?;
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut size = 0u64;
    loop {
        let n = source.read(&mut buf).await.map_err(ClientError::LocalIo)?;
        if n == 0 {
            break;
        }
        send(Frame::new(
            FrameKind::Data,
            Bytes::copy_from_slice(&buf[..n]),
        ))
        .await?;
        size += n as u64;
    }
    send(Frame::control(&FileWriteEnd { size })).await?;
    Ok(size)
}

/// Throughput at which an agent is assumed, pessimistically, to get a finished upload onto its
/// disk: the agent syncs the file before it answers, and what is still in flight or only in
/// its page cache at the end grows with the upload.
const UPLOAD_FLUSH_BYTES_PER_SEC: u64 = 4 << 20;

/// How long the agent may take to answer once the last piece of an upload of `sent` bytes
/// has been queued: the call timeout, plus the time to flush it at
/// [`UPLOAD_FLUSH_BYTES_PER_SEC`].
fn upload_answer_limit(call_timeout: Duration, sent: u64) -> Duration {
    call_timeout + Duration::from_secs(sent / UPLOAD_FLUSH_BYTES_PER_SEC)
}

/// The agent's answer to a file write (its response head and body), within `limit`.
async fn write_answer(
    response: impl Future<Output = Result<Response<Incoming>, ClientError>>,
    limit: Duration,
) -> Result<FileWriteResponse, ClientError> {
    bounded("file write response", limit, async {
        read_json::<FileWriteResponse>(response.await?).await
    })
    .await
}

/// A file the agent has opened for download ([`AgentClient::open_file`]).
pub struct FileDownload {
    frames: FrameReader<Incoming>,
    idle: Duration,
    size: u64,
    /// The most bytes asked for: an agent that sends more is not believed.
    limit: Option<u64>,
}

impl std::fmt::Debug for FileDownload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDownload")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl FileDownload {
    /// The file's size when the agent opened it (it may change while it is read).
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn next_frame(&mut self) -> Result<Frame, ClientError> {
        bounded("file download progress", self.idle, async {
            self.frames.next().await.map_err(protocol_error)
        })
        .await?
        .ok_or_else(|| ClientError::Protocol("file stream ended without its end event".into()))
    }

    /// Copies the rest of the file into `sink`; returns the bytes copied. Each piece must
    /// arrive within the call timeout; time spent writing into `sink` does not count. An
    /// agent that sends more than the request's limit is an error before the excess reaches
    /// `sink`.
    pub async fn copy_to<W: AsyncWrite + Unpin>(
        mut self,
        sink: &mut W,
    ) -> Result<u64, ClientError> {
        let mut received = 0u64;
        loop {
            let frame = self.next_frame().await?;
            match frame.kind {
                FrameKind::Data => {
                    let after = received.saturating_add(frame.payload.len() as u64);
                    if let Some(limit) = self.limit.filter(|limit| after > *limit) {
                        return Err(ClientError::Protocol(format!(
                            "the agent sent more than the {limit} bytes asked for"
                        )));
                    }
                    sink.write_all(&frame.payload)
                        .await
                        .map_err(ClientError::LocalIo)?;
                    received = after;
                }
                FrameKind::Control => match frame.parse_control().map_err(protocol_error)? {
                    FileReadEvent::End { sent } => {
                        if sent != received {
                            return Err(ClientError::Protocol(format!(
                                "agent announced {sent} bytes, sent {received}"
                            )));
                        }
                        sink.flush().await.map_err(ClientError::LocalIo)?;
                        return Ok(received);
                    }
                    FileReadEvent::Error(e) => return Err(e.into()),
                    other => return Err(ClientError::Protocol(format!("unexpected {other:?}"))),
                },
                other => return Err(ClientError::Protocol(format!("unexpected {other:?} frame"))),
            }
        }
    }
}

/// Runs `future`, failing with a timeout that names `what` if it takes longer than `limit`.
async fn bounded<T>(
    what: &'static str,
    limit: Duration,
    future: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| ClientError::Timeout { what, after: limit })?
}

fn protocol_error(e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(e.to_string())
}

/// Checks the status of a streaming response and wraps its body.
async fn framed_response(
    response: Response<Incoming>,
) -> Result<FrameReader<Incoming>, ClientError> {
    if response.status() != StatusCode::OK {
        return Err(read_json::<Empty>(response)
            .await
            .err()
            .unwrap_or_else(|| ClientError::Protocol("error status with a success body".into())));
    }
    Ok(FrameReader::new(response.into_body(), MAX_FRAME_PAYLOAD))
}

/// Reads a bounded JSON body: the value on success, the agent's error otherwise.
async fn read_json<T: DeserializeOwned>(response: Response<Incoming>) -> Result<T, ClientError> {
    let status = response.status();
    let bytes = Limited::new(response.into_body(), kiln_proto::MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|e| ClientError::Protocol(format!("reading response: {e}")))?
        .to_bytes();
    if status == StatusCode::OK {
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("malformed response: {e}")))
    } else {
        let error: AgentError = serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!("malformed error response (status {status}): {e}"))
        })?;
        Err(error.into())
    }
}

/// One event of an exec stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    /// Bytes from stdout (or the terminal).
    Stdout(Bytes),
    /// Bytes from stderr.
    Stderr(Bytes),
    /// Output was dropped before this attach.
    Dropped(u64),
    /// The process ended; no events follow.
    Exited {
        /// How.
        status: ExitStatus,
        /// Whether the agent killed it on timeout.
        timed_out: bool,
    },
}

/// Collected result of a process run to completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Stdout, up to the limit.
    pub stdout: Vec<u8>,
    /// Stderr, up to the limit.
    pub stderr: Vec<u8>,
    /// Whether any output was cut at the limit or dropped by the agent.
    pub truncated: bool,
    /// How it ended.
    pub status: ExitStatus,
    /// Whether it was killed on timeout.
    pub timed_out: bool,
}

/// Sends stdin, resizes and signals to a running process; clone it to use it from another
/// task while the [`ExecSession`] reads output.
#[derive(Debug, Clone)]
pub struct ExecInputHandle {
    input: FrameSender,
}

impl ExecInputHandle {
    async fn send(&self, frame: Frame) -> Result<(), ClientError> {
        // The agent drops a process's input stream when the process ends; a lost session
        // shows on the output side.
        self.input
            .send(&frame)
            .await
            .map_err(|_| ClientError::InputClosed)
    }

    /// Writes to the process's stdin.
    pub async fn stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(DATA_CHUNK) {
            self.send(Frame::new(FrameKind::Stdin, Bytes::copy_from_slice(chunk)))
                .await?;
        }
        Ok(())
    }

    /// Closes stdin (sends end-of-file on a terminal).
    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        self.send(Frame::control(&ExecInput::StdinEof)).await
    }

    /// Resizes the terminal.
    pub async fn resize(&self, size: PtySize) -> Result<(), ClientError> {
        self.send(Frame::control(&ExecInput::Resize(size))).await
    }

    /// Sends a signal to the process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.send(Frame::control(&ExecInput::Signal { signal }))
            .await
    }
}

/// A byte stream to a socket inside the guest; dropping it closes the connection.
#[derive(Debug)]
pub struct GuestConnection {
    input: FrameSender,
    output: FrameReader<Incoming>,
}

impl GuestConnection {
    /// Sends bytes to the guest's socket.
    pub async fn write(&self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(DATA_CHUNK) {
            self.input
                .send(&Frame::new(FrameKind::Stdin, Bytes::copy_from_slice(chunk)))
                .await
                .map_err(|e| ClientError::Disconnected(e.to_string()))?;
        }
        Ok(())
    }

    /// Shuts the write side (the guest's service reads end-of-file).
    pub async fn close_write(&self) -> Result<(), ClientError> {
        self.input
            .send(&Frame::control(&ExecInput::StdinEof))
            .await
            .map_err(|e| ClientError::Disconnected(e.to_string()))
    }

    /// The next bytes the guest's socket sent; `None` once it closed. Waiting is the
    /// caller's to bound.
    pub async fn read(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            match self.output.next().await.map_err(protocol_error)? {
                None => return Ok(None),
                Some(frame) if frame.kind == FrameKind::Stdout => return Ok(Some(frame.payload)),
                Some(frame) if frame.kind == FrameKind::Control => {
                    if let Ok(ExecEvent::Error(e)) = frame.parse_control::<ExecEvent>() {
                        return Err(e.into());
                    }
                }
                Some(other) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected {:?} frame on a connection",
                        other.kind
                    )))
                }
            }
        }
    }
}

/// A running (or attached) process. Dropping it before the exit kills a foreground process.
#[derive(Debug)]
pub struct ExecSession {
    input: FrameSender,
    output: FrameReader<Incoming>,
    pid: u32,
    done: bool,
}

impl ExecSession {
    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle for stdin, resize and signals.
    pub fn input(&self) -> ExecInputHandle {
        ExecInputHandle {
            input: self.input.clone(),
        }
    }

    /// The next output event; `None` after the exit was returned.
    pub async fn next(&mut self) -> Result<Option<ExecOutput>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let frame = self.output.next().await.map_err(|e| match e {
            kiln_proto::stream::ReadFrameError::Body(m) => ClientError::Disconnected(m),
            other => protocol_error(other),
        })?;
        let Some(frame) = frame else {
            return Err(ClientError::Protocol(
                "exec stream ended without an exit".into(),
            ));
        };
        Ok(Some(match frame.kind {
            FrameKind::Stdout => ExecOutput::Stdout(frame.payload),
            FrameKind::Stderr => ExecOutput::Stderr(frame.payload),
            FrameKind::Control => {
                match frame.parse_control::<ExecEvent>().map_err(protocol_error)? {
                    ExecEvent::Exited { status, timed_out } => {
                        self.done = true;
                        ExecOutput::Exited { status, timed_out }
                    }
                    ExecEvent::OutputDropped { bytes } => ExecOutput::Dropped(bytes),
                    ExecEvent::Error(e) => {
                        self.done = true;
                        return Err(e.into());
                    }
                    ExecEvent::Started { .. } => {
                        return Err(ClientError::Protocol("second started event".into()))
                    }
                }
            }
            other => return Err(ClientError::Protocol(format!("unexpected {other:?} frame"))),
        }))
    }

    /// Reads to the exit, keeping at most `limit` bytes of each stream.
    pub async fn collect(mut self, limit: usize) -> Result<ExecResult, ClientError> {
        let mut result = ExecResult {
            stdout: Vec::new(),
            stderr: Vec::new(),
            truncated: false,
            status: ExitStatus {
                code: None,
                signal: None,
            },
            timed_out: false,
        };
        let keep = |buf: &mut Vec<u8>, data: &[u8], truncated: &mut bool| {
            let room = limit.saturating_sub(buf.len());
            if data.len() > room {
                *truncated = true;
            }
            buf.extend_from_slice(&data[..data.len().min(room)]);
        };
        while let Some(event) = self.next().await? {
            match event {
                ExecOutput::Stdout(b) => keep(&mut result.stdout, &b, &mut result.truncated),
                ExecOutput::Stderr(b) => keep(&mut result.stderr, &b, &mut result.truncated),
                ExecOutput::Dropped(_) => result.truncated = true,
                ExecOutput::Exited { status, timed_out } => {
                    result.status = status;
                    result.timed_out = timed_out;
                }
            }
        }
        Ok(result)
    }
}
