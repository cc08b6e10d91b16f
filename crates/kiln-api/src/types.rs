//! The API's request and response bodies (the public contract; the OpenAPI document is
//! generated from these).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable: `unauthenticated`, `forbidden`, `not_found`, `invalid_request`,
    /// `conflict`, `too_large`, `unavailable`, `timeout`, `guest_error`, `method_not_allowed`,
    /// `internal`.
    pub code: String,
    /// What went wrong and, where it helps, what to do.
    pub message: String,
    /// The request's id (also its `X-Request-Id` header): the daemon's log lines about it
    /// carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// A sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxBody {
    /// Its id.
    pub id: String,
    /// Its template.
    pub template: String,
    /// Where it is in its life.
    pub state: SandboxStateBody,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Labels given at create.
    pub metadata: BTreeMap<String, String>,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// When it will be destroyed, ms since the Unix epoch.
    pub expires_at_ms: Option<i64>,
    /// Its time to live in seconds (what a keepalive restarts).
    pub ttl_secs: Option<u64>,
    /// The egress policy in force (absent where the host has no sandbox networking).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkBody>,
    /// How to reach what it serves (absent where the host has no sandbox networking).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortsBody>,
    /// A call that needs it running (exec, files, its ports) resumes it when paused; when
    /// off, such calls get 409 while it is paused.
    pub auto_resume: bool,
    /// What its time to live running out does while it runs. A paused sandbox is kept for
    /// the server's paused retention, then destroyed.
    pub on_expiry: OnExpiryBody,
    /// The sandbox it was forked from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
}

/// What a sandbox uses now, measured on the host from its VMM's cgroup, its disk file and
/// its network link (nothing the guest reports). A figure that cannot be measured now is
/// absent: CPU and memory while the sandbox is paused (it has no VMM), network without
/// sandbox networking.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxMetricsBody {
    /// The sandbox.
    pub sandbox_id: String,
    /// Its state.
    pub state: SandboxStateBody,
    /// CPU time its VMM used (vCPUs and device emulation), in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Host memory charged to its VMM (the guest RAM it touched included), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Its memory limit (guest RAM plus the VMM's allowance), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// Space its writable disk takes on the host, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Bytes it received over its network link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_rx_bytes: Option<u64>,
    /// Bytes it sent over its network link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_tx_bytes: Option<u64>,
    /// When it was measured (ms since the Unix epoch).
    pub measured_at_ms: i64,
}

/// Forward a port of the host to a port of the sandbox (plain TCP).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenForwardBody {
    /// The sandbox's port.
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
}

/// A plain TCP forward: connections to `address` go to `port` of the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForwardBody {
    /// The sandbox's port.
    pub port: u16,
    /// The host's address and port that lead to it (`127.0.0.1:30000`): open to anyone who
    /// reaches it.
    pub address: String,
    /// When it was opened, ms since the epoch.
    pub created_at_ms: i64,
}

/// A sandbox's TCP forwards.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForwardListBody {
    /// By port.
    pub forwards: Vec<ForwardBody>,
}

/// Fork a sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// How many children, 1 to 32 (default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 32)]
    pub count: Option<usize>,
    /// The children's time to live in seconds (the parent's if absent).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub ttl_secs: Option<u64>,
    /// Labels added to the parent's (a key given here wins).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A fork's children and what it cost.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkedBody {
    /// The children, each continuing from the parent's moment of the fork.
    pub sandboxes: Vec<SandboxBody>,
    /// How long the parent was stopped, in milliseconds.
    pub parent_paused_ms: f64,
    /// Bytes written to capture the parent (its state, memory and disk layer).
    pub bytes_written: u64,
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxStateBody {
    /// Its VM runs.
    Running,
    /// Its memory and device state are being written to disk.
    Pausing,
    /// Saved on disk: no VM process, no RAM; files, processes and network identity come back
    /// on resume.
    Paused,
    /// Being brought back from disk.
    Resuming,
    /// Its VM ended without being asked to (`reason` says why); only destroy is left.
    Failed,
}

