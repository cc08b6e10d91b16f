//! Per-sandbox cgroups with CPU, memory and task limits, on cgroup v2 where the host has its
//! controllers there, on the v1 `cpu`, `memory` (and `pids`, where mounted) hierarchies
//! otherwise.
//!
//! Sandbox cgroups live under the engine's own cgroup (`<own>/kiln/<sandbox>`), so whatever
//! limits the host puts on the daemon also bound its sandboxes. QEMU joins its cgroup before
//! it execs (see [`SandboxCgroup::procs_files`]), so everything it allocates is charged there.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Name of the directory that holds the sandbox cgroups under the engine's cgroup.
const PARENT: &str = "kiln";

/// CFS period used for CPU quotas.
const CPU_PERIOD_US: u64 = 100_000;

/// Tasks (processes and threads) a sandbox's cgroup may hold. QEMU runs a main thread, an RCU
/// thread, one per vCPU (a template has at most 64), up to 64 block I/O workers and a few
/// more; this leaves it twice that. A VMM a guest took over may not spawn processes
/// (seccomp), but threads it may: without this limit it could take the host's whole PID
/// space (`kernel.pid_max`, 32,768 on many hosts) within its memory limit.
pub const VMM_TASKS: u64 = 256;

/// Limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgroupLimits {
    /// CPU time per wall-clock time, in cores (1.5 = one and a half CPUs).
    pub cpus: f64,
    /// Memory of the whole VMM process (guest RAM it touched plus its own), in MiB.
    pub memory_mib: u64,
}

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// Unified hierarchy with the cpu and memory controllers.
    V2 {
        /// The engine's cgroup's directory.
        own: PathBuf,
    },
    /// Separate v1 hierarchies.
    V1 {
        /// The engine's cgroup's directory in the cpu hierarchy.
        cpu: PathBuf,
        /// The engine's cgroup's directory in the memory hierarchy.
        memory: PathBuf,
        /// The engine's cgroup's directory in the pids hierarchy, where one is mounted.
        pids: Option<PathBuf>,
    },
}

/// Errors of cgroup set-up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a v2 hierarchy with cpu and memory nor v1 cpu and memory hierarchies exist.
    #[error("no usable cgroup hierarchy with the cpu and memory controllers under {0}")]
    Unavailable(PathBuf),
    /// A cgroup file could not be read or written.
    #[error("{path}")]
    File {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn file_error(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::File {
        path: path.to_owned(),
        source,
    }
}

/// Where sandbox cgroups are made.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    /// Set once the v2 parent has its controllers delegated (done on the first create).
    v2_prepared: std::sync::OnceLock<()>,
}

