//! Processes started through the agent: spawning (user, env, cwd, PTY), the pump that moves
//! their output into an [`OutputLog`], stdin, signals, timeouts and the process table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kiln_proto::frame::DATA_CHUNK;
use kiln_proto::messages::{
    AgentError, ErrorKind, ExecRequest, ExitStatus, ProcessInfo, ProcessSelector, PtySize,
};
use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::output::{Chunk, Finish, OutputLog};
use crate::reaper::Reaper;
use crate::users::{resolve_user, UserIds};

/// `PATH` of processes whose environment does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Defaults applied to every exec, set by the init call.
#[derive(Debug, Clone, Default)]
pub struct ExecDefaults {
    /// Environment under every process's own.
    pub env: BTreeMap<String, String>,
    /// Working directory when a request names none.
    pub workdir: Option<String>,
    /// User when a request names none.
    pub user: Option<String>,
}

impl ExecDefaults {
    /// Resolves `path` against the default workdir (or `/`).
    pub fn resolve_path(&self, path: &str) -> Result<PathBuf, AgentError> {
        if path.is_empty() || path.contains('\0') {
            return Err(AgentError::new(
                ErrorKind::InvalidArgument,
                "path must be non-empty",
            ));
        }
        let path = Path::new(path);
        if path.is_absolute() {
            return Ok(path.to_owned());
        }
        Ok(Path::new(self.workdir.as_deref().unwrap_or("/")).join(path))
    }
}

/// The master side of a process's pseudo-terminal.
#[derive(Debug)]
struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| read_fd(fd.get_ref(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.fd.get_ref(), buf)
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            if let Ok(result) =
                guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                data = &data[result?..];
            }
        }
        Ok(())
    }

    fn resize(&self, size: PtySize) -> io::Result<()> {
        set_winsize(self.fd.get_ref(), size)
    }
}

/// Registers a non-blocking descriptor with the runtime.
pub(crate) fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it is dropped, which
    // happens only together with the AsyncFd that owns it.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Reads from a non-blocking fd; a terminal whose other side is gone (EIO) reads as EOF.
/// Reads what `fd` (non-blocking) holds right now: `Ok(0)` at its end, an error (would
/// block) when it is empty for now.
fn read_now(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    match nix::unistd::read(fd.as_raw_fd(), buf) {
        Ok(n) => Ok(n),
        Err(nix::errno::Errno::EIO) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

fn set_winsize(fd: &OwnedFd, size: PtySize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pseudo-terminal pair, both ends close-on-exec.
fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let slave_name = nix::pty::ptsname_r(&master)?;
    // SAFETY: `into_raw_fd` hands over sole ownership of a valid, open descriptor.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    let slave = nix::fcntl::open(
        slave_name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: `open` returned a new descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    set_winsize(&master, size)?;
    Ok((master, slave))
}

enum StdinSink {
    Pipe(pipe::Sender),
    Pty(Arc<PtyMaster>),
}

impl std::fmt::Debug for StdinSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StdinSink::Pipe(_) => "Pipe",
            StdinSink::Pty(_) => "Pty",
        })
    }
}

/// A process started through the agent.
#[derive(Debug)]
pub struct Process {
    /// Pid (and process group id: every process leads its own session).
    pub pid: u32,
    /// Tag given at start.
    pub tag: Option<String>,
    /// The argv it runs.
    pub argv: Vec<String>,
    /// Keeps running without an attached stream.
    pub background: bool,
    /// Start time, ms since the epoch.
    pub started_at_ms: u64,
    /// Its output history.
    pub output: OutputLog,
    stdin: tokio::sync::Mutex<Option<StdinSink>>,
    pty: Option<Arc<PtyMaster>>,
}

