//! The guest's user processes in a cgroup apart from the agent, so that nothing they do
//! wedges it: a process limit and a memory limit that leave the agent headroom, the agent
//! first in CPU scheduling and spared by the OOM killer, and one write that kills them all.
//!
//! Layout (cgroup v2, mounted by the agent as init):
//!
//! ```text
//! /sys/fs/cgroup/kiln-agent   the agent: cpu.weight 10000, memory.min, its pages locked
//! /sys/fs/cgroup/user         every process the agent starts: pids.max, memory.max
//! ```
//!
//! A guest root can undo all of this (its own cgroups are its own); it then only wedges
//! its own sandbox, which the host can still destroy.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_proto::KILL_ALL_WAIT;
use nix::mount::{mount, MsFlags};

/// Where the agent mounts cgroup v2.
const ROOT: &str = "/sys/fs/cgroup";

/// The user processes' cgroup, set up.
#[derive(Debug)]
pub struct UserCgroup {
    dir: PathBuf,
    /// Its `cgroup.procs`, open for writing: a new process writes `0` to it (itself) between
    /// fork and exec, so that it never runs a user instruction outside.
    procs: OwnedFd,
    limits: Limits,
}

/// The limits of the user processes, sized from the guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Their `pids.max` (processes and threads).
    pub pids: u64,
    /// Their `memory.max`, bytes.
    pub memory: u64,
    /// The agent's `memory.min`, bytes.
    pub agent_memory: u64,
}

impl Limits {
    /// The limits for a guest of `total` bytes of memory of which `available` are free for
    /// processes once the kernel has booted. They may run 4 tasks per MiB (at least 1024).
    /// They may take all of `available` but a reserve, so that their own limit is met before
    /// the guest runs out: their cgroup then reclaims and kills inside itself, while the agent
    /// and the kernel keep what they need. Were the limit above what is free, a bomb would
    /// drive the whole guest into reclaim first, and the agent would stall with it (for
    /// seconds under TCG).
    ///
    /// The reserve is the kernel's own (a sixteenth of the total, 16 MiB to 128 MiB) plus
    /// [`KERNEL_PER_TASK`] for each task the users may run; never more than half of what is
    /// free.
    pub fn for_memory(total: u64, available: u64) -> Limits {
        let available = available.min(total);
        let pids = (total >> 20).saturating_mul(4).max(1024);
        let reserve = (total / 16)
            .clamp(16 << 20, 128 << 20)
            .saturating_add(pids.saturating_mul(KERNEL_PER_TASK))
            .min(available / 2);
        Limits {
            pids,
            memory: available - reserve,
            agent_memory: reserve / 2,
        }
    }
}

/// Kernel memory a user task holds outside the users' cgroup, with a margin: about 7 KiB was
/// measured during a fork bomb of 600-750 tasks in a 256 MiB guest (Debian's 6.1 kernel),
/// where their cgroup's own figures (stacks, page tables, most slab) are counted against
/// its limit. Without it, such a bomb at the users' limit left the guest 2.5 MiB free and
/// the agent stalled in reclaim for up to 4.4 s.
const KERNEL_PER_TASK: u64 = 16 << 10;