impl std::fmt::Display for SandboxStateBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SandboxStateBody::Running => "running",
            SandboxStateBody::Pausing => "pausing",
            SandboxStateBody::Paused => "paused",
            SandboxStateBody::Resuming => "resuming",
            SandboxStateBody::Failed => "failed",
        })
    }
}

impl SandboxStateBody {
    fn of(state: &str) -> SandboxStateBody {
        match state {
            "running" => SandboxStateBody::Running,
            "pausing" => SandboxStateBody::Pausing,
            "paused" => SandboxStateBody::Paused,
            "resuming" => SandboxStateBody::Resuming,
            _ => SandboxStateBody::Failed,
        }
    }
}

/// What a running sandbox's time to live running out does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnExpiryBody {
    /// It is destroyed.
    #[default]
    Destroy,
    /// It is paused (and kept for the paused retention).
    Pause,
}

impl From<OnExpiryBody> for kiln_engine::OnExpiry {
    fn from(body: OnExpiryBody) -> Self {
        match body {
            OnExpiryBody::Destroy => kiln_engine::OnExpiry::Destroy,
            OnExpiryBody::Pause => kiln_engine::OnExpiry::Pause,
        }
    }
}

impl From<kiln_engine::OnExpiry> for OnExpiryBody {
    fn from(on_expiry: kiln_engine::OnExpiry) -> Self {
        match on_expiry {
            kiln_engine::OnExpiry::Destroy => OnExpiryBody::Destroy,
            kiln_engine::OnExpiry::Pause => OnExpiryBody::Pause,
        }
    }
}

/// How a sandbox's ports are reached: `http://<port>-<id>.<domain>/` (`url` with `{port}`
/// filled in), or `/v1/sandboxes/{id}/ports/{port}/` with an API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortsBody {
    /// Reachable by URL without the access token.
    pub public: bool,
    /// The URL of port `{port}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The token its URLs need unless public (`X-Kiln-Access-Token` header or `kiln_token`
    /// query parameter); shown to its owner only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

/// Options of a sandbox's ports at create.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortsOptions {
    /// Anyone may reach its ports by URL (default: only with its access token).
    #[serde(default)]
    pub public: bool,
}

/// A sandbox's egress policy.
///
/// Entries are IPv4 addresses or CIDRs (`203.0.113.0/24`), domain names (`example.test`) or
/// wildcards (`*.example.test`: every name below `example.test`, not `example.test` itself).
/// `deny_out` wins over `allow_out`. Names are enforced by kiln's resolver (names not allowed
/// do not resolve) and, on HTTP and HTTPS, by a proxy that checks the Host header or TLS server
/// name and connects to the address it resolved itself; QUIC is refused under a name list.
/// Always denied, whatever the policy: the host's own addresses, other sandboxes,
/// link-local and cloud metadata (169.254.0.0/16), and unless the operator opens them RFC 1918
/// and 100.64.0.0/10; an `allow_out` entry inside those is a 400.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkBody {
    /// Everything not denied is reachable; `false`: only what `allow_out` names.
    #[serde(default = "default_internet")]
    pub internet: bool,
    /// Reachable even without internet (at most 256 entries).
    #[serde(default)]
    #[schema(max_items = 256)]
    pub allow_out: Vec<String>,
    /// Never reachable (at most 256 entries).
    #[serde(default)]
    #[schema(max_items = 256)]
    pub deny_out: Vec<String>,
    /// Most bandwidth each way (to the sandbox and from it, ingress through its ports
    /// included), in Mbit/s; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100_000)]
    pub bandwidth_mbit: Option<u32>,
    /// Most connections it may have open at once (TCP, UDP and other flows it starts; DNS to
    /// kiln's resolver aside): a new one past it is refused at connect. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_connections: Option<u32>,
}

fn default_internet() -> bool {
    true
}

