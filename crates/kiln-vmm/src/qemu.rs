//! QEMU's `microvm` machine: command line and process handling for a cold boot.
//!
//! Devices are virtio-mmio only: a block device for the root disk, a serial port named
//! `kiln.agent` for the agent (a unix-socket chardev on the host), and the 8250 UART as the
//! console, written to a log file (the Debian kernel's virtio console is a module, so it does
//! not exist yet when the kernel opens `/dev/console`).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::os::fd::AsFd;

use crate::accel::{Accel, AccelChoice, AccelDecision};
use crate::driver::{
    AgentTransport, Capabilities, Confinement, DriverError, ExitReport, Hypervisor, Vm, VmSpec,
};
use crate::qmp::{Qmp, QmpError};

/// Name of the virtio-serial port the agent serves on.
pub const AGENT_PORT_NAME: &str = "kiln.agent";

/// Where guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Anonymous memory (a plain cold boot).
    Anonymous,
    /// A file: `shared` for a template being baked (RAM is written to the file), private
    /// (MAP_PRIVATE, copy-on-write) for VMs restored from it.
    File {
        /// The memory file.
        path: PathBuf,
        /// `share=on` (bake) or `share=off` (restore).
        shared: bool,
    },
}

/// Format of the root disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw image (the built rootfs, or a reflinked copy).
    Raw,
    /// qcow2 overlay on a read-only base.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for it.
    pub fn qemu_name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Everything a VM needs.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// Accelerator.
    pub accel: Accel,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Uncompressed ELF kernel (booted through PVH).
    pub kernel: PathBuf,
    /// Initramfs with the agent as `/init`.
    pub initramfs: PathBuf,
    /// Root disk image.
    pub root_disk: PathBuf,
    /// Its format.
    pub root_disk_format: DiskFormat,
    /// Discard writes to the root disk (QEMU keeps them in a temporary overlay).
    pub root_disk_snapshot: bool,
    /// Extra kernel command-line words.
    pub extra_cmdline: Vec<String>,
    /// Directory for the VM's sockets and logs.
    pub run_dir: PathBuf,
    /// Where guest RAM lives.
    pub memory: MemoryBacking,
    /// Start paused, waiting for device state (`-incoming defer`).
    pub incoming: bool,
    /// The guest NIC (virtio-net on a tap handed over as a descriptor), if any.
    pub nic: Option<GuestNic>,
    /// Drop to this user and group once initialised (`-run-with user=`), before any guest code runs.
    pub run_as: Option<(u32, u32)>,
    /// Filter QEMU's system calls (`-sandbox on` with the deny options).
    pub seccomp: bool,
}

/// The guest's network card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNic {
    /// MAC address.
    pub mac: String,
    /// Descriptor number of the tap in QEMU (see [`Attachments`]).
    pub tap_fd: i32,
}

/// Descriptors a QEMU process is started with.
#[derive(Debug, Default)]
pub struct Attachments {
    /// Network namespace QEMU runs in.
    pub netns: Option<std::os::fd::OwnedFd>,
    /// The guest's tap; its number goes into [`GuestNic::tap_fd`].
    pub tap: Option<std::os::fd::OwnedFd>,
    /// `cgroup.procs` files QEMU joins before it execs.
    pub cgroups: Vec<std::os::fd::OwnedFd>,
}

impl BootConfig {
    /// The QEMU rendering of `spec`, with the confinement options that go on the command line
    /// and the tap's descriptor number.
    pub fn from_spec(accel: Accel, spec: VmSpec, confinement: &Confinement) -> BootConfig {
        use std::os::fd::AsRawFd;
        let tap_fd = confinement.tap.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        BootConfig {
            accel,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel,
            initramfs: spec.initramfs,
            root_disk: spec.root_disk,
            root_disk_format: spec.root_disk_format,
            root_disk_snapshot: false,
            extra_cmdline: spec.extra_cmdline,
            run_dir: spec.run_dir,
            memory: spec.memory,
            incoming: spec.incoming,
            nic: spec.nic_mac.map(|mac| GuestNic { mac, tap_fd }),
            run_as: confinement.run_as,
            seccomp: confinement.seccomp,
            // QEMU starts vCPUs before `-run-with user=` drops privileges: with a privilege drop a cold
            // boot starts paused and the guest runs only once QMP answers (see `wait_started`).
        }
    }

