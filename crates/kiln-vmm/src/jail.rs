//! The jail a VMM process runs in, and the only way kiln starts one.
//!
//! A jailed process is the first process (PID 1) of new PID, mount, IPC and UTS namespaces,
//! joins the sandbox's network namespace and cgroups, and sees a root file system that holds
//! only what it was given: the system's `/usr` (read-only), a few device nodes, private
//! `/tmp` and `/dev/shm`, its own `/proc`, and the files bound in for it (each read-only
//! unless it is the VM's own). It then drops to its own unprivileged user with no
//! capabilities and `no_new_privs`, keeps only the descriptors it was handed, and execs.
//! Nothing of the host's data directories, other VMs' files or other processes is visible
//! from inside; the descriptors it gets (listening sockets, the tap, the console) were opened
//! by the daemon, so nothing the process writes can make the daemon open another file.
//!
//! The model is Firecracker's jailer, done in-process: `clone3` with the new namespaces and
//! a pidfd, then only raw system calls on data prepared before the clone (the daemon is
//! multi-threaded and the clone bypasses libc's fork handling: the child may not allocate,
//! run a signal handler or call a libc function that takes a lock), then `execve`. Signals
//! the daemon ignores (SIGPIPE) stay ignored in the VMM, as does SIGXFSZ; a seccomp filter
//! keeps the process from changing its resource limits, which the host sets from outside.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// A file or directory of the host made visible inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path, in a directory no VMM can write (so it cannot be swapped for a link): the
    /// jailed process is started as root and resolves it before it drops privileges.
    pub source: PathBuf,
    /// Absolute path inside the jail.
    pub target: PathBuf,
    /// Whether the jailed process may write it (only a VM's own disk and memory are).
    pub writable: bool,
}

impl Bind {
    /// `source` visible read-only at `target`.
    pub fn read_only(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Bind {
        Bind {
            source: source.into(),
            target: target.into(),
            writable: false,
        }
    }

    /// `source` visible writable at `target`.
    pub fn writable(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Bind {
        Bind {
            source: source.into(),
            target: target.into(),
            writable: true,
        }
    }
}

/// A character device node made in the jail's `/dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNode {
    /// Its name under `/dev`.
    pub name: &'static str,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Only the jailed user may open it (else anyone in the jail may).
    pub private: bool,
}

/// `/dev/null`, which every jail has (standard input and output point there).
const NULL_DEVICE: DeviceNode = DeviceNode {
    name: "null",
    major: 1,
    minor: 3,
    private: false,
};

/// The devices every VMM gets besides `/dev/null`.
pub const BASIC_DEVICES: [DeviceNode; 3] = [
    DeviceNode {
        name: "zero",
        major: 1,
        minor: 5,
        private: false,
    },
    DeviceNode {
        name: "random",
        major: 1,
        minor: 8,
        private: false,
    },
    DeviceNode {
        name: "urandom",
        major: 1,
        minor: 9,
        private: false,
    },
];

/// KVM's device, for VMMs that use it.
pub const KVM_DEVICE: DeviceNode = DeviceNode {
    name: "kvm",
    major: 10,
    minor: 232,
    private: true,
};

/// What a jail holds and whom it runs as.
#[derive(Debug, Clone, Default)]
pub struct Jail {
    /// An empty host directory the jail's root is mounted on (in the jail's own mount
    /// namespace only: the host sees it empty).
    pub root: PathBuf,
    /// Files and directories bound in.
    pub binds: Vec<Bind>,
    /// Device nodes in `/dev` besides `/dev/null` (e.g. [`BASIC_DEVICES`]).
    pub devices: Vec<DeviceNode>,
    /// The user and group the process runs as; `None` keeps the caller's (tests only).
    pub run_as: Option<(u32, u32)>,
}

/// The process to run in a jail and the descriptors it takes along.
#[derive(Debug)]
pub struct Launch {
    /// Program, as a path inside the jail.
    pub program: PathBuf,
    /// Its arguments (without the program name).
    pub args: Vec<String>,
    /// Its whole environment.
    pub env: Vec<(String, String)>,
    /// Network namespace to join (else it gets a new, empty one).
    pub netns: Option<OwnedFd>,
    /// `cgroup.procs` files to write the process into before anything else.
    pub cgroups: Vec<OwnedFd>,
    /// Descriptors it keeps, each under the number given (3 and up).
    pub fds: Vec<(OwnedFd, RawFd)>,
    /// Its standard error (else `/dev/null`).
    pub stderr: Option<OwnedFd>,
}

/// A jailed process this process started: its child, reaped by [`Jailed::try_wait`] or
/// [`Jailed::kill`].
#[derive(Debug)]
pub struct Jailed {
    pid: u32,
    pidfd: OwnedFd,
    status: Option<std::process::ExitStatus>,
}

impl Jailed {
    /// Its pid (in the daemon's PID namespace).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its pidfd.
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Its exit status once it has ended (reaps it).
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        let mut status = 0;
        // SAFETY: waitpid on our own unreaped child with a valid status pointer.
        let rc = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc == 0 {
            return Ok(None);
        }
        use std::os::unix::process::ExitStatusExt;
        self.status = Some(std::process::ExitStatus::from_raw(status));
        Ok(self.status)
    }

