//! Sandboxes: created by restoring a baked template into a new, confined VMM process with a
//! copy-on-write disk, then reseeded and re-clocked through the agent; watched for crashes
//! and for the end of their time to live.

use std::collections::BTreeMap;
use std::io::{Seek, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_agent_client::{AgentClient, ClientConfig, UnixConnector};
use kiln_proto::messages::{Command, ExecRequest, PostRestoreRequest};
use kiln_vmm::driver::{PhaseTimings, Vm};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use kiln_network::policy::EgressPolicy;

use crate::cgroup::CgroupLimits;
use crate::confine::{default_limits, VmResources, VMM_OVERHEAD_MIB};
use crate::prestart::{prestart, refill, take_prestarted, Prestarted};
use crate::{lock, BakedTemplate, EngineError, Inner};

/// What a sandbox uses, measured on the host (`None`: not measurable now, e.g. CPU and
/// memory while paused, when it has no VMM).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResourceUsage {
    /// CPU time of its VMM (the guest's vCPUs and device emulation), in seconds.
    pub cpu_seconds: Option<f64>,
    /// Memory charged to its VMM's cgroup (guest RAM it touched included), in bytes.
    pub memory_bytes: Option<u64>,
    /// Its memory limit, in bytes.
    pub memory_limit_bytes: Option<u64>,
    /// Space its writable disk takes on the host, in bytes.
    pub disk_bytes: Option<u64>,
    /// Bytes through its network link, if it has one.
    pub network: Option<NetworkUsage>,
}

/// Bytes through a sandbox's link, as the sandbox sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkUsage {
    /// Received by the sandbox.
    pub rx_bytes: u64,
    /// Sent by the sandbox.
    pub tx_bytes: u64,
}

/// Options of a create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Metadata handed to the guest.
    pub metadata: BTreeMap<String, String>,
    /// Run the post-restore call (clock, RNG reseed, identity). Only tests turn this off, to
    /// show what goes wrong without it; such a create takes no warmed VMM (its guest has had
    /// a post-restore call of its own).
    pub post_restore: bool,
    /// Destroy the sandbox this long after it was created.
    pub ttl: Option<Duration>,
    /// CPU quota in cores, at most the template's vCPUs (which a snapshot fixes).
    pub cpus: Option<f64>,
    /// Memory limit of the whole VMM process in MiB, at most the template's memory plus the
    /// VMM's own allowance.
    pub memory_mib: Option<u64>,
    /// Root disk size in MiB, at least the template's (the filesystem is grown to fill it).
    pub disk_mib: Option<u64>,
    /// Egress policy (the network's default if `None`); needs networking.
    pub network: Option<EgressPolicy>,
    /// What happens when its time to live runs out.
    pub on_expiry: OnExpiry,
}

/// What happens to a running sandbox when its time to live runs out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExpiry {
    /// It is destroyed.
    #[default]
    Destroy,
    /// It is paused (and its time to live is cleared: the [`crate::SandboxEvent::Paused`]
    /// event is where a caller sets how long a paused sandbox is kept). A paused or failed
    /// sandbox whose time runs out is destroyed.
    Pause,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            metadata: BTreeMap::new(),
            post_restore: true,
            ttl: None,
            cpus: None,
            memory_mib: None,
            disk_mib: None,
            network: None,
            on_expiry: OnExpiry::Destroy,
        }
    }
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum SandboxState {
    /// Its VM runs.
    Running,
    /// Its memory and device state are being written to disk.
    Pausing,
    /// Its VM is saved on disk: no VMM process, no RAM; its files, processes and network
    /// identity come back on resume.
    Paused,
    /// It is being brought back from disk.
    Resuming,
    /// Its VM ended without being asked to.
    Failed {
        /// What the VMM or the guest console said.
        reason: String,
    },
    /// It was destroyed (by request or because its time to live ran out).
    Destroyed,
}

impl SandboxState {
    /// `running`, `failed` or `destroyed`.
    pub fn name(&self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Resuming => "resuming",
            SandboxState::Failed { .. } => "failed",
            SandboxState::Destroyed => "destroyed",
        }
    }
}

/// A sandbox as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// The template it was restored from.
    pub template: String,
    /// Its state.
    #[serde(flatten)]
    pub state: SandboxState,
    /// VMM process id while it runs.
    pub pid: Option<u32>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
    /// When it will be destroyed, ms since the epoch.
    pub expires_at_ms: Option<u64>,
}

/// What changes over a sandbox's life.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) state: SandboxState,
    pub(crate) vm: Option<Box<dyn Vm>>,
    pub(crate) resources: Option<VmResources>,
}

impl Runtime {
    fn running(vm: Box<dyn Vm>, resources: VmResources) -> Mutex<Runtime> {
        Mutex::new(Runtime {
            state: SandboxState::Running,
            vm: Some(vm),
            resources: Some(resources),
        })
    }

    fn paused(resources: VmResources) -> Mutex<Runtime> {
        Mutex::new(Runtime {
            state: SandboxState::Paused,
            vm: None,
            resources: Some(resources),
        })
    }
}

