//! PID-1 duties: mounts, kernel modules, switching from the initramfs to the root disk,
//! hostname, network, resolver, wall clock, RNG reseed and power-off.
//!
//! Each duty can be disabled. On the host (tests, development) the agent runs with all of
//! them off, except that a test may enable `hostname` and `network` when the agent runs in its
//! own UTS and network namespaces, and `dns` when private files are bind-mounted over
//! `/etc/resolv.conf` and `/etc/hosts` in its own mount namespace, where they cannot touch
//! the machine.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use kiln_proto::messages::{AgentError, DnsConfig, ErrorKind, NetworkConfig, ShutdownAction};
use nix::mount::{mount, MsFlags};

/// One duty of the agent as init.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Duty {
    /// Mount /proc, /sys, /dev, /dev/pts, /dev/shm, /run and /tmp.
    Mounts,
    /// Load kernel modules and switch from the initramfs to the root disk.
    Modules,
    /// Set the hostname (init and post-restore calls).
    Hostname,
    /// Configure `lo` and the guest interface.
    Network,
    /// Write /etc/resolv.conf and /etc/hosts.
    Dns,
    /// Set the wall clock after a restore.
    Clock,
    /// Reseed the kernel RNG after a restore.
    Rng,
    /// Power off or reboot on request.
    Power,
    /// Run user processes in a cgroup apart from the agent's, with limits that keep the
    /// agent answering (see [`crate::cgroups`]).
    Cgroups,
}

impl Duty {
    /// Every duty.
    pub const ALL: [Duty; 9] = [
        Duty::Mounts,
        Duty::Modules,
        Duty::Hostname,
        Duty::Network,
        Duty::Dns,
        Duty::Clock,
        Duty::Rng,
        Duty::Power,
        Duty::Cgroups,
    ];

    /// Name used in responses.
    pub fn name(self) -> &'static str {
        match self {
            Duty::Mounts => "mounts",
            Duty::Modules => "modules",
            Duty::Hostname => "hostname",
            Duty::Network => "network",
            Duty::Dns => "dns",
            Duty::Clock => "clock",
            Duty::Rng => "rng",
            Duty::Power => "power",
            Duty::Cgroups => "cgroups",
        }
    }
}

/// The set of enabled duties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Duties(Vec<Duty>);

impl Duties {
    /// Every duty (the agent is the guest's init).
    pub fn all() -> Duties {
        Duties(Duty::ALL.to_vec())
    }

    /// Only `duties`.
    pub fn only(duties: &[Duty]) -> Duties {
        Duties(duties.to_vec())
    }

    /// Whether `duty` is enabled.
    pub fn has(&self, duty: Duty) -> bool {
        self.0.contains(&duty)
    }
}

fn err(kind: ErrorKind, what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::new(kind, format!("{what}: {e}"))
}

/// Kernel settings that wake an idle guest for work nobody here needs; each wake-up costs
/// the host CPU time for every idle sandbox (a great deal under TCG). Set as init, before
/// the template's snapshot.
const QUIET_IDLE: [(&str, &str); 3] = [
    // Proactive compaction: kcompactd wakes every 500 ms to check fragmentation.
    ("/proc/sys/vm/compaction_proactiveness", "0"),
    // The memory statistics' shepherd: every second by default, every 10 s here (as
    // latency-tuned hosts set it; counters are still folded when they pass a threshold).
    ("/proc/sys/vm/stat_interval", "10"),
    // The soft and hard lockup detectors' per-CPU timers (the host watches the guest).
    ("/proc/sys/kernel/watchdog", "0"),
];

/// Applies [`QUIET_IDLE`] and turns off block-layer writeback throttling (its latency
/// timer runs while the disk is idle). Kernel-wide: for the guest's init only. Failures are
/// logged: a kernel without one of these only costs CPU time.
pub fn quiet_idle() {
    let mut settings: Vec<(String, &str)> = QUIET_IDLE
        .iter()
        .map(|(path, value)| ((*path).to_owned(), *value))
        .collect();
    if let Ok(disks) = std::fs::read_dir("/sys/block") {
        for disk in disks.flatten() {
            let path = disk.path().join("queue/wbt_lat_usec");
            if path.exists() {
                settings.push((path.display().to_string(), "0"));
            }
        }
    }
    for (path, value) in settings {
        match std::fs::write(&path, value) {
            Ok(()) => {}
            // A kernel built without the feature.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!(%path, "kernel setting absent");
            }
            Err(e) => tracing::warn!(%path, error = %e, "kernel setting not applied"),
        }
    }
}

