//! Child reaping for an agent that runs as PID 1.
//!
//! Every orphan in the guest is re-parented to PID 1, so the agent must reap with
//! `waitpid(-1)`. Doing that naively races the code that waits for the processes the agent
//! started itself: the orphan loop can collect an exec's status before the exec machinery
//! asks for it, and the exit code is lost. Here one reaper owns all waiting. Registered
//! processes are collected by pid. Anything else is an orphan, collected with
//! `waitpid(-1)` only while no spawn is under way: a child whose spawn has not returned
//! yet has no registration, and its status must wait for it. A spawn does not hold the
//! lock while it runs (a child starved of memory may take seconds to exec, and other
//! spawns and exits must not wait for it); once it has registered, it wakes the reaper to
//! collect what waited. Only the reaper's task collects, on a blocking thread, in batches:
//! nothing on the agent's async workers ever waits for its lock, even while a fork bomb's
//! zombies are collected by the thousand.

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
    state: Mutex<State>,
    /// Wakes the reaper's task outside `SIGCHLD`: a spawn ended, or a batch was cut short.
    wake: tokio::sync::Notify,
}

/// Most statuses collected under one hold of the lock.
const BATCH: usize = 256;

#[derive(Debug, Default)]
struct State {
    /// Registered processes by pid, with where their status goes.
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
    /// Spawns (and [`Reaper::exclusive`] sections) under way: orphans wait while any is.
    starting: usize,
}

impl Reaper {
    /// Starts reaping on `SIGCHLD`. Must be called inside the runtime, before any spawn.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = signal(SignalKind::child())?;
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                // On a blocking thread: a storm of exits keeps it collecting, and spawns
                // wait for the lock meanwhile, which the async workers must never do.
                let reaper = task_reaper.clone();
                let Ok(more) = tokio::task::spawn_blocking(move || reaper.reap_all()).await else {
                    break;
                };
                if more {
                    continue;
                }
                tokio::select! {
                    signal = sigchld.recv() => if signal.is_none() { break },
                    () = task_reaper.wake.notified() => {}
                }
            }
        });
        Ok(reaper)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state intact; keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks a spawn under way until the returned guard is dropped; then has what waited
    /// for it collected.
    fn starting(&self) -> Starting<'_> {
        self.state().starting += 1;
        Starting { reaper: self }
    }

    /// Spawns `command` and registers its pid before its status can be collected. The
    /// spawn returns once the child has exec'd.
    pub fn spawn(
        &self,
        command: &mut Command,
    ) -> io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let _starting = self.starting();
        let child = command.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        let (tx, rx) = oneshot::channel();
        self.state().waiters.insert(pid, tx);
        Ok((child, rx))
    }

    /// Runs `f` with orphans left uncollected, so a helper that `f` forks (as `grantpt`
    /// may) keeps its status for `f`.
    pub fn exclusive<T>(&self, f: impl FnOnce() -> T) -> T {
        let _starting = self.starting();
        f()
    }

    /// Collects every registered process that has exited, and every orphan when no spawn
    /// is under way (while one is, its child may have exited unregistered). Returns whether
    /// it stopped at [`BATCH`] with more perhaps left.
    fn reap_all(&self) -> bool {
        let mut state = self.state();
        if state.starting == 0 {
            // Everything, registered or not, is collected below.
            return collect_batch(&mut state.waiters);
        }
        let registered: Vec<i32> = state.waiters.keys().copied().collect();
        for pid in registered.into_iter().map(Pid::from_raw) {
            match collect(pid) {
                Ok(Some(status)) => deliver(&mut state.waiters, pid, status),
                Ok(None) => {}
                // Not a child (any more): its waiter learns that the status is unknown.
                Err(e) => {
                    tracing::warn!(pid = pid.as_raw(), error = %e, "waitpid failed");
                    state.waiters.remove(&pid.as_raw());
                }
            }
        }
        false
    }
}

/// Collects up to [`BATCH`] children that have exited, registered or orphaned; returns
/// whether it stopped there.
fn collect_batch(waiters: &mut HashMap<i32, oneshot::Sender<ExitStatus>>) -> bool {
    let mut collected = 0;
    while collected < BATCH {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return false,
            Ok(status) => {
                collected += 1;
                if let Some((pid, status)) = exit_status(status) {
                    deliver(waiters, pid, status);
                }
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "waitpid failed");
                return false;
            }
        }
    }
    true
}

/// A spawn under way; see [`Reaper::starting`].
struct Starting<'a> {
    reaper: &'a Reaper,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.reaper.state().starting -= 1;
        // Statuses that arrived meanwhile had their signal already: have them collected.
        self.reaper.wake.notify_one();
    }
}

/// The status of `pid` if it has exited, collecting it.
fn collect(pid: Pid) -> Result<Option<ExitStatus>, Errno> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::EINTR) => continue,
            Ok(status) => return Ok(exit_status(status).map(|(_, status)| status)),
            Err(e) => return Err(e),
        }
    }
}

/// The exit of a process, from what `waitpid` reported (stops and continues are not exits).
fn exit_status(status: WaitStatus) -> Option<(Pid, ExitStatus)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((
            pid,
            ExitStatus {
                code: Some(code),
                signal: None,
            },
        )),
        WaitStatus::Signaled(pid, sig, _) => Some((
            pid,
            ExitStatus {
                code: None,
                signal: Some(sig as i32),
            },
        )),
        _ => None,
    }
}

fn deliver(waiters: &mut HashMap<i32, oneshot::Sender<ExitStatus>>, pid: Pid, status: ExitStatus) {
    match waiters.remove(&pid.as_raw()) {
        // The receiver may be gone if nobody waits any more; the status is simply dropped.
        Some(tx) => drop(tx.send(status)),
        None => tracing::debug!(pid = pid.as_raw(), "reaped orphan"),
    }
}