/// A sandbox.
#[derive(Debug)]
pub struct Sandbox {
    pub(crate) id: String,
    template: String,
    /// The baked template it runs on (what a resume restores into), if still known.
    pub(crate) source: Option<BakedTemplate>,
    /// Its cgroup limits (a resumed VMM gets them again).
    pub(crate) limits: CgroupLimits,
    pub(crate) dir: PathBuf,
    /// The guest console log, as the driver placed it (readable after the VM is gone).
    console_log: PathBuf,
    pub(crate) client: AgentClient,
    timings: PhaseTimings,
    created_at: SystemTime,
    netns: Option<String>,
    /// Its link to the host, if networking is on.
    link: Option<kiln_network::Link>,
    /// The egress policy in force (`None`: no networking).
    egress: Mutex<Option<EgressPolicy>>,
    pub(crate) runtime: Mutex<Runtime>,
    /// Held by a pause, a resume or a destroy for its whole length: one at a time, and a
    /// caller that finds one under way waits for it.
    pub(crate) operation: tokio::sync::Mutex<()>,
    on_expiry: Mutex<OnExpiry>,
    expires_at: watch::Sender<Option<SystemTime>>,
    pub(crate) engine: Weak<Inner>,
}

impl Sandbox {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its agent.
    pub fn agent(&self) -> &AgentClient {
        &self.client
    }

