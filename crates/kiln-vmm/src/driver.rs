//! The VMM driver interface: a [`Hypervisor`] launches [`Vm`]s from an engine-neutral
//! [`VmSpec`]. QEMU implements it today ([`crate::qemu::QemuDriver`]); Firecracker will be a
//! second implementation. Abilities a driver lacks are reported in its [`Capabilities`] and
//! refused with [`DriverError::Unsupported`], never faked.

use std::fmt::Debug;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::accel::AccelDecision;
use crate::qemu::SnapshotError;

/// Format of a disk file.
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

/// One file of a root disk. A disk is a chain: the VM's own (writable) layer first, then the
/// read-only layers it reads through to. The chain is always named here, by kiln: no layer's
/// own header (a qcow2 backing-file name, which whoever wrote the file chose) is followed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskLayer {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

impl DiskLayer {
    /// A raw layer.
    pub fn raw(path: impl Into<PathBuf>) -> DiskLayer {
        DiskLayer {
            path: path.into(),
            format: DiskFormat::Raw,
        }
    }

    /// A qcow2 layer.
    pub fn qcow2(path: impl Into<PathBuf>) -> DiskLayer {
        DiskLayer {
            path: path.into(),
            format: DiskFormat::Qcow2,
        }
    }
}

/// Where guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Anonymous memory (a plain cold boot).
    Anonymous,
    /// Anonymous memory named like a memory file's (`mem`), so saved state that carries all
    /// of RAM (a paused sandbox's) loads into it.
    Private,
    /// A file: `shared` for a template being baked (RAM is written to the file), else mapped
    /// privately (copy-on-write) from a file the VMM may only read.
    File {
        /// The memory file.
        path: PathBuf,
        /// Written through (bake) rather than mapped copy-on-write (restore).
        shared: bool,
    },
}

/// How long each phase of an operation took.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PhaseTimings {
    /// Phase name and duration in milliseconds, in order.
    pub phases: Vec<(String, f64)>,
}

impl PhaseTimings {
    /// Records phase `name` as lasting from `since` until now; returns now.
    pub fn record(&mut self, name: &str, since: std::time::Instant) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.phases
            .push((name.to_owned(), (now - since).as_secs_f64() * 1000.0));
        now
    }
}

/// The machine to run, independent of the VMM that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Uncompressed ELF kernel.
    pub kernel: PathBuf,
    /// Initramfs with the agent as `/init`.
    pub initramfs: PathBuf,
    /// Extra kernel command-line words.
    pub extra_cmdline: Vec<String>,
    /// The root disk: its writable layer, then the layers it reads through to.
    pub root_disk: Vec<DiskLayer>,
    /// Where guest RAM lives.
    pub memory: MemoryBacking,
    /// Start without running the guest, waiting for saved state ([`Vm::restore`]).
    pub incoming: bool,
    /// MAC address of the guest NIC; the tap comes with the [`Confinement`].
    pub nic_mac: Option<String>,
    /// Saved states it loads and writes carry no configuration section, as device state
    /// saved alone ([`Vm::save_devices`]) has none: every VMM of a fork's capture, so that
    /// what one saves the next loads.
    pub devices_state_only: bool,
    /// Directory for the VM's sockets and logs: the daemon's own (no VMM can write it);
    /// the VMM gets descriptors, never this path.
    pub run_dir: PathBuf,
}

/// What isolates a VM process from the host, handed over as descriptors the caller opened
/// with its own privileges.
#[derive(Debug, Default)]
pub struct Confinement {
    /// Network namespace the VMM runs in.
    pub netns: Option<OwnedFd>,
    /// The guest's tap (opened in that namespace).
    pub tap: Option<OwnedFd>,
    /// `cgroup.procs` files of the cgroups the VMM joins before it runs any code.
    pub cgroups: Vec<OwnedFd>,
    /// Unprivileged user and group the VMM runs guest code as.
    pub run_as: Option<(u32, u32)>,
    /// Confine the VMM's system calls (QEMU: `-sandbox on` with the deny options).
    pub seccomp: bool,
}

/// How the host reaches the guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentTransport {
    /// A virtio-serial port on a unix-socket chardev (QEMU).
    VirtioSerial,
    /// A vsock port behind a unix socket (Firecracker).
    Vsock,
}

/// What a driver can do on this host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// Save a paused VM's device state and restore it in a new process.
    pub snapshot: bool,
    /// Restore guest RAM copy-on-write (MAP_PRIVATE) from a template's memory file.
    pub private_memory_restore: bool,
    /// Pause and resume a running VM.
    pub pause: bool,
    /// Take the guest's tap as an open descriptor (otherwise the driver opens it by name).
    pub tap_descriptor: bool,
    /// System-call filtering of the VMM process.
    pub seccomp: bool,
    /// Run the VMM process as an unprivileged user.
    pub run_as: bool,
    /// Agent transport.
    pub agent_transport: AgentTransport,
}

/// How a VM process ended.
#[derive(Debug, Clone)]
pub struct ExitReport {
    /// Its exit status (unknown for an adopted process, which is not a child).
    pub status: Option<ExitStatus>,
    /// What it said about it: the VMM's last error lines, else the guest console's last lines.
    pub reason: String,
}

