//! A QEMU process: started in its jail with its sockets handed in as descriptors, or adopted
//! from an earlier run of the daemon; its QMP session, snapshot and restore of device state.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::{BootConfig, AGENT_FD, CONSOLE_FD, QMP_FD, TAP_FD};
use crate::driver::PhaseTimings;
use crate::jail::{Jail, Jailed, Launch, BASIC_DEVICES, KVM_DEVICE};
use crate::output::VmmOutput;
use crate::qmp::{Qmp, QmpError};

/// Errors of snapshot and restore.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A QMP command failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A file could not be opened.
    #[error("snapshot file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The VM was not in the expected state.
    #[error("unexpected VM state `{0}` after restore")]
    State(String),
}

/// Descriptors a QEMU process is started with, opened by the caller.
#[derive(Debug, Default)]
pub struct Attachments {
    /// Network namespace QEMU runs in.
    pub netns: Option<OwnedFd>,
    /// The guest's tap.
    pub tap: Option<OwnedFd>,
    /// `cgroup.procs` files QEMU joins before it execs.
    pub cgroups: Vec<OwnedFd>,
}

/// How this process holds its QEMU.
#[derive(Debug)]
enum Handle {
    /// Started by this process in its jail: a child, reaped here.
    Jailed(Jailed),
    /// Started by an earlier run of the daemon and adopted: not a child (its parent died),
    /// held by a pidfd, which keeps referring to this very process.
    Adopted { pid: u32, pidfd: OwnedFd },
}

impl Handle {
    fn pid(&self) -> u32 {
        match self {
            Handle::Jailed(jailed) => jailed.pid(),
            Handle::Adopted { pid, .. } => *pid,
        }
    }

    /// The exit status once the process ended (`None` inside: ended, status unknown).
    fn try_wait(&mut self) -> io::Result<Option<Option<std::process::ExitStatus>>> {
        match self {
            Handle::Jailed(jailed) => Ok(jailed.try_wait()?.map(Some)),
            Handle::Adopted { pidfd, .. } => Ok(crate::pidfd::exited(pidfd, 0)?.then_some(None)),
        }
    }

    fn kill(&mut self) -> io::Result<()> {
        match self {
            Handle::Jailed(jailed) => jailed.kill(),
            Handle::Adopted { pidfd, .. } => {
                // Its parent (init) reaps it; wait until it has ended.
                if !crate::pidfd::kill_and_wait(pidfd, Duration::from_secs(10))? {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "QEMU did not end after SIGKILL",
                    ));
                }
                Ok(())
            }
        }
    }
}

/// A QEMU process this crate started (or adopted); killed (by its own handle only) on drop
/// unless detached.
#[derive(Debug)]
pub struct QemuProcess {
    child: Handle,
    detached: bool,
    config: BootConfig,
    qmp: Option<Qmp>,
    output: Option<VmmOutput>,
}

/// A listening unix socket at `path` (an old one there is replaced: the directory is the
/// daemon's own).
fn listen(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path)
}

