//! Process descriptors (pidfds): they refer to one process for their whole life, so signals
//! and exit checks through them can never reach a later process that reused the pid.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A pidfd for process `pid`.
pub fn open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd for process `pid` if it still is the process that started at `start_ticks`
/// (clock ticks since boot, as in `/proc/PID/stat`).
pub fn open_if_same(pid: u32, start_ticks: u64) -> io::Result<OwnedFd> {
    let fd = open(pid)?;
    // Checked after the pidfd exists: from now on it refers to this very process.
    if crate::process_start_ticks(pid) != Some(start_ticks) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {pid} is not the one that was recorded"),
        ));
    }
    Ok(fd)
}

/// Sends SIGKILL to the process of `pidfd` (a process that already ended is not an error).
pub fn kill(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal, a null siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// Whether the process of `pidfd` has ended, waiting up to `timeout_ms`.
pub fn exited(pidfd: &OwnedFd, timeout_ms: i32) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a pidfd becomes readable when its process exits.
    let n = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n > 0)
}

/// Kills the process of `pidfd` (unless it has ended already) and waits up to `timeout` for
/// it to be gone (its parent reaps it). Returns whether it is gone.
pub fn kill_and_wait(pidfd: &OwnedFd, timeout: std::time::Duration) -> io::Result<bool> {
    if exited(pidfd, 0)? {
        return Ok(true);
    }
    kill(pidfd)?;
    exited(
        pidfd,
        i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX),
    )
}