    /// Kills it (through its pidfd, so never another process) and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        crate::pidfd::kill(&self.pidfd)?;
        let mut status = 0;
        // SAFETY: blocking waitpid on our own child, which was just sent SIGKILL.
        let rc = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        use std::os::unix::process::ExitStatusExt;
        self.status = Some(std::process::ExitStatus::from_raw(status));
        Ok(())
    }
}

/// One step of the child's set-up, run in order; a failure names the step.
#[derive(Debug)]
enum Step {
    /// `mkdir(path, mode)`.
    Mkdir(CString, libc::mode_t),
    /// Creates an empty file to bind a file onto.
    Touch(CString),
    /// `symlink(target, path)`.
    Symlink(CString, CString),
    /// Bind-mounts `source` on `target`, then remounts it with `flags` (read-only, nosuid,
    /// nodev).
    Bind {
        source: CString,
        target: CString,
        flags: libc::c_ulong,
    },
    /// A device node.
    Mknod {
        path: CString,
        dev: libc::dev_t,
        mode: libc::mode_t,
        owner: Option<(u32, u32)>,
    },
    /// A tmpfs.
    Tmpfs {
        target: CString,
        flags: libc::c_ulong,
        options: CString,
    },
}

/// Everything the child does, prepared before the clone.
#[derive(Debug)]
struct Plan {
    root: CString,
    steps: Vec<Step>,
    /// What each step does, for errors (same order as `steps`).
    descriptions: Vec<String>,
    proc_dir: CString,
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    run_as: Option<(u32, u32)>,
    hostname: CString,
}

// Fixed steps after the prepared ones, numbered after them in errors.
const FIXED_STEPS: [&str; 13] = [
    "joining the cgroup",
    "joining the network namespace",
    "making mounts private",
    "mounting the jail's root",
    "entering the jail (pivot_root)",
    "mounting /proc",
    "making the jail's root read-only",
    "setting the hostname",
    "limiting core dumps, ignoring SIGXFSZ",
    "handing over descriptors",
    "dropping privileges",
    "locking resource limits (seccomp)",
    "executing the program",
];