    /// The agent's socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    /// The console log.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_owned(),
            "reboot=t".to_owned(),
            "panic=-1".to_owned(),
            "quiet".to_owned(),
            "kiln.root=/dev/vda".to_owned(),
        ];
        if self.accel == Accel::Tcg {
            // Under TCG, TSC calibration against the emulated PIT can take very long.
            words.push("tsc_early_khz=2400000".to_owned());
        }
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// QEMU's arguments.
    pub fn args(&self) -> Vec<String> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let cpu = match self.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        };
        let mut drive = format!(
            "id=root,file={},format={},if=none,cache=unsafe,discard=unmap",
            path(&self.root_disk),
            self.root_disk_format.qemu_name()
        );
        if self.root_disk_snapshot {
            drive.push_str(",snapshot=on");
        }
        let mut machine = "microvm,pit=on,pic=on,rtc=on".to_owned();
        let mut memory = Vec::new();
        if let MemoryBacking::File { path: file, shared } = &self.memory {
            machine.push_str(",memory-backend=mem");
            memory.push("-object".to_owned());
            memory.push(format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
                self.memory_mib,
                path(file),
                if *shared { "on" } else { "off" }
            ));
        }
        let mut args: Vec<String> = vec![
            "-M".into(),
            machine,
            "-accel".into(),
            self.accel.qemu_name().into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            path(&self.kernel),
            "-initrd".into(),
            path(&self.initramfs),
            "-append".into(),
            self.cmdline(),
            "-serial".into(),
            format!("file:{}", path(&self.console_log())),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                path(&self.agent_socket())
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
            "-drive".into(),
            drive,
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path(&self.qmp_socket())),
        ];
        args.extend(memory);
        if let Some(nic) = &self.nic {
            args.push("-netdev".into());
            args.push(format!("tap,id=net0,fd={}", nic.tap_fd));
            args.push("-device".into());
            args.push(format!("virtio-net-device,netdev=net0,mac={}", nic.mac));
        }
        if self.incoming {
            args.push("-incoming".into());
            args.push("defer".into());
        }
        if self.start_paused() {
            args.push("-S".into());
        }
        if self.seccomp {
            // QEMU applies the filter before `-run-with user=` drops privileges, so the set*id
            // calls must stay allowed when it does; without CAP_SETUID (dropped with root)
            // and with no_new_privs (set by the filter) they cannot raise privileges.
            let elevate = if self.run_as.is_some() {
                "allow"
            } else {
                "deny"
            };
            args.push("-sandbox".into());
            args.push(format!(
                "on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"
            ));
        }
        if let Some((uid, gid)) = self.run_as {
            args.push("-run-with".into());
            args.push(format!("user={uid}:{gid}"));
        }
        args
    }

    /// Whether the guest waits to be told to run (`-S`, then QMP `cont`): a cold boot that
    /// drops privileges must not run guest code before the drop.
    pub fn start_paused(&self) -> bool {
        !self.incoming && self.run_as.is_some()
    }

    /// The parts of the command line a snapshot's device state depends on, with per-VM paths
    /// left out: two configurations with the same signature can restore each other's state.
    pub fn device_signature(&self) -> String {
        let mut normalised = self.clone();
        normalised.kernel = PathBuf::from("K");
        normalised.initramfs = PathBuf::from("I");
        normalised.root_disk = PathBuf::from("D");
        normalised.root_disk_format = DiskFormat::Raw;
        normalised.root_disk_snapshot = false;
        normalised.run_dir = PathBuf::from("R");
        normalised.incoming = false;
        normalised.run_as = None;
        normalised.seccomp = false;
        if let Some(nic) = &mut normalised.nic {
            nic.tap_fd = 0;
        }
        if let MemoryBacking::File { .. } = normalised.memory {
            normalised.memory = MemoryBacking::File {
                path: PathBuf::from("M"),
                shared: false,
            };
        }
        normalised.args().join(" ")
    }
}

/// How long each phase of a snapshot or restore took.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PhaseTimings {
    /// Phase name and duration in milliseconds, in order.
    pub phases: Vec<(String, f64)>,
}

