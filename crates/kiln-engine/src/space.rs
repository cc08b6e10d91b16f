//! The host's disk, shared by every sandbox.
//!
//! Sandbox disks are thin: a new one costs next to nothing and grows as its guest writes, up
//! to its size, so 200 sandboxes of 2 GiB fit on a disk far smaller than 400 GiB. What keeps
//! them from filling the host is therefore enforced while they run, not promised at create.
//! Two limits, both on bytes allocated on the host (holes are free):
//!
//! - the **reserve**: free space always left on the data directory's filesystem for the host
//!   (default: 2% of the filesystem, at least 1 GiB);
//! - the **budget** (optional): most bytes the sandboxes may hold in all, counting their
//!   disks (running and paused), pause images, fork captures and snapshots.
//!
//! A create, fork, pause or snapshot that would pass either is refused with
//! [`EngineError::NoSpace`]. Running sandboxes are held below both by their VMMs' file-size
//! limit (`RLIMIT_FSIZE`, set from the host): every [`TICK`] each running VMM may grow its
//! disk file by an equal share of the headroom left, so together they cannot pass a limit
//! before the next measurement, however fast they write. A write past the share fails in the
//! VMM, which reports an I/O error to the guest (`werror=report`): the guest sees a full
//! disk, its VM is never stopped, and its writes work again once space is freed.
//!
//! Two things escape the file-size limit, each bounded: a qcow2 disk re-using space it freed
//! inside its file (at most what its guest deleted before), and a raw disk on a reflink data
//! directory (XFS, btrfs), whose file has its full size from the start: there only the
//! admission of new work holds the line.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::{lock, EngineError, Inner};

/// How often the running VMMs' shares are measured and set.
pub const TICK: Duration = Duration::from_secs(1);

/// What a new sandbox is taken to need before its guest writes (its disk's first metadata
/// and writes): creates are refused unless this much is left.
pub const NEW_SANDBOX_BYTES: u64 = 64 << 20;

const GIB: u64 = 1 << 30;

/// The operator's limits on sandbox disk space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskLimits {
    /// Most bytes sandboxes may hold on the host; `None`: no budget beyond the reserve.
    pub budget: Option<u64>,
    /// Free space kept on the data directory's filesystem; `None`: [`default_reserve`].
    pub reserve: Option<u64>,
}

/// The default reserve of a filesystem of `size` bytes: 2% of it, at least 1 GiB (but never
/// more than half of it).
pub fn default_reserve(size: u64) -> u64 {
    (size / 50).max(GIB.min(size / 2))
}

/// The data directory's disk space as sandboxes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DiskSpace {
    /// Size of the data directory's filesystem.
    pub filesystem_bytes: u64,
    /// Free space on it for unprivileged writers (the VMMs).
    pub available_bytes: u64,
    /// Free space kept for the host.
    pub reserve_bytes: u64,
    /// Bytes allocated to sandboxes: disks, pause images, fork captures, snapshots.
    pub used_bytes: u64,
    /// Most bytes sandboxes may hold, if the operator set it.
    pub budget_bytes: Option<u64>,
}

impl DiskSpace {
    /// Bytes sandboxes may still take before a limit: the smaller of the free space above
    /// the reserve and what is left of the budget.
    pub fn headroom(&self) -> u64 {
        let free = self.available_bytes.saturating_sub(self.reserve_bytes);
        match self.budget_bytes {
            Some(budget) => free.min(budget.saturating_sub(self.used_bytes)),
            None => free,
        }
    }