/// A seccomp filter that refuses (EPERM) every change of a resource limit: the host sets
/// the jailed process's limits (its file-size share of the disk, see kiln-engine's `space`),
/// and the process, however compromised, cannot lift them. Reading limits stays allowed
/// (`prlimit64` with no new value). x86-64 system call numbers; other architectures and the
/// x32 ABI are refused outright.
#[cfg(target_arch = "x86_64")]
const RLIMIT_FILTER: [libc::sock_filter; 14] = {
    const fn op(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }
    const LOAD: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    const JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    const JGE: u32 = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
    const RET: u32 = libc::BPF_RET | libc::BPF_K;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const DENY: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    // Offsets in struct seccomp_data: nr, arch, then args[] from 16, 8 bytes each
    // (little-endian: low half first). prlimit64's new limit is args[2].
    const NEW_LOW: u32 = 16 + 2 * 8;
    // EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE (linux/audit.h).
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const NEW_HIGH: u32 = NEW_LOW + 4;
    // Jumps count instructions after the next one: 12 is DENY, 13 ALLOW.
    [
        /* 0 */ op(LOAD, 4, 0, 0),
        /* 1 */ op(JEQ, AUDIT_ARCH_X86_64, 1, 0),
        /* 2 */ op(RET, DENY, 0, 0),
        /* 3 */ op(LOAD, 0, 0, 0),
        /* 4 */ op(JGE, 0x4000_0000, 7, 0),
        /* 5 */ op(JEQ, libc::SYS_setrlimit as u32, 6, 0),
        /* 6 */ op(JEQ, libc::SYS_prlimit64 as u32, 1, 0),
        /* 7 */ op(RET, ALLOW, 0, 0),
        /* 8 */ op(LOAD, NEW_LOW, 0, 0),
        /* 9 */ op(JEQ, 0, 0, 2),
        /* 10 */ op(LOAD, NEW_HIGH, 0, 0),
        /* 11 */ op(JEQ, 0, 1, 0),
        /* 12 */ op(RET, DENY, 0, 0),
        /* 13 */ op(RET, ALLOW, 0, 0),
    ]
};

/// Joins `base` and `inner` (absolute, inside the jail); refuses `..` and relative paths.
fn inside(base: &Path, inner: &Path) -> io::Result<PathBuf> {
    if !inner.is_absolute() {
        return Err(invalid(format!("{} is not absolute", inner.display())));
    }
    let mut path = base.to_owned();
    for component in inner.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(part) => path.push(part),
            _ => return Err(invalid(format!("{} is not a plain path", inner.display()))),
        }
    }
    Ok(path)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| invalid("a NUL byte in a path or argument".into()))
}

fn cpath(path: &Path) -> io::Result<CString> {
    cstring(path.as_os_str().as_bytes())
}

/// The directories of `path` below the jail's root, outermost first.
fn parents_within(root: &Path, path: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = path
        .ancestors()
        .skip(1)
        .take_while(|p| p.starts_with(root) && *p != root)
        .map(Path::to_owned)
        .collect();
    dirs.reverse();
    dirs
}

