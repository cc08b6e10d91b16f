//! Messages exchanged over the agent's HTTP/2 routes, as JSON.
//!
//! New fields are added with `#[serde(default)]` so that a host and an agent one protocol
//! version apart still understand each other.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Executed directly, `argv[0]` looked up in `PATH`.
    Argv(Vec<String>),
    /// Run by `/bin/sh -c`.
    Shell(String),
}

impl Command {
    /// The argv the agent executes.
    pub fn to_argv(&self) -> Vec<String> {
        match self {
            Command::Argv(argv) => argv.clone(),
            Command::Shell(script) => vec!["/bin/sh".into(), "-c".into(), script.clone()],
        }
    }
}

/// Terminal size for PTY mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A request to start a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The command.
    pub command: Command,
    /// Environment added to the agent's default environment (set by the init call).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the default workdir if absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid`; the default user if absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Whether stdin is a pipe fed by `Stdin` frames (otherwise `/dev/null`).
    #[serde(default)]
    pub stdin: bool,
    /// Run in a pseudo-terminal of this size (stdout and stderr are merged into stdout).
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Kill the process group this many milliseconds after the request reached the agent
    /// (its start, however long that takes, counts).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Keep running when the exec stream goes away; can be listed and re-attached.
    #[serde(default)]
    pub background: bool,
    /// A name to find a background process by.
    #[serde(default)]
    pub tag: Option<String>,
}

impl ExecRequest {
    /// A foreground request for `command` with every option at its default.
    pub fn new(command: Command) -> ExecRequest {
        ExecRequest {
            command,
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            stdin: false,
            pty: None,
            timeout_ms: None,
            background: false,
            tag: None,
        }
    }
}

/// Identifies a process started through the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessSelector {
    /// By process id.
    Pid(u32),
    /// By the tag given at start.
    Tag(String),
}

/// Control messages the host sends on an exec or attach stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecInput {
    /// First message of an exec stream.
    Start(ExecRequest),
    /// First message of an attach stream.
    Attach {
        /// Which process.
        process: ProcessSelector,
    },
    /// Close the process's stdin.
    StdinEof,
    /// Resize the process's terminal.
    Resize(PtySize),
    /// Send a signal to the process group.
    Signal {
        /// Signal number.
        signal: i32,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if it was killed by one.
    pub signal: Option<i32>,
}

/// Control messages the agent sends on an exec or attach stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The process is running.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Output was discarded before this attach (a background process's history is bounded).
    OutputDropped {
        /// How many bytes.
        bytes: u64,
    },
    /// The process ended; always the last message of a stream.
    Exited {
        /// How it ended.
        status: ExitStatus,
        /// Whether the agent killed it because its timeout expired.
        timed_out: bool,
    },
    /// The exec failed; the last message of the stream.
    Error(AgentError),
}

/// One process as listed by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Pid in the guest.
    pub pid: u32,
    /// Tag given at start.
    pub tag: Option<String>,
    /// The argv it was started with.
    pub argv: Vec<String>,
    /// Whether it keeps running without an attached stream.
    pub background: bool,
    /// Whether it runs in a PTY.
    pub pty: bool,
    /// Start time, milliseconds since the Unix epoch (guest clock).
    pub started_at_ms: u64,
    /// `None` while running.
    pub exit: Option<ExitStatus>,
}

/// Response of the process list call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessList {
    /// Processes, sorted by pid.
    pub processes: Vec<ProcessInfo>,
}

/// Response of the kill-all call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillAllResponse {
    /// How many processes were killed.
    pub killed: u32,
}

/// Request of the signal call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    /// Which process.
    pub process: ProcessSelector,
    /// Signal number.
    pub signal: i32,
}

/// Where a connection made inside the guest goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectTarget {
    /// A unix socket, by absolute path.
    Unix(String),
    /// A TCP port on the guest's loopback.
    Tcp(u16),
}

/// First frame of a connect stream: a byte stream to a socket inside the guest, data as
/// `Stdin` frames in and `Stdout` frames out; the response ends when the guest side closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// Where to connect.
    pub target: ConnectTarget,
}