impl PhaseTimings {
    fn record(&mut self, name: &str, since: std::time::Instant) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.phases
            .push((name.to_owned(), (now - since).as_secs_f64() * 1000.0));
        now
    }
}

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

/// How this process holds its QEMU.
#[derive(Debug)]
enum Handle {
    /// Started by this process: a child, reaped here.
    Child(Child),
    /// Started by an earlier run of the daemon and adopted: not a child (its parent died),
    /// held by a pidfd, which keeps referring to this very process.
    Adopted {
        pid: u32,
        pidfd: std::os::fd::OwnedFd,
    },
}

impl Handle {
    fn pid(&self) -> u32 {
        match self {
            Handle::Child(child) => child.id(),
            Handle::Adopted { pid, .. } => *pid,
        }
    }

    /// The exit status once the process ended (`None` inside: ended, status unknown).
    fn try_wait(&mut self) -> io::Result<Option<Option<std::process::ExitStatus>>> {
        match self {
            Handle::Child(child) => Ok(child.try_wait()?.map(Some)),
            Handle::Adopted { pidfd, .. } => Ok(crate::pidfd::exited(pidfd, 0)?.then_some(None)),
        }
    }

    fn kill(&mut self) -> io::Result<()> {
        match self {
            Handle::Child(child) => {
                if child.try_wait()?.is_none() {
                    child.kill()?;
                    child.wait()?;
                }
            }
            Handle::Adopted { pidfd, .. } => {
                // Its parent (init) reaps it; wait until it has ended.
                if !crate::pidfd::kill_and_wait(pidfd, std::time::Duration::from_secs(10))? {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "QEMU did not end after SIGKILL",
                    ));
                }
            }
        }
        Ok(())
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
}

impl QemuProcess {
    /// Starts QEMU for `config`.
    pub fn spawn(qemu: &Path, config: BootConfig) -> io::Result<QemuProcess> {
        QemuProcess::spawn_with(qemu, config, Attachments::default())
    }