    /// Pid of its VMM process while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.runtime).vm.as_ref().map(|vm| vm.pid())
    }

    /// Its state.
    pub fn state(&self) -> SandboxState {
        lock(&self.runtime).state.clone()
    }

    /// Its directory (disk, sockets, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long each phase of its creation took.
    pub fn timings(&self) -> &PhaseTimings {
        &self.timings
    }

    /// Name of its network namespace.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Its link to the host (its address there: where the daemon reaches its ports), if
    /// networking is on.
    pub fn link(&self) -> Option<kiln_network::Link> {
        self.link
    }

    /// The egress policy in force, if networking is on.
    pub fn egress(&self) -> Option<EgressPolicy> {
        lock(&self.egress).clone()
    }

    /// Replaces its egress policy atomically: new connections follow it at once, and its
    /// established connections to destinations it now denies are cut.
    pub fn set_egress(&self, policy: EgressPolicy) -> Result<(), EngineError> {
        let engine = self
            .engine
            .upgrade()
            .ok_or_else(|| EngineError::Invalid("the engine is shutting down".into()))?;
        let network = engine.network.as_ref().ok_or_else(|| {
            EngineError::Conflict("networking is not enabled on this host".into())
        })?;
        let mut egress = lock(&self.egress);
        {
            let runtime = lock(&self.runtime);
            if runtime.state != SandboxState::Running {
                return Err(EngineError::Conflict(format!(
                    "sandbox `{}` is {}",
                    self.id,
                    runtime.state.name()
                )));
            }
            let ns = runtime
                .resources
                .as_ref()
                .and_then(|r| r.netns.as_ref())
                .ok_or_else(|| {
                    EngineError::Invalid("the sandbox has no network namespace".into())
                })?;
            network.apply(ns, &policy)?;
        }
        *egress = Some(policy);
        Ok(())
    }

    /// Its cgroup directories, while it runs.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        lock(&self.runtime)
            .resources
            .as_ref()
            .and_then(|r| r.cgroup.as_ref())
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default()
    }

    /// What it uses now, measured on the host: its VMM's cgroup (CPU time, memory), its
    /// disk's allocated bytes and, with networking, the bytes through its link. Nothing here
    /// comes from the guest.
    pub fn usage(&self) -> ResourceUsage {
        let cgroup = lock(&self.runtime)
            .resources
            .as_ref()
            .and_then(|r| r.cgroup.as_ref())
            .map(|c| c.usage())
            .unwrap_or_default();
        // The directory is root's; the disk file in it is the one thing the VMM may write,
        // and its allocated size is what it costs the host.
        let disk_bytes = disk_file(&self.dir).and_then(|disk| {
            use std::os::unix::fs::MetadataExt;
            std::fs::symlink_metadata(disk)
                .ok()
                .map(|meta| meta.blocks().saturating_mul(512))
        });
        let network = self.link.and_then(|link| {
            let engine = self.engine.upgrade()?;
            let interface = engine.network.as_ref()?.host_interface(link.slot);
            let statistics = Path::new("/sys/class/net")
                .join(interface)
                .join("statistics");
            let read = |name: &str| {
                std::fs::read_to_string(statistics.join(name))
                    .ok()
                    .and_then(|text| text.trim().parse::<u64>().ok())
            };
            // The host's end: what it receives, the sandbox sent.
            Some(NetworkUsage {
                rx_bytes: read("tx_bytes")?,
                tx_bytes: read("rx_bytes")?,
            })
        });
        // Where the cgroup does not count CPU time (cgroup v1 with cpuacct mounted apart),
        // the VMM process does: it is the cgroup's only process.
        let cpu_seconds = cgroup.cpu_seconds.or_else(|| {
            let pid = self.pid()?;
            Some(crate::procstat::read(Some(pid))?.cpu_seconds)
        });
        ResourceUsage {
            cpu_seconds,
            memory_bytes: cgroup.memory_bytes,
            memory_limit_bytes: cgroup.memory_limit_bytes,
            disk_bytes,
            network,
        }
    }

    /// The user id its VMM runs as, if not the daemon's.
    pub fn vm_uid(&self) -> Option<u32> {
        lock(&self.runtime)
            .resources
            .as_ref()
            .and_then(|r| r.uid.as_ref())
            .map(|u| u.id)
    }

    /// The guest console's last lines (of its last 256 KiB: the guest writes what it likes).
    pub fn console_tail(&self, lines: usize) -> String {
        kiln_vmm::output::console_tail(&self.console_log, lines)
    }

    /// How it is listed.
    pub fn info(&self) -> SandboxInfo {
        let ms = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let runtime = lock(&self.runtime);
        SandboxInfo {
            id: self.id.clone(),
            template: self.template.clone(),
            state: runtime.state.clone(),
            pid: runtime.vm.as_ref().map(|vm| vm.pid()),
            created_at_ms: ms(self.created_at),
            expires_at_ms: self.expires_at.borrow().map(ms),
        }
    }

    /// Sets what happens when its time to live runs out.
    pub fn set_on_expiry(&self, on_expiry: OnExpiry) {
        *lock(&self.on_expiry) = on_expiry;
    }

    /// What happens when its time to live runs out.
    pub fn on_expiry(&self) -> OnExpiry {
        *lock(&self.on_expiry)
    }

    /// Sets (or, with `None`, clears) its time to live, counted from now.
    pub fn set_ttl(&self, ttl: Option<Duration>) {
        self.expires_at
            .send_replace(ttl.map(|ttl| SystemTime::now() + ttl));
    }

    /// Stops the VM and removes everything the sandbox had: its VMM process, its network
    /// namespace, its cgroup and its files. Destroying twice is not an error.
    pub async fn destroy(&self) -> Result<(), EngineError> {
        self.destroy_because(false).await
    }

    async fn destroy_because(&self, expired: bool) -> Result<(), EngineError> {
        let _operation = self.operation.lock().await;
        // Only the first caller tears down; the sandbox stays listed until that is done, so a
        // concurrent destroy finds it (already destroyed) rather than leftovers under a live VM.
        let (vm, resources) = {
            let mut runtime = lock(&self.runtime);
            if runtime.state == SandboxState::Destroyed {
                return Ok(());
            }
            runtime.state = SandboxState::Destroyed;
            (runtime.vm.take(), runtime.resources.take())
        };
        let engine = self.engine.upgrade();
        let result = self.tear_down(vm, resources).await;
        match &result {
            Ok(()) => {
                if let Some(engine) = &engine {
                    lock(&engine.sandboxes).remove(&self.id);
                    if self
                        .source
                        .as_ref()
                        .is_some_and(|s| s.meta.capture_of.is_some() || !s.meta.lower.is_empty())
                    {
                        tokio::task::block_in_place(|| {
                            crate::fork::remove_unused_captures(engine);
                        });
                    }
                    let _ = engine.events.send(crate::SandboxEvent::Destroyed {
                        id: self.id.clone(),
                        expired,
                    });
                }
            }
            // Something could not be released: the sandbox stays listed, failed, saying
            // what; a later destroy tries again by name.
            Err(e) => {
                let reason = format!("could not be destroyed: {}", crate::error_chain(e));
                tracing::warn!(sandbox = %self.id, %reason);
                lock(&self.runtime).state = SandboxState::Failed {
                    reason: reason.clone(),
                };
                if let Some(engine) = &engine {
                    let _ = engine.events.send(crate::SandboxEvent::Failed {
                        id: self.id.clone(),
                        reason,
                    });
                }
            }
        }
        result
    }

    async fn tear_down(
        &self,
        vm: Option<Box<dyn Vm>>,
        resources: Option<VmResources>,
    ) -> Result<(), EngineError> {
        self.client.disconnect().await;
        if let Some(mut vm) = vm {
            vm.kill()?;
        }
        match resources {
            Some(resources) => resources.release()?,
            // A second attempt after a failed one: whatever is left, by name.
            None => {
                if let Some(engine) = self.engine.upgrade() {
                    crate::leftovers::remove_vm_dir(&self.dir, Some(&self.id), &engine)?;
                }
            }
        }
        crate::confine::remove_dir_if_present(&self.dir)
            .map_err(|e| EngineError::io("removing the sandbox directory", e))
    }

    /// Lets the VM run on without this engine (see [`crate::Engine::detach_all`]).
    pub(crate) fn detach(&self) {
        let mut runtime = lock(&self.runtime);
        if let Some(vm) = runtime.vm.take() {
            vm.detach();
        }
        if let Some(resources) = runtime.resources.take() {
            resources.detach();
        }
        runtime.state = SandboxState::Destroyed;
    }

    /// The VMM process ended: mark the sandbox failed (unless it was being destroyed) and free
    /// what only a running VM needs.
    fn vm_exited(&self, pid: u32) {
        let mut runtime = lock(&self.runtime);
        if runtime.state != SandboxState::Running {
            return;
        }
        // An earlier VMM of this sandbox (before a pause) ending late is not news.
        let Some(vm) = runtime.vm.as_mut().filter(|vm| vm.pid() == pid) else {
            return;
        };
        let reason = match vm.exited() {
            Ok(Some(report)) => report.reason,
            // Readable pidfd but not reaped yet cannot happen; be safe anyway.
            Ok(None) => return,
            Err(e) => format!("VMM ended, status unknown: {e}"),
        };
        tracing::warn!(sandbox = %self.id, %reason, "sandbox failed");
        if let Some(engine) = self.engine.upgrade() {
            let _ = engine.events.send(crate::SandboxEvent::Failed {
                id: self.id.clone(),
                reason: reason.clone(),
            });
        }
        runtime.state = SandboxState::Failed { reason };
        runtime.vm = None;
        if let Some(resources) = runtime.resources.take() {
            if let Err(e) = resources.release() {
                tracing::warn!(sandbox = %self.id, error = %e, "releasing a failed sandbox");
            }
        }
    }
}