impl From<kiln_network::policy::EgressPolicy> for NetworkBody {
    fn from(policy: kiln_network::policy::EgressPolicy) -> Self {
        let show = |list: &[kiln_network::policy::Destination]| {
            list.iter().map(ToString::to_string).collect()
        };
        NetworkBody {
            internet: policy.internet,
            allow_out: show(&policy.allow_out),
            deny_out: show(&policy.deny_out),
            bandwidth_mbit: policy.bandwidth_mbit,
            max_connections: policy.max_connections,
        }
    }
}

impl NetworkBody {
    /// The policy it describes; an entry that is neither an address nor a name is refused,
    /// named.
    pub fn parse(&self) -> Result<kiln_network::policy::EgressPolicy, String> {
        let parse = |field: &str, list: &[String]| {
            list.iter()
                .map(|entry| {
                    kiln_network::policy::Destination::parse(entry)
                        .map_err(|e| format!("network.{field}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(kiln_network::policy::EgressPolicy {
            internet: self.internet,
            allow_out: parse("allow_out", &self.allow_out)?,
            deny_out: parse("deny_out", &self.deny_out)?,
            bandwidth_mbit: self.bandwidth_mbit,
            max_connections: self.max_connections,
        })
    }
}

impl From<kiln_control::SandboxRecord> for SandboxBody {
    fn from(record: kiln_control::SandboxRecord) -> Self {
        SandboxBody {
            id: record.id,
            template: record.template,
            state: SandboxStateBody::of(&record.state),
            reason: record.reason,
            metadata: record.metadata,
            created_at_ms: record.created_at_ms,
            expires_at_ms: record.expires_at_ms,
            ttl_secs: record.ttl_ms.map(|ms| (ms / 1000) as u64),
            ports: record.access_token.as_ref().map(|token| PortsBody {
                public: record.public_ports,
                url: None,
                access_token: Some(token.clone()),
            }),
            network: record.network.map(Into::into),
            auto_resume: record.auto_resume,
            on_expiry: record.on_expiry.into(),
            parent_id: record.parent_id,
        }
    }
}

impl SandboxBody {
    /// Shows a transition under way (`pausing`, `resuming`) where the record says where it
    /// goes from.
    pub fn with_live_state(mut self, live: Option<&kiln_engine::SandboxState>) -> SandboxBody {
        if let Some(
            state @ (kiln_engine::SandboxState::Pausing | kiln_engine::SandboxState::Resuming),
        ) = live
        {
            self.state = SandboxStateBody::of(state.name());
        }
        self
    }

    /// Fills in the URL of its ports, served under `domain` at `port` (80 if `None`).
    pub fn with_port_urls(mut self, domain: &str, port: Option<u16>) -> SandboxBody {
        let suffix = port.map_or_else(String::new, |p| format!(":{p}"));
        if let Some(ports) = &mut self.ports {
            ports.url = Some(format!("http://{{port}}-{}.{domain}{suffix}/", self.id));
        }
        self
    }
}

/// A page of sandboxes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    /// The sandboxes, oldest first.
    pub sandboxes: Vec<SandboxBody>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Create a sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxBody {
    /// Template name (the server's default, `python`, if absent).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9_-]*$")]
    pub template: Option<String>,
    /// Time to live in seconds (the server's default if absent).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub ttl_secs: Option<u64>,
    /// Labels to list by.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Environment added to every command run in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// CPU quota in cores, at least 0.1 and at most the template's vCPUs.
    #[serde(default)]
    #[schema(minimum = 0.1)]
    pub cpus: Option<f64>,
    /// Memory limit of the VM process in MiB: from the template's memory plus 64 to the
    /// template's memory plus 256 (the default).
    #[serde(default)]
    #[schema(minimum = 64)]
    pub memory_mib: Option<u64>,
    /// Root disk size in MiB, at least the template's and at most 1 TiB.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1048576)]
    pub disk_mib: Option<u64>,
    /// Egress policy (the host's default, normally internet on, if absent).
    #[serde(default)]
    pub network: Option<NetworkBody>,
    /// How its ports may be reached (by default only with its access token).
    #[serde(default)]
    pub ports: Option<PortsOptions>,
    /// A call that needs it running resumes it when paused (default true).
    #[serde(default)]
    pub auto_resume: Option<bool>,
    /// What its time to live running out does (default `destroy`).
    #[serde(default)]
    pub on_expiry: Option<OnExpiryBody>,
    /// Create from this snapshot (id or name) instead of a template: the sandbox continues
    /// from the moment of the snapshot.
    #[serde(default)]
    pub snapshot: Option<String>,
}

/// Take a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotBody {
    /// Its name, unique among the tenant's snapshots: 1 to 63 of `a-z`, `0-9`, `-`, `_`,
    /// starting with a letter or digit.
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9_-]*$")]
    pub name: String,
}

/// A snapshot: a sandbox's memory, device state and disk at one moment, kept until deleted.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotBody {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// That sandbox's template.
    pub template: String,
    /// Its files' size on disk in bytes (a memory file it shares with its template, whose
    /// pages it holds no copy of, is not counted).
    pub size_bytes: i64,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: i64,
}