    /// Starts QEMU for `config` inside `attachments.netns`, with the tap inherited.
    pub fn spawn_with(
        qemu: &Path,
        config: BootConfig,
        attachments: Attachments,
    ) -> io::Result<QemuProcess> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(&config.run_dir)?;
        let stderr = std::fs::File::create(config.run_dir.join("qemu.stderr"))?;
        if let (Some(nic), Some(tap)) = (&config.nic, &attachments.tap) {
            if nic.tap_fd != tap.as_raw_fd() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "GuestNic::tap_fd must be the tap's descriptor",
                ));
            }
        }
        let netns = attachments.netns.as_ref().map(AsRawFd::as_raw_fd);
        let tap = attachments.tap.as_ref().map(AsRawFd::as_raw_fd);
        let cgroups: Vec<i32> = attachments.cgroups.iter().map(AsRawFd::as_raw_fd).collect();
        let mut command = Command::new(qemu);
        if netns.is_some() || tap.is_some() || !cgroups.is_empty() {
            // SAFETY: runs in the child between fork and exec; write, setns and fcntl are
            // async-signal-safe, nothing is allocated, and the descriptors are open in the
            // parent until spawn returns.
            unsafe {
                command.pre_exec(move || {
                    // Join the cgroups first: everything QEMU allocates is charged to them.
                    for &procs in &cgroups {
                        // "0" moves the writing process.
                        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    if let Some(ns) = netns {
                        if libc::setns(ns, libc::CLONE_NEWNET) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    if let Some(tap) = tap {
                        // Keep the tap across exec under its own number.
                        if libc::fcntl(tap, libc::F_SETFD, 0) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .args(config.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{} not found: apt-get install qemu-system-x86",
                            qemu.display()
                        ),
                    )
                } else {
                    e
                }
            })?;
        Ok(QemuProcess {
            child: Handle::Child(child),
            detached: false,
            config,
            qmp: None,
        })
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

    /// Pauses the VM and writes its device state to `state` (RAM stays in the shared memory
    /// file: `x-ignore-shared`). The VM stays paused.
    pub fn snapshot_to(&mut self, state: &Path) -> Result<PhaseTimings, SnapshotError> {
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
        let qmp = self.qmp()?;
        qmp.execute("stop", None)?;
        let at = timings.record("stop", start);
        hand_over_state(qmp, &file)?;
        qmp.execute("migrate", Some(serde_json::json!({ "uri": STATE_URI })))?;
        qmp.wait_migration(Duration::from_secs(120))?;
        timings.record("save device state", at);
        file.sync_all().map_err(|source| SnapshotError::File {
            path: state.to_owned(),
            source,
        })?;
        Ok(timings)
    }

    /// Loads device state from `state` (read from its current position) into a VM started
    /// with `incoming`, and resumes it.
    pub fn restore_from(&mut self, state: &std::fs::File) -> Result<PhaseTimings, SnapshotError> {
        let mut timings = PhaseTimings::default();
        let start = std::time::Instant::now();
        let file = state;
        let qmp = self.qmp()?;
        let at = timings.record("QMP ready", start);
        hand_over_state(qmp, file)?;
        qmp.execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": STATE_URI })),
        )?;
        let state_now = qmp.wait_incoming(Duration::from_secs(60))?;
        if state_now != "paused" && state_now != "postmigrate" && state_now != "prelaunch" {
            return Err(SnapshotError::State(state_now));
        }
        let at = timings.record("load device state", at);
        qmp.execute("cont", None)?;
        timings.record("resume", at);
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

    /// Waits until the agent's socket exists (QEMU creates it early in start-up).
    pub fn wait_for_agent_socket(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let socket = self.config.agent_socket();
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let status = status.map_or_else(|| "status unknown".into(), |s| s.to_string());
                return Err(io::Error::other(format!(
                    "QEMU exited ({status}): {}",
                    self.stderr_tail()
                )));
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "QEMU did not create the agent socket",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether QEMU has exited, and how (`Some(None)`: exited, status unknown because the
    /// process was adopted rather than started here).
    pub fn try_wait(&mut self) -> io::Result<Option<Option<std::process::ExitStatus>>> {
        self.child.try_wait()
    }

    /// The last lines QEMU wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        tail_lines(&self.config.run_dir.join("qemu.stderr"), 20)
    }

    /// The last lines of the guest console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail_lines(&self.config.console_log(), lines)
    }

    /// Kills QEMU and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        self.child.kill()
    }

    /// Adopts QEMU process `pid`, started by an earlier run with its sockets and logs in
    /// `run_dir`, if it still is the process that started at `start_ticks` (clock ticks since
    /// boot, as in `/proc/PID/stat`). The configuration it knows is its directory only.
    pub fn adopt(run_dir: &Path, pid: u32, start_ticks: u64) -> io::Result<QemuProcess> {
        let pidfd = crate::pidfd::open_if_same(pid, start_ticks)?;
        let config = BootConfig {
            accel: Accel::Tcg,
            vcpus: 0,
            memory_mib: 0,
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            root_disk: PathBuf::new(),
            root_disk_format: DiskFormat::Raw,
            root_disk_snapshot: false,
            extra_cmdline: Vec::new(),
            run_dir: run_dir.to_owned(),
            memory: MemoryBacking::Anonymous,
            incoming: false,
            nic: None,
            run_as: None,
            seccomp: false,
        };
        Ok(QemuProcess {
            child: Handle::Adopted { pid, pidfd },
            detached: false,
            config,
            qmp: None,
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

/// The QEMU driver.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    binary: PathBuf,
    accel: AccelDecision,
    version: String,
}

impl QemuDriver {
    /// Resolves the accelerator and asks `binary` for its version.
    pub fn new(binary: &Path, accel: AccelChoice) -> Result<QemuDriver, DriverError> {
        let accel = crate::accel::resolve(accel);
        let output = Command::new(binary)
            .arg("--version")
            .output()
            .map_err(|e| DriverError::Launch {
                driver: "qemu",
                source: io::Error::new(
                    e.kind(),
                    format!(
                        "running {} (apt-get install qemu-system-x86)",
                        binary.display()
                    ),
                ),
            })?;
        let version = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok(QemuDriver {
            binary: binary.to_owned(),
            accel,
            version,
        })
    }
}

impl Hypervisor for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn accel(&self) -> &AccelDecision {
        &self.accel
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshot: true,
            private_memory_restore: true,
            pause: true,
            tap_descriptor: true,
            seccomp: true,
            run_as: true,
            agent_transport: AgentTransport::VirtioSerial,
        }
    }

    fn restore_signature(&self, spec: &VmSpec) -> String {
        BootConfig::from_spec(self.accel.accel, spec.clone(), &Confinement::default())
            .device_signature()
    }

    fn adopt(
        &self,
        run_dir: &Path,
        pid: u32,
        start_ticks: u64,
    ) -> Result<Box<dyn Vm>, DriverError> {
        let process = QemuProcess::adopt(run_dir, pid, start_ticks)?;
        Ok(Box::new(QemuVm { process }))
    }

    fn launch(&self, spec: VmSpec, confinement: Confinement) -> Result<Box<dyn Vm>, DriverError> {
        let config = BootConfig::from_spec(self.accel.accel, spec, &confinement);
        let attachments = Attachments {
            netns: confinement.netns,
            tap: confinement.tap,
            cgroups: confinement.cgroups,
        };
        let process =
            QemuProcess::spawn_with(&self.binary, config, attachments).map_err(|source| {
                DriverError::Launch {
                    driver: "qemu",
                    source,
                }
            })?;
        Ok(Box::new(QemuVm { process }))
    }
}

/// A VM run by [`QemuDriver`].
#[derive(Debug)]
pub struct QemuVm {
    process: QemuProcess,
}

impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn agent_socket(&self) -> PathBuf {
        self.process.config().agent_socket()
    }

    fn console_log(&self) -> PathBuf {
        self.process.config().console_log()
    }

    fn wait_started(&mut self, timeout: Duration) -> Result<(), DriverError> {
        self.process.wait_for_agent_socket(timeout)?;
        // QMP answers once QEMU's main loop runs (after `-run-with user=` dropped privileges): from
        // then on it takes commands at once.
        let paused = self.process.config().start_paused();
        let qmp = self.process.qmp()?;
        if paused {
            qmp.execute("cont", None)?;
        }
        Ok(())
    }

    fn restore(&mut self, state: &std::fs::File) -> Result<PhaseTimings, DriverError> {
        Ok(self.process.restore_from(state)?)
    }

    fn snapshot(&mut self, state: &Path) -> Result<PhaseTimings, DriverError> {
        Ok(self.process.snapshot_to(state)?)
    }

    fn pause(&mut self) -> Result<(), DriverError> {
        self.process.qmp()?.execute("stop", None)?;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DriverError> {
        self.process.qmp()?.execute("cont", None)?;
        Ok(())
    }

    fn resize_root_disk(&mut self, bytes: u64) -> Result<(), DriverError> {
        self.process.qmp()?.execute(
            "block_resize",
            Some(serde_json::json!({ "device": "root", "size": bytes })),
        )?;
        Ok(())
    }

    fn exited(&mut self) -> Result<Option<ExitReport>, DriverError> {
        let Some(status) = self.process.try_wait()? else {
            return Ok(None);
        };
        let status_text =
            status.map_or_else(|| "exit status unknown".to_owned(), |s| s.to_string());
        let stderr = self.process.stderr_tail();
        let console = self.process.console_tail(200);
        let reason = if !stderr.trim().is_empty() {
            format!("QEMU exited ({status_text}): {}", stderr.trim())
        } else if let Some(panic) = guest_crash_line(&console) {
            format!("QEMU exited ({status_text}): the guest kernel crashed: {panic}")
        } else {
            let tail: Vec<&str> = console.lines().collect();
            format!(
                "QEMU exited ({status_text}); guest console:\n{}",
                tail[tail.len().saturating_sub(10)..].join("\n")
            )
        };
        Ok(Some(ExitReport { status, reason }))
    }

    fn kill(&mut self) -> Result<(), DriverError> {
        Ok(self.process.kill()?)
    }

    fn detach(self: Box<Self>) {
        self.process.detach();
    }

    fn diagnostics(&self) -> String {
        self.process.stderr_tail()
    }

    fn console_tail(&self, lines: usize) -> String {
        self.process.console_tail(lines)
    }
}

/// The line of a guest console that says why its kernel died, without the timestamp.
fn guest_crash_line(console: &str) -> Option<&str> {
    console
        .lines()
        .rev()
        .find(|line| line.contains("Kernel panic") || line.contains("kernel BUG"))
        .map(|line| match line.find("] ") {
            Some(at) if line.starts_with('[') => &line[at + 2..],
            _ => line,
        })
}

/// Migration URI of the device-state file handed over with [`hand_over_state`].
const STATE_URI: &str = "fd:state";

/// Common to save and load: RAM stays in the shared memory file (`x-ignore-shared`), and the
/// state file goes to QEMU as a descriptor (`-sandbox spawn=deny` forbids `exec:` URIs).
fn hand_over_state(qmp: &mut Qmp, file: &std::fs::File) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": true }]
        })),
    )?;
    qmp.execute_with_fd(
        "getfd",
        Some(serde_json::json!({ "fdname": "state" })),
        file.as_fd(),
    )?;
    Ok(())
}