impl Plan {
    fn new(jail: &Jail, launch: &Launch) -> io::Result<Plan> {
        let root = &jail.root;
        let mut plan = Plan {
            root: cpath(root)?,
            steps: Vec::new(),
            descriptions: Vec::new(),
            proc_dir: cpath(Path::new("/proc"))?,
            program: cpath(&launch.program)?,
            argv: Vec::new(),
            envp: Vec::new(),
            run_as: jail.run_as,
            hostname: cstring(b"kiln-vmm")?,
        };
        let mut made = std::collections::BTreeSet::new();
        let mut mkdir = |plan: &mut Plan, dir: &Path, mode: libc::mode_t| -> io::Result<()> {
            if made.insert(dir.to_owned()) {
                plan.push(
                    Step::Mkdir(cpath(dir)?, mode),
                    format!("making {}", dir.display()),
                );
            }
            Ok(())
        };
        // The system: /usr read-only, the top-level links of a merged-/usr system (or
        // binds where /lib etc. are real directories), the loader's cache.
        for top in ["usr", "lib", "lib64", "lib32", "libx32", "bin", "sbin"] {
            let host = Path::new("/").join(top);
            let target = root.join(top);
            match std::fs::symlink_metadata(&host) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let link = std::fs::read_link(&host)?;
                    plan.push(
                        Step::Symlink(cpath(&link)?, cpath(&target)?),
                        format!("linking /{top}"),
                    );
                }
                Ok(meta) if meta.is_dir() => {
                    mkdir(&mut plan, &target, 0o755)?;
                    plan.bind(&host, &target, false)?;
                }
                _ => {}
            }
        }
        let ld_cache = Path::new("/etc/ld.so.cache");
        if ld_cache.is_file() {
            mkdir(&mut plan, &root.join("etc"), 0o755)?;
            let target = root.join("etc/ld.so.cache");
            plan.push(
                Step::Touch(cpath(&target)?),
                "creating /etc/ld.so.cache".into(),
            );
            plan.bind(ld_cache, &target, false)?;
        }
        for dir in ["dev", "proc", "tmp"] {
            mkdir(&mut plan, &root.join(dir), 0o755)?;
        }
        mkdir(&mut plan, &root.join("dev/shm"), 0o755)?;
        for dir in ["tmp", "dev/shm"] {
            plan.push(
                Step::Tmpfs {
                    target: cpath(&root.join(dir))?,
                    flags: libc::MS_NOSUID | libc::MS_NODEV,
                    options: cstring(b"mode=1777,size=16m")?,
                },
                format!("mounting /{dir}"),
            );
        }
        for device in std::iter::once(&NULL_DEVICE).chain(&jail.devices) {
            let path = root.join("dev").join(device.name);
            let (mode, owner) = if device.private {
                (libc::S_IFCHR | 0o600, jail.run_as)
            } else {
                (libc::S_IFCHR | 0o666, None)
            };
            plan.push(
                Step::Mknod {
                    path: cpath(&path)?,
                    dev: libc::makedev(device.major, device.minor),
                    mode,
                    owner,
                },
                format!("making /dev/{}", device.name),
            );
        }
        for bind in &jail.binds {
            let target = inside(root, &bind.target)?;
            for dir in parents_within(root, &target) {
                mkdir(&mut plan, &dir, 0o755)?;
            }
            let meta = std::fs::metadata(&bind.source).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{} (to bind into a jail): {e}", bind.source.display()),
                )
            })?;
            if meta.is_dir() {
                mkdir(&mut plan, &target, 0o755)?;
            } else {
                plan.push(
                    Step::Touch(cpath(&target)?),
                    format!("creating {}", bind.target.display()),
                );
            }
            plan.bind(&bind.source, &target, bind.writable)?;
        }
        plan.argv.push(cstring(
            launch
                .program
                .file_name()
                .map_or(b"vmm".as_slice(), OsStr::as_bytes),
        )?);
        for arg in &launch.args {
            plan.argv.push(cstring(arg.as_bytes())?);
        }
        for (key, value) in &launch.env {
            plan.envp
                .push(cstring(format!("{key}={value}").as_bytes())?);
        }
        Ok(plan)
    }

    fn push(&mut self, step: Step, description: String) {
        self.steps.push(step);
        self.descriptions.push(description);
    }

    /// Binds `source` (a path the child resolves in its own copy of the host's mounts: a
    /// descriptor opened here would belong to the host's mount namespace, which a bind
    /// mount refuses) on `target`.
    fn bind(&mut self, source: &Path, target: &Path, writable: bool) -> io::Result<()> {
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
        if !writable {
            flags |= libc::MS_RDONLY;
        }
        let shown = target.strip_prefix(self.root_path()).map_or_else(
            |_| target.display().to_string(),
            |p| format!("/{}", p.display()),
        );
        self.push(
            Step::Bind {
                source: cpath(source)?,
                target: cpath(target)?,
                flags,
            },
            format!("binding {} at {shown}", source.display()),
        );
        Ok(())
    }

    fn root_path(&self) -> PathBuf {
        PathBuf::from(std::ffi::OsStr::from_bytes(self.root.as_bytes()))
    }
}