/// Mounts the pseudo filesystems every guest program expects. Already-mounted targets are
/// left alone, so this is safe to run again after switching root.
pub fn mount_pseudo_filesystems() {
    let table: [(&str, &str, &str, MsFlags, &str); 7] = [
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            "",
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            "",
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            "mode=0755",
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "mode=0620,ptmxmode=0666,gid=5",
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
        (
            "run",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmp",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (source, target, fstype, flags, data) in table {
        if is_mount_point(target) {
            continue;
        }
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(source), target, Some(fstype), flags, Some(data)) {
            tracing::warn!(target, error = %e, "mount failed");
        }
    }
    // /dev/ptmx must point at the devpts instance for PTYs to work.
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
}

fn is_mount_point(path: &str) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

/// Loads the modules listed (one path per line, in dependency order) in `list`, each with
/// the parameters the kernel command line gives it (`virtio_mmio.device=...`), as modprobe
/// would: the kernel applies command-line parameters only to built-in modules.
pub fn load_modules(list: &Path) -> io::Result<()> {
    let text = std::fs::read_to_string(list)?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let file = std::fs::File::open(line)?;
        let params = CString::new(module_params(&cmdline, &module_name(line)))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: finit_module reads a module from an open descriptor and a NUL-terminated
        // parameter string; both are valid for the duration of the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::new(e.kind(), format!("loading {line}: {e}")));
            }
        }
    }
    Ok(())
}