/// The last `lines` lines of the last 256 KiB of `path` (invalid UTF-8 replaced): bounded
/// whatever the file's size, as a guest's console log may be anything.
pub fn tail_lines(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const WINDOW: u64 = 256 << 10;
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(WINDOW)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.take(WINDOW).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_are_bounded_and_lossy() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("console.log");
        let mut text = vec![0xffu8; 1 << 20];
        text.extend_from_slice(b"\nlast line\n");
        std::fs::write(&path, &text).expect("write");
        assert_eq!(tail_lines(&path, 1), "last line");
        assert!(tail_lines(&path, 1000).len() < 1 << 20);
        assert_eq!(tail_lines(&dir.path().join("missing"), 5), "");
    }

    #[test]
    fn a_guest_kernel_panic_is_found_in_the_console() {
        let console = "[    1.0] ok\n[    3.1] Kernel panic - not syncing: sysrq triggered crash\n[    3.2] CPU: 0 PID: 1\n[    3.3] Kernel Offset: disabled\n";
        assert_eq!(
            guest_crash_line(console),
            Some("Kernel panic - not syncing: sysrq triggered crash")
        );
        assert_eq!(guest_crash_line("[ 1.0] all fine\n"), None);
    }

    #[test]
    fn confinement_goes_on_the_command_line_but_not_into_the_signature() {
        let mut confined = config(Accel::Tcg);
        confined.seccomp = true;
        confined.run_as = Some((2_000_000_007, 2_000_000_007));
        let args = confined.args().join(" ");
        assert!(args.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
        ));
        assert!(args.contains("-run-with user=2000000007:2000000007"));
        assert_eq!(
            confined.device_signature(),
            config(Accel::Tcg).device_signature()
        );
        confined.run_as = None;
        assert!(confined.args().join(" ").contains("elevateprivileges=deny"));
    }

    fn config(accel: Accel) -> BootConfig {
        BootConfig {
            accel,
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            root_disk: "/r/rootfs.ext4".into(),
            root_disk_format: DiskFormat::Raw,
            root_disk_snapshot: true,
            extra_cmdline: vec!["KILN_AGENT_LOG=debug".into()],
            run_dir: "/run/kiln/vm1".into(),
            memory: MemoryBacking::Anonymous,
            incoming: false,
            nic: None,
            run_as: None,
            seccomp: false,
        }
    }

    #[test]
    fn command_line_has_the_devices_and_the_port_name() {
        let args = config(Accel::Tcg).args().join(" ");
        for expected in [
            "-M microvm,pit=on,pic=on,rtc=on",
            "-accel tcg -cpu max -smp 2 -m 512M",
            "-nodefaults",
            "virtserialport,chardev=agent,name=kiln.agent",
            "socket,id=agent,path=/run/kiln/vm1/agent.sock,server=on,wait=off",
            "file=/r/rootfs.ext4,format=raw,if=none,cache=unsafe,discard=unmap,snapshot=on",
            "-serial file:/run/kiln/vm1/console.log",
        ] {
            assert!(args.contains(expected), "missing `{expected}` in {args}");
        }
        let cmdline = config(Accel::Tcg).cmdline();
        assert!(cmdline.contains("kiln.root=/dev/vda") && cmdline.contains("tsc_early_khz"));
        assert!(cmdline.ends_with("KILN_AGENT_LOG=debug"));
        assert!(!config(Accel::Kvm).cmdline().contains("tsc_early_khz"));
        assert!(!args.contains("-sandbox") && !args.contains("-run-with"));
        assert!(config(Accel::Kvm)
            .args()
            .join(" ")
            .contains("-accel kvm -cpu host"));
    }
}