impl Process {
    /// Writes to the process's stdin (or terminal).
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        let mut stdin = self.stdin.lock().await;
        let result = match stdin.as_mut() {
            Some(StdinSink::Pipe(pipe)) => pipe.write_all(data).await,
            Some(StdinSink::Pty(pty)) => pty.write_all(data).await,
            None => {
                return Err(AgentError::new(
                    ErrorKind::InvalidArgument,
                    "stdin is closed or was not requested",
                ))
            }
        };
        result.map_err(|e| AgentError::new(ErrorKind::Io, format!("writing stdin: {e}")))
    }

    /// Closes stdin; on a terminal, sends the end-of-file character.
    pub async fn close_stdin(&self) {
        let mut stdin = self.stdin.lock().await;
        if let Some(StdinSink::Pty(pty)) = stdin.as_ref() {
            // A failed write here means the terminal is already gone, which is what EOF means.
            let _ = pty.write_all(&[0x04]).await;
            return;
        }
        *stdin = None;
    }

    /// Resizes the terminal.
    pub fn resize(&self, size: PtySize) -> Result<(), AgentError> {
        let pty = self.pty.as_ref().ok_or_else(|| {
            AgentError::new(ErrorKind::InvalidArgument, "process has no terminal")
        })?;
        pty.resize(size)
            .map_err(|e| AgentError::new(ErrorKind::Io, format!("resize: {e}")))
    }

    /// Sends `signal` to the process group.
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        let signal = Signal::try_from(signal).map_err(|_| {
            AgentError::new(
                ErrorKind::InvalidArgument,
                format!("unknown signal {signal}"),
            )
        })?;
        signal_group(self.pid, signal)
    }

    /// Whether the process has ended.
    pub fn finished(&self) -> Option<Finish> {
        self.output.finished()
    }

    /// Listing entry.
    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.pid,
            tag: self.tag.clone(),
            argv: self.argv.clone(),
            background: self.background,
            pty: self.pty.is_some(),
            started_at_ms: self.started_at_ms,
            exit: self.finished().map(|f| f.status),
        }
    }
}

fn signal_group(pid: u32, signal: Signal) -> Result<(), AgentError> {
    let pid = i32::try_from(pid).map_err(|_| AgentError::new(ErrorKind::Internal, "bad pid"))?;
    killpg(Pid::from_raw(pid), signal).map_err(|e| match e {
        nix::errno::Errno::ESRCH => {
            AgentError::new(ErrorKind::NotFound, format!("process {pid} has exited"))
        }
        other => AgentError::new(ErrorKind::Io, format!("kill: {other}")),
    })
}

enum Sources {
    Pipes {
        stdout: Option<pipe::Receiver>,
        stderr: Option<pipe::Receiver>,
    },
    Pty(Arc<PtyMaster>),
}

