//! VMMs started ahead of creates: confined (namespace wired, cgroup, uid, jail), with the
//! sandbox's directory and disk. At most [`crate::MAX_PRESTART`] per template.
//!
//! A cold one waits for the template's device state. A warm one (the default,
//! [`crate::EngineConfig::warm_prestart`]) has also restored the template and run a command in
//! the guest once, so that the create skips the restore and the handshake and the sandbox's
//! first command runs on paths the VMM has run before (under TCG, already translated; under
//! KVM, already faulted in). A warm guest holds the template's state, the same for every
//! sandbox of the template, plus what its warm-up gave it (a post-restore call with the
//! sandbox-to-be's name and entropy, which the create's own call replaces with fresh ones). While it waits its link to the host
//! is held closed (nothing in or out); the create puts the sandbox's egress policy in force
//! and opens it after that call.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent_client::AgentClient;
use kiln_proto::messages::{Command, ExecRequest};
use kiln_vmm::driver::{DiskFormat, DiskLayer, MemoryBacking, PhaseTimings, Vm};

use crate::confine::{confine, default_limits, launch_recorded, VmResources};
use crate::sandbox::{record, restore_guest};
use crate::{lock, BakedTemplate, EngineError, Inner};

pub(crate) fn new_id() -> String {
    let bytes: [u8; 6] = rand::random();
    format!("sb-{}", hex::encode(bytes))
}

/// A VMM started ahead of a create: confined, with the sandbox's directory and disk, waiting
/// for the template's device state (`guest` is `None`: no guest code has run) or running the
/// template's guest, warmed (`guest` is its agent, connected).
#[derive(Debug)]
pub(crate) struct Prestarted {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    pub(crate) vm: Box<dyn Vm>,
    pub(crate) resources: VmResources,
    /// The warmed guest's agent.
    pub(crate) guest: Option<AgentClient>,
    // Declared last: the directory goes after the VMM using it.
    pub(crate) cleanup: DirGuard,
}

/// Starts a VMM for `template` that waits for its device state (blocking). Its namespace
/// gets the default egress policy; its link is held closed if the VMM is to be `warmed`.
pub(crate) fn prestart(
    engine: &Arc<Inner>,
    template: &BakedTemplate,
    warmed: bool,
    timings: &mut PhaseTimings,
) -> Result<Prestarted, EngineError> {
    let mut phase = Instant::now();
    let id = new_id();
    let dir = engine.config.data_dir.join("sandboxes").join(&id);
    std::fs::create_dir(&dir).map_err(|e| EngineError::io("creating the sandbox directory", e))?;
    let cleanup = DirGuard(Some(dir.clone()));
    {
        use std::os::unix::fs::PermissionsExt;
        // Root's alone: the VMM gets its files through its jail, never through this path.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| EngineError::io("creating the sandbox directory", e))?;
    }
    let mut root_disk = match template.meta.disk_format {
        // The template's raw disk lives where reflinks work: share its extents.
        DiskFormat::Raw => {
            let disk = dir.join("disk.raw");
            crate::disk::reflink(&template.disk(), &disk)?;
            vec![DiskLayer::raw(disk)]
        }
        DiskFormat::Qcow2 => {
            let disk = dir.join("disk.qcow2");
            crate::disk::qcow2_overlay(&disk, template.meta.disk_bytes)?;
            let mut chain = vec![DiskLayer::qcow2(disk)];
            chain.extend(template.disk_chain());
            chain
        }
    };
    let disk = root_disk[0].path.clone();
    record(timings, "disk", &mut phase);
    let memory = MemoryBacking::File {
        path: template.memory(),
        shared: false,
    };
    let spec = template.meta.machine.vm_spec(
        &dir.join("run"),
        std::mem::take(&mut root_disk),
        memory,
        true,
    );
    let egress = engine.default_egress();
    // Only the disk is the VMM user's: the directory, its pid record, sockets and console
    // log stay root's, and outside the VMM's jail.
    let (confinement, resources) = confine(
        engine,
        &id,
        default_limits(&template.meta.machine),
        &[&disk],
        egress.as_ref(),
    )?;
    if warmed {
        // A guest that runs before its create has no way in or out until then, and gets the
        // CPU only when no sandbox wants it.
        if let Some((network, link)) = &resources.link {
            network.hold(*link, true)?;
        }
        if let Some(cgroup) = &resources.cgroup {
            cgroup.set_background(true)?;
        }
    }
    record(timings, "confinement", &mut phase);
    let mut vm = launch_recorded(engine, spec, confinement, &dir, &id)?;
    record(timings, "spawn", &mut phase);
    vm.wait_started(Duration::from_secs(30))?;
    record(timings, "VMM ready", &mut phase);
    Ok(Prestarted {
        id,
        dir,
        vm,
        resources,
        guest: None,
        cleanup,
    })
}