/// Starts `launch` in `jail`. Returns once the program has been executed (a failure of any
/// set-up step is returned with the step's name).
pub fn spawn(jail: &Jail, launch: Launch) -> io::Result<Jailed> {
    let plan = Plan::new(jail, &launch)?;
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan.envp.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let cgroups: Vec<RawFd> = launch.cgroups.iter().map(AsRawFd::as_raw_fd).collect();
    let netns = launch.netns.as_ref().map(AsRawFd::as_raw_fd);
    let stderr = launch.stderr.as_ref().map(AsRawFd::as_raw_fd);
    let passed: Vec<(RawFd, RawFd)> = launch
        .fds
        .iter()
        .map(|(fd, number)| (fd.as_raw_fd(), *number))
        .collect();
    if let Some(bad) = passed.iter().find(|(_, number)| *number < 3) {
        return Err(invalid(format!("descriptor number {} is below 3", bad.1)));
    }
    let highest = passed.iter().map(|(_, n)| *n).max().unwrap_or(2);
    let (report_read, report_write) = pipe(false)?;

    let mut pidfd: RawFd = -1;
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_PIDFD;
    if netns.is_none() {
        // No namespace given: an empty one of its own (only a down loopback).
        flags |= libc::CLONE_NEWNET;
    }
    let mut args: CloneArgs = CloneArgs {
        flags: flags as u64,
        pidfd: (&raw mut pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM and without a stack behaves like fork: the child gets
    // a copy of this process with one thread. It runs only `child`, which makes raw system
    // calls on the data prepared above (no allocation, no locks) and ends in execve or _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw mut args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let context = ChildContext {
            plan: &plan,
            argv: &argv,
            envp: &envp,
            cgroups: &cgroups,
            netns,
            stderr,
            passed: &passed,
            highest,
            report: report_write.as_raw_fd(),
        };
        // SAFETY: we are the freshly cloned child; see `child`.
        unsafe { child(&context) }
    }
    drop(report_write);
    // SAFETY: clone3 stored a new pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut jailed = Jailed {
        pid: pid as u32,
        pidfd,
        status: None,
    };
    // The child reports (step, errno) and exits, or its exec closes the pipe; a child that
    // does neither in time is killed rather than left to hang its caller.
    let mut poll = libc::pollfd {
        fd: report_read.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + SETUP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // SAFETY: one valid pollfd for the call.
        let n = unsafe { libc::poll(&mut poll, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 {
            break;
        }
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        let _ = jailed.kill();
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "jailing {}: its set-up did not finish within {} s",
                launch.program.display(),
                SETUP_TIMEOUT.as_secs()
            ),
        ));
    }
    let mut report = [0u8; 8];
    let n = read_full(&report_read, &mut report)?;
    if n == 0 {
        return Ok(jailed);
    }
    let _ = jailed.kill();
    if n != report.len() {
        return Err(io::Error::other(
            "the jailed process failed before reporting why",
        ));
    }
    let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]) as usize;
    let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    let what = plan
        .descriptions
        .get(step)
        .cloned()
        .or_else(|| {
            FIXED_STEPS
                .get(step.wrapping_sub(plan.steps.len()))
                .map(|s| (*s).to_owned())
        })
        .unwrap_or_else(|| format!("step {step}"));
    let source = io::Error::from_raw_os_error(errno);
    Err(io::Error::new(
        source.kind(),
        format!("jailing {}: {what}: {source}", launch.program.display()),
    ))
}

/// Longest a jailed process may take from the clone to its exec.
const SETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `struct clone_args` of clone3(2).
#[repr(C)]
#[derive(Debug, Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

struct ChildContext<'a> {
    plan: &'a Plan,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    cgroups: &'a [RawFd],
    netns: Option<RawFd>,
    stderr: Option<RawFd>,
    passed: &'a [(RawFd, RawFd)],
    highest: RawFd,
    report: RawFd,
}

