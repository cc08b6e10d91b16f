//! The agent's state and its HTTP/2 service: one handler per route of
//! [`kiln_proto::routes`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_proto::frame::{Frame, FrameKind, MAX_FRAME_PAYLOAD};
use kiln_proto::messages::{
    AgentError, AgentInfo, ConnectRequest, ConnectTarget, Empty, ErrorKind, ExecEvent, ExecInput,
    ExecRequest, ExistsResponse, FileReadRequest, InitRequest, InitResponse, KillAllResponse,
    ListRequest, MkdirRequest, PathRequest, PostRestoreRequest, PostRestoreResponse, ProcessList,
    ReadinessCheck, RemoveRequest, RenameRequest, ShutdownRequest, SignalRequest, StartCommand,
};
use kiln_proto::routes;
use kiln_proto::stream::{frame_channel, FrameReader, FrameSender};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::cgroups::UserCgroup;
use crate::duties::{self, Duties, Duty};
use crate::files;
use crate::info;
use crate::output::Next;
use crate::process::{self, ExecDefaults, Process, ProcessTable};
use crate::reaper::Reaper;
use crate::session::{self, Identity};
use crate::transport::{ListenAddr, SerialPort};

type Body = BoxBody<Bytes, Infallible>;

/// How long the host has to send the first frame of a stream.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Static configuration of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where to serve.
    pub listen: ListenAddr,
    /// Enabled init duties.
    pub duties: Duties,
}

#[derive(Debug, Default)]
struct MutableState {
    defaults: ExecDefaults,
    initialized: bool,
    /// The resolver settings of `init`, written again with each new hostname.
    dns: Option<kiln_proto::messages::DnsConfig>,
    metadata: BTreeMap<String, String>,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    reaper: Arc<Reaper>,
    processes: ProcessTable,
    boot_id: String,
    state: Mutex<MutableState>,
    /// The user processes' cgroup, where the agent is init (see [`crate::cgroups`]).
    user_cgroup: Option<UserCgroup>,
    /// Permits for processes starting at once (see [`CONCURRENT_STARTS`]).
    starts: Arc<tokio::sync::Semaphore>,
}

/// At most this many processes start at once. Each start holds one of the agent's blocking
/// threads (16, see `main.rs`) until its child has exec'd, which a child starved of memory
/// may take seconds to do; the rest stay free for file calls and kill-all.
const CONCURRENT_STARTS: usize = 8;