/// Registers a process descriptor, which becomes readable when its process exits.
fn watch_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd stays open and unchanged until it is dropped together with the
    // AsyncFd that owns it.
    unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)
}

/// Marks `sandbox` failed when its VMM `pid` exits (unless it was asked to).
pub(crate) async fn watch_exit(sandbox: Weak<Sandbox>, exit: AsyncFd<OwnedFd>, pid: u32) {
    if exit.readable().await.is_ok() {
        if let Some(sandbox) = sandbox.upgrade() {
            sandbox.vm_exited(pid);
        }
    }
}

/// Destroys `sandbox` when its time to live runs out (also a failed or paused one: it still
/// holds files).
async fn watch_expiry(sandbox: Weak<Sandbox>, mut expires_at: watch::Receiver<Option<SystemTime>>) {
    loop {
        let deadline = *expires_at.borrow_and_update();
        let expiry = async {
            match deadline {
                Some(at) => {
                    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = expiry => {
                if !expire(&sandbox).await {
                    return;
                }
            }
            changed = expires_at.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Ends `sandbox`'s time to live: destroys it, or pauses it if it runs and asked for that
/// (then returns true: its next time to live is watched).
async fn expire(sandbox: &Weak<Sandbox>) -> bool {
    let Some(sandbox) = sandbox.upgrade() else {
        return false;
    };
    if sandbox.on_expiry() == OnExpiry::Pause && sandbox.state() == SandboxState::Running {
        tracing::info!(sandbox = %sandbox.id, "time to live ran out: pausing");
        sandbox.set_ttl(None);
        match sandbox.pause().await {
            Ok(_) => return true,
            Err(e) => {
                tracing::warn!(sandbox = %sandbox.id, error = %e, "pausing an expired sandbox: destroying it");
            }
        }
    }
    tracing::info!(sandbox = %sandbox.id, "time to live ran out");
    if let Err(e) = sandbox.destroy_because(true).await {
        tracing::warn!(sandbox = %sandbox.id, error = %e, "destroying an expired sandbox");
    }
    false
}

/// The smallest CPU quota a sandbox may ask for, in cores: less would leave a guest too slow
/// to answer at all.
pub const MIN_CPUS: f64 = 0.1;

/// The least memory a sandbox's VMM may be limited to beyond its guest's, in MiB.
pub const MIN_VMM_MIB: u64 = 64;

/// What a sandbox holds of the host, as its create asked for it or its template gives it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Resources {
    /// CPU quota, in cores.
    pub cpus: f64,
    /// Memory limit of its VMM (guest RAM and the VMM's own), in MiB.
    pub memory_mib: u64,
    /// Size of its root disk, in MiB.
    pub disk_mib: u64,
}

/// What a sandbox of `template` created with `options` would hold, or why `options` are not
/// valid for it.
pub fn resources_for(
    template: &BakedTemplate,
    options: &CreateOptions,
) -> Result<Resources, EngineError> {
    let limits = limits_for(template, options)?;
    Ok(Resources {
        cpus: limits.cpus,
        memory_mib: limits.memory_mib,
        disk_mib: options
            .disk_mib
            .unwrap_or_else(|| template.meta.disk_bytes.div_ceil(1 << 20)),
    })
}

/// Checks a create's resource requests against the template.
fn limits_for(
    template: &BakedTemplate,
    options: &CreateOptions,
) -> Result<CgroupLimits, EngineError> {
    let mut limits = default_limits(&template.meta.machine);
    if let Some(cpus) = options.cpus {
        if !(MIN_CPUS..=limits.cpus).contains(&cpus) {
            return Err(EngineError::Invalid(format!(
                "cpus must be at least {MIN_CPUS} and at most the template's {} vCPUs (got {cpus})",
                limits.cpus
            )));
        }
        limits.cpus = cpus;
    }
    if let Some(memory) = options.memory_mib {
        // Below the guest's memory plus the VMM's own, a VMM that must hold all of the
        // guest's memory (a resume loads it whole) is killed by its limit.
        let least = u64::from(template.meta.machine.memory_mib) + MIN_VMM_MIB;
        if !(least..=limits.memory_mib).contains(&memory) {
            return Err(EngineError::Invalid(format!(
                "memory_mib must be between {least} and {} (the template's {} MiB plus {MIN_VMM_MIB} to {VMM_OVERHEAD_MIB} MiB for the VMM; got {memory})",
                limits.memory_mib, template.meta.machine.memory_mib
            )));
        }
        limits.memory_mib = memory;
    }
    if let Some(disk) = options.disk_mib {
        let template_mib = template.meta.disk_bytes.div_ceil(1 << 20);
        if template.meta.disk_bytes == 0 || disk < template_mib || disk > 1 << 20 {
            return Err(EngineError::Invalid(format!(
                "disk_mib must be between the template's {template_mib} MiB and 1 TiB (got {disk})"
            )));
        }
    }
    Ok(limits)
}

/// Lists `sandbox` in the engine and starts watching its VMM (`exit`, if it has one
/// running) and its time to live.
fn register(
    engine: &Arc<Inner>,
    sandbox: Sandbox,
    exit: Option<(AsyncFd<OwnedFd>, u32)>,
) -> Arc<Sandbox> {
    let expiry = sandbox.expires_at.subscribe();
    let sandbox = Arc::new(sandbox);
    lock(&engine.sandboxes).insert(sandbox.id.clone(), sandbox.clone());
    if let Some((exit, pid)) = exit {
        tokio::spawn(watch_exit(Arc::downgrade(&sandbox), exit, pid));
    }
    tokio::spawn(watch_expiry(Arc::downgrade(&sandbox), expiry));
    sandbox
}

/// A process descriptor of VMM `pid`, to watch for its exit.
pub(crate) fn exit_watch(pid: u32) -> Result<(AsyncFd<OwnedFd>, u32), EngineError> {
    kiln_vmm::pidfd::open(pid)
        .and_then(watch_fd)
        .map(|fd| (fd, pid))
        .map_err(|e| EngineError::io("watching the VMM process", e))
}

/// A sandbox of an earlier run to take over (what the daemon recorded about it).
#[derive(Debug, Clone)]
pub struct AdoptRequest {
    /// Its id.
    pub id: String,
    /// Its template.
    pub template: String,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
    /// When it expires, ms since the epoch.
    pub expires_at_ms: Option<u64>,
    /// The egress policy it had (its namespace still holds it).
    pub egress: Option<EgressPolicy>,
    /// What happens when its time to live runs out.
    pub on_expiry: OnExpiry,
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Takes over a sandbox of an earlier run: its VMM if it still runs, or its saved state if
/// it was paused (also a pause finished just before the daemon died, whatever its record
/// says; a VMM left from a resume that had not run the guest yet is ended).
pub(crate) async fn adopt(
    engine: &Arc<Inner>,
    request: AdoptRequest,
) -> Result<Arc<Sandbox>, EngineError> {
    let id = request.id.clone();
    let dir = engine.config.data_dir.join("sandboxes").join(&id);
    let recorded = crate::leftovers::read_pid_file(&dir);
    if let Some((_, _, name)) = &recorded {
        if *name != id {
            return Err(EngineError::Invalid(format!(
                "the VMM recorded in {} is not `{id}`'s",
                dir.display()
            )));
        }
    }
    let source = crate::pause::read_sandbox_file(engine, &dir);
    let (runtime, exit, mut resources) = if crate::pause::is_paused(&dir) {
        if let Some((pid, ticks, _)) = recorded {
            crate::leftovers::kill_if_same(pid, ticks, Duration::from_secs(10));
        }
        let mut resources = VmResources::existing(engine, &id, None);
        resources.release_vmm()?;
        (None, None, resources)
    } else {
        let (pid, ticks, _) =
            recorded.ok_or_else(|| EngineError::Invalid(format!("no VMM recorded for `{id}`")))?;
        let mut vm = engine.driver.adopt(&dir.join("run"), pid, ticks)?;
        let exit = match kiln_vmm::pidfd::open_if_same(pid, ticks) {
            Ok(fd) => watch_fd(fd).map_err(|e| EngineError::io("watching the VMM process", e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::Invalid(format!(
                    "the VMM of `{id}` just ended"
                )))
            }
            Err(e) => return Err(EngineError::io("watching the VMM process", e)),
        };
        crate::pause::continue_unfinished(&dir, vm.as_mut())?;
        let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status.lines().find_map(|line| {
                    line.strip_prefix("Uid:")
                        .and_then(|v| v.split_whitespace().next())
                        .and_then(|v| v.parse().ok())
                })
            })
            .and_then(|uid| engine.claim_uid(uid));
        let resources = VmResources::existing(engine, &id, uid);
        (Some(vm), Some((exit, pid)), resources)
    };
    let (source, limits) = match source {
        Ok((template, limits)) => (Some(template), limits),
        // A paused sandbox without its template cannot come back.
        Err(e) if runtime.is_none() => return Err(e),
        Err(e) => {
            tracing::warn!(sandbox = %id, error = %e, "its template is unknown: it cannot be paused");
            let unknown = CgroupLimits {
                cpus: 1.0,
                memory_mib: VMM_OVERHEAD_MIB,
            };
            (None, unknown)
        }
    };
    if let Some(network) = &engine.network {
        let policy = request
            .egress
            .clone()
            .unwrap_or_else(|| network.default_policy());
        resources.adopt_link(network, &policy)?;
    }
    let (agent_socket, console_log) = engine.driver.run_files(&dir.join("run"));
    let client = AgentClient::new(
        Arc::new(UnixConnector::new(agent_socket)),
        ClientConfig {
            hello_interval: Duration::from_millis(50),
            handshake_timeout: Duration::from_secs(30),
            call_timeout: engine.config.agent_call_timeout,
            keepalive: keepalive(engine),
            ..ClientConfig::default()
        },
    );
    let paused = runtime.is_none();
    let runtime = match runtime {
        Some(vm) => {
            if let Err(e) = client.connect().await {
                return Err(EngineError::Invalid(format!(
                    "its agent did not answer: {e}; VMM: {}; console:\n{}",
                    vm.diagnostics(),
                    vm.console_tail(20)
                )));
            }
            Runtime::running(vm, resources)
        }
        None => Runtime::paused(resources),
    };
    let (netns, link) = {
        let held = lock(&runtime);
        let resources = held.resources.as_ref();
        (
            resources.and_then(|r| r.netns.as_ref().map(|ns| ns.name().to_owned())),
            resources.and_then(|r| r.link.as_ref().map(|(_, link)| *link)),
        )
    };
    let egress = match link {
        Some(_) => request.egress.clone().or_else(|| engine.default_egress()),
        None => None,
    };
    let expires_at = watch::Sender::new(request.expires_at_ms.map(from_ms));
    let sandbox = register(
        engine,
        Sandbox {
            id: id.clone(),
            template: request.template,
            source,
            limits,
            dir,
            console_log,
            client,
            timings: PhaseTimings::default(),
            created_at: from_ms(request.created_at_ms),
            netns,
            link,
            egress: Mutex::new(egress),
            runtime,
            operation: tokio::sync::Mutex::new(()),
            on_expiry: Mutex::new(request.on_expiry),
            expires_at,
            engine: Arc::downgrade(engine),
        },
        exit,
    );
    tracing::info!(sandbox = %id, paused, "re-adopted");
    Ok(sandbox)
}

/// The keep-alive of a sandbox's agent session: a peer that stops answering in the middle
/// of a stream (where no call timeout applies) is dropped within the agent call timeout.
fn keepalive(engine: &Inner) -> Duration {
    engine.config.agent_call_timeout / 2
}

/// A create (or a bake) in flight, counted until dropped so that a stopping engine waits for
/// it before it lists its sandboxes for the last time ([`crate::Engine::stop_creating`]).
pub(crate) struct Creating<'a>(&'a Inner);

impl Creating<'_> {
    /// Counts a create or bake, unless the engine no longer makes sandboxes.
    pub(crate) fn enter(engine: &Inner) -> Result<Creating<'_>, EngineError> {
        let admitted = engine.creating.send_if_modified(|n| {
            let open = !engine.closed.load(std::sync::atomic::Ordering::SeqCst);
            if open {
                *n += 1;
            }
            open
        });
        if admitted {
            Ok(Creating(engine))
        } else {
            Err(EngineError::Stopping)
        }
    }
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.0.creating.send_modify(|n| *n -= 1);
    }
}