impl Cgroups {
    /// Finds the host's cgroup layout and this process's place in it.
    pub fn detect() -> Result<Cgroups, CgroupError> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(file_error(Path::new("/proc/self/cgroup")))?;
        Cgroups::detect_in(Path::new("/sys/fs/cgroup"), &own)
    }

    /// [`Cgroups::detect`] against a cgroup mount at `root` and a `/proc/self/cgroup` text.
    fn detect_in(root: &Path, proc_self_cgroup: &str) -> Result<Cgroups, CgroupError> {
        let own_path = |wanted: &str| {
            proc_self_cgroup.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let matches = if wanted.is_empty() {
                    controllers.is_empty()
                } else {
                    controllers.split(',').any(|c| c == wanted)
                };
                matches.then(|| path.trim_start_matches('/').to_owned())
            })
        };
        if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("cpu") && has("memory") {
                let own = root.join(own_path("").unwrap_or_default());
                return Ok(Cgroups {
                    layout: Layout::V2 { own },
                    v2_prepared: std::sync::OnceLock::new(),
                });
            }
        }
        let cpu = root.join("cpu");
        let memory = root.join("memory");
        let pids = root.join("pids");
        if cpu.join("cpu.cfs_quota_us").is_file() && memory.join("memory.limit_in_bytes").is_file()
        {
            return Ok(Cgroups {
                layout: Layout::V1 {
                    cpu: cpu.join(own_path("cpu").unwrap_or_default()),
                    memory: memory.join(own_path("memory").unwrap_or_default()),
                    pids: pids
                        .join("cgroup.procs")
                        .is_file()
                        .then(|| pids.join(own_path("pids").unwrap_or_default())),
                },
                v2_prepared: std::sync::OnceLock::new(),
            });
        }
        Err(CgroupError::Unavailable(root.to_owned()))
    }

    /// `v1` or `v2`.
    pub fn version(&self) -> &'static str {
        match self.layout {
            Layout::V1 { .. } => "v1",
            Layout::V2 { .. } => "v2",
        }
    }

    /// The directories that hold sandbox cgroups.
    fn parents(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { own } => vec![own.join(PARENT)],
            Layout::V1 { cpu, memory, pids } => [Some(cpu), Some(memory), pids.as_ref()]
                .into_iter()
                .flatten()
                .map(|dir| dir.join(PARENT))
                .collect(),
        }
    }

    /// Makes the cgroup of sandbox `name` with `limits`.
    pub fn create(&self, name: &str, limits: CgroupLimits) -> Result<SandboxCgroup, CgroupError> {
        if let Layout::V2 { own } = &self.layout {
            if self.v2_prepared.get().is_none() {
                prepare_v2_parent(own)?;
                let _ = self.v2_prepared.set(());
            }
        }
        let dirs: Vec<PathBuf> = self.parents().iter().map(|p| p.join(name)).collect();
        for dir in &dirs {
            std::fs::create_dir_all(dir).map_err(file_error(dir))?;
        }
        let cgroup = SandboxCgroup {
            layout: self.layout.clone(),
            dirs,
        };
        // From here on a failure removes what was made (SandboxCgroup is removed on drop
        // only through `remove`, so do it explicitly).
        if let Err(e) = cgroup.set_limits(limits) {
            let _ = cgroup.remove();
            return Err(e);
        }
        Ok(cgroup)
    }

    /// The cgroup of sandbox `name`, if it exists (to re-adopt or clean it up).
    pub fn existing(&self, name: &str) -> Option<SandboxCgroup> {
        let dirs: Vec<PathBuf> = self.parents().iter().map(|p| p.join(name)).collect();
        dirs.iter().any(|d| d.is_dir()).then(|| SandboxCgroup {
            layout: self.layout.clone(),
            dirs,
        })
    }
}

/// On v2 a cgroup's controllers must be enabled in every ancestor's `subtree_control`, and a
/// cgroup that has processes cannot enable them for its children ("no internal processes").
/// The engine's cgroup enables them for `kiln/` (process-free); if the engine's cgroup holds
/// processes (a systemd service with `Delegate=yes`), the engine first moves itself into a
/// leaf `daemon/` beside `kiln/`.
fn prepare_v2_parent(own: &Path) -> Result<(), CgroupError> {
    let parent = own.join(PARENT);
    std::fs::create_dir_all(&parent).map_err(file_error(&parent))?;
    if let Err(e) = enable_controllers(own) {
        let busy = matches!(&e, CgroupError::File { source, .. } if source.raw_os_error() == Some(libc::EBUSY));
        if !busy {
            return Err(e);
        }
        let leaf = own.join("daemon");
        std::fs::create_dir_all(&leaf).map_err(file_error(&leaf))?;
        let procs = leaf.join("cgroup.procs");
        std::fs::write(&procs, "0").map_err(file_error(&procs))?;
        tracing::info!(cgroup = %leaf.display(), "moved the daemon into a leaf cgroup");
        enable_controllers(own)?;
    }
    enable_controllers(&parent)
}

/// Enables cpu and memory (and pids, where `dir` has it) for `dir`'s children.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let listed = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let (available, enabled) = (
        listed("cgroup.controllers"),
        listed("cgroup.subtree_control"),
    );
    let has = |list: &str, controller: &str| {
        list.split_whitespace()
            .any(|c| c.trim_start_matches('+') == controller)
    };
    let missing: Vec<String> = ["cpu", "memory", "pids"]
        .into_iter()
        .filter(|&c| c != "pids" || has(&available, c))
        .filter(|&c| !has(&enabled, c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let control = dir.join("cgroup.subtree_control");
    std::fs::write(&control, missing.join(" ")).map_err(|source| CgroupError::File {
        path: control.clone(),
        source: io::Error::new(
            source.kind(),
            format!(
                "{source}: enabling {} for kiln's cgroups (under systemd run the daemon with \
                 Delegate=yes)",
                missing.join(" ")
            ),
        ),
    })
}

/// What a cgroup's processes use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CgroupUsage {
    /// CPU time used, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Memory charged now (the VMM's, guest RAM it touched included), in bytes.
    pub memory_bytes: Option<u64>,
    /// The memory limit, in bytes.
    pub memory_limit_bytes: Option<u64>,
}