impl Agent {
    /// Creates the agent; must run inside a tokio runtime (it starts the reaper).
    pub fn new(config: AgentConfig) -> io::Result<Arc<Agent>> {
        let user_cgroup = if config.duties.has(Duty::Cgroups) {
            UserCgroup::set_up()
                .inspect_err(
                    |e| tracing::error!(error = %e, "user processes run without their cgroup"),
                )
                .ok()
        } else {
            None
        };
        Ok(Arc::new(Agent {
            user_cgroup,
            config,
            reaper: Reaper::start()?,
            processes: ProcessTable::default(),
            boot_id: kiln_proto::handshake::nonce_from_bytes(rand::random()),
            state: Mutex::new(MutableState::default()),
            starts: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_STARTS)),
        }))
    }

    fn state(&self) -> MutexGuard<'_, MutableState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn defaults(&self) -> ExecDefaults {
        self.state().defaults.clone()
    }

    fn identity(&self) -> Identity {
        Identity {
            boot_id: self.boot_id.clone(),
            initialized: self.state().initialized,
        }
    }

    /// Serves forever on the configured address.
    pub async fn run(self: Arc<Self>) -> io::Result<()> {
        match self.config.listen.clone() {
            ListenAddr::Unix(path) => {
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path)?;
                tracing::info!(path = %path.display(), "agent listening on unix socket");
                loop {
                    let (stream, _) = listener.accept().await?;
                    let agent = self.clone();
                    tokio::spawn(async move { agent.serve_session(stream).await });
                }
            }
            ListenAddr::Serial(path) => {
                let port = SerialPort::open(&path)?;
                tracing::info!(path = %path.display(), "agent serving on virtio-serial port");
                loop {
                    port.wait_host().await?;
                    self.clone().serve_session(port.stream()?).await;
                }
            }
        }
    }

    /// Runs one session: handshake, then HTTP/2 until the host goes away.
    pub async fn serve_session<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let stream = match session::accept(stream, &self.identity()).await {
            Ok(Some(stream)) => stream,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "session ended during handshake");
                return;
            }
        };
        let agent = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let agent = agent.clone();
            async move { Ok::<_, Infallible>(agent.route(req).await) }
        });
        let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .max_frame_size(256 * 1024)
            .max_concurrent_streams(1024)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "session ended");
        }
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::POST {
            return error_response(AgentError::new(ErrorKind::InvalidRequest, "use POST"));
        }
        let path = req.uri().path().to_owned();
        let body = req.into_body();
        match path.as_str() {
            routes::INFO => reply(Ok(self.info())),
            routes::INIT => unary(body, |r: InitRequest| self.init(r)).await,
            routes::POST_RESTORE => {
                unary(
                    body,
                    |r: PostRestoreRequest| async move { self.post_restore(r) },
                )
                .await
            }
            routes::SHUTDOWN => unary(body, |r: ShutdownRequest| self.shutdown(r)).await,
            routes::EXEC | routes::ATTACH => self.exec_stream(body).await,
            routes::INPUT => self.process_input(body).await,
            routes::CONNECT => connect_stream(body).await,
            routes::PROCESSES => reply(Ok(ProcessList {
                processes: self.processes.list(),
            })),
            routes::KILL_ALL => {
                let agent = self.clone();
                let killed = tokio::task::spawn_blocking(move || agent.kill_all())
                    .await
                    .unwrap_or_else(|e| {
                        Err(AgentError::new(
                            ErrorKind::Internal,
                            format!("kill-all: {e}"),
                        ))
                    });
                reply(killed.map(|killed| KillAllResponse { killed }))
            }
            routes::SIGNAL => {
                unary(body, |r: SignalRequest| async move {
                    self.processes
                        .find(&r.process)?
                        .signal(r.signal)
                        .map(|()| Empty {})
                })
                .await
            }
            routes::FILE_READ => self.file_read(body).await,
            routes::FILE_WRITE => self.file_write(body).await,
            routes::FILE_LIST => {
                unary(body, |r: ListRequest| async move {
                    files::list(self.defaults().resolve_path(&r.path)?, r.depth).await
                })
                .await
            }
            routes::FILE_STAT => {
                unary(body, |r: PathRequest| async move {
                    files::stat(self.defaults().resolve_path(&r.path)?).await
                })
                .await
            }
            routes::FILE_EXISTS => {
                unary(body, |r: PathRequest| async move {
                    let exists = files::exists(self.defaults().resolve_path(&r.path)?).await?;
                    Ok(ExistsResponse { exists })
                })
                .await
            }
            routes::FILE_MKDIR => {
                unary(body, |r: MkdirRequest| async move {
                    let defaults = self.defaults();
                    let path = defaults.resolve_path(&r.path)?;
                    files::mkdir(path, r.mode, r.user.or(defaults.user))
                        .await
                        .map(|()| Empty {})
                })
                .await
            }
            routes::FILE_REMOVE => {
                unary(body, |r: RemoveRequest| async move {
                    let path = self.defaults().resolve_path(&r.path)?;
                    files::remove(path, r.recursive).await.map(|()| Empty {})
                })
                .await
            }
            routes::FILE_RENAME => {
                unary(body, |r: RenameRequest| async move {
                    let defaults = self.defaults();
                    let (from, to) = (
                        defaults.resolve_path(&r.from)?,
                        defaults.resolve_path(&r.to)?,
                    );
                    files::rename(from, to).await.map(|()| Empty {})
                })
                .await
            }
            other => error_response(AgentError::new(
                ErrorKind::InvalidRequest,
                format!("unknown route {other}"),
            )),
        }
    }

    fn info(&self) -> AgentInfo {
        let state = self.state();
        AgentInfo {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: kiln_proto::PROTOCOL_VERSION,
            boot_id: self.boot_id.clone(),
            initialized: state.initialized,
            uptime_secs: info::uptime_secs(),
            load: info::load(),
            memory: info::memory(),
            disk: info::disk(),
            running_processes: u32::try_from(self.processes.running()).unwrap_or(u32::MAX),
            hostname: info::hostname(),
            metadata: state.metadata.clone(),
        }
    }

    async fn init(self: Arc<Self>, request: InitRequest) -> Result<InitResponse, AgentError> {
        let duties = &self.config.duties;
        let mut response = InitResponse::default();
        let mut note = |duty: Duty, applied: bool| {
            let list = if applied {
                &mut response.applied
            } else {
                &mut response.skipped
            };
            list.push(duty.name().to_owned());
        };
        if let Some(network) = &request.network {
            let enabled = duties.has(Duty::Network);
            if enabled {
                duties::configure_network(network)?;
            }
            note(Duty::Network, enabled);
        }
        if let Some(hostname) = &request.hostname {
            let enabled = duties.has(Duty::Hostname);
            if enabled {
                duties::set_hostname(hostname)?;
                if duties.has(Duty::Mounts) {
                    duties::write_etc_hostname(hostname)?;
                }
            }
            note(Duty::Hostname, enabled);
        }
        if let Some(dns) = &request.dns {
            let enabled = duties.has(Duty::Dns);
            if enabled {
                duties::write_dns(dns, request.hostname.as_deref())?;
                self.state().dns = Some(dns.clone());
            }
            note(Duty::Dns, enabled);
        }
        if let Some(workdir) = &request.workdir {
            if !std::path::Path::new(workdir).is_absolute() {
                return Err(AgentError::new(
                    ErrorKind::InvalidArgument,
                    "workdir must be absolute",
                ));
            }
        }
        if let Some(user) = &request.user {
            crate::users::resolve_user(std::path::Path::new("/"), user)?;
        }
        {
            let mut state = self.state();
            state.defaults = ExecDefaults {
                env: request.env.clone(),
                workdir: request.workdir.clone(),
                user: request.user.clone(),
            };
        }
        if let Some(start) = &request.start {
            response.start_pid = Some(self.run_start_command(start).await?);
        }
        self.state().initialized = true;
        Ok(response)
    }

    /// Starts the template's start command in the background and waits for its readiness.
    async fn run_start_command(self: &Arc<Self>, start: &StartCommand) -> Result<u32, AgentError> {
        let mut request = ExecRequest::new(start.command.clone());
        request.background = true;
        request.tag = Some("start".into());
        let process = self.start_process(&request).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(start.timeout_ms);
        let interval = Duration::from_millis(start.interval_ms.max(10));
        loop {
            if let Some(finish) = process.finished() {
                return Err(AgentError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "start command exited before it was ready: {:?}",
                        finish.status
                    ),
                ));
            }
            let ready = match &start.readiness {
                None => true,
                Some(ReadinessCheck::TcpPort { port }) => {
                    tokio::net::TcpStream::connect(("127.0.0.1", *port))
                        .await
                        .is_ok()
                }
                Some(ReadinessCheck::Exec { command }) => {
                    let check = self
                        .start_process(&ExecRequest::new(command.clone()))
                        .await?;
                    let mut output = check.output.subscribe();
                    let finish = loop {
                        if let Next::Finished(f) = output.next().await {
                            break f;
                        }
                    };
                    self.processes.remove(&check);
                    finish.status.code == Some(0)
                }
            };
            if ready {
                return Ok(process.pid);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AgentError::new(
                    ErrorKind::Timeout,
                    format!("start command not ready after {} ms", start.timeout_ms),
                ));
            }
            tokio::time::sleep(interval).await;
        }
    }

    fn post_restore(&self, request: PostRestoreRequest) -> Result<PostRestoreResponse, AgentError> {
        let duties = &self.config.duties;
        let mut response = PostRestoreResponse::default();
        let entropy = decode_hex(&request.entropy_hex)
            .ok_or_else(|| AgentError::new(ErrorKind::InvalidArgument, "entropy_hex is not hex"))?;
        if duties.has(Duty::Clock) {
            response.clock_skew_ms = duties::set_clock(request.wall_clock_ns)?;
            response.applied.push("clock".into());
        } else {
            response.skipped.push("clock".into());
        }
        if duties.has(Duty::Rng) {
            duties::add_entropy(&entropy)?;
            response.applied.push("rng".into());
        } else {
            response.skipped.push("rng".into());
        }
        if let Some(hostname) = &request.hostname {
            if duties.has(Duty::Hostname) {
                duties::set_hostname(hostname)?;
                // The files that name the guest follow its new name.
                if duties.has(Duty::Mounts) {
                    duties::write_etc_hostname(hostname)?;
                }
                let dns = self.state().dns.clone();
                if let (Some(dns), true) = (dns, duties.has(Duty::Dns)) {
                    duties::write_dns(&dns, Some(hostname))?;
                }
                response.applied.push("hostname".into());
            } else {
                response.skipped.push("hostname".into());
            }
        }
        if let Some(metadata) = request.metadata {
            self.state().metadata = metadata;
            response.applied.push("metadata".into());
        }
        Ok(response)
    }

    async fn shutdown(self: Arc<Self>, request: ShutdownRequest) -> Result<Empty, AgentError> {
        let power = self.config.duties.has(Duty::Power);
        // Answer first; the power-off happens once the response is on its way.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if power {
                if let Err(e) = duties::shutdown(request.action) {
                    tracing::error!(error = %e, "shutdown failed");
                }
            } else {
                tracing::info!("shutdown requested; exiting (power duty disabled)");
                std::process::exit(0);
            }
        });
        Ok(Empty {})
    }

    /// Kills every user process: the whole users' cgroup where there is one, else every
    /// process group the agent started.
    fn kill_all(&self) -> Result<u32, AgentError> {
        match &self.user_cgroup {
            Some(cgroup) => cgroup
                .kill_all()
                .map_err(|e| AgentError::new(ErrorKind::Io, format!("killing processes: {e}"))),
            None => Ok(self.processes.kill_running()),
        }
    }

    /// Starts a process on a blocking thread: the spawn returns once the child has exec'd,
    /// which a child starved of memory (its users' cgroup at its limit) may take seconds to
    /// do, and the agent must keep answering meanwhile (keep-alive pings, kill-all). The
    /// start runs to its end even if its caller goes away meanwhile; a foreground process
    /// whose caller has gone is then killed, as when its stream ends.
    async fn start_process(
        self: &Arc<Self>,
        request: &ExecRequest,
    ) -> Result<Arc<Process>, AgentError> {
        let requested = tokio::time::Instant::now();
        let permit = Arc::clone(&self.starts)
            .acquire_owned()
            .await
            .map_err(|_| AgentError::new(ErrorKind::Internal, "the agent is stopping"))?;
        let (server, request) = (Arc::clone(self), request.clone());
        let (started, start) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let result = server.spawn_listed(&request, requested);
            if let Err(Ok(process)) = started.send(result) {
                if !request.background {
                    tokio::spawn(async move { server.abandon(&process).await });
                }
            }
        });
        start.await.map_err(|_| {
            AgentError::new(
                ErrorKind::Internal,
                "starting the process failed unexpectedly (see the agent's log)",
            )
        })?
    }

    /// Kills a foreground process whose caller has gone, and unlists it once it is reaped
    /// (listed until then, so a listing never misses a process still alive).
    async fn abandon(&self, process: &Arc<Process>) {
        let _ = process.signal(libc::SIGKILL);
        process.output.wait_finished().await;
        self.processes.remove(process);
    }

    /// Spawns `request` and adds it to the process table (blocking until its child exec'd).
    fn spawn_listed(
        &self,
        request: &ExecRequest,
        requested: tokio::time::Instant,
    ) -> Result<Arc<Process>, AgentError> {
        let _tag = self.processes.reserve_tag(request.tag.as_deref())?;
        let cgroup = self.user_cgroup.as_ref().map(UserCgroup::procs_fd);
        let process = process::spawn(&self.reaper, &self.defaults(), request, cgroup, requested)?;
        self.processes.insert(process.clone());
        Ok(process)
    }

    /// An exec or attach stream: the first frame says which, then stdin/resize/signal frames
    /// flow in and output frames flow out.
    async fn exec_stream(self: Arc<Self>, body: Incoming) -> Response<Body> {
        let mut input = FrameReader::new(body, MAX_FRAME_PAYLOAD);
        let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, input.next()).await {
            Ok(Ok(Some(frame))) => frame.parse_control::<ExecInput>(),
            Ok(Ok(None)) => return error_response(invalid("empty exec stream")),
            Ok(Err(e)) => return error_response(invalid(e.to_string())),
            Err(_) => {
                return error_response(AgentError::new(ErrorKind::Timeout, "no exec request"))
            }
        };
        let (process, owned) = match first {
            Ok(ExecInput::Start(request)) => match self.start_process(&request).await {
                Ok(process) => (process, !request.background),
                Err(e) => return error_response(e),
            },
            Ok(ExecInput::Attach { process }) => match self.processes.find(&process) {
                Ok(process) => (process, false),
                Err(e) => return error_response(e),
            },
            Ok(_) => return error_response(invalid("an exec stream starts with start or attach")),
            Err(e) => return error_response(invalid(e.to_string())),
        };
        let (out, body) = frame_channel(16);
        let input_task = tokio::spawn(forward_input(process.clone(), input, owned));
        tokio::spawn(async move {
            let completed = forward_output(&process, &out).await;
            input_task.abort();
            if owned {
                if completed {
                    self.processes.remove(&process);
                } else {
                    // The host went away: a foreground process does not outlive its stream.
                    self.abandon(&process).await;
                }
            }
        });
        Response::new(body.boxed())
    }

    /// Input for a process from outside its own stream: the first frame names the process
    /// (`Attach`), the rest are applied in order; the reply is the first failure, if any.
    async fn process_input(self: Arc<Self>, body: Incoming) -> Response<Body> {
        let mut input = FrameReader::new(body, MAX_FRAME_PAYLOAD);
        let process = match input.next().await {
            Ok(Some(frame)) => match frame.parse_control::<ExecInput>() {
                Ok(ExecInput::Attach { process }) => match self.processes.find(&process) {
                    Ok(process) => process,
                    Err(e) => return error_response(e),
                },
                Ok(_) => return error_response(invalid("process input starts with attach")),
                Err(e) => return error_response(invalid(e.to_string())),
            },
            Ok(None) => return error_response(invalid("empty process input")),
            Err(e) => return error_response(invalid(e.to_string())),
        };
        loop {
            match input.next().await {
                Ok(Some(frame)) => {
                    if let Err(e) = apply_input(&process, frame).await {
                        return error_response(e);
                    }
                }
                Ok(None) => return reply(Ok(Empty {})),
                Err(e) => return error_response(invalid(e.to_string())),
            }
        }
    }

    async fn file_read(self: Arc<Self>, body: Incoming) -> Response<Body> {
        let request: FileReadRequest = match read_json(body).await {
            Ok(r) => r,
            Err(e) => return error_response(e),
        };
        let path = match self.defaults().resolve_path(&request.path) {
            Ok(p) => p,
            Err(e) => return error_response(e),
        };
        let (out, body) = frame_channel(16);
        tokio::spawn(files::read_to(path, request.offset, request.limit, out));
        Response::new(body.boxed())
    }

    async fn file_write(self: Arc<Self>, body: Incoming) -> Response<Body> {
        let defaults = self.defaults();
        let frames = FrameReader::new(body, MAX_FRAME_PAYLOAD);
        reply(
            files::write_from(frames, |start| {
                Ok((
                    defaults.resolve_path(&start.path)?,
                    start.user.clone().or(defaults.user.clone()),
                ))
            })
            .await,
        )
    }
}