/// Restores `template` into a new sandbox.
pub(crate) async fn create(
    engine: &Arc<Inner>,
    template: &BakedTemplate,
    options: CreateOptions,
) -> Result<Arc<Sandbox>, EngineError> {
    let _creating = Creating::enter(engine)?;
    match create_from(engine, template, &options, true).await {
        Ok(sandbox) => Ok(sandbox),
        Err(Attempt::Failed(e)) => Err(e),
        Err(Attempt::WarmGuestFailed(e)) => {
            tracing::warn!(template = %template.meta.name, error = %crate::error_chain(&e), "a warmed guest failed its create: creating without it");
            match create_from(engine, template, &options, false).await {
                Ok(sandbox) => Ok(sandbox),
                Err(Attempt::Failed(e) | Attempt::WarmGuestFailed(e)) => Err(e),
            }
        }
    }
}

/// Why a create failed: a warmed guest that failed its first call is worth a retry without
/// one (its VMM went with it).
enum Attempt {
    Failed(EngineError),
    WarmGuestFailed(EngineError),
}

impl<E: Into<EngineError>> From<E> for Attempt {
    fn from(e: E) -> Attempt {
        Attempt::Failed(e.into())
    }
}

/// A create, from a pre-started VMM if `pooled` and one is ready.
async fn create_from(
    engine: &Arc<Inner>,
    template: &BakedTemplate,
    options: &CreateOptions,
    pooled: bool,
) -> Result<Arc<Sandbox>, Attempt> {
    let limits = limits_for(template, options)?;
    let egress =
        match (&engine.network, &options.network) {
            (Some(network), Some(policy)) => {
                network.check(policy)?;
                Some(policy.clone())
            }
            (Some(network), None) => Some(network.default_policy()),
            (None, Some(_)) => return Err(EngineError::Conflict(
                "networking is not enabled on this host: a create may not ask for a network policy"
                    .into(),
            )
            .into()),
            (None, None) => None,
        };
    crate::space::admit(engine, crate::space::NEW_SANDBOX_BYTES, "create a sandbox")?;
    // Not collected as an unused bake while a sandbox is being made from it.
    let _pin = crate::fork::Pin::new(engine, &template.dir);
    let started = Instant::now();
    let mut timings = PhaseTimings::default();
    let mut phase = Instant::now();
    let pooled = pooled && options.post_restore;
    let mut slot = match pooled.then(|| take_prestarted(engine, template)).flatten() {
        Some(prestarted) => {
            let name = match prestarted.guest {
                Some(_) => "take warmed VMM",
                None => "take pre-started VMM",
            };
            record(&mut timings, name, &mut phase);
            prestarted
        }
        None => tokio::task::block_in_place(|| prestart(engine, template, false, &mut timings))?,
    };
    phase = Instant::now();
    // Dropped whole on an error below: the VMM dies before its resources and directory go.
    if limits != default_limits(&template.meta.machine) {
        if let Some(cgroup) = &slot.resources.cgroup {
            cgroup.set_limits(limits)?;
        }
    }
    // The pre-started VMM's namespace is wired with the default policy: another one is put
    // in force before the guest runs as the sandbox.
    if let (Some(network), Some(policy), Some(ns)) =
        (&engine.network, &egress, slot.resources.netns.as_ref())
    {
        if *policy != network.default_policy() {
            tokio::task::block_in_place(|| network.apply(ns, policy))?;
        }
    }
    if slot.guest.is_some() {
        if let Some(cgroup) = &slot.resources.cgroup {
            cgroup.set_background(false)?;
        }
        // Its share of the disk space as of now (it got one when it was warmed).
        hold_space(engine, &slot);
    }
    let exit = exit_watch(slot.vm.pid())?;
    crate::pause::write_sandbox_file(&slot.dir, template, limits)?;
    record(&mut timings, "limits", &mut phase);
    let (client, warmed) = match slot.guest.take() {
        Some(client) => (client, true),
        None => (
            restore_guest(engine, template, &mut slot, &mut timings).await?,
            false,
        ),
    };
    phase = Instant::now();
    if options.post_restore {
        let request = identity(&slot.id, Some(&options.metadata));
        let call = client.post_restore(&request);
        if warmed {
            // A warmed guest that stopped answering while it waited is not worth the call's
            // whole timeout: a fresh VMM is.
            match tokio::time::timeout(WARMED_ANSWER, call).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Attempt::WarmGuestFailed(e.into())),
                Err(_) => {
                    return Err(Attempt::WarmGuestFailed(EngineError::Boot(format!(
                        "the warmed guest did not answer its post-restore call in {} s",
                        WARMED_ANSWER.as_secs()
                    ))))
                }
            }
        } else {
            call.await?;
        }
        record(&mut timings, "post-restore", &mut phase);
    }
    // A warmed guest's link opens once it is the sandbox (its own entropy and name).
    if warmed {
        if let Some((network, link)) = &slot.resources.link {
            network.hold(*link, false)?;
            record(&mut timings, "open link", &mut phase);
        }
    }
    if let Some(disk_mib) = options.disk_mib {
        grow_disk(slot.vm.as_mut(), &client, disk_mib).await?;
        record(&mut timings, "grow disk", &mut phase);
    }
    timings
        .phases
        .push(("total".into(), started.elapsed().as_secs_f64() * 1000.0));
    let Prestarted {
        id,
        dir,
        vm,
        resources,
        cleanup,
        ..
    } = slot;
    cleanup.disarm();
    let netns = resources.netns.as_ref().map(|ns| ns.name().to_owned());
    let link = resources.link.as_ref().map(|(_, link)| *link);
    let expires_at = watch::Sender::new(options.ttl.map(|ttl| SystemTime::now() + ttl));
    let sandbox = register(
        engine,
        Sandbox {
            id: id.clone(),
            template: template.meta.name.clone(),
            source: Some(template.clone()),
            limits,
            dir,
            console_log: vm.console_log(),
            client,
            timings,
            created_at: SystemTime::now(),
            netns,
            link,
            egress: Mutex::new(egress),
            runtime: Runtime::running(vm, resources),
            operation: tokio::sync::Mutex::new(()),
            on_expiry: Mutex::new(options.on_expiry),
            expires_at,
            engine: Arc::downgrade(engine),
        },
        Some(exit),
    );
    let _ = engine.events.send(crate::SandboxEvent::Created {
        id,
        template: template.meta.name.clone(),
    });
    // The next create's VMM is started once this sandbox's first moments (its first command,
    // usually) are past, so that it does not compete with them for the CPU.
    let (engine, template) = (Arc::clone(engine), template.clone());
    tokio::spawn(async move {
        tokio::time::sleep(REFILL_DELAY).await;
        refill(&engine, &template, false);
    });
    Ok(sandbox)
}