impl From<kiln_control::SnapshotRecord> for SnapshotBody {
    fn from(record: kiln_control::SnapshotRecord) -> Self {
        SnapshotBody {
            id: record.id,
            name: record.name,
            sandbox_id: record.sandbox_id,
            template: record.template,
            size_bytes: record.size_bytes,
            created_at_ms: record.created_at_ms,
        }
    }
}

/// The caller's snapshots.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    /// Oldest first.
    pub snapshots: Vec<SnapshotBody>,
}

/// A field that may be left out but, when given, is not `null` (`null` is refused, not read
/// as "not given").
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// Change a sandbox: every field is optional, at least one must be given, and a field not
/// given stays as it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSandboxBody {
    /// New time to live in seconds, counted from now.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    #[schema(minimum = 1)]
    pub ttl_secs: Option<u64>,
    /// New egress policy, replacing the old one atomically: new connections follow it at
    /// once, and established connections to destinations it denies are cut.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    pub network: Option<NetworkBody>,
    /// Whether a call that needs it running resumes it when paused.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    pub auto_resume: Option<bool>,
    /// What its time to live running out does.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    pub on_expiry: Option<OnExpiryBody>,
}

/// Whether `tag` may name a background command: 1 to 128 characters of `A-Z a-z 0-9 . _ :
/// @ + = -` (it stands for the pid in a URL path, and the agent takes at most 128 bytes).
pub(crate) fn is_tag(tag: &str) -> bool {
    (1..=128).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@+=-".contains(&b))
}

/// A command: a shell command line (run by `/bin/sh -c`) or an argv array.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum CommandBody {
    /// Run by `/bin/sh -c`.
    Shell(String),
    /// Executed directly; `argv[0]` is looked up in `PATH`.
    Argv(Vec<String>),
}