/// The value of `name` in a flat-keyed cgroup file (`name value` lines, as `cpu.stat`).
fn stat_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// One sandbox's cgroup (a directory per hierarchy on v1).
#[derive(Debug)]
pub struct SandboxCgroup {
    layout: Layout,
    dirs: Vec<PathBuf>,
}

impl SandboxCgroup {
    /// Sets its CPU quota and memory limit, and its task limit ([`VMM_TASKS`]) where the host
    /// has the pids controller.
    pub fn set_limits(&self, limits: CgroupLimits) -> Result<(), CgroupError> {
        let quota_us = (limits.cpus * CPU_PERIOD_US as f64).round().max(1000.0) as u64;
        let memory_bytes = limits.memory_mib.saturating_mul(1 << 20);
        let writes: Vec<(PathBuf, String)> = match &self.layout {
            Layout::V2 { .. } => vec![
                (
                    self.dirs[0].join("cpu.max"),
                    format!("{quota_us} {CPU_PERIOD_US}"),
                ),
                (self.dirs[0].join("memory.max"), memory_bytes.to_string()),
                // No swap: a sandbox over its limit is reclaimed or killed, not swapped.
                (self.dirs[0].join("memory.swap.max"), "0".into()),
                (self.dirs[0].join("pids.max"), VMM_TASKS.to_string()),
            ],
            Layout::V1 { .. } => vec![
                (
                    self.dirs[0].join("cpu.cfs_period_us"),
                    CPU_PERIOD_US.to_string(),
                ),
                (self.dirs[0].join("cpu.cfs_quota_us"), quota_us.to_string()),
                (
                    self.dirs[1].join("memory.limit_in_bytes"),
                    memory_bytes.to_string(),
                ),
            ]
            .into_iter()
            .chain(
                self.dirs
                    .get(2)
                    .map(|pids| (pids.join("pids.max"), VMM_TASKS.to_string())),
            )
            .collect(),
        };
        for (path, value) in writes {
            match std::fs::write(&path, &value) {
                Ok(()) => {}
                // memory.swap.max is absent where the host has no swap accounting, pids.max
                // on a v2 host whose kernel or parent cgroup lacks the pids controller.
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        && (path.ends_with("memory.swap.max")
                            || matches!(self.layout, Layout::V2 { .. })
                                && path.ends_with("pids.max")) => {}
                Err(e) => return Err(file_error(&path)(e)),
            }
        }
        Ok(())
    }

    /// Gives its processes the least CPU weight (`background`: they run when no sandbox at
    /// the default weight wants the CPU) or the default one back.
    pub fn set_background(&self, background: bool) -> Result<(), CgroupError> {
        let (path, value) = match &self.layout {
            Layout::V2 { .. } => (
                self.dirs[0].join("cpu.weight"),
                if background { "1" } else { "100" },
            ),
            Layout::V1 { .. } => (
                self.dirs[0].join("cpu.shares"),
                if background { "2" } else { "1024" },
            ),
        };
        std::fs::write(&path, value).map_err(file_error(&path))
    }