/// Starts `request` and its output pump; in the users' cgroup when `cgroup` (the
/// descriptor of its `cgroup.procs`, see [`crate::cgroups`]) is given. Its timeout counts
/// from `requested`: a spawn can wait seconds for a child starved of memory to exec, and
/// that wait is part of what the caller bounded.
pub fn spawn(
    reaper: &Reaper,
    defaults: &ExecDefaults,
    request: &ExecRequest,
    cgroup: Option<RawFd>,
    requested: tokio::time::Instant,
) -> Result<Arc<Process>, AgentError> {
    let deadline = request
        .timeout_ms
        .map(|ms| requested + Duration::from_millis(ms));
    let argv = request.command.to_argv();
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(AgentError::new(ErrorKind::InvalidArgument, "empty command"));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            "argument contains a NUL byte",
        ));
    }
    let user = match request.user.as_deref().or(defaults.user.as_deref()) {
        Some(spec) => Some(resolve_user(Path::new("/"), spec)?),
        None => None,
    };
    let env = build_env(defaults, request, user.as_ref())?;
    let cwd = match request.cwd.as_deref() {
        Some(cwd) => defaults.resolve_path(cwd)?,
        None => PathBuf::from(defaults.workdir.as_deref().unwrap_or("/")),
    };
    match std::fs::metadata(&cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(AgentError::new(
                ErrorKind::NotADirectory,
                format!("working directory {} is not a directory", cwd.display()),
            ))
        }
        Err(_) => {
            return Err(AgentError::new(
                ErrorKind::NotFound,
                format!("working directory {} does not exist", cwd.display()),
            ))
        }
    }

    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&cwd);

    let pty =
        match request.pty {
            Some(size) => Some(reaper.exclusive(|| open_pty(size)).map_err(|e| {
                AgentError::new(ErrorKind::Io, format!("cannot open a terminal: {e}"))
            })?),
            None => None,
        };
    match &pty {
        Some((_, slave)) => {
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map(Stdio::from)
                    .map_err(|e| AgentError::new(ErrorKind::Io, format!("dup: {e}")))
            };
            command
                .stdin(dup(slave)?)
                .stdout(dup(slave)?)
                .stderr(dup(slave)?);
        }
        None => {
            command
                .stdin(if request.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    let with_tty = pty.is_some();
    let ids = user.map(|u| (u.uid, u.gid, u.groups));
    if with_tty || ids.is_some() || cgroup.is_some() {
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls; it allocates nothing (the group list is prepared).
        unsafe {
            command.pre_exec(move || {
                if let Some(fd) = cgroup {
                    crate::cgroups::enter(fd);
                }
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some((uid, gid, groups)) = &ids {
                    if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                        || libc::setgid(*gid) < 0
                        || libc::setuid(*uid) < 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
    } else {
        // Without a terminal, a user switch or a cgroup to enter (the agent on a host), a
        // process group of its own is all a process needs (signals and timeouts address the
        // group), and without a pre-exec hook std spawns with posix_spawn (vfork), which
        // skips copying the agent's page tables. The signal mask is reset by std.
        command.process_group(0);
    }

    let (mut child, exit) = reaper
        .spawn(&mut command)
        .map_err(|e| spawn_error(&argv[0], e))?;
    let pid = child.id();
    let streams = child_streams(&mut child, pty);
    // The reaper collects the child; the std handle must not wait for it.
    drop(child);
    let Streams {
        stdin,
        sources,
        pty: pty_master,
    } = streams.inspect_err(|_| {
        // Nobody could watch or stop it: it does not run on unseen.
        let _ = signal_group(pid, Signal::SIGKILL);
    })?;

    let process = Arc::new(Process {
        pid,
        tag: request.tag.clone(),
        argv,
        background: request.background,
        started_at_ms: now_ms(),
        output: OutputLog::default(),
        stdin: tokio::sync::Mutex::new(stdin),
        pty: pty_master,
    });
    tokio::spawn(pump(pid, process.output.clone(), sources, exit, deadline));
    Ok(process)
}

/// The ends of a spawned child's streams that the agent keeps.
struct Streams {
    stdin: Option<StdinSink>,
    sources: Sources,
    /// The terminal's master side, with a PTY.
    pty: Option<Arc<PtyMaster>>,
}

/// Takes the agent's ends of `child`'s streams (of its terminal, with `pty`).
fn child_streams(
    child: &mut std::process::Child,
    pty: Option<(OwnedFd, OwnedFd)>,
) -> Result<Streams, AgentError> {
    let io_error = |e: io::Error| AgentError::new(ErrorKind::Io, format!("process pipes: {e}"));
    Ok(match pty {
        Some((master, _slave)) => {
            nix::fcntl::fcntl(
                master.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
            )
            .map_err(|e| io_error(e.into()))?;
            let master = Arc::new(PtyMaster {
                fd: async_fd(master).map_err(io_error)?,
            });
            Streams {
                stdin: Some(StdinSink::Pty(master.clone())),
                sources: Sources::Pty(master.clone()),
                pty: Some(master),
            }
        }
        None => {
            let stdin = match child.stdin.take() {
                Some(s) => Some(StdinSink::Pipe(
                    pipe::Sender::from_owned_fd(OwnedFd::from(s)).map_err(io_error)?,
                )),
                None => None,
            };
            let receiver = |fd: Option<OwnedFd>| -> Result<Option<pipe::Receiver>, AgentError> {
                fd.map(|fd| pipe::Receiver::from_owned_fd(fd).map_err(io_error))
                    .transpose()
            };
            let stdout = receiver(child.stdout.take().map(OwnedFd::from))?;
            let stderr = receiver(child.stderr.take().map(OwnedFd::from))?;
            Streams {
                stdin,
                sources: Sources::Pipes { stdout, stderr },
                pty: None,
            }
        }
    })
}

fn spawn_error(program: &str, e: io::Error) -> AgentError {
    if e.raw_os_error() == Some(libc::EAGAIN) {
        return AgentError::new(
            ErrorKind::LimitReached,
            format!(
                "cannot start `{program}`: the sandbox's process limit is reached; kill \
                 processes first (the kill-all call stops every one)"
            ),
        );
    }
    match e.kind() {
        io::ErrorKind::NotFound => AgentError::new(
            ErrorKind::NotFound,
            format!("command `{program}` not found"),
        ),
        io::ErrorKind::PermissionDenied => AgentError::new(
            ErrorKind::PermissionDenied,
            format!("permission denied executing `{program}`"),
        ),
        _ => AgentError::new(ErrorKind::Io, format!("cannot start `{program}`: {e}")),
    }
}

fn build_env(
    defaults: &ExecDefaults,
    request: &ExecRequest,
    user: Option<&UserIds>,
) -> Result<HashMap<OsString, OsString>, AgentError> {
    let mut env: HashMap<OsString, OsString> = HashMap::new();
    let mut set = |k: &str, v: &str| {
        env.insert(OsString::from(k), OsString::from_vec(v.as_bytes().to_vec()));
    };
    set("PATH", DEFAULT_PATH);
    match user {
        Some(user) => {
            set("HOME", &user.home);
            if let Some(name) = &user.name {
                set("USER", name);
                set("LOGNAME", name);
            }
        }
        None => {
            set("HOME", "/root");
            set("USER", "root");
            set("LOGNAME", "root");
        }
    }
    if request.pty.is_some() {
        set("TERM", "xterm-256color");
    }
    for (key, value) in defaults.env.iter().chain(&request.env) {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(AgentError::new(
                ErrorKind::InvalidArgument,
                format!("invalid environment variable `{}`", key.escape_debug()),
            ));
        }
        set(key, value);
    }
    Ok(env)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn read_opt(source: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> io::Result<usize> {
    match source {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Moves output into the log until the process exits, then drains what it left in the pipes.
async fn pump(
    pid: u32,
    log: OutputLog,
    mut sources: Sources,
    mut exit: oneshot::Receiver<ExitStatus>,
    deadline: Option<tokio::time::Instant>,
) {
    let mut timed_out = false;
    let mut pty_open = true;
    let mut out_buf = vec![0u8; DATA_CHUNK];
    let mut err_buf = vec![0u8; DATA_CHUNK];
    let status = loop {
        let timer = async {
            match deadline {
                Some(at) if !timed_out => tokio::time::sleep_until(at).await,
                _ => std::future::pending().await,
            }
        };
        match &mut sources {
            Sources::Pipes { stdout, stderr } => {
                tokio::select! {
                    biased;
                    status = &mut exit => break status.unwrap_or(ExitStatus { code: None, signal: None }),
                    read = read_opt(stdout, &mut out_buf) => match read {
                        Ok(n) if n > 0 => log.push(Chunk::Stdout(Bytes::copy_from_slice(&out_buf[..n]))).await,
                        _ => *stdout = None,
                    },
                    read = read_opt(stderr, &mut err_buf) => match read {
                        Ok(n) if n > 0 => log.push(Chunk::Stderr(Bytes::copy_from_slice(&err_buf[..n]))).await,
                        _ => *stderr = None,
                    },
                    () = timer => {
                        timed_out = true;
                        let _ = signal_group(pid, Signal::SIGKILL);
                    }
                }
            }
            Sources::Pty(master) => {
                let read = async {
                    if pty_open {
                        master.read(&mut out_buf).await
                    } else {
                        std::future::pending().await
                    }
                };
                tokio::select! {
                    biased;
                    status = &mut exit => break status.unwrap_or(ExitStatus { code: None, signal: None }),
                    read = read => match read {
                        Ok(n) if n > 0 => log.push(Chunk::Stdout(Bytes::copy_from_slice(&out_buf[..n]))).await,
                        // Every holder of the terminal closed it; only the exit is left to wait for.
                        _ => pty_open = false,
                    },
                    () = timer => {
                        timed_out = true;
                        let _ = signal_group(pid, Signal::SIGKILL);
                    }
                }
            }
        }
    };
    // Everything the process wrote before it exited is in the pipe buffers now.
    match &mut sources {
        Sources::Pipes { stdout, stderr } => {
            for (source, stream) in [
                (stdout, Chunk::Stdout as fn(Bytes) -> Chunk),
                (stderr, Chunk::Stderr),
            ] {
                while let Some(receiver) = source.as_ref() {
                    // Read the pipe itself: tokio's `try_read` answers "would block" while its
                    // reactor has not yet seen the pipe readable, and output written just
                    // before the exit was lost that way now and then.
                    match read_now(receiver, &mut out_buf) {
                        Ok(n) if n > 0 => {
                            log.push(stream(Bytes::copy_from_slice(&out_buf[..n])))
                                .await
                        }
                        _ => *source = None,
                    }
                }
            }
        }
        Sources::Pty(master) => {
            while let Ok(n) = master.try_read(&mut out_buf) {
                if n == 0 {
                    break;
                }
                log.push(Chunk::Stdout(Bytes::copy_from_slice(&out_buf[..n])))
                    .await;
            }
        }
    }
    log.finish(Finish { status, timed_out });
}

/// Processes started through the agent, by pid.
#[derive(Debug, Default)]
pub struct ProcessTable {
    processes: Mutex<BTreeMap<u32, Arc<Process>>>,
    /// Tags of processes being started, not in the table yet.
    starting_tags: Mutex<BTreeSet<String>>,
}

/// A tag held for a process being started until it is in the table (or has failed to
/// start), so that no other start takes it meanwhile.
#[derive(Debug)]
pub struct TagReservation<'a> {
    table: &'a ProcessTable,
    tag: Option<String>,
}

impl Drop for TagReservation<'_> {
    fn drop(&mut self) {
        if let Some(tag) = &self.tag {
            self.table.starting_tags().remove(tag);
        }
    }
}

/// How many finished processes the table keeps for listing and re-attaching.
const KEEP_FINISHED: usize = 64;

impl ProcessTable {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Arc<Process>>> {
        self.processes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn starting_tags(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.starting_tags
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds `tag` for a process about to start, if no running or starting process has it.
    /// Insert the process before the reservation is dropped.
    pub fn reserve_tag(&self, tag: Option<&str>) -> Result<TagReservation<'_>, AgentError> {
        let Some(tag) = tag else {
            return Ok(TagReservation {
                table: self,
                tag: None,
            });
        };
        if tag.is_empty() || tag.len() > 128 {
            return Err(AgentError::new(
                ErrorKind::InvalidArgument,
                "tag must be 1 to 128 bytes",
            ));
        }
        let mut starting = self.starting_tags();
        let taken = starting.contains(tag)
            || self
                .lock()
                .values()
                .any(|p| p.tag.as_deref() == Some(tag) && p.finished().is_none());
        if taken {
            return Err(AgentError::new(
                ErrorKind::AlreadyExists,
                format!("a running process is already tagged `{tag}`"),
            ));
        }
        starting.insert(tag.to_owned());
        Ok(TagReservation {
            table: self,
            tag: Some(tag.to_owned()),
        })
    }

    /// Adds a process, dropping the oldest finished ones beyond the keep limit.
    pub fn insert(&self, process: Arc<Process>) {
        let mut table = self.lock();
        table.insert(process.pid, process);
        let finished: Vec<u32> = table
            .values()
            .filter(|p| p.finished().is_some())
            .map(|p| p.pid)
            .collect();
        if finished.len() > KEEP_FINISHED {
            let mut by_age: Vec<(u64, u32)> = finished
                .iter()
                .filter_map(|pid| table.get(pid).map(|p| (p.started_at_ms, *pid)))
                .collect();
            by_age.sort_unstable();
            for (_, pid) in by_age.iter().take(finished.len() - KEEP_FINISHED) {
                table.remove(pid);
            }
        }
    }

    /// Removes `process` if the table still holds this very process.
    pub fn remove(&self, process: &Arc<Process>) {
        let mut table = self.lock();
        if table
            .get(&process.pid)
            .is_some_and(|p| Arc::ptr_eq(p, process))
        {
            table.remove(&process.pid);
        }
    }

    /// Finds a process by pid or tag (a running one first, then the newest).
    pub fn find(&self, selector: &ProcessSelector) -> Result<Arc<Process>, AgentError> {
        let table = self.lock();
        let found = match selector {
            ProcessSelector::Pid(pid) => table.get(pid).cloned(),
            ProcessSelector::Tag(tag) => table
                .values()
                .filter(|p| p.tag.as_deref() == Some(tag.as_str()))
                .max_by_key(|p| (p.finished().is_none(), p.started_at_ms))
                .cloned(),
        };
        let missing = match selector {
            ProcessSelector::Pid(pid) => {
                format!("process `{pid}` not found: no process with that pid was started here")
            }
            ProcessSelector::Tag(tag) => {
                format!("process `{tag}` not found: no process with that tag was started here")
            }
        };
        found.ok_or_else(|| AgentError::new(ErrorKind::NotFound, missing))
    }

    /// Every process, by pid.
    pub fn list(&self) -> Vec<ProcessInfo> {
        self.lock().values().map(|p| p.info()).collect()
    }

    /// Kills the process group of every running process (where the agent has no users'
    /// cgroup: on a host); returns how many groups it signalled.
    pub fn kill_running(&self) -> u32 {
        let running: Vec<Arc<Process>> = self
            .lock()
            .values()
            .filter(|p| p.finished().is_none())
            .cloned()
            .collect();
        let killed = running
            .iter()
            .filter(|p| signal_group(p.pid, Signal::SIGKILL).is_ok())
            .count();
        u32::try_from(killed).unwrap_or(u32::MAX)
    }

    /// Number of running processes.
    pub fn running(&self) -> usize {
        self.lock()
            .values()
            .filter(|p| p.finished().is_none())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::messages::Command as ExecCommand;
    use std::time::Instant;

    /// A spawn that cannot finish until released, as a child starved of memory in a guest
    /// cannot exec: its "cgroup" is a full pipe, which the child's write into
    /// `cgroup.procs` waits on until the pipe is drained.
    struct StalledSpawn {
        cgroup: OwnedFd,
        drain: Option<std::thread::JoinHandle<()>>,
    }

    impl StalledSpawn {
        /// A spawn given [`Self::cgroup`] returns `after` from now, not before.
        fn new(after: Duration) -> StalledSpawn {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
            nix::fcntl::fcntl(
                write.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
            )
            .expect("non-blocking");
            while nix::unistd::write(&write, &[0; 4096]).is_ok() {}
            nix::fcntl::fcntl(
                write.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()),
            )
            .expect("blocking again");
            let drain = std::thread::spawn(move || {
                std::thread::sleep(after);
                let mut buf = [0; 4096];
                nix::unistd::read(read.as_raw_fd(), &mut buf).expect("drained");
            });
            StalledSpawn {
                cgroup: write,
                drain: Some(drain),
            }
        }

        fn cgroup(&self) -> Option<RawFd> {
            Some(self.cgroup.as_raw_fd())
        }
    }

    impl Drop for StalledSpawn {
        fn drop(&mut self) {
            if let Some(drain) = self.drain.take() {
                drain.join().expect("the drain does not panic");
            }
        }
    }

    async fn start(
        reaper: &Arc<Reaper>,
        request: ExecRequest,
        cgroup: Option<RawFd>,
    ) -> Arc<Process> {
        let reaper = reaper.clone();
        let requested = tokio::time::Instant::now();
        tokio::task::spawn_blocking(move || {
            spawn(
                &reaper,
                &ExecDefaults::default(),
                &request,
                cgroup,
                requested,
            )
        })
        .await
        .expect("the spawn does not panic")
        .expect("the process starts")
    }

    /// Runs `test` with a reaper of its own in a runtime of its own, one at a time: a
    /// process has one set of children, and two reapers would collect each other's. The
    /// runtime (and with it the reaper) is gone before the next test starts.
    fn with_reaper<F: std::future::Future<Output = ()>>(test: impl FnOnce(Arc<Reaper>) -> F) {
        static ONE_REAPER: Mutex<()> = Mutex::new(());
        let _one = ONE_REAPER
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async { test(Reaper::start().expect("reaper starts")).await });
        drop(runtime);
    }

    fn sh(script: &str) -> ExecRequest {
        ExecRequest::new(ExecCommand::Shell(script.into()))
    }

    async fn finished(process: &Process) -> Finish {
        tokio::time::timeout(Duration::from_secs(10), process.output.wait_finished())
            .await
            .unwrap_or_else(|_| panic!("{:?} did not end in 10 s", process.argv))
    }

    /// The wait for a spawn is part of the time the caller bounded, not added to it.
    #[test]
    fn a_timeout_counts_from_the_request_not_from_the_spawn() {
        with_reaper(|reaper| async move {
            let stalled = StalledSpawn::new(Duration::from_secs(2));
            let requested = Instant::now();
            let mut request = sh("exec sleep 30");
            request.timeout_ms = Some(1500);
            let process = start(&reaper, request, stalled.cgroup()).await;
            let spawned = requested.elapsed();
            let finish = finished(&process).await;
            let ended = requested.elapsed();
            assert!(finish.timed_out, "{finish:?}");
            assert_eq!(finish.status.signal, Some(libc::SIGKILL));
            assert!(
                spawned >= Duration::from_millis(1900),
                "spawned after {spawned:?}"
            );
            // Counted from the spawn it would end at 3.5 s.
            assert!(ended < Duration::from_millis(3000), "ended after {ended:?}");
        });
    }

    /// A stalled spawn holds up neither another process's start nor its exit status, and
    /// its own child's status, which may come before it registered, still reaches it.
    #[test]
    fn a_stalled_spawn_holds_up_no_other_process() {
        with_reaper(|reaper| async move {
            let stalled = StalledSpawn::new(Duration::from_secs(2));
            let began = Instant::now();
            let slow = tokio::spawn({
                let reaper = reaper.clone();
                let cgroup = stalled.cgroup();
                async move { start(&reaper, sh("exit 3"), cgroup).await }
            });
            // Let the slow spawn begin first.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let quick = start(&reaper, sh("exit 5"), None).await;
            let status = finished(&quick).await.status;
            let quick_done = began.elapsed();
            assert_eq!(status.code, Some(5));
            assert!(
                quick_done < Duration::from_millis(1500),
                "the quick process ended after {quick_done:?}, behind the stalled spawn"
            );
            let slow = slow.await.expect("the slow spawn does not panic");
            assert!(began.elapsed() >= Duration::from_millis(1900));
            assert_eq!(finished(&slow).await.status.code, Some(3));
            drop(stalled);
        });
    }

    #[test]
    fn a_tag_is_held_from_the_start_of_a_spawn() {
        let table = ProcessTable::default();
        let held = table.reserve_tag(Some("web")).expect("a free tag");
        let again = table.reserve_tag(Some("web"));
        assert_eq!(
            again.map(|_| ()).map_err(|e| e.kind),
            Err(ErrorKind::AlreadyExists),
            "a tag being started is taken"
        );
        table.reserve_tag(Some("db")).expect("another tag");
        table.reserve_tag(None).expect("no tag");
        table.reserve_tag(None).expect("no tag, twice");
        drop(held);
        table
            .reserve_tag(Some("web"))
            .expect("free again once the start ended");
        assert_eq!(
            table.reserve_tag(Some("")).map(|_| ()).map_err(|e| e.kind),
            Err(ErrorKind::InvalidArgument)
        );
    }
}
