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
use kiln_vmm::driver::{Confinement, DiskFormat, DiskLayer, MemoryBacking, PhaseTimings, Vm};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::bake::MachineShape;
use crate::cgroup::{CgroupLimits, SandboxCgroup};
use crate::{lock, BakedTemplate, EngineError, Inner, VmUid};

/// Memory the VMM process may use beyond the guest's RAM (its own heap, device buffers and,
/// under TCG, translated code).
const VMM_OVERHEAD_MIB: u64 = 256;

/// Options of a create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Metadata handed to the guest.
    pub metadata: BTreeMap<String, String>,
    /// Run the post-restore call (clock, RNG reseed, identity). Only tests turn this off, to
    /// show what goes wrong without it.
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
        }
    }
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum SandboxState {
    /// Its VM runs.
    Running,
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

/// Host resources a VMM runs in; released on drop (best effort) or by [`VmResources::release`].
#[derive(Debug)]
pub(crate) struct VmResources {
    netns: Option<kiln_net::netns::NetNs>,
    cgroup: Option<SandboxCgroup>,
    uid: Option<VmUid>,
}

impl VmResources {
    /// The resources that VM `name` of an earlier run left (its namespace and cgroup, if they
    /// exist), with the uid it runs as, if known.
    pub(crate) fn existing(
        cgroups: Option<&crate::cgroup::Cgroups>,
        name: &str,
        uid: Option<VmUid>,
    ) -> VmResources {
        VmResources {
            netns: kiln_net::netns::NetNs::existing(&netns_name(name)),
            cgroup: cgroups.and_then(|c| c.existing(name)),
            uid,
        }
    }

    /// Hands `paths` to the VMM's user, readable and writable by it alone: the files it
    /// writes (its own disk; a bake's memory file). It runs unprivileged from its first
    /// instruction, so it opens them with its own rights.
    pub(crate) fn grant(&self, paths: &[&Path]) -> Result<(), EngineError> {
        use std::os::unix::fs::PermissionsExt;
        for path in paths {
            let owner = self.uid.as_ref().map(|uid| uid.id);
            std::os::unix::fs::chown(path, owner, owner)
                .and_then(|()| {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                })
                .map_err(|e| {
                    EngineError::io(&format!("handing {} to the VMM user", path.display()), e)
                })?;
        }
        Ok(())
    }

    /// The user and group its processes run as, if not root.
    pub(crate) fn run_as(&self) -> Option<(u32, u32)> {
        self.uid.as_ref().map(|uid| (uid.id, uid.id))
    }

    /// Its cgroups' `cgroup.procs` files, for another process to join.
    pub(crate) fn cgroup_procs(&self) -> Result<Vec<OwnedFd>, EngineError> {
        Ok(match &self.cgroup {
            Some(cgroup) => cgroup.procs_files()?,
            None => Vec::new(),
        })
    }

    /// Removes the network namespace and the cgroup, and gives the uid back. The VMM process
    /// must be gone.
    pub(crate) fn release(mut self) -> Result<(), EngineError> {
        self.release_now()
    }

    /// Leaves the namespace and cgroup in place for a later run of the daemon.
    fn detach(mut self) {
        if let Some(netns) = self.netns.take() {
            netns.detach();
        }
        self.cgroup = None;
    }

    fn release_now(&mut self) -> Result<(), EngineError> {
        let mut first_error = None;
        if let Some(netns) = self.netns.take() {
            if let Err(e) = netns.remove() {
                first_error.get_or_insert(EngineError::io("removing the network namespace", e));
            }
        }
        if let Some(cgroup) = self.cgroup.take() {
            if let Err(e) = cgroup.remove() {
                first_error.get_or_insert(e.into());
            }
        }
        self.uid = None;
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for VmResources {
    fn drop(&mut self) {
        if let Err(e) = self.release_now() {
            tracing::warn!(error = %e, "releasing a VM's resources");
        }
    }
}

/// The limits a template's VM gets unless a create asks for less.
pub(crate) fn default_limits(shape: &MachineShape) -> CgroupLimits {
    CgroupLimits {
        cpus: f64::from(shape.vcpus),
        memory_mib: u64::from(shape.memory_mib) + VMM_OVERHEAD_MIB,
    }
}

/// Makes the network namespace (with the guest's tap), the cgroup and the uid of VM `name`,
/// and the confinement that hands them to the driver.
pub(crate) fn confine(
    engine: &Arc<Inner>,
    name: &str,
    limits: CgroupLimits,
    writable: &[&Path],
) -> Result<(Confinement, VmResources), EngineError> {
    let mut resources = VmResources {
        netns: None,
        cgroup: None,
        uid: engine.take_uid()?,
    };
    let ns = kiln_net::netns::NetNs::create(&netns_name(name))
        .map_err(|e| EngineError::io("creating the network namespace", e))?;
    let tap = kiln_net::tap::create_tap(&ns).map_err(|e| EngineError::io("creating the tap", e))?;
    let netns = ns
        .open()
        .map_err(|e| EngineError::io("opening the network namespace", e))?;
    resources.netns = Some(ns);
    let mut cgroups = Vec::new();
    if let Some(hierarchy) = &engine.cgroups {
        let cgroup = hierarchy.create(name, limits)?;
        cgroups = cgroup.procs_files()?;
        resources.cgroup = Some(cgroup);
    }
    resources.grant(writable)?;
    Ok((
        Confinement {
            netns: Some(netns),
            tap: Some(tap),
            cgroups,
            run_as: resources.uid.as_ref().map(|uid| (uid.id, uid.id)),
            seccomp: engine.config.confinement.seccomp,
        },
        resources,
    ))
}

/// Removes `dir` and everything in it; one that is already gone is fine.
pub(crate) fn remove_dir_if_present(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Launches a VMM and records it (pid, start time, name) in `dir`, so that a later run finds
/// it whatever happens to this one.
pub(crate) fn launch_recorded(
    engine: &Arc<Inner>,
    spec: kiln_vmm::driver::VmSpec,
    confinement: Confinement,
    dir: &Path,
    name: &str,
) -> Result<Box<dyn Vm>, EngineError> {
    let vm = engine.driver.launch(spec, confinement)?;
    crate::leftovers::write_pid_file(dir, vm.pid(), name)
        .map_err(|e| EngineError::io("recording the VMM", e))?;
    Ok(vm)
}

/// What changes over a sandbox's life.
#[derive(Debug)]
struct Runtime {
    state: SandboxState,
    vm: Option<Box<dyn Vm>>,
    resources: Option<VmResources>,
}

impl Runtime {
    fn running(vm: Box<dyn Vm>, resources: VmResources) -> Mutex<Runtime> {
        Mutex::new(Runtime {
            state: SandboxState::Running,
            vm: Some(vm),
            resources: Some(resources),
        })
    }
}

/// A sandbox.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    template: String,
    dir: PathBuf,
    /// The guest console log, as the driver placed it (readable after the VM is gone).
    console_log: PathBuf,
    client: AgentClient,
    timings: PhaseTimings,
    created_at: SystemTime,
    netns: Option<String>,
    runtime: Mutex<Runtime>,
    expires_at: watch::Sender<Option<SystemTime>>,
    engine: Weak<Inner>,
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

    /// Its cgroup directories, while it runs.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        lock(&self.runtime)
            .resources
            .as_ref()
            .and_then(|r| r.cgroup.as_ref())
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default()
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
        if let Some(engine) = &engine {
            let _ = engine.events.send(crate::SandboxEvent::Destroyed {
                id: self.id.clone(),
                expired,
            });
        }
        let result = self.tear_down(vm, resources).await;
        if let Some(engine) = &engine {
            lock(&engine.sandboxes).remove(&self.id);
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
        if let Some(resources) = resources {
            resources.release()?;
        }
        remove_dir_if_present(&self.dir)
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
    fn vm_exited(&self) {
        let mut runtime = lock(&self.runtime);
        if runtime.state != SandboxState::Running {
            return;
        }
        let Some(vm) = runtime.vm.as_mut() else {
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

fn new_id() -> String {
    let bytes: [u8; 6] = rand::random();
    format!("sb-{}", hex::encode(bytes))
}

/// The network namespace of the VM named `name`.
pub(crate) fn netns_name(name: &str) -> String {
    format!("kiln-{name}")
}

/// Registers a process descriptor, which becomes readable when its process exits.
fn watch_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd stays open and unchanged until it is dropped together with the
    // AsyncFd that owns it.
    unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)
}

/// Watches one sandbox: marks it failed when its VMM exits, destroys it when its time to
/// live runs out.
async fn watch_sandbox(
    sandbox: Weak<Sandbox>,
    exit: AsyncFd<OwnedFd>,
    mut expires_at: watch::Receiver<Option<SystemTime>>,
) {
    // A failed sandbox still holds files, so its time to live is watched on after its VMM
    // exits (the descriptor stays readable from then on, hence the flag).
    let mut exited = false;
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
            _ = exit.readable(), if !exited => {
                exited = true;
                if let Some(sandbox) = sandbox.upgrade() {
                    sandbox.vm_exited();
                }
            }
            () = expiry => {
                expire(&sandbox).await;
                return;
            }
            changed = expires_at.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

async fn expire(sandbox: &Weak<Sandbox>) {
    if let Some(sandbox) = sandbox.upgrade() {
        tracing::info!(sandbox = %sandbox.id, "time to live ran out");
        if let Err(e) = sandbox.destroy_because(true).await {
            tracing::warn!(sandbox = %sandbox.id, error = %e, "destroying an expired sandbox");
        }
    }
}

/// Checks a create's resource requests against the template.
fn limits_for(
    template: &BakedTemplate,
    options: &CreateOptions,
) -> Result<CgroupLimits, EngineError> {
    let mut limits = default_limits(&template.meta.machine);
    if let Some(cpus) = options.cpus {
        if !(cpus > 0.0 && cpus <= limits.cpus) {
            return Err(EngineError::Invalid(format!(
                "cpus must be more than 0 and at most the template's {} vCPUs (got {cpus})",
                limits.cpus
            )));
        }
        limits.cpus = cpus;
    }
    if let Some(memory) = options.memory_mib {
        if !(64..=limits.memory_mib).contains(&memory) {
            return Err(EngineError::Invalid(format!(
                "memory_mib must be between 64 and {} (the template's {} MiB plus {VMM_OVERHEAD_MIB} MiB for the VMM; got {memory})",
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

/// A VMM started ahead of a create: confined, with the sandbox's directory and disk, waiting
/// for the template's device state. It holds no guest state (no guest code has run).
#[derive(Debug)]
pub(crate) struct Prestarted {
    id: String,
    dir: PathBuf,
    vm: Box<dyn Vm>,
    resources: VmResources,
    // Declared last: the directory goes after the VMM using it.
    cleanup: DirGuard,
}

/// Starts a VMM for `template` that waits for its device state (blocking).
pub(crate) fn prestart(
    engine: &Arc<Inner>,
    template: &BakedTemplate,
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
    // Only the disk is the VMM user's: the directory, its pid record, sockets and console
    // log stay root's, and outside the VMM's jail.
    let (confinement, resources) = confine(
        engine,
        &id,
        default_limits(&template.meta.machine),
        &[&disk],
    )?;
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
        cleanup,
    })
}

/// VMMs started ahead of creates, per template key.
#[derive(Debug, Default)]
pub(crate) struct PrestartPool {
    ready: Vec<Prestarted>,
    starting: usize,
}

impl PrestartPool {
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.ready.iter().map(|p| p.vm.pid()).collect()
    }
}

/// Takes a pre-started VMM for `template` if one is ready and still alive.
fn take_prestarted(engine: &Arc<Inner>, template: &BakedTemplate) -> Option<Prestarted> {
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

/// Starts VMMs in the background until `template` has as many waiting as configured.
pub(crate) fn refill(engine: &Arc<Inner>, template: &BakedTemplate) {
    let target = engine.config.prestart;
    let key = template.meta.key.clone();
    {
        let mut pools = lock(&engine.prestarted);
        if engine
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let pool = pools.entry(key.clone()).or_default();
        if pool.ready.len() + pool.starting >= target {
            return;
        }
        pool.starting += 1;
        engine.prestarting.send_modify(|n| *n += 1);
    }
    let engine = Arc::clone(engine);
    let template = template.clone();
    tokio::task::spawn_blocking(move || {
        let result = prestart(&engine, &template, &mut PhaseTimings::default());
        {
            let mut pools = lock(&engine.prestarted);
            let pool = pools.entry(key).or_default();
            pool.starting -= 1;
            match result {
                Ok(prestarted) => pool.ready.push(prestarted),
                Err(e) => {
                    tracing::warn!(template = %template.meta.name, error = %e, "pre-starting a VMM");
                }
            }
        }
        engine.prestarting.send_modify(|n| *n -= 1);
    });
}

/// Lists `sandbox` in the engine and starts watching its VMM and its time to live.
fn register(engine: &Arc<Inner>, sandbox: Sandbox, exit: AsyncFd<OwnedFd>) -> Arc<Sandbox> {
    let expiry = sandbox.expires_at.subscribe();
    let sandbox = Arc::new(sandbox);
    lock(&engine.sandboxes).insert(sandbox.id.clone(), sandbox.clone());
    tokio::spawn(watch_sandbox(Arc::downgrade(&sandbox), exit, expiry));
    sandbox
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
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Takes over a sandbox of an earlier run whose VMM still runs.
pub(crate) async fn adopt(
    engine: &Arc<Inner>,
    request: AdoptRequest,
) -> Result<Arc<Sandbox>, EngineError> {
    let id = request.id.clone();
    let dir = engine.config.data_dir.join("sandboxes").join(&id);
    let (pid, ticks, name) = crate::leftovers::read_pid_file(&dir)
        .ok_or_else(|| EngineError::Invalid(format!("no VMM recorded for `{id}`")))?;
    if name != id {
        return Err(EngineError::Invalid(format!(
            "the VMM recorded in {} is not `{id}`'s",
            dir.display()
        )));
    }
    let vm = engine.driver.adopt(&dir.join("run"), pid, ticks)?;
    let exit = match kiln_vmm::pidfd::open_if_same(pid, ticks) {
        Ok(fd) => watch_fd(fd).map_err(|e| EngineError::io("watching the VMM process", e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EngineError::Invalid(format!(
                "the VMM of `{id}` just ended"
            )))
        }
        Err(e) => return Err(EngineError::io("watching the VMM process", e)),
    };
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
    let resources = VmResources::existing(engine.cgroups.as_ref(), &id, uid);
    let client = AgentClient::new(
        Arc::new(UnixConnector::new(vm.agent_socket())),
        ClientConfig {
            hello_interval: Duration::from_millis(50),
            handshake_timeout: Duration::from_secs(10),
            ..ClientConfig::default()
        },
    );
    client.connect().await?;
    let netns = resources.netns.as_ref().map(|ns| ns.name().to_owned());
    let expires_at = watch::Sender::new(request.expires_at_ms.map(from_ms));
    let sandbox = register(
        engine,
        Sandbox {
            id: id.clone(),
            template: request.template,
            dir,
            console_log: vm.console_log(),
            client,
            timings: PhaseTimings::default(),
            created_at: from_ms(request.created_at_ms),
            netns,
            runtime: Runtime::running(vm, resources),
            expires_at,
            engine: Arc::downgrade(engine),
        },
        exit,
    );
    tracing::info!(sandbox = %id, pid, "re-adopted");
    Ok(sandbox)
}

/// Restores `template` into a new sandbox.
pub(crate) async fn create(
    engine: &Arc<Inner>,
    template: &BakedTemplate,
    options: CreateOptions,
) -> Result<Arc<Sandbox>, EngineError> {
    let limits = limits_for(template, &options)?;
    let started = Instant::now();
    let mut timings = PhaseTimings::default();
    let mut phase = Instant::now();
    let prestarted = match take_prestarted(engine, template) {
        Some(prestarted) => {
            record(&mut timings, "take pre-started VMM", &mut phase);
            prestarted
        }
        None => tokio::task::block_in_place(|| prestart(engine, template, &mut timings))?,
    };
    phase = Instant::now();
    // Dropped whole on an error below: the VMM dies before its resources and directory go.
    let mut slot = prestarted;
    if limits != default_limits(&template.meta.machine) {
        if let Some(cgroup) = &slot.resources.cgroup {
            cgroup.set_limits(limits)?;
        }
    }
    let exit = kiln_vmm::pidfd::open(slot.vm.pid())
        .and_then(watch_fd)
        .map_err(|e| EngineError::io("watching the VMM process", e))?;
    // The verified bytes go to the VMM through an anonymous file: what was checked is what
    // loads.
    let state = template.read_state()?;
    let mut state_file = tempfile::tempfile_in(&slot.dir)
        .map_err(|e| EngineError::io("staging the device state", e))?;
    state_file
        .write_all(&state)
        .and_then(|()| state_file.rewind())
        .map_err(|e| EngineError::io("staging the device state", e))?;
    record(&mut timings, "limits and state", &mut phase);
    let restore = tokio::task::block_in_place(|| slot.vm.restore(&state_file))?;
    timings.phases.extend(restore.phases);
    phase = Instant::now();

    let client = AgentClient::new(
        Arc::new(UnixConnector::new(slot.vm.agent_socket())),
        ClientConfig {
            hello_interval: Duration::from_millis(20),
            handshake_timeout: Duration::from_secs(30),
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
    record(&mut timings, "agent handshake", &mut phase);
    if options.post_restore {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut entropy = [0u8; 64];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut entropy);
        client
            .post_restore(&PostRestoreRequest {
                wall_clock_ns: now,
                entropy_hex: hex::encode(entropy),
                hostname: Some(slot.id.clone()),
                metadata: Some(options.metadata.clone()),
            })
            .await?;
        record(&mut timings, "post-restore", &mut phase);
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
    } = slot;
    cleanup.disarm();
    let netns = resources.netns.as_ref().map(|ns| ns.name().to_owned());
    let expires_at = watch::Sender::new(options.ttl.map(|ttl| SystemTime::now() + ttl));
    let sandbox = register(
        engine,
        Sandbox {
            id: id.clone(),
            template: template.meta.name.clone(),
            dir,
            console_log: vm.console_log(),
            client,
            timings,
            created_at: SystemTime::now(),
            netns,
            runtime: Runtime::running(vm, resources),
            expires_at,
            engine: Arc::downgrade(engine),
        },
        exit,
    );
    let _ = engine.events.send(crate::SandboxEvent::Created {
        id,
        template: template.meta.name.clone(),
    });
    // Start the next create's VMM now that this one no longer competes for the CPU.
    refill(engine, template);
    Ok(sandbox)
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

fn record(timings: &mut PhaseTimings, name: &str, since: &mut Instant) {
    timings
        .phases
        .push((name.to_owned(), since.elapsed().as_secs_f64() * 1000.0));
    *since = Instant::now();
}

/// Removes a half-created sandbox directory unless disarmed.
#[derive(Debug)]
struct DirGuard(Option<PathBuf>);

impl DirGuard {
    fn disarm(mut self) {
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