    /// What its processes use now, as the kernel counts it (a figure the kernel does not
    /// offer here is `None`).
    pub fn usage(&self) -> CgroupUsage {
        let read = |path: PathBuf| std::fs::read_to_string(path).ok();
        let number = |path: PathBuf| read(path).and_then(|text| text.trim().parse::<u64>().ok());
        match &self.layout {
            Layout::V2 { .. } => CgroupUsage {
                cpu_seconds: read(self.dirs[0].join("cpu.stat"))
                    .and_then(|stat| stat_field(&stat, "usage_usec"))
                    .map(|usec| usec as f64 / 1e6),
                memory_bytes: number(self.dirs[0].join("memory.current")),
                // `max` (no limit) is not a number: None.
                memory_limit_bytes: number(self.dirs[0].join("memory.max")),
            },
            Layout::V1 { .. } => CgroupUsage {
                // Where cpuacct is mounted with cpu (it usually is).
                cpu_seconds: number(self.dirs[0].join("cpuacct.usage")).map(|ns| ns as f64 / 1e9),
                memory_bytes: number(self.dirs[1].join("memory.usage_in_bytes")),
                memory_limit_bytes: number(self.dirs[1].join("memory.limit_in_bytes")),
            },
        }
    }

    /// Its directories (one on v2; cpu, memory and pids, where mounted, on v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Open `cgroup.procs` files: a process that writes `0` to each joins the cgroup.
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs
            .iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(file_error(&path))
            })
            .collect()
    }

    /// Removes it. Its processes must be gone; the kernel may take a moment to notice an
    /// exit, so a busy cgroup is retried briefly.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            let mut attempts = 0;
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempts < 100 => {
                        attempts += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(file_error(dir)(e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_SELF: &str = "9:name=systemd:/\n5:pids:/outer\n4:memory:/outer/inner\n1:cpu:/\n0::/\n";

    /// A v1 layout with cpu and memory hierarchies, and pids if `pids`.
    fn v1_root_with(pids: bool) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let cpu = root.path().join("cpu");
        let memory = root.path().join("memory/outer/inner");
        std::fs::create_dir_all(&cpu).expect("mkdir");
        std::fs::create_dir_all(&memory).expect("mkdir");
        if pids {
            std::fs::create_dir_all(root.path().join("pids/outer")).expect("mkdir");
            std::fs::write(root.path().join("pids/cgroup.procs"), "1\n").expect("write");
        }
        std::fs::write(cpu.join("cpu.cfs_quota_us"), "-1").expect("write");
        std::fs::write(
            root.path().join("memory").join("memory.limit_in_bytes"),
            "max",
        )
        .expect("write");
        root
    }

    fn v1_root() -> tempfile::TempDir {
        v1_root_with(true)
    }

    #[test]
    fn v1_limits_go_under_the_engines_own_cgroups() {
        let root = v1_root();
        let cgroups = Cgroups::detect_in(root.path(), V1_SELF).expect("v1");
        assert_eq!(cgroups.version(), "v1");
        let cgroup = cgroups
            .create(
                "sb-1",
                CgroupLimits {
                    cpus: 1.5,
                    memory_mib: 300,
                },
            )
            .expect("create");
        let cpu = root.path().join("cpu/kiln/sb-1");
        let memory = root.path().join("memory/outer/inner/kiln/sb-1");
        let pids = root.path().join("pids/outer/kiln/sb-1");
        assert_eq!(cgroup.dirs(), [cpu.clone(), memory.clone(), pids.clone()]);
        let read = |p: PathBuf| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "150000");
        assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(
            read(memory.join("memory.limit_in_bytes")),
            (300u64 << 20).to_string()
        );
        assert_eq!(read(pids.join("pids.max")), VMM_TASKS.to_string());
        assert!(cgroups.existing("sb-1").is_some());
        assert!(cgroups.existing("sb-2").is_none());
    }

    #[test]
    fn v1_without_a_pids_hierarchy_limits_cpu_and_memory() {
        let root = v1_root_with(false);
        let cgroups = Cgroups::detect_in(root.path(), V1_SELF).expect("v1");
        let limits = CgroupLimits {
            cpus: 1.0,
            memory_mib: 64,
        };
        let cgroup = cgroups.create("sb-1", limits).expect("create");
        assert_eq!(
            cgroup.dirs(),
            [
                root.path().join("cpu/kiln/sb-1"),
                root.path().join("memory/outer/inner/kiln/sb-1")
            ]
        );
        assert!(!root.path().join("pids").exists());
    }

    #[test]
    fn v2_enables_controllers_down_to_the_sandbox() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids",
        )
        .expect("write");
        let own = root.path().join("daemon.service");
        std::fs::create_dir_all(own.join("kiln")).expect("mkdir");
        // What the kernel lists: what the parent delegates (pids only to the engine's own).
        std::fs::write(own.join("cgroup.controllers"), "cpu io memory pids").expect("write");
        std::fs::write(own.join("kiln/cgroup.controllers"), "cpu memory pids").expect("write");
        let cgroups = Cgroups::detect_in(root.path(), "0::/daemon.service\n").expect("v2");
        assert_eq!(cgroups.version(), "v2");
        let cgroup = cgroups
            .create(
                "sb-1",
                CgroupLimits {
                    cpus: 0.25,
                    memory_mib: 128,
                },
            )
            .expect("create");
        let dir = own.join("kiln/sb-1");
        assert_eq!(cgroup.dirs(), std::slice::from_ref(&dir));
        let read = |p: PathBuf| std::fs::read_to_string(p).expect("read");
        assert_eq!(
            read(own.join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            read(own.join("kiln/cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(read(dir.join("cpu.max")), "25000 100000");
        assert_eq!(read(dir.join("memory.max")), (128u64 << 20).to_string());
        assert_eq!(read(dir.join("pids.max")), VMM_TASKS.to_string());

        // Only what is missing is enabled: a daemon that ran before this limit existed had
        // cpu and memory; a parent without pids gets none asked of it.
        std::fs::write(own.join("kiln/cgroup.subtree_control"), "cpu memory").expect("write");
        enable_controllers(&own.join("kiln")).expect("enable");
        assert_eq!(read(own.join("kiln/cgroup.subtree_control")), "+pids");
        std::fs::write(own.join("kiln/cgroup.controllers"), "cpu memory").expect("write");
        std::fs::write(own.join("kiln/cgroup.subtree_control"), "").expect("write");
        enable_controllers(&own.join("kiln")).expect("enable");
        assert_eq!(
            read(own.join("kiln/cgroup.subtree_control")),
            "+cpu +memory"
        );

        // Usage as the kernel's files say (what this test wrote stands in for them).
        std::fs::write(
            dir.join("cpu.stat"),
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
        )
        .expect("write");
        std::fs::write(dir.join("memory.current"), "104857600\n").expect("write");
        assert_eq!(
            cgroup.usage(),
            CgroupUsage {
                cpu_seconds: Some(2.5),
                memory_bytes: Some(100 << 20),
                memory_limit_bytes: Some(128 << 20),
            }
        );
        std::fs::write(dir.join("memory.max"), "max\n").expect("write");
        std::fs::remove_file(dir.join("cpu.stat")).expect("rm");
        let usage = cgroup.usage();
        assert_eq!((usage.cpu_seconds, usage.memory_limit_bytes), (None, None));
    }

    #[test]
    fn v1_usage_comes_from_cpuacct_and_memory() {
        let root = v1_root();
        let cgroups = Cgroups::detect_in(root.path(), V1_SELF).expect("v1");
        let limits = CgroupLimits {
            cpus: 1.0,
            memory_mib: 64,
        };
        let cgroup = cgroups.create("sb-1", limits).expect("create");
        let cpu = root.path().join("cpu/kiln/sb-1");
        let memory = root.path().join("memory/outer/inner/kiln/sb-1");
        std::fs::write(cpu.join("cpuacct.usage"), "1500000000\n").expect("write");
        std::fs::write(memory.join("memory.usage_in_bytes"), "4096\n").expect("write");
        assert_eq!(
            cgroup.usage(),
            CgroupUsage {
                cpu_seconds: Some(1.5),
                memory_bytes: Some(4096),
                memory_limit_bytes: Some(64 << 20),
            }
        );
    }

    #[test]
    fn hybrid_without_v2_controllers_uses_v1_and_nothing_is_an_error() {
        let root = v1_root();
        std::fs::write(root.path().join("cgroup.controllers"), "").expect("write");
        assert_eq!(
            Cgroups::detect_in(root.path(), V1_SELF)
                .expect("v1")
                .version(),
            "v1"
        );
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Cgroups::detect_in(empty.path(), V1_SELF),
            Err(CgroupError::Unavailable(_))
        ));
    }
}