/// Longest warm-up (restore, handshake, post-restore call, command); past it the VMM is
/// discarded. Bounds what an engine's shutdown waits for.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// What a warm-up runs in the guest: a program every template has, that prints a line, on
/// the paths the sandbox's first command takes too (the agent's spawn and output, fork, exec,
/// the dynamic loader, the C library's start-up).
const WARM_UP: [&str; 2] = ["echo", "warm"];

/// Restores `template` into `prestarted`'s VMM, connects to its agent, runs the post-restore
/// call as the create will (with the sandbox-to-be's name, which is its VMM's) and one
/// command.
async fn warm(
    engine: &Arc<Inner>,
    template: &BakedTemplate,
    prestarted: &mut Prestarted,
) -> Result<(), EngineError> {
    let client = restore_guest(engine, template, prestarted, &mut PhaseTimings::default()).await?;
    client
        .post_restore(&crate::sandbox::identity(&prestarted.id, None))
        .await?;
    // A template without the program still warms the agent's side of an exec.
    let argv = WARM_UP.iter().map(|s| s.to_string()).collect();
    match client
        .run(ExecRequest::new(Command::Argv(argv)), 1 << 10)
        .await
    {
        Ok(result) if result.status.code == Some(0) => {}
        Ok(result) => {
            tracing::debug!(template = %template.meta.name, status = ?result.status, "warm-up command failed")
        }
        Err(kiln_agent_client::ClientError::Agent(e)) => {
            tracing::debug!(template = %template.meta.name, error = %e, "warm-up command refused");
        }
        Err(e) => return Err(e.into()),
    }
    prestarted.guest = Some(client);
    Ok(())
}

/// VMMs started ahead of creates, per template key.
#[derive(Debug)]
pub(crate) struct PrestartPool {
    ready: Vec<Prestarted>,
    starting: usize,
    /// Tells this pool from one made for the same key after it was removed.
    generation: u64,
}