/// A pipe (read end, write end), close-on-exec; both ends non-blocking if asked (a writer
/// that must never stall on a full pipe, e.g. a VMM's standard error, loses data instead).
pub fn pipe(nonblocking: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let mut flags = libc::O_CLOEXEC;
    if nonblocking {
        flags |= libc::O_NONBLOCK;
    }
    // SAFETY: pipe2 fills two descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `program` as an absolute path: as given if it has a directory, else found on `PATH`.
pub fn find_program(program: &Path) -> io::Result<PathBuf> {
    if program.components().count() > 1 {
        return std::fs::canonicalize(program);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .map(std::fs::canonicalize)
        .unwrap_or_else(|| {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} not found on PATH: bash scripts/up.sh installs it",
                    program.display()
                ),
            ))
        })
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: reading into the unfilled rest of `buf`.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// The child: runs every step, then execs. Never returns.
///
/// # Safety
/// Must run only in the child of `clone3` made by [`spawn`]: it uses raw system calls only,
/// on memory that was prepared before the clone.
unsafe fn child(context: &ChildContext<'_>) -> ! {
    // SAFETY: every call below is a raw system call on valid NUL-terminated strings and
    // arrays from `context`, which outlive this function; nothing allocates.
    unsafe {
        let plan = context.plan;
        let fail = |step: usize| -> ! {
            let errno = *libc::__errno_location();
            let mut report = [0u8; 8];
            report[..4].copy_from_slice(&(step as u32).to_ne_bytes());
            report[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(context.report, report.as_ptr().cast(), report.len());
            libc::_exit(127);
        };
        let fixed = plan.steps.len();
        // No signal handler of the daemon's may run here (it could take a lock): block all
        // until just before exec, which then starts with none blocked.
        let all: u64 = !0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const all,
            std::ptr::null_mut::<u64>(),
            8,
        );
        // The jail's modes are the ones asked for, whatever the daemon's umask.
        libc::umask(0);
        for &procs in context.cgroups {
            if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                fail(fixed);
            }
        }
        if let Some(ns) = context.netns {
            if libc::setns(ns, libc::CLONE_NEWNET) < 0 {
                fail(fixed + 1);
            }
        }
        let null = std::ptr::null::<libc::c_char>();
        if libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) < 0
        {
            fail(fixed + 2);
        }
        if libc::mount(
            c"tmpfs".as_ptr(),
            plan.root.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID,
            c"mode=0755,size=1m".as_ptr().cast(),
        ) < 0
        {
            fail(fixed + 3);
        }
        for (index, step) in plan.steps.iter().enumerate() {
            let ok = match step {
                Step::Mkdir(path, mode) => libc::mkdir(path.as_ptr(), *mode) == 0,
                Step::Touch(path) => {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    );
                    fd >= 0 && libc::close(fd) == 0
                }
                Step::Symlink(target, path) => libc::symlink(target.as_ptr(), path.as_ptr()) == 0,
                Step::Bind {
                    source,
                    target,
                    flags,
                } => {
                    libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ) == 0
                        && libc::mount(
                            null,
                            target.as_ptr(),
                            null,
                            libc::MS_REMOUNT | libc::MS_BIND | flags,
                            std::ptr::null(),
                        ) == 0
                }
                Step::Mknod {
                    path,
                    dev,
                    mode,
                    owner,
                } => {
                    libc::mknod(path.as_ptr(), *mode, *dev) == 0
                        && libc::chmod(path.as_ptr(), *mode & 0o777) == 0
                        && owner.is_none_or(|(uid, gid)| libc::chown(path.as_ptr(), uid, gid) == 0)
                }
                Step::Tmpfs {
                    target,
                    flags,
                    options,
                } => {
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        target.as_ptr(),
                        c"tmpfs".as_ptr(),
                        *flags,
                        options.as_ptr().cast(),
                    ) == 0
                }
            };
            if !ok {
                fail(index);
            }
        }
        // pivot_root(".", "."): the old root ends up stacked under the new one and is
        // detached at once, so nothing of the host stays reachable.
        if libc::chdir(plan.root.as_ptr()) < 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) < 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) < 0
            || libc::chdir(c"/".as_ptr()) < 0
        {
            fail(fixed + 4);
        }
        if libc::mount(
            c"proc".as_ptr(),
            plan.proc_dir.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) < 0
        {
            fail(fixed + 5);
        }
        if libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
            std::ptr::null(),
        ) < 0
        {
            fail(fixed + 6);
        }
        if libc::sethostname(plan.hostname.as_ptr(), plan.hostname.as_bytes().len()) < 0 {
            fail(fixed + 7);
        }
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &no_core) < 0 {
            fail(fixed + 8);
        }
        // The host limits how far the VMM's files may grow (kiln-engine's disk space
        // shares): a write past it fails with EFBIG, which the VMM reports to its guest,
        // rather than ending the process.
        if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
            fail(fixed + 8);
        }
        // Descriptors: move every passed one above all target numbers first (so no dup2
        // overwrites a source still needed), then onto its number; stdin and stdout are
        // /dev/null, stderr the given one.
        let base = context.highest.max(context.report).max(64) + 1;
        let mut moved = [0 as RawFd; 32];
        if context.passed.len() > moved.len() {
            *libc::__errno_location() = libc::E2BIG;
            fail(fixed + 9);
        }
        for (i, &(fd, _)) in context.passed.iter().enumerate() {
            let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base);
            if high < 0 {
                fail(fixed + 9);
            }
            moved[i] = high;
        }
        let report_high = libc::fcntl(context.report, libc::F_DUPFD_CLOEXEC, base);
        if report_high < 0 {
            fail(fixed + 9);
        }
        let fail = |step: usize| -> ! {
            let errno = *libc::__errno_location();
            let mut report = [0u8; 8];
            report[..4].copy_from_slice(&(step as u32).to_ne_bytes());
            report[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(report_high, report.as_ptr().cast(), report.len());
            libc::_exit(127);
        };
        let stderr_high = match context.stderr {
            Some(fd) => libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base),
            None => libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC),
        };
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if stderr_high < 0 || devnull < 0 {
            fail(fixed + 9);
        }
        if libc::dup2(devnull, 0) < 0
            || libc::dup2(devnull, 1) < 0
            || libc::dup2(stderr_high, 2) < 0
        {
            fail(fixed + 9);
        }
        for (i, &(_, number)) in context.passed.iter().enumerate() {
            // dup2 clears close-on-exec on the new number.
            if libc::dup2(moved[i], number) < 0 {
                fail(fixed + 9);
            }
        }
        // Everything else goes: close-on-exec on all but 0..=2 and the passed numbers (the
        // report pipe must stay open until exec succeeds).
        let mut next = 3;
        let mut numbers = [0 as RawFd; 32];
        for (i, &(_, number)) in context.passed.iter().enumerate() {
            numbers[i] = number;
        }
        let numbers = &mut numbers[..context.passed.len()];
        numbers.sort_unstable();
        for &number in numbers.iter() {
            if number > next
                && libc::syscall(
                    libc::SYS_close_range,
                    next as libc::c_uint,
                    (number - 1) as libc::c_uint,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) < 0
            {
                fail(fixed + 9);
            }
            next = number + 1;
        }
        if libc::syscall(
            libc::SYS_close_range,
            next as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            fail(fixed + 9);
        }
        if let Some((uid, gid)) = plan.run_as {
            // Raw system calls: glibc's wrappers would make every thread of the process
            // change credentials, taking locks that another thread of the daemon may have
            // held at the clone (this child has one thread, the locks' holders are gone).
            if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) < 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) < 0
            {
                fail(fixed + 10);
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            fail(fixed + 10);
        }
        #[cfg(target_arch = "x86_64")]
        {
            let program = libc::sock_fprog {
                len: RLIMIT_FILTER.len() as u16,
                filter: RLIMIT_FILTER.as_ptr().cast_mut(),
            };
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const program,
            ) < 0
            {
                fail(fixed + 11);
            }
        }
        let none: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const none,
            std::ptr::null_mut::<u64>(),
            8,
        );
        libc::execve(
            plan.program.as_ptr(),
            context.argv.as_ptr(),
            context.envp.as_ptr(),
        );
        fail(fixed + 12);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_the_jail_stay_inside() {
        let root = Path::new("/j");
        assert_eq!(
            inside(root, Path::new("/vm/disk")).expect("plain"),
            Path::new("/j/vm/disk")
        );
        assert!(inside(root, Path::new("vm/disk")).is_err());
        assert!(inside(root, Path::new("/vm/../../etc/shadow")).is_err());
        assert_eq!(
            parents_within(root, Path::new("/j/a/b/c")),
            vec![PathBuf::from("/j/a"), PathBuf::from("/j/a/b")]
        );
    }
}