/// How long after a create the next one's VMM is started (measured with `kiln bench tti`:
/// started at once, it took about 30 ms from the sandbox's create and first command on a
/// 2-core host).
const REFILL_DELAY: Duration = Duration::from_millis(300);

/// How long a warmed guest has to answer the create's post-restore call before the create
/// gives up on it and starts a fresh VMM.
const WARMED_ANSWER: Duration = Duration::from_secs(10);

/// What a restored guest is told to become sandbox `id`: the host's clock, fresh entropy,
/// its name and the create's metadata.
pub(crate) fn identity(
    id: &str,
    metadata: Option<&BTreeMap<String, String>>,
) -> PostRestoreRequest {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut entropy = [0u8; 64];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut entropy);
    PostRestoreRequest {
        wall_clock_ns: now,
        entropy_hex: hex::encode(entropy),
        hostname: Some(id.to_owned()),
        metadata: metadata.cloned(),
    }
}

/// Gives `slot`'s VMM its share of the sandboxes' disk space (see [`crate::space`]).
fn hold_space(engine: &Inner, slot: &Prestarted) {
    let vmm = crate::space::Vmm {
        pid: slot.vm.pid(),
        run_as: slot.resources.run_as(),
    };
    crate::space::hold(engine, vmm, &slot.dir);
}