impl UserCgroup {
    /// Mounts cgroup v2 if needed, moves the agent into its own cgroup (first in CPU
    /// scheduling, memory protected, exempt from the OOM killer) and makes the users'.
    pub fn set_up() -> io::Result<UserCgroup> {
        let root = Path::new(ROOT);
        if !root.join("cgroup.controllers").exists() {
            std::fs::create_dir_all(root)?;
            mount(
                Some("cgroup2"),
                root,
                Some("cgroup2"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(|e| io::Error::other(format!("mounting cgroup2 on {ROOT}: {e}")))?;
        }
        write(&root.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
        lock_in_memory();
        let memory = crate::info::memory();
        if memory.total_bytes == 0 || memory.available_bytes == 0 {
            return Err(io::Error::other(
                "no MemTotal or MemAvailable in /proc/meminfo",
            ));
        }
        let limits = Limits::for_memory(memory.total_bytes, memory.available_bytes);

        let agent = root.join("kiln-agent");
        make_dir(&agent)?;
        write(&agent.join("cpu.weight"), "10000")?;
        write(&agent.join("memory.min"), &limits.agent_memory.to_string())?;
        write(&agent.join("cgroup.procs"), &std::process::id().to_string())?;
        write(Path::new("/proc/self/oom_score_adj"), "-1000")?;

        let dir = root.join("user");
        make_dir(&dir)?;
        write(&dir.join("pids.max"), &limits.pids.to_string())?;
        write(&dir.join("memory.max"), &limits.memory.to_string())?;
        // Under memory pressure the kernel kills inside the users' cgroup, one process at a
        // time (a fork bomb's shells, a runaway buffer), never the agent.
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        tracing::info!(
            pids = limits.pids,
            memory_mib = limits.memory >> 20,
            guest_mib = memory.total_bytes >> 20,
            "user processes confined"
        );
        Ok(UserCgroup {
            dir,
            procs: procs.into(),
            limits,
        })
    }

    /// The descriptor a new process writes `0` to (see [`enter`]).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Kills every process in the users' cgroup and below it, and waits until they are gone.
    /// Returns how many there were. It waits while they keep leaving: at most
    /// [`KILL_STALL`] without one leaving, and [`KILL_ALL_WAIT`] in all.
    ///
    /// Their memory limit is lifted until they are gone: a fork bomb sits at that limit,
    /// and its processes reclaiming pages of the files they all map (walking every mapping
    /// of them) held up those exiting for 15 s and more under TCG (hundreds waiting in
    /// `unlink_file_vma`, none leaving).
    pub fn kill_all(&self) -> io::Result<u32> {
        let count = count_processes(&self.dir);
        let memory_max = self.dir.join("memory.max");
        write(&memory_max, "max")?;
        let killed = self.kill_and_wait(count);
        let restored = write(&memory_max, &self.limits.memory.to_string());
        let count = killed?;
        restored?;
        Ok(count)
    }

    fn kill_and_wait(&self, count: u32) -> io::Result<u32> {
        write(&self.dir.join("cgroup.kill"), "1").map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{e} (killing a cgroup's processes needs Linux 5.14 or later)"),
            )
        })?;
        let started = Instant::now();
        let (mut left, mut last_progress) = (count, started);
        loop {
            let events = std::fs::read_to_string(self.dir.join("cgroup.events"))?;
            if events.lines().any(|line| line == "populated 0") {
                return Ok(count);
            }
            let now = Instant::now();
            let still = count_processes(&self.dir);
            if still < left {
                (left, last_progress) = (still, now);
            }
            if now - last_progress > KILL_STALL || now - started > KILL_ALL_WAIT {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "processes were still exiting {} s after they were killed, none in the last {} s ({}; memory.events: {})",
                        (now - started).as_secs(),
                        (now - last_progress).as_secs(),
                        describe_processes(&self.dir),
                        std::fs::read_to_string(self.dir.join("memory.events"))
                            .unwrap_or_default()
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How long a kill-all waits without any killed process leaving before it gives up.
const KILL_STALL: Duration = Duration::from_secs(15);

/// Keeps the agent's pages in memory: its program's now (a guest short of memory would
/// otherwise evict them and the agent would stall reading them back), the rest as they are
/// first touched (thread stacks are not filled in ahead). Failures are logged: the agent
/// still works, only less surely under memory pressure.
fn lock_in_memory() {
    use std::os::unix::fs::MetadataExt;
    let program = std::fs::metadata("/proc/self/exe").map_or(0, |m| m.ino());
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for (start, end) in program_mappings(&maps, program) {
        // SAFETY: locks pages of mappings this process holds; no memory is changed.
        if unsafe { libc::mlock(start as *const libc::c_void, end - start) } != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot lock the agent's program in memory");
            break;
        }
    }
    // SAFETY: a flag change on this process's mappings.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot lock the agent's memory");
    }
}

/// The address ranges of `/proc/self/maps` lines that map the file of inode `program` (by
/// inode: a path may have been replaced, or end in " (deleted)").
fn program_mappings(maps: &str, program: u64) -> Vec<(usize, usize)> {
    if program == 0 {
        return Vec::new();
    }
    let inode = program.to_string();
    maps.lines()
        .filter(|line| line.split_whitespace().nth(4) == Some(inode.as_str()))
        .filter_map(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .filter(|(start, end)| start < end)
        .collect()
}

/// In a new process between fork and exec: moves it into the users' cgroup (`procs_fd`, see
/// [`UserCgroup::procs_fd`]) and gives it the default OOM score the agent's own hides.
/// Failures are ignored: a guest root may have dismantled the cgroup on purpose.
///
/// # Safety
///
/// Only async-signal-safe calls: it may run in a child forked from a multi-threaded process.
pub unsafe fn enter(procs_fd: RawFd) {
    // SAFETY: writes of static buffers to descriptors, and an open of a static C string.
    unsafe {
        libc::write(procs_fd, b"0".as_ptr().cast(), 1);
        let adj = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if adj >= 0 {
            libc::write(adj, b"0".as_ptr().cast(), 1);
            libc::close(adj);
        }
    }
}

/// Processes in `dir` and every cgroup below it.
fn count_processes(dir: &Path) -> u32 {
    u32::try_from(pids_in(dir).len()).unwrap_or(u32::MAX)
}

/// The processes in `dir` and below it, counted by state and by where they wait: for an
/// error that says why they are not gone ("3 processes: 2 D in rwsem_down_read, 1 R").
fn describe_processes(dir: &Path) -> String {
    let pids = pids_in(dir);
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for pid in &pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = state_of(&stat).unwrap_or("gone").to_owned();
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        let kind = match wchan.trim() {
            "" | "0" => state,
            wchan => format!("{state} in {wchan}"),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by_key(|kind| std::cmp::Reverse(kind.1));
    let shown: Vec<String> = kinds
        .iter()
        .take(6)
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect();
    format!("{} processes: {}", pids.len(), shown.join(", "))
}

/// The state letter of a `/proc/<pid>/stat` line: the field after the command, which is in
/// parentheses and may itself hold any character.
fn state_of(stat: &str) -> Option<&str> {
    stat.rsplit_once(')')?.1.split_whitespace().next()
}

/// The process ids in `dir`'s `cgroup.procs` and those of every cgroup below it.
fn pids_in(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| {
            text.lines()
                .filter_map(|line| line.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(pids_in(&entry.path()));
        }
    }
    pids
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value} to {}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn limits_stay_below_what_the_guest_has_free() {
        // A 256 MiB guest as Debian's kernel boots it: 206 MiB in MemTotal, 165 MiB free.
        // The kernel's 16 MiB and 16 KiB for each of 1024 tasks are kept back.
        let small = Limits::for_memory(206 * MIB, 165 * MIB);
        assert_eq!(small.memory, (165 - 32) * MIB);
        assert_eq!(small.agent_memory, 16 * MIB);
        assert_eq!(small.pids, 1024);
        let tiny = Limits::for_memory(64 * MIB, 20 * MIB);
        assert_eq!(tiny.memory, 10 * MIB, "never more than half kept back");
        let large = Limits::for_memory(16 << 30, 15 << 30);
        assert_eq!(large.pids, 65536);
        assert_eq!(large.memory, (15 << 30) - 128 * MIB - 1024 * MIB);
        let odd = Limits::for_memory(100 * MIB, 200 * MIB);
        assert!(
            odd.memory < 100 * MIB,
            "free memory is never more than the total"
        );
    }

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(state_of("42 (bash) D 1 42 42 0"), Some("D"));
        assert_eq!(state_of("43 (a) R (b)) Z 1 43"), Some("Z"));
        assert_eq!(state_of(""), None);
    }

    #[test]
    fn the_program_mappings_are_found_by_inode() {
        let maps = "\
55d0c0000000-55d0c0100000 r--p 00000000 fe:01 12 /sbin/kiln-agent
55d0c0100000-55d0c0400000 r-xp 00100000 fe:01 12 /sbin/kiln-agent
55d0c0600000-55d0c0700000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 r--p 00000000 fe:01 13 /sbin/kiln-agent-old
";
        assert_eq!(
            program_mappings(maps, 12),
            vec![
                (0x55d0_c000_0000, 0x55d0_c010_0000),
                (0x55d0_c010_0000, 0x55d0_c040_0000)
            ]
        );
        assert!(program_mappings(maps, 0).is_empty());
    }
}