/// `virtio-mmio.ko.xz` -> `virtio_mmio`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The `name.param=value` words of the command line for `module`, as `param=value ...`.
fn module_params(cmdline: &str, module: &str) -> String {
    cmdline
        .split_whitespace()
        .filter_map(|word| {
            let (name, param) = word.split_once('.')?;
            (name.replace('-', "_") == module && param.contains('=')).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Root-disk settings from the kernel command line (`kiln.root=/dev/vda`,
/// `kiln.rootfstype=ext4`, `kiln.rootflags=...`, `kiln.init=/sbin/kiln-agent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    /// Block device of the root filesystem.
    pub device: String,
    /// Its filesystem type.
    pub fstype: String,
    /// Mount options.
    pub flags: String,
    /// Program to run as init on the root disk.
    pub init: String,
}

impl RootSpec {
    /// Reads the spec from a kernel command line; `None` without `kiln.root=`.
    pub fn from_cmdline(cmdline: &str) -> Option<RootSpec> {
        let get = |key: &str| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
        };
        Some(RootSpec {
            device: get("kiln.root=")?,
            fstype: get("kiln.rootfstype=").unwrap_or_else(|| "ext4".into()),
            flags: get("kiln.rootflags=").unwrap_or_default(),
            init: get("kiln.init=").unwrap_or_else(|| "/sbin/kiln-agent".into()),
        })
    }
}

/// When running from an initramfs with `kiln.root=` on the command line: loads the modules
/// the initramfs lists in `/kiln/modules.list`, mounts the root disk, moves the pseudo
/// filesystems over, switches root and executes the agent on the root disk. Returns only on
/// failure or when there is nothing to switch to.
pub fn switch_root_if_needed() -> io::Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let spec = RootSpec::from_cmdline(&cmdline);
    let fs = nix::sys::statfs::statfs("/")?;
    // RAMFS_MAGIC is not in libc; the initramfs is ramfs or tmpfs.
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let fs_type = fs.filesystem_type().0 as i64;
    let on_initramfs = fs_type == RAMFS_MAGIC || fs_type == libc::TMPFS_MAGIC;
    if !on_initramfs {
        return Ok(());
    }
    // Drivers are needed on an initramfs-only guest too (the agent's port is virtio-serial).
    let list = Path::new("/kiln/modules.list");
    if list.exists() {
        load_modules(list)?;
    }
    let Some(spec) = spec else {
        return Ok(());
    };
    // Block devices appear asynchronously once their driver has probed.
    let device = Path::new(&spec.device);
    for _ in 0..500 {
        if device.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::create_dir_all("/sysroot")?;
    let data = (!spec.flags.is_empty()).then_some(spec.flags.as_str());
    mount(
        Some(device),
        "/sysroot",
        Some(spec.fstype.as_str()),
        MsFlags::empty(),
        data,
    )?;
    for dir in ["/dev", "/proc", "/sys", "/run", "/tmp"] {
        let target = format!("/sysroot{dir}");
        let _ = std::fs::create_dir_all(&target);
        mount(
            Some(dir),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )?;
    }
    // Free the initramfs: its files live in RAM for as long as they exist, and nothing can
    // reach them once the root disk is moved over "/" (what switch_root(8) does too).
    use std::os::unix::fs::MetadataExt;
    let root_dev = std::fs::symlink_metadata("/")?.dev();
    remove_tree_on_device(Path::new("/"), root_dev);
    std::env::set_current_dir("/sysroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    std::env::set_current_dir("/")?;
    let init = CString::new(spec.init.clone()).map_err(io::Error::other)?;
    let args: Vec<CString> = std::env::args()
        .filter_map(|a| CString::new(a).ok())
        .collect();
    nix::unistd::execv(&init, &args)?;
    Ok(())
}

/// Removes everything under `dir` that is on device `dev`, without crossing into other
/// filesystems (the root disk mounted on /sysroot, moved pseudo filesystems).
fn remove_tree_on_device(dir: &Path, dev: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_tree_on_device(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Validates and sets the hostname.
pub fn set_hostname(name: &str) -> Result<(), AgentError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            format!("invalid hostname `{name}`"),
        ));
    }
    nix::unistd::sethostname(name).map_err(|e| err(ErrorKind::Io, "sethostname", e))
}

/// Writes `/etc/hostname` (as init only: on a host it is the machine's file).
pub fn write_etc_hostname(name: &str) -> Result<(), AgentError> {
    std::fs::write("/etc/hostname", format!("{name}\n"))
        .map_err(|e| err(ErrorKind::Io, "/etc/hostname", e))
}

/// Writes `/etc/resolv.conf` and a `/etc/hosts` that names the guest.
pub fn write_dns(dns: &DnsConfig, hostname: Option<&str>) -> Result<(), AgentError> {
    let mut resolv = String::new();
    for server in &dns.nameservers {
        resolv.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.search.is_empty() {
        resolv.push_str(&format!("search {}\n", dns.search.join(" ")));
    }
    std::fs::write("/etc/resolv.conf", resolv)
        .map_err(|e| err(ErrorKind::Io, "/etc/resolv.conf", e))?;
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(name) = hostname {
        hosts.push_str(&format!("127.0.1.1\t{name}\n"));
    }
    std::fs::write("/etc/hosts", hosts).map_err(|e| err(ErrorKind::Io, "/etc/hosts", e))
}

/// Brings up `lo` and configures the guest interface: address, prefix, MTU, default route.
pub fn configure_network(config: &NetworkConfig) -> Result<(), AgentError> {
    if config.prefix_len > 32 {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            "prefix_len must be at most 32",
        ));
    }
    if kiln_net::iface::ifreq(&config.interface).is_err() {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            format!("invalid interface `{}`", config.interface),
        ));
    }
    kiln_net::iface::configure(&kiln_net::iface::InterfaceConfig {
        name: config.interface.clone(),
        address: config.address,
        prefix_len: config.prefix_len,
        mtu: config.mtu,
        gateway: config.gateway,
    })
    .map_err(|e| {
        let kind = match e.raw_os_error() {
            Some(libc::ENODEV) => ErrorKind::NotFound,
            Some(libc::EPERM) => ErrorKind::PermissionDenied,
            _ => ErrorKind::Io,
        };
        err(kind, &format!("configuring {}", config.interface), e)
    })
}