/// Run a command.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// What to run.
    pub command: CommandBody,
    /// Environment on top of the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (the template's if absent).
    #[serde(default)]
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid` (the template's user if absent).
    #[serde(default)]
    #[schema(min_length = 1)]
    pub user: Option<String>,
    /// Kill the command after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Text written to the command's stdin, which is then closed (else stdin is empty).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Most bytes of stdout and of stderr returned (default 1 MiB, at most 16 MiB); the
    /// result says when output was cut.
    #[serde(default)]
    #[schema(maximum = 16777216)]
    pub max_output_bytes: Option<usize>,
    /// Start it in the background and return at once; list, attach and signal it through
    /// `/processes`.
    #[serde(default)]
    pub background: bool,
    /// A name to find a background command by (in place of its pid in `/processes/{process}`).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:@+=-]+$")]
    pub tag: Option<String>,
    /// Keep stdin open after `stdin`'s text (if any), to write more with
    /// `/processes/{process}/stdin` and close it there.
    #[serde(default)]
    pub open_stdin: bool,
    /// Run in a terminal of this size: stdout and stderr merged, input through
    /// `/processes/{process}/stdin`, new sizes through `/processes/{process}/resize`.
    #[serde(default)]
    pub pty: Option<TerminalSize>,
}

/// Input for a running process's stdin (or terminal).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessStdinBody {
    /// Text to write.
    #[serde(default)]
    pub data: Option<String>,
    /// Bytes to write, base64 (instead of `data`).
    #[serde(default)]
    #[schema(format = Byte)]
    pub data_b64: Option<String>,
    /// Close stdin after writing (end of file; on a terminal, the end-of-file character).
    #[serde(default)]
    pub close: bool,
}

/// The result of a command run to completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResultBody {
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
    /// Stdout (invalid UTF-8 replaced).
    pub stdout: String,
    /// Stderr (invalid UTF-8 replaced).
    pub stderr: String,
    /// Output was longer than `max_output_bytes` (or the agent dropped some).
    pub truncated: bool,
    /// It was killed because `timeout_ms` passed.
    pub timed_out: bool,
    /// Wall-clock time from the request to the exit, in ms.
    pub duration_ms: f64,
}

/// A background command that was started.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StartedBody {
    /// Its pid in the sandbox.
    pub pid: u32,
    /// Its tag.
    pub tag: Option<String>,
}

/// One line of a streamed exec or attach (newline-delimited JSON).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEventBody {
    /// The command started.
    Start {
        /// Its pid.
        pid: u32,
    },
    /// Output on stdout: `data` when it is valid UTF-8, else `data_b64`.
    Stdout {
        /// Text.
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        /// Bytes, base64.
        #[serde(skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    /// Output on stderr, like `stdout`.
    Stderr {
        /// Text.
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        /// Bytes, base64.
        #[serde(skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    /// This many bytes of output were dropped before an attach.
    Dropped {
        /// Bytes.
        bytes: u64,
    },
    /// The command ended; nothing follows.
    Exit {
        /// Exit code, if it exited.
        exit_code: Option<i32>,
        /// Signal number, if a signal ended it.
        signal: Option<i32>,
        /// Killed on timeout.
        timed_out: bool,
    },
    /// The stream broke; nothing follows.
    Error {
        /// As in error responses.
        code: String,
        /// What happened.
        message: String,
    },
}

/// A process started through the API.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessBody {
    /// Its pid.
    pub pid: u32,
    /// Its tag.
    pub tag: Option<String>,
    /// Its argv.
    pub argv: Vec<String>,
    /// Started in the background.
    pub background: bool,
    /// Still running.
    pub running: bool,
    /// Exit code, once it exited.
    pub exit_code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
}

/// What a kill-all did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KillAllBody {
    /// How many processes were killed.
    pub killed: u32,
}

/// Send a signal.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// Signal number (default 15, SIGTERM).
    #[serde(default = "default_signal")]
    #[schema(minimum = 1, maximum = 64)]
    pub signal: i32,
}

fn default_signal() -> i32 {
    15
}

/// A file or directory.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileBody {
    /// Absolute path.
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, ms since the Unix epoch.
    pub modified_ms: i64,
}

/// A directory listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileListBody {
    /// Entries, depth first.
    pub entries: Vec<FileBody>,
    /// The listing stopped at the entry limit.
    pub truncated: bool,
}

/// Bytes written.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WrittenBody {
    /// Path written.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
}

/// Make a directory and its missing parents.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirBody {
    /// Absolute path.
    #[schema(
        min_length = 1,
        max_length = 4095,
        pattern = "^(/[^/\\u0000]{0,255})+$"
    )]
    pub path: String,
}

/// Rename a file or directory.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameBody {
    /// Absolute source path, not `/`.
    #[schema(
        min_length = 2,
        max_length = 4095,
        pattern = "^(/[^/\\u0000]{0,255})*/[^/\\u0000]{1,255}(/[^/\\u0000]{0,255})*$"
    )]
    pub from: String,
    /// Absolute destination path, not `/`.
    #[schema(
        min_length = 2,
        max_length = 4095,
        pattern = "^(/[^/\\u0000]{0,255})*/[^/\\u0000]{1,255}(/[^/\\u0000]{0,255})*$"
    )]
    pub to: String,
}

/// A template.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateBody {
    /// Its name.
    pub name: String,
    /// What it is.
    pub description: Option<String>,
    /// Virtual CPUs of its sandboxes.
    pub vcpus: u32,
    /// Guest memory of its sandboxes, MiB.
    pub memory_mib: u32,
    /// Root disk of its sandboxes, MiB.
    pub disk_mib: u64,
    /// Baked and ready (else the next create builds and bakes it first, which takes long).
    pub ready: bool,
    /// Shared by every tenant.
    pub global: bool,
}

impl From<kiln_control::TemplateInfo> for TemplateBody {
    fn from(info: kiln_control::TemplateInfo) -> Self {
        TemplateBody {
            name: info.name,
            description: info.description,
            vcpus: info.vcpus,
            memory_mib: info.memory_mib,
            disk_mib: info.disk_mib,
            ready: info.ready,
            global: info.global,
        }
    }
}

/// Templates.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    /// By name.
    pub templates: Vec<TemplateBody>,
}

/// Make an API key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    /// Tenant the key acts for (the caller's if absent).
    #[serde(default)]
    pub tenant: Option<String>,
    /// A label.
    #[serde(default)]
    pub name: String,
    /// May manage keys.
    #[serde(default)]
    pub admin: bool,
}

/// An API key (its secret only in the response that created it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyBody {
    /// Its id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its label.
    pub name: String,
    /// May manage keys.
    pub admin: bool,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Revocation time.
    pub revoked_at_ms: Option<i64>,
    /// The secret to send as `Authorization: Bearer <secret>`; shown once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl From<kiln_control::KeyRecord> for KeyBody {
    fn from(record: kiln_control::KeyRecord) -> Self {
        KeyBody {
            id: record.id,
            tenant: record.tenant,
            name: record.name,
            admin: record.admin,
            created_at_ms: record.created_at_ms,
            revoked_at_ms: record.revoked_at_ms,
            secret: None,
        }
    }
}

/// API keys.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    /// Oldest first.
    pub keys: Vec<KeyBody>,
}

/// The daemon's health.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthBody {
    /// `ok`.
    pub status: String,
    /// kiln's version.
    pub version: String,
    /// `kvm` or `tcg`.
    pub accel: String,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TerminalSize {
    /// Rows.
    #[schema(maximum = 65535)]
    pub rows: u16,
    /// Columns.
    #[schema(maximum = 65535)]
    pub cols: u16,
}

/// The first message of an interactive session (`/exec/ws`): start a command, or attach to
/// a running one.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InteractiveStartBody {
    /// What to run (absent when attaching).
    #[serde(default)]
    pub command: Option<CommandBody>,
    /// A process to attach to instead, by pid or tag.
    #[serde(default)]
    pub attach: Option<String>,
    /// Run in a terminal of this size (stdout and stderr merged).
    #[serde(default)]
    pub pty: Option<TerminalSize>,
    /// Environment on top of the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User.
    #[serde(default)]
    #[schema(min_length = 1)]
    pub user: Option<String>,
    /// Kill the command after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// What a client sends during an interactive session (binary messages are stdin bytes).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum InteractiveInputBody {
    /// Text for stdin.
    Stdin {
        /// The text.
        data: String,
    },
    /// End of stdin.
    CloseStdin,
    /// The terminal changed size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Send a signal to the process group.
    Signal {
        /// Signal number.
        signal: i32,
    },
}

/// Build a template: a spec of the caller's own, or an existing template by name.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildTemplateBody {
    /// A template spec (TOML, as in `templates/*/template.toml`; no `files` or `base.image`):
    /// stored as one of the caller's templates, then built.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    pub spec: Option<String>,
    /// An existing template (global or the caller's) to build and bake now.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(nullable = false)]
    #[schema(min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9_-]*$")]
    pub name: Option<String>,
}

/// One line of a template build's progress (newline-delimited JSON).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEventBody {
    /// A step started.
    Step {
        /// What is being built (`kernel`, `rootfs python`).
        artefact: String,
        /// The step.
        name: String,
    },
    /// A step finished.
    StepDone {
        /// What is being built.
        artefact: String,
        /// The step.
        name: String,
        /// How long it took.
        elapsed_ms: f64,
        /// A size or a count.
        detail: Option<String>,
    },
    /// An artefact came from the cache.
    Cached {
        /// What.
        artefact: String,
    },
    /// Built and baked; nothing follows.
    Ready {
        /// The template.
        template: TemplateBody,
    },
    /// The build failed; nothing follows.
    Error {
        /// As in error responses.
        code: String,
        /// What happened.
        message: String,
    },
}

/// Run code in the sandbox's code interpreter (state persists between calls of a context).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeBody {
    /// The code; the value of its last expression is the result.
    pub code: String,
    /// `python` (the default, and the only language so far).
    #[serde(default)]
    #[schema(pattern = "^python$")]
    pub language: Option<String>,
    /// The context to run in (`default` if absent); `POST .../code/contexts` makes more.
    #[serde(default)]
    #[schema(min_length = 1)]
    pub context: Option<String>,
    /// Environment set for this run, on top of the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Interrupt the run after this many milliseconds (the context keeps its state; the
    /// outcome says `timed_out`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Something a run showed, by MIME type: `text/plain` always; `image/png` (base64),
/// `text/html`, `application/json`, ... where the object offers them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CodeOutputBody {
    /// The representations, by MIME type.
    #[schema(value_type = Object)]
    pub data: kiln_control::code::MimeBundle,
    /// The value of the last expression (else something displayed during the run: a
    /// figure, `display(x)`).
    pub is_main_result: bool,
}

/// The exception a run raised.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CodeErrorBody {
    /// Its class, e.g. `ZeroDivisionError` (`KeyboardInterrupt` when interrupted).
    pub name: String,
    /// Its message.
    pub value: String,
    /// The traceback, from the run's own code.
    pub traceback: String,
}

/// What a run did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecutionBody {
    /// What it showed, in order; the last expression's value has `is_main_result`.
    pub results: Vec<CodeOutputBody>,
    /// What it printed.
    pub stdout: String,
    /// What it wrote to stderr.
    pub stderr: String,
    /// The exception it raised, if it did.
    pub error: Option<CodeErrorBody>,
    /// How many runs its context has done.
    pub execution_count: u64,
    /// It was interrupted because `timeout_ms` passed.
    pub timed_out: bool,
    /// Output past the limits (16 MiB of text per stream, 64 MiB of results) was dropped.
    pub truncated: bool,
    /// Wall-clock time of the request, in ms.
    pub duration_ms: f64,
}

// Serialized only: raw values cannot go through a tagged enum's deserializer (clients read
// these lines as plain JSON).
/// One line of a streamed run (newline-delimited JSON).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CodeEventBody {
    /// Printed text.
    Stdout {
        /// The text.
        text: String,
    },
    /// Text written to stderr.
    Stderr {
        /// The text.
        text: String,
    },
    /// Something shown (a figure, `display(x)`), by MIME type.
    Display {
        /// The representations.
        #[schema(value_type = Object)]
        data: kiln_control::code::MimeBundle,
    },
    /// The last expression's value, by MIME type.
    Result {
        /// The representations.
        #[schema(value_type = Object)]
        data: kiln_control::code::MimeBundle,
    },
    /// The run raised.
    Error {
        /// Exception class.
        name: String,
        /// Its message.
        value: String,
        /// The traceback.
        traceback: String,
    },
    /// The run ended; nothing follows.
    Done {
        /// How many runs its context has done.
        execution_count: u64,
        /// Interrupted because `timeout_ms` passed.
        timed_out: bool,
    },
    /// The stream broke (not the code's error); nothing follows.
    Failure {
        /// As in error responses.
        code: String,
        /// What happened.
        message: String,
    },
}

/// A code context: globals of its own, in a process of its own.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CodeContextBody {
    /// Its id (`default` is always there).
    pub id: String,
}

/// A sandbox's code contexts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CodeContextList {
    /// Their ids.
    pub contexts: Vec<String>,
}

/// Whether an interrupt stopped a run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InterruptedBody {
    /// A run was going on (it ends with a `KeyboardInterrupt` error).
    pub running: bool,
}