    /// Refuses `what` if it needs more than the headroom, saying which limit it would pass.
    fn admit(&self, need: u64, what: &str) -> Result<(), EngineError> {
        let free = self.available_bytes.saturating_sub(self.reserve_bytes);
        if need > free {
            return Err(EngineError::NoSpace(format!(
                "not enough disk space to {what}: the data directory's filesystem has {} free \
                 and keeps {} in reserve (--disk-reserve-mib), and this needs about {}; destroy \
                 sandboxes or snapshots, or free space on the host",
                human(self.available_bytes),
                human(self.reserve_bytes),
                human(need)
            )));
        }
        if let Some(budget) = self.budget_bytes {
            if self.used_bytes.saturating_add(need) > budget {
                return Err(EngineError::NoSpace(format!(
                    "not enough disk space to {what}: sandboxes hold {} of the host's {} budget \
                     for them (--disk-budget-mib), and this needs about {}; destroy sandboxes or \
                     snapshots",
                    human(self.used_bytes),
                    human(budget),
                    human(need)
                )));
            }
        }
        Ok(())
    }
}

/// `bytes` for a person: MiB below 10 GiB, GiB from there.
fn human(bytes: u64) -> String {
    if bytes < 10 * GIB {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    }
}

/// Each of `vmms` running VMMs' share of `headroom`.
fn share(headroom: u64, vmms: usize) -> u64 {
    headroom / (vmms.max(1) as u64)
}

/// Allocated bytes of the files under `path`, symbolic links not followed.
fn allocated_under(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path).map_or(0, |entries| {
            entries
                .flatten()
                .map(|entry| allocated_under(&entry.path()))
                .sum()
        })
    } else if meta.is_file() {
        meta.blocks().saturating_mul(512)
    } else {
        0
    }
}

/// Measures the data directory's space (blocking: walks the sandboxes' files).
pub(crate) fn measure(engine: &Inner) -> Result<DiskSpace, EngineError> {
    let data = &engine.config.data_dir;
    let fs = nix::sys::statvfs::statvfs(data).map_err(|e| {
        EngineError::io(
            "measuring the data directory's filesystem",
            std::io::Error::from(e),
        )
    })?;
    let block = fs.fragment_size();
    let filesystem_bytes = fs.blocks().saturating_mul(block);
    let mut used_bytes = allocated_under(&data.join("sandboxes"));
    if let Ok(entries) = std::fs::read_dir(data.join("templates")) {
        for entry in entries.flatten() {
            if crate::fork::is_capture_name(&entry.file_name().to_string_lossy()) {
                used_bytes = used_bytes.saturating_add(allocated_under(&entry.path()));
            }
        }
    }
    let limits = engine.config.disk;
    Ok(DiskSpace {
        filesystem_bytes,
        available_bytes: fs.blocks_available().saturating_mul(block),
        reserve_bytes: limits
            .reserve
            .unwrap_or_else(|| default_reserve(filesystem_bytes)),
        used_bytes,
        budget_bytes: limits.budget,
    })
}

/// Refuses `what` (a phrase: "create a sandbox") unless `need` bytes fit under both limits.
pub(crate) fn admit(engine: &Inner, need: u64, what: &str) -> Result<(), EngineError> {
    tokio::task::block_in_place(|| measure(engine))?.admit(need, what)
}

/// A VMM process whose file-size limit kiln sets: its pid, and the user and group it runs
/// as (`None`: the daemon's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Vmm {
    pub(crate) pid: u32,
    pub(crate) run_as: Option<(u32, u32)>,
}