/// Loads `template`'s device state into `slot`'s waiting VMM, lets the guest run and connects
/// to its agent.
pub(crate) async fn restore_guest(
    engine: &Arc<Inner>,
    template: &BakedTemplate,
    slot: &mut Prestarted,
    timings: &mut PhaseTimings,
) -> Result<AgentClient, EngineError> {
    let mut phase = Instant::now();
    hold_space(engine, slot);
    // The verified bytes go to the VMM through an anonymous file: what was checked is what
    // loads.
    let state = template.read_state()?;
    let mut state_file = tempfile::tempfile_in(&slot.dir)
        .map_err(|e| EngineError::io("staging the device state", e))?;
    state_file
        .write_all(&state)
        .and_then(|()| state_file.rewind())
        .map_err(|e| EngineError::io("staging the device state", e))?;
    record(timings, "state", &mut phase);
    if let Some(delta) = template.read_ram_delta(false)? {
        // Before the VMM reads any saved state: root writes into a process that has run
        // nothing but its own start-up.
        tokio::task::block_in_place(|| delta.inject(slot.vm.pid(), &template.memory()))
            .map_err(|e| EngineError::io("writing the capture's changed pages into the VMM", e))?;
        record(timings, "changed pages", &mut phase);
    }
    let restore = tokio::task::block_in_place(|| slot.vm.restore(&state_file))?;
    timings.phases.extend(restore.phases);
    phase = Instant::now();
    let client = AgentClient::new(
        Arc::new(UnixConnector::new(slot.vm.agent_socket())),
        ClientConfig {
            hello_interval: Duration::from_millis(20),
            handshake_timeout: Duration::from_secs(30),
            call_timeout: engine.config.agent_call_timeout,
            keepalive: keepalive(engine),
            ..ClientConfig::default()
        },
    );
    if let Err(e) = client.connect().await {
        return Err(EngineError::Boot(format!(
            "restored agent did not answer: {e}; VMM: {}; console:\n{}",
            slot.vm.diagnostics(),
            slot.vm.console_tail(20)
        )));
    }
    record(timings, "agent handshake", &mut phase);
    Ok(client)
}