impl QemuProcess {
    /// Starts QEMU for `config` in its jail: its sockets made here and handed in as
    /// descriptors, joining `attachments`' namespace and cgroups, as `config.run_as`.
    pub fn spawn(
        qemu: &Path,
        config: BootConfig,
        attachments: Attachments,
    ) -> io::Result<QemuProcess> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let program = crate::jail::find_program(qemu)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.run_dir)?;
        std::fs::set_permissions(&config.run_dir, std::fs::Permissions::from_mode(0o700))?;
        let jail_root = config.jail_root();
        match std::fs::create_dir(&jail_root) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let qmp = listen(&config.qmp_socket())?;
        let agent = listen(&config.agent_socket())?;
        let console = listen(&config.console_socket())?;
        // QEMU's end never blocks: a full pipe drops its messages rather than stalling it; ours
        // is drained by the output thread.
        let (stderr_read, stderr_write) = crate::jail::pipe(true)?;
        let mut binds = config.binds();
        if !super::config::under_usr(&program) {
            // A QEMU outside /usr (a custom build): its directory, read-only.
            if let Some(dir) = program.parent() {
                binds.push(crate::jail::Bind::read_only(dir, dir));
            }
        }
        let mut devices = BASIC_DEVICES.to_vec();
        if config.accel == crate::accel::Accel::Kvm {
            devices.push(KVM_DEVICE);
        }
        let jail = Jail {
            root: jail_root,
            binds,
            devices,
            run_as: config.run_as,
        };
        let mut fds: Vec<(OwnedFd, i32)> = vec![
            (qmp.into(), QMP_FD),
            (agent.into(), AGENT_FD),
            (console.into(), CONSOLE_FD),
        ];
        if let Some(tap) = attachments.tap {
            fds.push((tap, TAP_FD));
        }
        let launch = Launch {
            program,
            args: config.args(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            netns: attachments.netns,
            cgroups: attachments.cgroups,
            fds,
            stderr: Some(stderr_write),
        };
        let jailed = crate::jail::spawn(&jail, launch)?;
        let mut process = QemuProcess {
            child: Handle::Jailed(jailed),
            detached: false,
            config,
            qmp: None,
            output: None,
        };
        process.output = Some(VmmOutput::start(
            &process.config.console_socket(),
            &process.config.console_log(),
            Some(stderr_read),
        )?);
        Ok(process)
    }

    /// The QMP session (connected on first use).
    pub fn qmp(&mut self) -> Result<&mut Qmp, QmpError> {
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(
                &self.config.qmp_socket(),
                Duration::from_secs(30),
            )?);
        }
        self.qmp
            .as_mut()
            .ok_or_else(|| QmpError::Protocol("no QMP session".into()))
    }

    /// Waits until QEMU answers on QMP (it runs its main loop) and, for a cold boot, lets
    /// the guest run. A QEMU that exits first is an error with its own last words.
    pub fn wait_started(&mut self) -> io::Result<()> {
        let paused = self.config.start_paused();
        let result = self.qmp().and_then(|qmp| {
            if paused {
                qmp.execute("cont", None)?;
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Some(status) = self.try_wait()? {
                    if let Some(output) = &mut self.output {
                        output.wait_closed(Duration::from_secs(1));
                    }
                    let status = status.map_or_else(|| "status unknown".into(), |s| s.to_string());
                    return Err(io::Error::other(format!(
                        "QEMU exited ({status}): {}",
                        self.stderr_tail()
                    )));
                }
                Err(io::Error::other(e))
            }
        }
    }

    /// Pauses the VM and writes its device state to `state` (RAM stays in the shared memory
    /// file: `x-ignore-shared`). The VM stays paused.
    pub fn snapshot_to(&mut self, state: &Path) -> Result<PhaseTimings, SnapshotError> {
        self.save_to(state, true, true)
    }

    /// Pauses the VM and writes its device state and all of its RAM to `state`, whatever
    /// backs it (`x-ignore-shared` off). The VM stays paused. The file is not synced: it is
    /// a step on the way, not something to keep across a host crash.
    pub fn capture_to(&mut self, state: &Path) -> Result<PhaseTimings, SnapshotError> {
        self.save_to(state, false, false)
    }

    /// Creates the state file `state` (write-only: QEMU takes a descriptor from an fd set
    /// only in the mode it opens with) and stops the VM; returns the file, the timings so far
    /// and when the stop was done.
    fn stop_for_save(
        &mut self,
        state: &Path,
    ) -> Result<(std::fs::File, PhaseTimings, std::time::Instant), SnapshotError> {
        let mut timings = PhaseTimings::default();
        let start = std::time::Instant::now();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(state)
            .map_err(|source| SnapshotError::File {
                path: state.to_owned(),
                source,
            })?;
        self.qmp()?.execute("stop", None)?;
        let at = timings.record("stop", start);
        Ok((file, timings, at))
    }

    /// Pauses the VM and writes its device state alone (no RAM, whatever backs it) to a
    /// new file at `state`: QEMU's `xen-save-devices-state`, the device sections of a
    /// migration stream. The VM stays paused; the file is not synced.
    pub fn save_devices_to(&mut self, state: &Path) -> Result<PhaseTimings, SnapshotError> {
        let (file, mut timings, at) = self.stop_for_save(state)?;
        let qmp = self.qmp()?;
        qmp.execute_with_fd(
            "add-fd",
            Some(serde_json::json!({ "fdset-id": STATE_FDSET })),
            file.as_fd(),
        )?;
        let saved = qmp.execute(
            "xen-save-devices-state",
            Some(serde_json::json!({
                "filename": format!("/dev/fdset/{STATE_FDSET}"),
                "live": false
            })),
        );
        release_state(qmp);
        saved?;
        timings.record("save device state alone", at);
        Ok(timings)
    }

    fn save_to(
        &mut self,
        state: &Path,
        ignore_shared: bool,
        durable: bool,
    ) -> Result<PhaseTimings, SnapshotError> {
        let (file, mut timings, at) = self.stop_for_save(state)?;
        let qmp = self.qmp()?;
        let uri = hand_over_state(qmp, &file, ignore_shared)?;
        // QEMU throttles a migration to 128 MiB/s by default (a network's courtesy): a
        // stopped VM writing to a local file goes as fast as the disk takes it.
        qmp.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": UNTHROTTLED })),
        )?;
        qmp.execute("migrate", Some(serde_json::json!({ "uri": uri })))?;
        let migrated = qmp.wait_migration(Duration::from_secs(120));
        release_state(qmp);
        migrated?;
        let at = timings.record("save device state", at);
        if durable {
            file.sync_all().map_err(|source| SnapshotError::File {
                path: state.to_owned(),
                source,
            })?;
            timings.record("sync state", at);
        }
        Ok(timings)
    }

    /// Loads device state from `state` (read from its start) into a VM started with
    /// `incoming`, and resumes it.
    pub fn restore_from(&mut self, state: &std::fs::File) -> Result<PhaseTimings, SnapshotError> {
        let mut timings = self.load_from(state)?;
        let at = std::time::Instant::now();
        self.qmp()?.execute("cont", None)?;
        timings.record("resume", at);
        Ok(timings)
    }

    /// Loads saved state from `state` (read from its start) into a VM started with
    /// `incoming`; the guest stays stopped.
    pub fn load_from(&mut self, state: &std::fs::File) -> Result<PhaseTimings, SnapshotError> {
        self.load_with(state, true)
    }

    /// Loads a state written by [`QemuProcess::capture_to`] (RAM in the stream) into a VM
    /// started with `incoming`; the guest stays stopped.
    pub fn load_captured_from(
        &mut self,
        state: &std::fs::File,
    ) -> Result<PhaseTimings, SnapshotError> {
        self.load_with(state, false)
    }

    fn load_with(
        &mut self,
        state: &std::fs::File,
        ignore_shared: bool,
    ) -> Result<PhaseTimings, SnapshotError> {
        let mut timings = PhaseTimings::default();
        let start = std::time::Instant::now();
        // QEMU takes a descriptor from an fd set only if its access mode is the one it
        // opens with: read-only here. A fresh read-only description of the same file.
        let path = format!("/proc/self/fd/{}", state.as_raw_fd());
        let state = std::fs::File::open(&path).map_err(|source| SnapshotError::File {
            path: path.into(),
            source,
        })?;
        let qmp = self.qmp()?;
        let at = timings.record("QMP ready", start);
        let uri = hand_over_state(qmp, &state, ignore_shared)?;
        qmp.execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))?;
        let state_now = qmp.wait_incoming(Duration::from_secs(60));
        release_state(qmp);
        let state_now = state_now?;
        if state_now != "paused" && state_now != "postmigrate" && state_now != "prelaunch" {
            return Err(SnapshotError::State(state_now));
        }
        timings.record("load device state", at);
        Ok(timings)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &BootConfig {
        &self.config
    }

    /// Whether QEMU has exited, and how (`Some(None)`: exited, status unknown because the
    /// process was adopted rather than started here).
    pub fn try_wait(&mut self) -> io::Result<Option<Option<std::process::ExitStatus>>> {
        self.child.try_wait()
    }

    /// Waits (up to a second) until everything QEMU wrote before it ended is collected.
    pub fn collect_output(&mut self) {
        if let Some(output) = &mut self.output {
            output.wait_closed(Duration::from_secs(1));
        }
    }

    /// The last lines QEMU wrote to stderr (only for a process started by this daemon).
    pub fn stderr_tail(&self) -> String {
        self.output
            .as_ref()
            .map(|o| o.stderr_tail(20))
            .unwrap_or_default()
    }

    /// The last lines of the guest console.
    pub fn console_tail(&self, lines: usize) -> String {
        crate::output::console_tail(&self.config.console_log(), lines)
    }

    /// Kills QEMU and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        self.child.kill()
    }

    /// Adopts QEMU process `pid`, started by an earlier run with its sockets and logs in
    /// `run_dir`, if it still is the process that started at `start_ticks` (clock ticks since
    /// boot, as in `/proc/PID/stat`). The configuration it knows is its directory only; its
    /// console is collected again from now on.
    pub fn adopt(run_dir: &Path, pid: u32, start_ticks: u64) -> io::Result<QemuProcess> {
        let pidfd = crate::pidfd::open_if_same(pid, start_ticks)?;
        let config = BootConfig {
            accel: crate::accel::Accel::Tcg,
            tsc_khz: None,
            vcpus: 0,
            memory_mib: 0,
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            root_disk: Vec::new(),
            extra_cmdline: Vec::new(),
            run_dir: run_dir.to_owned(),
            memory: crate::driver::MemoryBacking::Anonymous,
            incoming: false,
            nic_mac: None,
            devices_state_only: false,
            run_as: None,
            seccomp: false,
        };
        let output = VmmOutput::start(&config.console_socket(), &config.console_log(), None)?;
        Ok(QemuProcess {
            child: Handle::Adopted { pid, pidfd },
            detached: false,
            config,
            qmp: None,
            output: Some(output),
        })
    }

    /// Lets QEMU run on when this handle is dropped (for a later run to adopt it).
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(e) = self.kill() {
            tracing::warn!(pid = self.child.pid(), error = %e, "could not kill QEMU");
        }
    }
}

