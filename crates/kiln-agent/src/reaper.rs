//! Child reaping for an agent that runs as PID 1.
//!
//! Every orphan in the guest is re-parented to PID 1, so the agent must reap with
//! `waitpid(-1)`. Doing that naively races the code that waits for the processes the agent
//! started itself: the orphan loop can collect an exec's status before the exec machinery
//! asks for it, and the exit code is lost. Here one reaper owns all waiting: processes are
//! spawned while holding the waiter table's lock and registered before it is released, and
//! the reaper takes the same lock around `waitpid(-1)`, so every status of a registered pid
//! reaches its waiter and everything else is an orphan that is simply collected.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_proto::messages::ExitStatus;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// The single owner of `waitpid` in the agent.
#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
}

impl Reaper {
    /// Starts reaping on `SIGCHLD`. Must be called inside the runtime, before any spawn.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = signal(SignalKind::child())?;
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                // Off the async workers: a spawn holds the lock until its child has exec'd,
                // which a child starved of memory may take seconds to do.
                let reaper = task_reaper.clone();
                if tokio::task::spawn_blocking(move || reaper.reap_all())
                    .await
                    .is_err()
                {
                    break;
                }
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<ExitStatus>>> {
        // A panic while holding this lock leaves the map intact; keep using it.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Spawns `command` and registers its pid before any status can be collected.
    pub fn spawn(
        &self,
        command: &mut Command,
    ) -> io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let mut waiters = self.waiters();
        let child = command.spawn()?;
        let (tx, rx) = oneshot::channel();
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        waiters.insert(pid, tx);
        Ok((child, rx))
    }

    /// Holds the spawn lock while `f` runs, so no child can be forked meanwhile
    /// (used while creating descriptors that must not leak into children).
    pub fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = self.waiters();
        f()
    }

    /// Collects every child that has exited.
    fn reap_all(&self) {
        let mut waiters = self.waiters();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(WaitStatus::Exited(pid, code)) => deliver(
                    &mut waiters,
                    pid,
                    ExitStatus {
                        code: Some(code),
                        signal: None,
                    },
                ),
                Ok(WaitStatus::Signaled(pid, sig, _)) => deliver(
                    &mut waiters,
                    pid,
                    ExitStatus {
                        code: None,
                        signal: Some(sig as i32),
                    },
                ),
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    break;
                }
            }
        }
    }
}

fn deliver(waiters: &mut HashMap<i32, oneshot::Sender<ExitStatus>>, pid: Pid, status: ExitStatus) {
    match waiters.remove(&pid.as_raw()) {
        // The receiver may be gone if nobody waits any more; the status is simply dropped.
        Some(tx) => drop(tx.send(status)),
        None => tracing::debug!(pid = pid.as_raw(), "reaped orphan"),
    }
}