/// Sets the wall clock; returns the guest clock's offset from `ns` before it was set.
pub fn set_clock(ns: u64) -> Result<i64, AgentError> {
    let before = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map_err(|e| err(ErrorKind::Io, "clock_gettime", e))?;
    let before_ns = before.tv_sec() as i128 * 1_000_000_000 + before.tv_nsec() as i128;
    let skew_ms = ((before_ns - ns as i128) / 1_000_000) as i64;
    let spec = nix::sys::time::TimeSpec::new(
        (ns / 1_000_000_000) as libc::time_t,
        (ns % 1_000_000_000) as libc::c_long,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec)
        .map_err(|e| err(ErrorKind::Io, "clock_settime", e))?;
    Ok(skew_ms)
}

/// Mixes `entropy` into the kernel RNG, credits it (RNDADDENTROPY) and reseeds the CRNG
/// from it (RNDRESEEDCRNG).
pub fn add_entropy(entropy: &[u8]) -> Result<(), AgentError> {
    #[repr(C)]
    struct RandPoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; 512],
    }
    if entropy.is_empty() || entropy.len() > 512 {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            "entropy must be 1 to 512 bytes",
        ));
    }
    let mut info = RandPoolInfo {
        entropy_count: (entropy.len() * 8) as libc::c_int,
        buf_size: entropy.len() as libc::c_int,
        buf: [0; 512],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(|e| err(ErrorKind::Io, "/dev/random", e))?;
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
    // SAFETY: the kernel reads the header and `buf_size` bytes of `buf`, all inside `info`.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &raw const info) };
    if rc < 0 {
        return Err(err(
            ErrorKind::Io,
            "RNDADDENTROPY",
            io::Error::last_os_error(),
        ));
    }
    // Crediting entropy does not rekey an initialised CRNG: without an explicit reseed,
    // every VM restored from one snapshot would keep producing the same random bytes until
    // the next scheduled reseed. RNDRESEEDCRNG = _IO('R', 0x07).
    const RNDRESEEDCRNG: libc::Ioctl = 0x5207;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc < 0 {
        return Err(err(
            ErrorKind::Io,
            "RNDRESEEDCRNG",
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Stops every process, syncs the disks and powers off or reboots. Does not return on success.
pub fn shutdown(action: ShutdownAction) -> Result<(), AgentError> {
    use nix::sys::signal::{kill, Signal};
    let everyone = nix::unistd::Pid::from_raw(-1);
    let _ = kill(everyone, Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let _ = kill(everyone, Signal::SIGKILL);
    nix::unistd::sync();
    let mode = match action {
        ShutdownAction::PowerOff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
        ShutdownAction::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
    };
    nix::sys::reboot::reboot(mode).map_err(|e| err(ErrorKind::Io, "reboot", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_parameters_come_from_the_command_line() {
        let cmdline = "console=hvc0 virtio_mmio.device=512@0xfeb00e00:12 virtio-mmio.device=512@0xfeb00c00:11 ext4.x=1 kiln.root=/dev/vda";
        assert_eq!(
            module_params(cmdline, "virtio_mmio"),
            "device=512@0xfeb00e00:12 device=512@0xfeb00c00:11"
        );
        assert_eq!(module_params(cmdline, "virtio_blk"), "");
        assert_eq!(module_name("/kiln/modules/virtio-mmio.ko"), "virtio_mmio");
    }

    #[test]
    fn root_spec_from_cmdline() {
        let spec =
            RootSpec::from_cmdline("console=ttyS0 kiln.root=/dev/vda kiln.rootflags=noatime")
                .expect("has kiln.root");
        assert_eq!(spec.device, "/dev/vda");
        assert_eq!(spec.fstype, "ext4");
        assert_eq!(spec.flags, "noatime");
        assert_eq!(spec.init, "/sbin/kiln-agent");
        assert_eq!(RootSpec::from_cmdline("console=ttyS0"), None);
    }

    #[test]
    fn rejects_bad_hostnames_and_interfaces_before_any_syscall() {
        for bad in ["", "-x", "a..b", "a b", "x/y", &"a".repeat(65)] {
            assert_eq!(
                set_hostname(bad).map_err(|e| e.kind),
                Err(ErrorKind::InvalidArgument),
                "{bad}"
            );
        }
        assert_eq!(
            add_entropy(&[]).map_err(|e| e.kind),
            Err(ErrorKind::InvalidArgument)
        );
        assert_eq!(
            add_entropy(&[0; 513]).map_err(|e| e.kind),
            Err(ErrorKind::InvalidArgument)
        );
    }
}