/// Error categories; hosts map them to their own error types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such file, directory, process or user.
    NotFound,
    /// The caller may not do this.
    PermissionDenied,
    /// Expected a file, found a directory.
    IsADirectory,
    /// Expected a directory, found something else.
    NotADirectory,
    /// The target exists.
    AlreadyExists,
    /// A directory to remove is not empty.
    DirectoryNotEmpty,
    /// An argument is invalid (empty argv, relative path, bad signal, ...).
    InvalidArgument,
    /// The request itself is malformed.
    InvalidRequest,
    /// The agent cannot do this in its current mode.
    Unsupported,
    /// An operation took too long.
    Timeout,
    /// The guest ran out of space.
    NoSpace,
    /// A limit of the guest is reached (its user processes' process limit).
    LimitReached,
    /// Any other I/O error.
    Io,
    /// A bug or unexpected state in the agent.
    Internal,
    /// A kind this side does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

/// A typed error from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct AgentError {
    /// Category.
    pub kind: ErrorKind,
    /// Human-readable detail.
    pub message: String,
}

impl AgentError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> AgentError {
        AgentError {
            kind,
            message: message.into(),
        }
    }
}

/// IPv4 configuration of the guest's interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Interface name in the guest.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Prefix length of the guest's subnet.
    pub prefix_len: u8,
    /// Default gateway.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// MTU, if not the default.
    #[serde(default)]
    pub mtu: Option<u32>,
}

fn default_interface() -> String {
    "eth0".into()
}

/// Resolver configuration written to `/etc/resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// Name servers.
    #[serde(default)]
    pub nameservers: Vec<Ipv4Addr>,
    /// Search domains.
    #[serde(default)]
    pub search: Vec<String>,
}

/// How the agent decides that the start command is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReadinessCheck {
    /// A command that exits 0 once ready; retried.
    Exec {
        /// The check command.
        command: Command,
    },
    /// A TCP port on the guest's loopback accepts connections.
    TcpPort {
        /// The port.
        port: u16,
    },
}

/// A long-running process started before the template snapshot is taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartCommand {
    /// What to run (as a background process tagged `start`).
    pub command: Command,
    /// When it counts as ready; immediately if absent.
    #[serde(default)]
    pub readiness: Option<ReadinessCheck>,
    /// Give up after this long.
    #[serde(default = "default_start_timeout_ms")]
    pub timeout_ms: u64,
    /// Delay between readiness checks.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
}

fn default_start_timeout_ms() -> u64 {
    60_000
}

fn default_interval_ms() -> u64 {
    100
}

/// First call after a cold boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitRequest {
    /// Guest network; left unconfigured if absent.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Resolver configuration.
    #[serde(default)]
    pub dns: Option<DnsConfig>,
    /// Hostname.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Default environment of every process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Default working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Default user (`name`, `uid` or `uid:gid`).
    #[serde(default)]
    pub user: Option<String>,
    /// The template's start command.
    #[serde(default)]
    pub start: Option<StartCommand>,
}

/// Result of the init call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitResponse {
    /// Init duties that were applied (`network`, `dns`, `hostname`).
    pub applied: Vec<String>,
    /// Duties skipped because the agent runs with them disabled.
    pub skipped: Vec<String>,
    /// Pid of the start command, if any.
    pub start_pid: Option<u32>,
}

/// Called by the host after every restore or fork.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostRestoreRequest {
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub wall_clock_ns: u64,
    /// Fresh entropy for the kernel RNG, hex encoded (at most 512 bytes).
    pub entropy_hex: String,
    /// New hostname.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Metadata made available to the guest (replaces the previous set).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Result of the post-restore call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostRestoreResponse {
    /// Steps applied (`clock`, `rng`, `hostname`, `metadata`).
    pub applied: Vec<String>,
    /// Steps skipped because the agent runs with them disabled.
    pub skipped: Vec<String>,
    /// Guest clock minus host clock before the clock was set, in milliseconds.
    pub clock_skew_ms: i64,
}

/// Memory use of the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// `MemTotal`.
    pub total_bytes: u64,
    /// `MemAvailable`.
    pub available_bytes: u64,
}

/// Use of the root filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Size of the filesystem.
    pub total_bytes: u64,
    /// Space available to unprivileged users.
    pub available_bytes: u64,
}

/// Response of the info call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's version.
    pub agent_version: String,
    /// The protocol version it speaks.
    pub protocol: u32,
    /// Random id of this boot (shared by every restore of one snapshot).
    pub boot_id: String,
    /// Whether the init call was applied.
    pub initialized: bool,
    /// Seconds since the guest kernel booted (`/proc/uptime`).
    pub uptime_secs: f64,
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    /// Memory.
    pub memory: MemoryInfo,
    /// Root filesystem.
    pub disk: DiskInfo,
    /// Processes started through the agent that are still running.
    pub running_processes: u32,
    /// Hostname.
    pub hostname: String,
    /// Metadata set by the last post-restore call.
    pub metadata: BTreeMap<String, String>,
}