/// Errors of a driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The VMM process could not be started.
    #[error("starting {driver}")]
    Launch {
        /// The driver.
        driver: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM process failed an operation.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Snapshot or restore failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A control command (pause, resume) failed.
    #[error(transparent)]
    Control(#[from] crate::qmp::QmpError),
    /// The driver cannot do this.
    #[error("{driver} does not support {what}")]
    Unsupported {
        /// The driver.
        driver: &'static str,
        /// The missing ability.
        what: &'static str,
    },
}

/// A VMM: launches VMs. One per engine, shared.
pub trait Hypervisor: Send + Sync + Debug {
    /// Short name (`qemu`).
    fn name(&self) -> &'static str;
    /// The VMM's version, part of every snapshot's key.
    fn version(&self) -> &str;
    /// The accelerator it uses and why.
    fn accel(&self) -> &AccelDecision;
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// The parts of `spec` (as this driver renders it) that saved device state depends on,
    /// with per-VM paths and descriptors left out: two specs with the same signature can
    /// restore each other's snapshots.
    fn restore_signature(&self, spec: &VmSpec) -> String;
    /// The agent socket and console log of VMs whose run directory is `run_dir` (the same
    /// for every VMM process of that directory: before a pause and after the resume).
    fn run_files(&self, run_dir: &Path) -> (PathBuf, PathBuf);
    /// Starts a VM process for `spec`, confined by `confinement`.
    fn launch(&self, spec: VmSpec, confinement: Confinement) -> Result<Box<dyn Vm>, DriverError>;
    /// Takes over VM process `pid` (started by an earlier run, with its sockets and logs in
    /// `run_dir`) if it still is the process that started at `start_ticks`.
    fn adopt(
        &self,
        run_dir: &Path,
        pid: u32,
        start_ticks: u64,
    ) -> Result<Box<dyn Vm>, DriverError> {
        let _ = (run_dir, pid, start_ticks);
        Err(DriverError::Unsupported {
            driver: self.name(),
            what: "adopting a running VM",
        })
    }
}

/// A running VM process, killed and reaped when dropped.
pub trait Vm: Send + Debug {
    /// The VMM process id (owned: it is not reaped before [`Vm::exited`] or [`Vm::kill`]).
    fn pid(&self) -> u32;
    /// The unix socket that leads to the guest agent.
    fn agent_socket(&self) -> PathBuf;
    /// The guest console log.
    fn console_log(&self) -> PathBuf;
    /// Waits until the VMM accepts commands and connections to the agent socket.
    fn wait_started(&mut self, timeout: std::time::Duration) -> Result<(), DriverError>;
    /// Loads saved device state (read from the file's position) into a VM launched with
    /// [`VmSpec::incoming`], and runs it.
    fn restore(&mut self, state: &std::fs::File) -> Result<PhaseTimings, DriverError>;
    /// Loads saved state like [`Vm::restore`] but leaves the guest stopped (run it with
    /// [`Vm::resume`]).
    fn load(&mut self, state: &std::fs::File) -> Result<PhaseTimings, DriverError>;
    /// Pauses the VM and saves its device state and all of its RAM (also RAM in a shared
    /// memory file) into a new file at `state`.
    fn capture(&mut self, state: &Path) -> Result<PhaseTimings, DriverError>;
    /// Loads a state written by [`Vm::capture`] into a VM launched with
    /// [`VmSpec::incoming`] (RAM goes to whatever backs it); the guest stays stopped.
    fn load_captured(&mut self, state: &std::fs::File) -> Result<PhaseTimings, DriverError>;
    /// Pauses the VM and saves its device state into a new file at `state`.
    fn snapshot(&mut self, state: &Path) -> Result<PhaseTimings, DriverError>;
    /// Pauses the VM and saves its device state alone into a new file at `state`: no RAM,
    /// whatever backs it (the caller takes what it needs of RAM itself). It loads with
    /// [`Vm::load`] into a VM whose spec has [`VmSpec::devices_state_only`].
    fn save_devices(&mut self, state: &Path) -> Result<PhaseTimings, DriverError>;
    /// Pauses the guest's CPUs.
    fn pause(&mut self) -> Result<(), DriverError>;
    /// Resumes a paused guest.
    fn resume(&mut self) -> Result<(), DriverError>;
    /// Grows the root disk to `bytes` while the guest runs (the guest is told; growing its
    /// filesystem is up to it).
    fn resize_root_disk(&mut self, bytes: u64) -> Result<(), DriverError>;
    /// How the process ended, once it has (reaps it).
    fn exited(&mut self) -> Result<Option<ExitReport>, DriverError>;
    /// Kills the process (only this one, by its own handle) and reaps it.
    fn kill(&mut self) -> Result<(), DriverError>;
    /// Lets the process run on when this handle goes (a later run adopts it).
    fn detach(self: Box<Self>);
    /// The last lines of the VMM's own error output.
    fn diagnostics(&self) -> String;
    /// The last `lines` lines of the guest console.
    fn console_tail(&self, lines: usize) -> String;
}