/// Sets the soft file-size limit of `vmm` to `bytes` (`None`: its hard limit, which kiln
/// leaves as it was). The VMM cannot change it back: its jail's seccomp filter refuses
/// every change of a limit.
///
/// Changing another user's limits takes `CAP_SYS_RESOURCE`, which a daemon in a container
/// may lack; a thread of the VMM's own user may (the kernel matches its ids), so the call
/// is made from a short-lived thread that takes the VMM's user ids with raw system calls
/// (which change the calling thread's credentials only) and then ends.
fn limit_file_size(vmm: Vmm, bytes: Option<u64>) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(vmm.pid)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let set = move || -> std::io::Result<()> {
        let mut old = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `old` is a valid, writable rlimit64; no new value is passed (null).
        if unsafe { libc::prlimit64(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut old) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let new = libc::rlimit64 {
            rlim_cur: bytes.map_or(old.rlim_max, |b| b.min(old.rlim_max)),
            rlim_max: old.rlim_max,
        };
        // SAFETY: `new` is a valid rlimit64 for the call; the old value is not asked for.
        if unsafe { libc::prlimit64(pid, libc::RLIMIT_FSIZE, &new, std::ptr::null_mut()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let Some((uid, gid)) = vmm.run_as else {
        return set();
    };
    std::thread::Builder::new()
        .name("kiln-fsize".into())
        .spawn(move || {
            // SAFETY: raw setresgid/setresuid change this thread's credentials only (glibc's
            // wrappers would change every thread's); the thread ends right after.
            let switched = unsafe {
                libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
                    && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
            };
            if !switched {
                return Err(std::io::Error::last_os_error());
            }
            set()
        })?
        .join()
        .map_err(|_| std::io::Error::other("the limit-setting thread panicked"))?
}

/// Lifts the file-size limit of a VMM about to write a pause image or a capture (their size
/// was admitted before).
pub(crate) fn lift(vmm: Vmm) {
    if let Err(e) = limit_file_size(vmm, None) {
        tracing::warn!(pid = vmm.pid, error = %e, "lifting a VMM's file-size limit");
    }
}

/// The file-size limit the VMM of the sandbox in `dir` gets now: its disk file may grow by
/// what the last measurement left to each running VMM (`None`: not measured yet).
fn target(engine: &Inner, dir: &Path) -> Option<u64> {
    let share = engine.disk_share.load(Ordering::Relaxed);
    if share == u64::MAX {
        return None;
    }
    let length = std::fs::metadata(crate::sandbox::disk_file(dir)?).map_or(0, |m| m.len());
    Some(length.saturating_add(share))
}

/// Gives `vmm`, of the sandbox in `dir`, its share (called as it starts to run).
pub(crate) fn hold(engine: &Inner, vmm: Vmm, dir: &Path) {
    let Some(limit) = target(engine, dir) else {
        return;
    };
    if let Err(e) = limit_file_size(vmm, Some(limit)) {
        tracing::warn!(pid = vmm.pid, error = %e, "setting a VMM's file-size limit");
    }
}

/// A limit is set again when it must shrink, or has room to grow by this much: a VMM that
/// does not write costs no system call.
const LOOSEN_STEP: u64 = 64 << 20;

/// One measurement: every running VMM gets its share of the headroom. `applied` holds the
/// limits set by earlier rounds, by pid.
fn enforce(engine: &Inner, applied: &mut std::collections::HashMap<u32, u64>) {
    let space = match measure(engine) {
        Ok(space) => space,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "measuring sandbox disk space");
            return;
        }
    };
    let running: Vec<(Vmm, PathBuf)> = lock(&engine.sandboxes)
        .values()
        .filter_map(|sandbox| {
            let vmm = Vmm {
                pid: sandbox.pid()?,
                run_as: sandbox.vm_uid().map(|uid| (uid, uid)),
            };
            Some((vmm, sandbox.dir().to_owned()))
        })
        .collect();
    let headroom = space.headroom();
    let was_full = engine.disk_share.load(Ordering::Relaxed) == 0;
    engine
        .disk_share
        .store(share(headroom, running.len()), Ordering::Relaxed);
    if (headroom == 0) != was_full {
        if headroom == 0 {
            tracing::warn!(
                available = space.available_bytes,
                reserve = space.reserve_bytes,
                used = space.used_bytes,
                budget = ?space.budget_bytes,
                "sandbox disks are full (the disk reserve or budget is reached): their writes \
                 fail until space is freed"
            );
        } else {
            tracing::info!("sandbox disks may grow again");
        }
    }
    applied.retain(|pid, _| running.iter().any(|(vmm, _)| vmm.pid == *pid));
    for (vmm, dir) in running {
        let Some(limit) = target(engine, &dir) else {
            continue;
        };
        let due = applied
            .get(&vmm.pid)
            .is_none_or(|&last| limit < last || limit >= last.saturating_add(LOOSEN_STEP));
        if !due {
            continue;
        }
        match limit_file_size(vmm, Some(limit)) {
            Ok(()) => {
                applied.insert(vmm.pid, limit);
            }
            Err(e) => {
                tracing::warn!(pid = vmm.pid, error = %e, "setting a VMM's file-size limit")
            }
        }
    }
}

/// Measures and sets the running VMMs' shares every [`TICK`] for as long as the engine lives.
pub(crate) fn start(engine: &Arc<Inner>, runtime: &tokio::runtime::Handle) {
    let engine: Weak<Inner> = Arc::downgrade(engine);
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut applied = std::collections::HashMap::new();
        loop {
            ticks.tick().await;
            let Some(engine) = engine.upgrade() else {
                return;
            };
            match tokio::task::spawn_blocking(move || {
                enforce(&engine, &mut applied);
                applied
            })
            .await
            {
                Ok(kept) => applied = kept,
                Err(_) => {
                    tracing::warn!("the sandbox disk space check panicked");
                    applied = std::collections::HashMap::new();
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(available: u64, reserve: u64, used: u64, budget: Option<u64>) -> DiskSpace {
        DiskSpace {
            filesystem_bytes: 100 * GIB,
            available_bytes: available,
            reserve_bytes: reserve,
            used_bytes: used,
            budget_bytes: budget,
        }
    }

    #[test]
    fn headroom_is_the_tighter_limit() {
        assert_eq!(space(10 * GIB, 2 * GIB, 0, None).headroom(), 8 * GIB);
        assert_eq!(
            space(10 * GIB, 2 * GIB, 5 * GIB, Some(6 * GIB)).headroom(),
            GIB
        );
        assert_eq!(space(GIB, 2 * GIB, 0, None).headroom(), 0);
        assert_eq!(space(10 * GIB, 0, 7 * GIB, Some(6 * GIB)).headroom(), 0);
    }

    #[test]
    fn admission_names_the_limit_it_would_pass() {
        let reserve = space(3 * GIB, 2 * GIB, 0, None).admit(2 * GIB, "pause a sandbox");
        let message = reserve.expect_err("past the reserve").to_string();
        assert!(message.contains("reserve"), "{message}");
        assert!(message.contains("pause a sandbox"), "{message}");
        let budget = space(50 * GIB, 2 * GIB, 9 * GIB, Some(10 * GIB)).admit(2 * GIB, "fork");
        let message = budget.expect_err("past the budget").to_string();
        assert!(message.contains("budget"), "{message}");
        space(50 * GIB, 2 * GIB, 7 * GIB, Some(10 * GIB))
            .admit(2 * GIB, "fork")
            .expect("fits both");
    }

    #[test]
    fn shares_never_add_up_past_the_headroom() {
        for (headroom, vmms) in [(0, 0), (7, 0), (7, 3), (GIB, 200), (GIB + 1, 7)] {
            assert!(share(headroom, vmms) * (vmms.max(1) as u64) <= headroom);
        }
        assert_eq!(share(GIB, 1), GIB);
    }

    #[test]
    fn default_reserve_scales_with_the_filesystem() {
        assert_eq!(default_reserve(100 * GIB), 2 * GIB);
        assert_eq!(default_reserve(4 * GIB), GIB);
        assert_eq!(default_reserve(GIB), GIB / 2);
    }

    #[test]
    fn captures_are_told_from_bakes() {
        use crate::fork::is_capture_name;
        assert!(is_capture_name("snap-0a1b2c"));
        assert!(is_capture_name(".bake-fork-0a1b2c"));
        assert!(!is_capture_name("python-5e2402b0"));
        assert!(!is_capture_name(".bake-python-x"));
    }
}