/// Feeds stdin, resize and signal frames to the process. A foreground (`owned`) process is
/// killed if the host's side of the stream fails.
async fn forward_input<B>(process: Arc<Process>, mut input: FrameReader<B>, owned: bool)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = match input.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(pid = process.pid, error = %e, "exec input stream failed");
                if owned {
                    let _ = process.signal(libc::SIGKILL);
                }
                return;
            }
        };
        if let Err(e) = apply_input(&process, frame).await {
            tracing::debug!(pid = process.pid, error = %e, "exec input rejected");
        }
    }
}

/// A byte stream between the host and a socket inside the guest (a service the template
/// started, such as the code interpreter). The first frame names the target; then `Stdin`
/// frames are written to it (`StdinEof` shuts its write side) and what it sends comes back as
/// `Stdout` frames; the response ends when it closes, and closing the request closes it.
async fn connect_stream(body: Incoming) -> Response<Body> {
    let mut input = FrameReader::new(body, MAX_FRAME_PAYLOAD);
    let request = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, input.next()).await {
        Ok(Ok(Some(frame))) => match frame.parse_control::<ConnectRequest>() {
            Ok(request) => request,
            Err(e) => return error_response(invalid(e.to_string())),
        },
        Ok(Ok(None)) => return error_response(invalid("empty connect stream")),
        Ok(Err(e)) => return error_response(invalid(e.to_string())),
        Err(_) => return error_response(AgentError::new(ErrorKind::Timeout, "no connect request")),
    };
    let connected: io::Result<Box<dyn GuestSocket>> = match &request.target {
        ConnectTarget::Unix(path) => tokio::net::UnixStream::connect(path)
            .await
            .map(|s| Box::new(s) as Box<dyn GuestSocket>),
        ConnectTarget::Tcp(port) => tokio::net::TcpStream::connect(("127.0.0.1", *port))
            .await
            .map(|s| Box::new(s) as Box<dyn GuestSocket>),
    };
    let socket = match connected {
        Ok(socket) => socket,
        Err(e) => {
            let kind = match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ErrorKind::NotFound,
                _ => ErrorKind::Io,
            };
            return error_response(AgentError::new(
                kind,
                format!("connecting to {:?}: {e}", request.target),
            ));
        }
    };
    let (mut reader, mut writer) = tokio::io::split(socket);
    let (out, body) = frame_channel(16);
    let inbound = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok(Some(frame)) = input.next().await {
            let written = match frame.kind {
                FrameKind::Stdin => writer.write_all(&frame.payload).await,
                FrameKind::Control => match frame.parse_control::<ExecInput>() {
                    Ok(ExecInput::StdinEof) => writer.shutdown().await,
                    _ => Ok(()),
                },
                _ => Ok(()),
            };
            if written.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; kiln_proto::frame::DATA_CHUNK];
        loop {
            let n = tokio::select! {
                read = reader.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                () = out.closed() => break,
            };
            let frame = Frame::new(FrameKind::Stdout, Bytes::copy_from_slice(&buf[..n]));
            if out.send(&frame).await.is_err() {
                break;
            }
        }
        // The host's side goes when the guest's does (or the host went away).
        inbound.abort();
    });
    Response::new(body.boxed())
}