impl PrestartPool {
    fn new() -> PrestartPool {
        static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        PrestartPool {
            ready: Vec::new(),
            starting: 0,
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.ready.iter().map(|p| p.vm.pid()).collect()
    }

    /// CPU time the ready VMMs' cgroups have used, in seconds (those with a known figure).
    pub(crate) fn cpu_seconds(&self) -> f64 {
        self.ready
            .iter()
            .filter_map(|p| p.resources.cgroup.as_ref()?.usage().cpu_seconds)
            .sum()
    }
}

/// Takes a pre-started VMM for `template` if one is ready and still alive (a warm one's guest
/// may still have stopped answering: the create's first call finds out).
pub(crate) fn take_prestarted(engine: &Arc<Inner>, template: &BakedTemplate) -> Option<Prestarted> {
    loop {
        let mut taken = lock(&engine.prestarted)
            .get_mut(&template.meta.key)?
            .ready
            .pop()?;
        match taken.vm.exited() {
            Ok(None) => return Some(taken),
            Ok(Some(report)) => {
                tracing::warn!(reason = %report.reason, "a pre-started VMM died while waiting");
            }
            Err(e) => tracing::warn!(error = %e, "checking a pre-started VMM"),
        }
    }
}

/// Starts VMMs in the background until `template` has as many waiting as configured; if
/// `open` is false, only for a template that has a pool already (one [`crate::Engine::prestart`]
/// opened: a tenant's templates and snapshots get none).
pub(crate) fn refill(engine: &Arc<Inner>, template: &BakedTemplate, open: bool) {
    // A fork's capture gets its children at once; none come later.
    if template.meta.capture_of.is_some() {
        return;
    }
    let target = engine.config.prestart;
    let key = template.meta.key.clone();
    let generation = {
        let mut pools = lock(&engine.prestarted);
        if engine
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        if !open && !pools.contains_key(&key) {
            return;
        }
        let pool = pools.entry(key.clone()).or_insert_with(PrestartPool::new);
        if pool.ready.len() + pool.starting >= target {
            return;
        }
        pool.starting += 1;
        engine.prestarting.send_modify(|n| *n += 1);
        pool.generation
    };
    let engine = Arc::clone(engine);
    let template = template.clone();
    let warmed = engine.config.warm_prestart;
    tokio::spawn(async move {
        let started = {
            let (engine, template) = (Arc::clone(&engine), template.clone());
            tokio::task::spawn_blocking(move || {
                prestart(&engine, &template, warmed, &mut PhaseTimings::default())
            })
            .await
        };
        // A failed VMM comes back with its error, to be dropped off the async runtime.
        let result = match started {
            Ok(Ok(mut prestarted)) if warmed => {
                match tokio::time::timeout(
                    WARM_UP_TIMEOUT,
                    warm(&engine, &template, &mut prestarted),
                )
                .await
                {
                    Ok(Ok(())) => Ok(prestarted),
                    Ok(Err(e)) => Err((e, Some(prestarted))),
                    Err(_) => Err((
                        EngineError::Boot(format!(
                            "warming the VMM took over {} s",
                            WARM_UP_TIMEOUT.as_secs()
                        )),
                        Some(prestarted),
                    )),
                }
            }
            Ok(Ok(prestarted)) => Ok(prestarted),
            Ok(Err(e)) => Err((e, None)),
            Err(e) => Err((EngineError::Boot(format!("pre-starting a VMM: {e}")), None)),
        };
        let discard = {
            let mut pools = lock(&engine.prestarted);
            // The pool may have gone while this VMM was made (its bake removed; perhaps made
            // again since): then the VMM goes too.
            let pool = pools
                .get_mut(&key)
                .filter(|pool| pool.generation == generation);
            match (pool, result) {
                (Some(pool), Ok(prestarted)) => {
                    pool.starting -= 1;
                    pool.ready.push(prestarted);
                    None
                }
                (None, Ok(prestarted)) => Some(prestarted),
                (pool, Err((e, prestarted))) => {
                    if let Some(pool) = pool {
                        pool.starting -= 1;
                    }
                    tracing::warn!(template = %template.meta.name, error = %crate::error_chain(&e), "pre-starting a VMM");
                    prestarted
                }
            }
        };
        if let Some(prestarted) = discard {
            // Its teardown kills a process and runs tools: blocking work.
            let _ = tokio::task::spawn_blocking(move || drop(prestarted)).await;
        }
        engine.prestarting.send_modify(|n| *n -= 1);
    });
}

/// Removes a half-created sandbox directory unless disarmed.
#[derive(Debug)]
pub(crate) struct DirGuard(Option<PathBuf>);

impl DirGuard {
    /// Removes `dir` when dropped unless disarmed.
    pub(crate) fn new(dir: PathBuf) -> DirGuard {
        DirGuard(Some(dir))
    }

    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