/// The disk file a sandbox's VMM writes, in the sandbox's directory `dir` (a qcow2 layer, or
/// a reflinked raw image); not followed through a link.
pub(crate) fn disk_file(dir: &Path) -> Option<PathBuf> {
    ["disk.qcow2", "disk.raw"]
        .iter()
        .map(|name| dir.join(name))
        .find(|path| std::fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file()))
}

/// Grows the root disk to `disk_mib` and the guest's filesystem with it.
async fn grow_disk(
    vm: &mut dyn Vm,
    client: &AgentClient,
    disk_mib: u64,
) -> Result<(), EngineError> {
    tokio::task::block_in_place(|| vm.resize_root_disk(disk_mib << 20))?;
    let result = client
        .run(
            ExecRequest::new(Command::Argv(vec!["resize2fs".into(), "/dev/vda".into()])),
            16 << 10,
        )
        .await?;
    if result.status.code != Some(0) {
        return Err(EngineError::Boot(format!(
            "growing the guest filesystem failed: {}",
            String::from_utf8_lossy(&result.stderr).trim()
        )));
    }
    Ok(())
}

pub(crate) fn record(timings: &mut PhaseTimings, name: &str, since: &mut Instant) {
    timings
        .phases
        .push((name.to_owned(), since.elapsed().as_secs_f64() * 1000.0));
    *since = Instant::now();
}