/// A connected guest socket.
trait GuestSocket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> GuestSocket for T {}

/// Applies one stdin, end-of-stdin, resize or signal frame to `process`.
async fn apply_input(process: &Process, frame: Frame) -> Result<(), AgentError> {
    match frame.kind {
        FrameKind::Stdin => process.write_stdin(&frame.payload).await,
        FrameKind::Control => match frame.parse_control::<ExecInput>() {
            Ok(ExecInput::StdinEof) => {
                process.close_stdin().await;
                Ok(())
            }
            Ok(ExecInput::Resize(size)) => process.resize(size),
            Ok(ExecInput::Signal { signal }) => process.signal(signal),
            Ok(other) => Err(invalid(format!("unexpected {other:?} on a running stream"))),
            Err(e) => Err(invalid(e.to_string())),
        },
        other => Err(invalid(format!("unexpected {other:?} frame"))),
    }
}

/// Sends the process's output and exit to the host. Returns false if the host went away.
async fn forward_output(process: &Process, out: &FrameSender) -> bool {
    let mut output = process.output.subscribe();
    if out
        .send(&Frame::control(&ExecEvent::Started { pid: process.pid }))
        .await
        .is_err()
    {
        return false;
    }
    if output.dropped_before() > 0 {
        let event = ExecEvent::OutputDropped {
            bytes: output.dropped_before(),
        };
        if out.send(&Frame::control(&event)).await.is_err() {
            return false;
        }
    }
    loop {
        let frame = tokio::select! {
            next = output.next() => match next {
                Next::Chunk(crate::output::Chunk::Stdout(b)) => Frame::new(FrameKind::Stdout, b),
                Next::Chunk(crate::output::Chunk::Stderr(b)) => Frame::new(FrameKind::Stderr, b),
                Next::Finished(finish) => {
                    let event = ExecEvent::Exited { status: finish.status, timed_out: finish.timed_out };
                    return out.send(&Frame::control(&event)).await.is_ok();
                }
            },
            () = out.closed() => return false,
        };
        if out.send(&frame).await.is_err() {
            return false;
        }
    }
}

fn invalid(message: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::InvalidRequest, message)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect()
}

async fn read_json<T: DeserializeOwned>(body: Incoming) -> Result<T, AgentError> {
    let bytes = Limited::new(body, kiln_proto::MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|e| invalid(format!("reading request: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("malformed request: {e}")))
}

async fn unary<Req, Resp, Fut>(body: Incoming, handler: impl FnOnce(Req) -> Fut) -> Response<Body>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    Fut: std::future::Future<Output = Result<Resp, AgentError>>,
{
    match read_json(body).await {
        Ok(request) => reply(handler(request).await),
        Err(e) => error_response(e),
    }
}

fn reply<T: Serialize>(result: Result<T, AgentError>) -> Response<Body> {
    match result {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(e) => error_response(e),
    }
}

fn error_response(error: AgentError) -> Response<Body> {
    let status = match error.kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty => StatusCode::CONFLICT,
        ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Io | ErrorKind::Internal | ErrorKind::NoSpace | ErrorKind::Unknown => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::BAD_REQUEST,
    };
    json_response(status, &error)
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decoding_rejects_garbage() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é1"), None);
    }
}
