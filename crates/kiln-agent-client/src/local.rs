//! Running an agent on the host, for tests and development.
//!
//! The agent runs with its init duties disabled, as PID 1 of fresh mount, UTS and PID
//! namespaces (optionally a fresh network namespace too), so nothing it does can touch the
//! machine: it can neither mount over the host's filesystems, nor rename the host, nor see or
//! signal the host's processes. With the `dns` duty enabled, private files are bind-mounted
//! over `/etc/resolv.conf` and `/etc/hosts` in its mount namespace, so the duty writes those
//! instead of the host's. Requires root (for the namespaces) and `unshare` from util-linux.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{AgentClient, ClientConfig, UnixConnector};

/// Options of a [`LocalAgent`].
#[derive(Debug, Clone, Default)]
pub struct LocalAgentOptions {
    /// Init duties to re-enable: `hostname` (the UTS namespace is always fresh), `network`
    /// (only with `new_netns`) and `dns` (writes private files, see
    /// [`LocalAgent::resolver_files`]).
    pub enable_duties: Vec<String>,
    /// Run in a fresh network namespace (holding only `lo`).
    pub new_netns: bool,
    /// A shell command run inside the namespaces before the agent starts (for example to
    /// create a dummy `eth0` in the fresh network namespace).
    pub setup: Option<String>,
    /// Where the agent's log goes; inherited if absent.
    pub log_file: Option<PathBuf>,
    /// The agent's log filter; `warn` if absent.
    pub log_filter: Option<String>,
}

/// An agent process on the host, killed (with everything it started) on drop.
#[derive(Debug)]
pub struct LocalAgent {
    child: Child,
    socket: PathBuf,
    resolver_files: Option<[PathBuf; 2]>,
    _dir: tempfile::TempDir,
}

impl LocalAgent {
    /// Starts `agent_binary` and waits until its socket accepts connections.
    pub async fn start(agent_binary: &Path, options: LocalAgentOptions) -> io::Result<LocalAgent> {
        let dir = tempfile::Builder::new().prefix("kiln-agent-").tempdir()?;
        let socket = dir.path().join("agent.sock");
        let mut agent = format!(
            "exec {} --no-init --listen unix:{} --log {}",
            shell_quote(&agent_binary.to_string_lossy()),
            shell_quote(&socket.to_string_lossy()),
            shell_quote(options.log_filter.as_deref().unwrap_or("warn")),
        );
        for duty in &options.enable_duties {
            agent.push_str(&format!(" --enable-duty {}", shell_quote(duty)));
        }
        let mut prelude = Vec::new();
        let resolver_files = if options.enable_duties.iter().any(|d| d == "dns") {
            let files = [dir.path().join("resolv.conf"), dir.path().join("hosts")];
            for (file, target) in files.iter().zip(["/etc/resolv.conf", "/etc/hosts"]) {
                std::fs::write(file, "")?;
                prelude.push(format!(
                    "mount --bind {} {target}",
                    shell_quote(&file.to_string_lossy())
                ));
            }
            Some(files)
        } else {
            None
        };
        prelude.extend(options.setup.clone());
        let script = if prelude.is_empty() {
            agent
        } else {
            format!("set -e; {}; {agent}", prelude.join("; "))
        };
        let mut command = Command::new("unshare");
        command.args([
            "--mount",
            // Mounts made inside must never propagate to the host.
            "--propagation",
            "private",
            "--uts",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
        ]);
        if options.new_netns {
            command.arg("--net");
        }
        command
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(log) = &options.log_file {
            let file = std::fs::File::create(log)?;
            command.stdout(file.try_clone()?).stderr(file);
        }
        let child = command.spawn()?;
        let mut local = LocalAgent {
            child,
            socket,
            resolver_files,
            _dir: dir,
        };
        local.wait_listening(Duration::from_secs(20)).await?;
        Ok(local)
    }

    async fn wait_listening(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(1);
        loop {
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "agent exited during start-up: {status}"
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "agent did not start listening",
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A client for this agent.
    pub fn client(&self) -> AgentClient {
        self.client_with(ClientConfig::default())
    }

    /// A client with a custom configuration.
    pub fn client_with(&self, config: ClientConfig) -> AgentClient {
        AgentClient::new(
            std::sync::Arc::new(UnixConnector::new(&self.socket)),
            config,
        )
    }

    /// With the `dns` duty enabled, the private files that stand in for `/etc/resolv.conf` and
    /// `/etc/hosts` (in that order) in the agent's mount namespace: what the duty writes.
    pub fn resolver_files(&self) -> Option<[&Path; 2]> {
        self.resolver_files
            .as_ref()
            .map(|[resolv, hosts]| [resolv.as_path(), hosts.as_path()])
    }

    /// Pid (in the host's namespace) of the `unshare` process that owns the agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the agent and waits for it; everything in its namespaces dies with it.
    pub async fn stop(mut self) -> io::Result<()> {
        self.child.kill().await
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Locates the agent binary: `$KILN_AGENT_BIN`, or `kiln-agent` next to the running
/// executable (or its parent directory, for test binaries under `deps/`).
pub fn find_agent_binary() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent();
    for candidate in [dir, dir.and_then(Path::parent)].into_iter().flatten() {
        let candidate = candidate.join("kiln-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "kiln-agent binary not found: build it (cargo build -p kiln-agent) or set KILN_AGENT_BIN",
    ))
}