/// A migration bandwidth limit no local file reaches (bytes per second).
const UNTHROTTLED: u64 = 1 << 40;

/// The fd set the state file goes to QEMU in.
const STATE_FDSET: u64 = 7;

/// Common to save and load: RAM in a shared memory file stays there (`x-ignore-shared`,
/// which both sides must agree on) unless `ignore_shared` is off (then all of RAM is in the
/// file, `mapped-ram`), and the state file goes to
/// QEMU as a descriptor in an fd set (`-sandbox spawn=deny` forbids `exec:` URIs, and QEMU
/// opens no path of its own choosing). Returns the migration URI.
fn hand_over_state(
    qmp: &mut Qmp,
    file: &std::fs::File,
    ignore_shared: bool,
) -> Result<String, QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({
            "capabilities": [
                { "capability": "x-ignore-shared", "state": ignore_shared },
                // Without x-ignore-shared, RAM goes in the file at fixed offsets, zero pages
                // as holes: loading then reads only the pages that hold something (a stream
                // would make the loading side touch every zero page of its RAM).
                { "capability": "mapped-ram", "state": !ignore_shared }
            ]
        })),
    )?;
    qmp.execute_with_fd(
        "add-fd",
        Some(serde_json::json!({ "fdset-id": STATE_FDSET })),
        file.as_fd(),
    )?;
    Ok(format!("file:/dev/fdset/{STATE_FDSET}"))
}

/// Drops QEMU's copy of the state file's descriptor.
fn release_state(qmp: &mut Qmp) {
    if let Err(e) = qmp.execute(
        "remove-fd",
        Some(serde_json::json!({ "fdset-id": STATE_FDSET })),
    ) {
        tracing::debug!(error = %e, "releasing the state file's descriptor");
    }
}