/// Power actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownAction {
    /// Power the VM off.
    PowerOff,
    /// Reboot it.
    Reboot,
}

/// Request of the shutdown call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownRequest {
    /// What to do.
    pub action: ShutdownAction,
}

/// A path argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRequest {
    /// Absolute path, or relative to the default workdir.
    pub path: String,
}

/// Start of a file read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReadRequest {
    /// File to read.
    pub path: String,
    /// Byte offset to start at.
    #[serde(default)]
    pub offset: u64,
    /// Read at most this many bytes.
    #[serde(default)]
    pub limit: Option<u64>,
}

/// First frame of a file write stream; `Data` frames follow, then [`FileWriteEnd`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWriteStart {
    /// Target path; replaced atomically when the stream completes.
    pub path: String,
    /// Permission bits (default 0644, or the replaced file's).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Owner (`name`, `uid` or `uid:gid`); the default user if absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_parents: bool,
}

impl FileWriteStart {
    /// A write of `path` with the defaults: mode 0644 (or the replaced file's), the default
    /// user, parents must exist.
    pub fn new(path: impl Into<String>) -> FileWriteStart {
        FileWriteStart {
            path: path.into(),
            mode: None,
            user: None,
            create_parents: false,
        }
    }
}

/// Last frame of a file write stream. A stream that ends without it writes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWriteEnd {
    /// Total bytes sent, checked by the agent.
    pub size: u64,
}

/// Result of a file write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWriteResponse {
    /// Bytes written.
    pub size: u64,
}

/// First frame of a file read response: what is about to be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FileReadEvent {
    /// The file opened; `Data` frames follow.
    Opened {
        /// File size when opened.
        size: u64,
    },
    /// All data was sent.
    End {
        /// Bytes sent.
        sent: u64,
    },
    /// The read failed.
    Error(AgentError),
}

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (not followed).
    Symlink,
    /// Anything else.
    Other,
}

/// Metadata of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// The path, as asked or as found in a listing.
    pub path: String,
    /// Its type.
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, milliseconds since the Unix epoch.
    pub modified_ms: i64,
    /// Target of a symlink.
    #[serde(default)]
    pub link_target: Option<String>,
}

/// Request of the list call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {
    /// Directory to list.
    pub path: String,
    /// 1 lists the directory itself; more descends that many levels.
    #[serde(default = "default_depth")]
    pub depth: u32,
}

fn default_depth() -> u32 {
    1
}

/// Response of the list call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    /// Entries, depth first, sorted by name within a directory.
    pub entries: Vec<FileStat>,
    /// Whether the listing stopped at one of the agent's limits: a number of entries, or a
    /// total size of entries that keeps the response well below [`crate::MAX_JSON_BODY`].
    pub truncated: bool,
}

/// Request of the mkdir call (always `-p`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirRequest {
    /// Directory to create.
    pub path: String,
    /// Permission bits (default 0755).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Owner of the directories created; the default user if absent.
    #[serde(default)]
    pub user: Option<String>,
}

/// Request of the remove call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// Path to remove.
    pub path: String,
    /// Remove directories and their contents.
    #[serde(default)]
    pub recursive: bool,
}

/// Request of the rename call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    /// Existing path.
    pub from: String,
    /// New path (replaced if it is a file).
    pub to: String,
}

/// Response of the exists call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExistsResponse {
    /// Whether the path exists (symlinks are not followed).
    pub exists: bool,
}

/// Empty success body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_input_wire_shape_is_stable() {
        let start = ExecInput::Start(ExecRequest::new(Command::Shell("true".into())));
        let json = serde_json::to_value(&start).expect("serializable");
        assert_eq!(json["type"], "start");
        assert_eq!(json["command"]["shell"], "true");
        let minimal: ExecInput =
            serde_json::from_str(r#"{"type":"start","command":{"argv":["ls"]}}"#)
                .expect("defaults fill the rest");
        assert_eq!(
            minimal,
            ExecInput::Start(ExecRequest::new(Command::Argv(vec!["ls".into()])))
        );
    }

    #[test]
    fn unknown_error_kinds_decode_as_unknown() {
        let err: AgentError =
            serde_json::from_str(r#"{"kind":"from_the_future","message":"x"}"#).expect("decodes");
        assert_eq!(err.kind, ErrorKind::Unknown);
    }

    #[test]
    fn shell_command_runs_through_sh() {
        assert_eq!(
            Command::Shell("echo hi".into()).to_argv(),
            ["/bin/sh", "-c", "echo hi"]
        );
    }
}
