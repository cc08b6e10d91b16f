//! kiln's microVM engine: bakes templates into snapshots and creates sandboxes by restoring
//! them, each with a copy-on-write root disk, a fresh RNG seed and the host's clock.
//!
//! The daemon drives this library; it holds no HTTP or CLI concerns.

pub mod bake;
pub mod cgroup;
mod confine;
pub mod disk;
mod fork;
pub mod leftovers;
mod pause;
pub mod persist;
mod prestart;
pub mod procstat;
mod ramdelta;
pub mod sandbox;
pub mod space;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_image::template::TemplateImages;
use kiln_proto::messages::InitRequest;
use kiln_vmm::accel::{AccelChoice, AccelDecision};
use kiln_vmm::driver::Hypervisor;
use kiln_vmm::driver::{DiskFormat, DiskLayer, MemoryBacking};
use kiln_vmm::qemu::QemuDriver;

pub use bake::{BakeOptions, BakedTemplate};
pub use cgroup::{CgroupLimits, Cgroups};
pub use fork::ForkReport;
pub use sandbox::{
    resources_for, AdoptRequest, CreateOptions, NetworkUsage, OnExpiry, ResourceUsage, Resources,
    Sandbox, SandboxInfo, SandboxState,
};
pub use space::{DiskLimits, DiskSpace};

/// A baked template [`Engine::remove_unused_bakes`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedBake {
    /// Its directory (gone).
    pub dir: PathBuf,
    /// The root filesystem artefact it was made from.
    pub rootfs: Option<PathBuf>,
}

/// Input `name` of `baked`'s key.
fn bake_input<'a>(baked: &'a BakedTemplate, name: &str) -> Option<&'a str> {
    baked
        .meta
        .inputs
        .iter()
        .find(|(input, _)| input == name)
        .map(|(_, value)| value.as_str())
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Building the template's images failed.
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
    /// A disk could not be created.
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    /// Snapshot or restore failed.
    #[error(transparent)]
    Snapshot(#[from] kiln_vmm::qemu::SnapshotError),
    /// The guest agent failed.
    #[error("guest agent")]
    Agent(#[from] kiln_agent_client::ClientError),
    /// Saved metadata is unreadable.
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    /// A saved file does not match its checksum.
    #[error("corrupt template: {0}")]
    Corrupt(String),
    /// The VM did not boot to a working agent.
    #[error("boot failed: {0}")]
    Boot(String),
    /// The VMM driver failed.
    #[error(transparent)]
    Driver(#[from] kiln_vmm::driver::DriverError),
    /// Cgroups could not be set up.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// A request asked for something impossible (e.g. more CPU than the template has).
    #[error("{0}")]
    Invalid(String),
    /// No sandbox has this id.
    #[error("no sandbox `{0}`")]
    NotFound(String),
    /// A limited resource ran out.
    #[error("{0}")]
    Exhausted(String),
    /// The host's disk space for sandboxes (its reserve or budget) does not allow it.
    #[error("{0}")]
    NoSpace(String),
    /// The sandbox's state does not allow it now (e.g. resuming a running sandbox's pause).
    #[error("{0}")]
    Conflict(String),
    /// Sandbox networking failed or refused a policy.
    #[error(transparent)]
    Network(#[from] kiln_network::NetworkError),
    /// The engine is stopping and makes no new sandboxes ([`Engine::stop_creating`]).
    #[error("the daemon is stopping: it makes no new sandboxes")]
    Stopping,
}

/// Ends the process at once (as `kill -9` would, its VMMs left running) if failpoint `name`
/// is listed in `KILN_FAILPOINTS` (comma-separated): how tests kill the daemon at an exact
/// step of a pause or resume rather than at a moment chosen by timing.
pub(crate) fn failpoint(name: &str) {
    static LIST: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let list = LIST.get_or_init(|| {
        std::env::var("KILN_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    });
    if list.iter().any(|l| l == name) {
        eprintln!("failpoint {name}: ending the process");
        std::process::abort();
    }
}

/// An error and its sources, on one line (`a: b: c`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl EngineError {
    pub(crate) fn io(context: &str, source: std::io::Error) -> EngineError {
        EngineError::Io {
            context: context.to_owned(),
            source,
        }
    }
}

/// How sandbox VMM processes are confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfinementConfig {
    /// First of 65536 user and group ids that VMM processes run as, one per sandbox; `None`
    /// leaves them running as the daemon's user.
    pub vm_uid_base: Option<u32>,
    /// Filter the VMM's system calls.
    pub seccomp: bool,
    /// Put every VMM in its own cgroup with CPU and memory limits.
    pub cgroups: bool,
}

/// Default first VMM uid: far above login users and the usual subordinate-id ranges.
pub const DEFAULT_VM_UID_BASE: u32 = 2_000_000_000;

/// Number of VMM uids, so of sandboxes (and bakes) that can run at once.
pub const VM_UID_COUNT: u32 = 65_536;

impl Default for ConfinementConfig {
    fn default() -> Self {
        ConfinementConfig {
            vm_uid_base: Some(DEFAULT_VM_UID_BASE),
            seccomp: true,
            cgroups: true,
        }
    }
}

/// Static configuration of an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where baked templates and sandboxes live (e.g. `/var/lib/kiln`).
    pub data_dir: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// The guest agent's log filter (`KILN_AGENT_LOG`, logged to the VM console).
    pub guest_log: Option<String>,
    /// Confinement of the VMM processes.
    pub confinement: ConfinementConfig,
    /// VMMs kept started per template, so that a create skips the VMM's start-up (at most
    /// [`MAX_PRESTART`]).
    pub prestart: usize,
    /// Pre-started VMMs also restore their template, make the post-restore call and run a
    /// command in its guest ahead of a create (with no way in or out of their namespace and
    /// the least CPU weight until the create): a create is then the sandbox's own clock,
    /// entropy, name and metadata given to a running guest, and its first command does not
    /// pay for code run the first time. `false`: they
    /// wait for the device state, holding no guest state, and cost no CPU while they wait.
    pub warm_prestart: bool,
    /// Sandbox networking (links to the host, NAT egress with policy); `None`: sandboxes have
    /// a namespace and a tap but no way out.
    pub network: Option<kiln_network::NetworkConfig>,
    /// Limits on the disk space sandboxes take on the host (see [`space`]).
    pub disk: DiskLimits,
    /// How long the host waits for a sandbox's agent to answer a call before the call fails
    /// (a guest that stopped answering, or one too slow). Streams wait on progress instead;
    /// a stream whose agent stops answering is dropped within this time (keep-alive pings
    /// every half of it).
    pub agent_call_timeout: Duration,
}

/// How long the host waits by default for an agent's answer: a loaded host under emulation
/// may take seconds where KVM takes milliseconds.
pub const DEFAULT_AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stopping engine waits for creates in flight ([`Engine::stop_creating`]): a
/// create takes seconds, a fork of many children under emulation a minute.
pub const STOP_WAIT: Duration = Duration::from_secs(120);

/// Most VMMs kept pre-started per template.
pub const MAX_PRESTART: usize = 2;

impl EngineConfig {
    /// The defaults, with data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            qemu: "qemu-system-x86_64".into(),
            accel: AccelChoice::Auto,
            guest_log: None,
            confinement: ConfinementConfig::default(),
            prestart: 1,
            warm_prestart: true,
            network: None,
            disk: DiskLimits::default(),
            agent_call_timeout: DEFAULT_AGENT_CALL_TIMEOUT,
        }
    }
}

/// A change in a sandbox's life, as the engine's subscribers see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SandboxEvent {
    /// It was created and answers.
    Created {
        /// The sandbox.
        id: String,
        /// Its template.
        template: String,
    },
    /// Its VM ended without being asked to.
    Failed {
        /// The sandbox.
        id: String,
        /// What the VMM or the guest console said.
        reason: String,
    },
    /// It was paused to disk.
    Paused {
        /// The sandbox.
        id: String,
    },
    /// It was resumed.
    Resumed {
        /// The sandbox.
        id: String,
    },
    /// It was forked into `children`.
    Forked {
        /// The parent.
        id: String,
        /// Its new children.
        children: Vec<String>,
    },
    /// It was destroyed.
    Destroyed {
        /// The sandbox.
        id: String,
        /// Because its time to live ran out (else on request).
        expired: bool,
    },
}

/// The engine: a cheap handle, clone it freely.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: EngineConfig,
    pub(crate) driver: Arc<dyn Hypervisor>,
    pub(crate) cgroups: Option<Cgroups>,
    /// Sandbox disks are reflinked raw images (XFS, btrfs) rather than qcow2 overlays.
    pub(crate) reflink: bool,
    pub(crate) sandboxes: Mutex<BTreeMap<String, Arc<Sandbox>>>,
    /// Pre-started VMMs by template key.
    pub(crate) prestarted: Mutex<std::collections::HashMap<String, prestart::PrestartPool>>,
    /// VMMs being pre-started right now; none start once the engine shuts down.
    pub(crate) prestarting: tokio::sync::watch::Sender<usize>,
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
    /// Creates and bakes in flight (see [`sandbox::Creating`]); none start once `closed`
    /// is set, which is set under this channel's lock.
    pub(crate) creating: tokio::sync::watch::Sender<usize>,
    pub(crate) closed: std::sync::atomic::AtomicBool,
    pub(crate) events: tokio::sync::broadcast::Sender<SandboxEvent>,
    /// Sandbox networking, if configured.
    pub(crate) network: Option<Arc<kiln_network::Network>>,
    /// Fork captures whose children are being made (not removed meanwhile).
    pub(crate) pinned_captures: Mutex<std::collections::HashSet<std::path::PathBuf>>,
    uids: Mutex<BTreeSet<u32>>,
    /// Bytes each running VMM's disk file may grow by until the next measurement
    /// (`u64::MAX`: not measured yet); see [`space`].
    pub(crate) disk_share: std::sync::atomic::AtomicU64,
    /// Offset of the VMM uid to try first.
    next_uid: std::sync::atomic::AtomicU32,
}

/// A VMM uid (and gid) taken from the engine's range, given back on drop.
#[derive(Debug)]
pub(crate) struct VmUid {
    pub(crate) id: u32,
    engine: std::sync::Weak<Inner>,
}

impl Drop for VmUid {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.upgrade() {
            lock(&engine.uids).remove(&self.id);
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    /// The network namespace of the VM named `name`.
    pub(crate) fn netns_name(&self, name: &str) -> String {
        let prefix = self
            .config
            .network
            .as_ref()
            .map_or("kiln-", |n| n.prefix.as_str());
        format!("{prefix}{name}")
    }

    /// The egress policy a sandbox gets unless its create asks for another.
    pub(crate) fn default_egress(&self) -> Option<kiln_network::policy::EgressPolicy> {
        self.network.as_ref().map(|n| n.default_policy())
    }

    /// Claims `uid` for an adopted VMM, if it is one of the engine's and free.
    pub(crate) fn claim_uid(self: &Arc<Self>, uid: u32) -> Option<VmUid> {
        let base = self.config.confinement.vm_uid_base?;
        if !(base..base.saturating_add(VM_UID_COUNT)).contains(&uid) {
            return None;
        }
        lock(&self.uids).insert(uid).then(|| VmUid {
            id: uid,
            engine: Arc::downgrade(self),
        })
    }

    /// Takes the next free VMM uid after the one handed out last, if VMMs run unprivileged:
    /// a uid given back is reused only after every other one was (what a VMM owned lives
    /// in its jail's private mounts and IPC namespace and goes with it; its disk goes with
    /// its sandbox; the rotation keeps even a leftover from meeting the next holder).
    pub(crate) fn take_uid(self: &Arc<Self>) -> Result<Option<VmUid>, EngineError> {
        let Some(base) = self.config.confinement.vm_uid_base else {
            return Ok(None);
        };
        let mut taken = lock(&self.uids);
        let start = self.next_uid.load(std::sync::atomic::Ordering::Relaxed);
        let offset = (0..VM_UID_COUNT)
            .map(|i| (start + i) % VM_UID_COUNT)
            .find(|offset| !taken.contains(&(base + offset)))
            .ok_or_else(|| {
                EngineError::Exhausted(format!("all {VM_UID_COUNT} VMM user ids are in use"))
            })?;
        self.next_uid.store(
            (offset + 1) % VM_UID_COUNT,
            std::sync::atomic::Ordering::Relaxed,
        );
        let id = base + offset;
        taken.insert(id);
        Ok(Some(VmUid {
            id,
            engine: Arc::downgrade(self),
        }))
    }
}

impl Engine {
    /// Opens the engine: resolves the accelerator, QEMU's version and the cgroup layout.
    pub fn new(config: EngineConfig) -> Result<Engine, EngineError> {
        if config.prestart > MAX_PRESTART {
            return Err(EngineError::Invalid(format!(
                "prestart is at most {MAX_PRESTART} per template (got {})",
                config.prestart
            )));
        }
        let driver = QemuDriver::new(&config.qemu, config.accel)?;
        let accel = driver.accel();
        tracing::info!(accel = accel.accel.qemu_name(), reason = %accel.reason, "accelerator chosen");
        let cgroups = if config.confinement.cgroups {
            let cgroups = Cgroups::detect()?;
            tracing::info!(version = cgroups.version(), "sandbox cgroups");
            Some(cgroups)
        } else {
            None
        };
        // Root's alone: VMMs get their files through their jails, and nobody else (a local
        // user, another sandbox's VMM user) may reach anything in here.
        for dir in ["", "templates", "sandboxes"] {
            let dir = config.data_dir.join(dir);
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| EngineError::io("creating the data directory", e))?;
        }
        let network = match &config.network {
            Some(network) => {
                let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                    EngineError::Invalid(
                        "sandbox networking needs a tokio runtime: open the engine inside one"
                            .into(),
                    )
                })?;
                let network = Arc::new(kiln_network::Network::open(network.clone())?);
                network.start(&runtime)?;
                Some(network)
            }
            None => None,
        };
        let reflink = disk::supports_reflink(&config.data_dir.join("templates"));
        tracing::info!(
            disks = if reflink { "reflink" } else { "qcow2 overlay" },
            "sandbox disks"
        );
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                driver: Arc::new(driver),
                cgroups,
                reflink,
                sandboxes: Mutex::new(BTreeMap::new()),
                prestarted: Mutex::new(std::collections::HashMap::new()),
                prestarting: tokio::sync::watch::Sender::new(0),
                shutting_down: std::sync::atomic::AtomicBool::new(false),
                creating: tokio::sync::watch::Sender::new(0),
                closed: std::sync::atomic::AtomicBool::new(false),
                events: tokio::sync::broadcast::Sender::new(1024),
                network,
                pinned_captures: Mutex::new(std::collections::HashSet::new()),
                uids: Mutex::new(BTreeSet::new()),
                disk_share: std::sync::atomic::AtomicU64::new(u64::MAX),
                // Start somewhere else on every run, so a restarted daemon does not hand
                // out first the uids its predecessor used last.
                next_uid: std::sync::atomic::AtomicU32::new(rand::random::<u32>() % VM_UID_COUNT),
            }),
        };
        let space = space::measure(&engine.inner)?;
        tracing::info!(
            available = space.available_bytes,
            reserve = space.reserve_bytes,
            budget = ?space.budget_bytes,
            used = space.used_bytes,
            "sandbox disk space"
        );
        if space.headroom() < space::NEW_SANDBOX_BYTES {
            tracing::warn!(
                "the data directory's filesystem has {} MiB free and keeps {} MiB in reserve: \
                 creates will be refused until space is freed (or --disk-reserve-mib is lowered)",
                space.available_bytes >> 20,
                space.reserve_bytes >> 20
            );
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            space::start(&engine.inner, &runtime);
        }
        Ok(engine)
    }

    /// The accelerator in use and why.
    pub fn accel(&self) -> &AccelDecision {
        self.inner.driver.accel()
    }

    /// The VMM driver.
    pub fn driver(&self) -> &dyn Hypervisor {
        self.inner.driver.as_ref()
    }

    /// Sandbox networking, if configured.
    pub fn network(&self) -> Option<&Arc<kiln_network::Network>> {
        self.inner.network.as_ref()
    }

    /// Removes the host's networking set-up (after every sandbox was destroyed).
    pub fn close_network(&self) {
        if let Some(network) = &self.inner.network {
            network.shutdown();
        }
    }

    /// The cgroup version sandboxes are limited with, if any.
    pub fn cgroup_version(&self) -> Option<&'static str> {
        self.inner.cgroups.as_ref().map(Cgroups::version)
    }

    /// How sandbox disks are made: `reflink` (raw copies sharing extents, where the data
    /// directory is on XFS or btrfs) or `qcow2` (overlays on a read-only base).
    pub fn disk_strategy(&self) -> &'static str {
        if self.inner.reflink {
            "reflink"
        } else {
            "qcow2"
        }
    }

    /// The data directory's disk space as sandboxes see it, measured now (blocking: walks
    /// the sandboxes' files).
    pub fn disk_space(&self) -> Result<DiskSpace, EngineError> {
        space::measure(&self.inner)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.inner.config.data_dir
    }

    /// Returns the baked snapshot of `images`, baking it first when there is none for
    /// exactly these inputs (a changed kernel, rootfs, QEMU, accelerator or device
    /// configuration means a new key, so a re-bake).
    pub async fn bake(&self, images: &TemplateImages) -> Result<BakedTemplate, EngineError> {
        self.bake_with(images, BakeOptions::default()).await
    }

    /// [`Engine::bake`] with options. Unless `options.skip_restore_check`, a new bake is
    /// published only once a sandbox made from it has answered: a snapshot whose restored
    /// agent does not answer (seen under TCG, rarely: every restore of such a bake fails the
    /// same way) is discarded and baked again, at most twice.
    pub async fn bake_with(
        &self,
        images: &TemplateImages,
        options: BakeOptions,
    ) -> Result<BakedTemplate, EngineError> {
        const BAKES: usize = 3;
        // A stopping engine waits for the bake too: its VMM and files are its own to remove.
        let _baking = sandbox::Creating::enter(&self.inner)?;
        let mut attempt = 1;
        loop {
            let (baked, fresh) = self.bake_once(images, options.clone()).await?;
            if !fresh || options.skip_restore_check {
                return Ok(baked);
            }
            let checked = async {
                let sandbox =
                    sandbox::create(&self.inner, &baked, CreateOptions::default()).await?;
                sandbox.destroy().await
            };
            match checked.await {
                Ok(()) => return Ok(baked),
                Err(EngineError::Boot(reason)) if attempt < BAKES => {
                    tracing::warn!(template = %images.spec.name, attempt, %reason, "a new bake did not restore: baking again");
                    self.discard_bake(&baked)?;
                    attempt += 1;
                }
                Err(e) => {
                    if let Err(discard) = self.discard_bake(&baked) {
                        tracing::warn!(template = %images.spec.name, error = %discard, "removing a bake that did not restore");
                    }
                    if matches!(e, EngineError::Stopping) {
                        return Err(e);
                    }
                    return Err(EngineError::Boot(format!(
                        "a sandbox made from the new bake of `{}` failed ({attempt} bakes): {}",
                        images.spec.name,
                        crate::error_chain(&e)
                    )));
                }
            }
        }
    }

    /// One bake of `images`, or the one already made of the same inputs; whether it is new.
    async fn bake_once(
        &self,
        images: &TemplateImages,
        options: BakeOptions,
    ) -> Result<(BakedTemplate, bool), EngineError> {
        let init = InitRequest {
            env: images.rootfs.config.env.clone(),
            workdir: images.rootfs.config.workdir.clone(),
            user: images.rootfs.config.user.clone(),
            start: images.rootfs.config.start.clone(),
            hostname: Some(images.spec.name.clone()),
            network: Some(bake::guest_network()),
            // The guest's gateway answers DNS (each sandbox's namespace sends it to the
            // daemon's resolver).
            dns: Some(kiln_proto::messages::DnsConfig {
                nameservers: vec![kiln_net::GATEWAY_ADDRESS],
                search: Vec::new(),
            }),
        };
        let config = &self.inner.config;
        let shape = bake::MachineShape::with_guest_log(images, config.guest_log.as_deref());
        let probe = shape.vm_spec(
            Path::new("R"),
            vec![DiskLayer::qcow2("D")],
            MemoryBacking::File {
                path: "M".into(),
                shared: true,
            },
            false,
        );
        let inputs = bake::bake_inputs(
            images,
            self.driver(),
            &probe,
            &init,
            options.owner.as_deref(),
        );
        let key = inputs.key();
        let dir = config
            .data_dir
            .join("templates")
            .join(format!("{}-{key}", images.spec.name));
        if dir.join("meta.json").is_file() {
            // A bake found under its key's name must be of that key, and of the disks this
            // data directory makes: a raw template disk needs reflinks (one copied or moved
            // here from another filesystem may lack them).
            let usable = BakedTemplate::open(&dir).and_then(|baked| {
                if baked.meta.key != key {
                    return Err(EngineError::Corrupt(format!(
                        "{} holds a bake of other inputs",
                        dir.display()
                    )));
                }
                if baked.meta.disk_format == DiskFormat::Raw && !self.inner.reflink {
                    return Err(EngineError::Corrupt(format!(
                        "{} has a raw template disk, and this data directory's filesystem \
                         has no reflinks",
                        dir.display()
                    )));
                }
                Ok(baked)
            });
            match usable {
                Ok(baked) => return Ok((baked, false)),
                Err(e) => {
                    tracing::warn!(template = %images.spec.name, error = %e, "re-baking: saved snapshot is unusable");
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| EngineError::io("removing a broken template", e))?;
                }
            }
        } else if let Some(old) = self.previous_bake(&images.spec.name, &inputs) {
            tracing::info!(template = %images.spec.name, reason = %old, "re-baking: inputs changed");
        }
        let staging = tempfile::Builder::new()
            .prefix(&format!(".bake-{}-", images.spec.name))
            .tempdir_in(config.data_dir.join("templates"))
            .map_err(|e| EngineError::io("creating the bake directory", e))?;
        let baked = bake::bake_into(bake::BakeJob {
            shape,
            images,
            engine: &self.inner,
            inputs: &inputs,
            init: &init,
            out: staging.path(),
            options,
        })
        .await?;
        let staged = staging.keep();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| EngineError::io("publishing the baked template", e))?;
        }
        std::fs::rename(&staged, &dir)
            .map_err(|e| EngineError::io("publishing the baked template", e))?;
        Ok((
            BakedTemplate {
                dir,
                meta: baked.meta,
            },
            true,
        ))
    }

    /// Deletes a baked template (one that failed [`BakedTemplate::verify`]), so that the
    /// next [`Engine::bake_with`] of its images bakes it afresh.
    pub fn discard_bake(&self, baked: &BakedTemplate) -> Result<(), EngineError> {
        let templates = self.data_dir().join("templates");
        if baked.dir.parent() != Some(templates.as_path()) || baked.meta.capture_of.is_some() {
            return Err(EngineError::Corrupt(format!(
                "{} is not a baked template of this engine",
                baked.dir.display()
            )));
        }
        std::fs::remove_dir_all(&baked.dir)
            .map_err(|e| EngineError::io("removing a baked template that failed its check", e))
    }

    /// Removes the baked templates of template `name` of `owner` (`None`: a shared template)
    /// other than `keep` that nothing uses: no sandbox runs or is paused on one, no fork
    /// capture or snapshot has a disk layer in one, and no create is making a sandbox from
    /// one; their pre-started VMMs go too. A bake is a cache of its inputs: one removed is
    /// made again if those inputs come back. Returns what it removed.
    pub async fn remove_unused_bakes(
        &self,
        name: &str,
        owner: Option<&str>,
        keep: Option<&BakedTemplate>,
    ) -> Vec<RemovedBake> {
        let inner = Arc::clone(&self.inner);
        let (name, owner) = (name.to_owned(), owner.map(str::to_owned));
        let keep = keep.map(|k| k.dir.clone());
        let run = move || {
            let templates = inner.config.data_dir.join("templates");
            let Ok(entries) = std::fs::read_dir(&templates) else {
                return Vec::new();
            };
            let layers = fork::capture_layers(&inner);
            let mut removed = Vec::new();
            for entry in entries.flatten() {
                let dir = entry.path();
                if Some(&dir) == keep.as_ref() {
                    continue;
                }
                let Ok(baked) = BakedTemplate::open(&dir) else {
                    continue;
                };
                let owned_by = bake_input(&baked, "owner");
                if baked.meta.name != name
                    || baked.meta.capture_of.is_some()
                    || owned_by != owner.as_deref()
                    || !fork::users(&inner, &dir).is_empty()
                    || lock(&inner.pinned_captures).contains(&dir)
                    || layers.iter().any(|layer| layer.starts_with(&dir))
                {
                    continue;
                }
                let pool = lock(&inner.prestarted).remove(&baked.meta.key);
                drop(pool);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {
                        tracing::info!(bake = %dir.display(), "removed a bake nothing uses");
                        removed.push(RemovedBake {
                            dir,
                            rootfs: bake_input(&baked, "rootfs").map(PathBuf::from),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(bake = %dir.display(), error = %e, "removing an unused bake")
                    }
                }
            }
            removed
        };
        tokio::task::spawn_blocking(run).await.unwrap_or_default()
    }

    /// Whether a baked template (a template's, a capture's or a snapshot's) was made from the
    /// root filesystem artefact `rootfs`.
    pub fn bakes_use_rootfs(&self, rootfs: &Path) -> bool {
        let Ok(entries) = std::fs::read_dir(self.data_dir().join("templates")) else {
            return false;
        };
        entries.flatten().any(|entry| {
            BakedTemplate::open(&entry.path())
                .is_ok_and(|baked| bake_input(&baked, "rootfs") == Some(&*rootfs.to_string_lossy()))
        })
    }

    /// Describes how an earlier bake of `name` differs from `inputs`, if there is one.
    fn previous_bake(&self, name: &str, inputs: &kiln_image::cache::Inputs) -> Option<String> {
        let entries = std::fs::read_dir(self.data_dir().join("templates")).ok()?;
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if !file_name.starts_with(&format!("{name}-")) {
                continue;
            }
            if let Ok(old) = BakedTemplate::open(&entry.path()) {
                let changed: Vec<&str> = inputs
                    .entries()
                    .iter()
                    .filter(|entry| !old.meta.inputs.contains(entry))
                    .map(|(name, _)| name.as_str())
                    .collect();
                return Some(format!(
                    "changed since the last bake: {}",
                    changed.join(", ")
                ));
            }
        }
        None
    }

    /// Boots `images` cold (no snapshot), confined like a sandbox, runs `true` through the
    /// agent and tears the VM down: the baseline that restores are compared with. Returns
    /// the time from the VMM's launch until `true` exited.
    pub async fn measure_cold_boot(
        &self,
        images: &TemplateImages,
    ) -> Result<std::time::Duration, EngineError> {
        bake::cold_boot(&self.inner, images).await
    }

    /// Creates a sandbox by restoring `template`.
    pub async fn create(
        &self,
        template: &BakedTemplate,
        options: CreateOptions,
    ) -> Result<Arc<Sandbox>, EngineError> {
        sandbox::create(&self.inner, template, options).await
    }

    /// Forks `parent` `count` times (1 to 32): the parent is stopped while its state is
    /// captured once (see `fork.rs`), then runs on; each child is restored from the capture
    /// through the create path with `options` (cpus and memory are the parent's, the network
    /// policy the parent's unless given), continuing from that moment with the parent's
    /// processes, memory and files, and its own id, hostname, reseeded RNG and clock. All or
    /// nothing: if one child cannot be made, none is kept. A paused parent is resumed first.
    pub async fn fork(
        &self,
        parent: &Arc<Sandbox>,
        count: usize,
        options: CreateOptions,
    ) -> Result<(Vec<Arc<Sandbox>>, ForkReport), EngineError> {
        fork::fork(&self.inner, parent, count, options).await
    }

    /// Snapshots `sandbox`: its memory, device state and disk, captured as a fork captures
    /// (the sandbox stops briefly, then runs on), flushed to stable storage and hashed, kept
    /// under `<data_dir>/templates/snap-*` until [`Engine::remove_snapshot`]. Sandboxes are
    /// created from it with [`Engine::create`] after [`Engine::open_snapshot`]. A paused
    /// sandbox is resumed first.
    pub async fn snapshot(&self, sandbox: &Arc<Sandbox>) -> Result<BakedTemplate, EngineError> {
        if sandbox.state() == SandboxState::Paused {
            sandbox.resume().await?;
        }
        sandbox
            .capture(
                &self.inner,
                &mut ForkReport::default(),
                fork::CaptureKind::Snapshot,
                0,
                "snapshot the sandbox",
            )
            .await
    }

    /// Opens the snapshot in `dir` (a name under `<data_dir>/templates`): its metadata read
    /// and checked, and refused if another VMM made it (a conflict naming both).
    pub fn open_snapshot(&self, dir: &str) -> Result<BakedTemplate, EngineError> {
        if !dir.starts_with(fork::SNAPSHOT_PREFIX) || dir.contains('/') || dir.contains("..") {
            return Err(EngineError::Invalid(format!("`{dir}` is not a snapshot")));
        }
        let snapshot = BakedTemplate::open(&self.data_dir().join("templates").join(dir))?;
        let here = format!(
            "{} {}",
            self.inner.driver.name(),
            self.inner.driver.version()
        );
        let made = snapshot
            .meta
            .inputs
            .iter()
            .find(|(name, _)| name == "vmm")
            .map(|(_, value)| value.clone())
            .unwrap_or_default();
        if made != here {
            return Err(EngineError::Conflict(format!(
                "the snapshot was made under {made} and this host runs {here}"
            )));
        }
        Ok(snapshot)
    }

    /// The sandboxes whose memory or disk is backed by `snapshot`'s files.
    pub fn snapshot_users(&self, snapshot: &BakedTemplate) -> Vec<String> {
        fork::users(&self.inner, &snapshot.dir)
    }

    /// Removes `snapshot`'s files, unless a sandbox still depends on them (a conflict listing
    /// them), and any fork capture left unused by that.
    pub fn remove_snapshot(&self, snapshot: &BakedTemplate) -> Result<(), EngineError> {
        let users = self.snapshot_users(snapshot);
        if !users.is_empty() {
            return Err(EngineError::Conflict(format!(
                "sandboxes still use this snapshot: {}",
                users.join(", ")
            )));
        }
        std::fs::remove_dir_all(&snapshot.dir)
            .map_err(|e| EngineError::io("removing the snapshot", e))?;
        // A fork's capture it stood on (a snapshot of a fork's child) may be unused now.
        fork::remove_unused_captures(&self.inner);
        Ok(())
    }

    /// Keeps VMMs pre-started for `template` from now on: starts them in the background, up to
    /// the configured number (and warms them, [`EngineConfig::warm_prestart`]), so that its next
    /// creates skip the VMM's start-up; each create from the template starts the next one. A
    /// template never passed here gets none (a tenant's own templates, snapshots).
    pub fn prestart(&self, template: &BakedTemplate) {
        prestart::refill(&self.inner, template, true);
    }

    /// Stops pre-starting, waits for VMMs being pre-started and removes every pre-started one
    /// (their processes, namespaces, cgroups and directories). Sandboxes are left alone.
    pub async fn shutdown_prestarted(&self) {
        {
            // Under the pool's lock: a refill either saw the flag or is counted as in flight.
            let _pools = lock(&self.inner.prestarted);
            self.inner
                .shutting_down
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let mut in_flight = self.inner.prestarting.subscribe();
        let _ = in_flight.wait_for(|n| *n == 0).await;
        let pools = std::mem::take(&mut *lock(&self.inner.prestarted));
        tokio::task::block_in_place(|| drop(pools));
    }

    /// Pids of the pre-started VMMs (their memory counts toward the sandboxes' footprint).
    pub fn prestarted_pids(&self) -> Vec<u32> {
        lock(&self.inner.prestarted)
            .values()
            .flat_map(|pool| pool.pids())
            .collect()
    }

    /// CPU time the pre-started VMMs have used so far, from their cgroups, in seconds.
    pub fn prestarted_cpu_seconds(&self) -> f64 {
        lock(&self.inner.prestarted)
            .values()
            .map(|pool| pool.cpu_seconds())
            .sum()
    }

    /// Lifecycle events of every sandbox from now on. A subscriber that falls more than 1024
    /// events behind gets `Lagged` and should re-read [`Engine::list`].
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<SandboxEvent> {
        self.inner.events.subscribe()
    }

    /// The sandbox `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>, EngineError> {
        lock(&self.inner.sandboxes)
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(id.to_owned()))
    }

    /// Every sandbox (running or failed), by id.
    pub fn list(&self) -> Vec<SandboxInfo> {
        let sandboxes: Vec<Arc<Sandbox>> = lock(&self.inner.sandboxes).values().cloned().collect();
        sandboxes.iter().map(|s| s.info()).collect()
    }

    /// Takes over the sandboxes of an earlier run that `wanted` names and whose VMMs still
    /// run (their agents answer again), then removes everything else that run left: VMMs,
    /// network namespaces, cgroups and directories of sandboxes not adopted, pre-started
    /// VMMs, interrupted bakes. Call once, right after [`Engine::new`].
    pub async fn recover(
        &self,
        wanted: Vec<sandbox::AdoptRequest>,
    ) -> Vec<(String, Result<Arc<Sandbox>, EngineError>)> {
        let mut results = Vec::new();
        for request in wanted {
            let id = request.id.clone();
            let result = sandbox::adopt(&self.inner, request).await;
            if let Err(e) = &result {
                tracing::warn!(sandbox = %id, error = %crate::error_chain(e), "not re-adopted");
            }
            results.push((id, result));
        }
        let adopted: std::collections::HashSet<String> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(id, _)| id.clone())
            .collect();
        let data_dir = self.data_dir().to_owned();
        let inner = Arc::clone(&self.inner);
        tokio::task::block_in_place(|| {
            for (dir, prefix) in [("sandboxes", ""), ("templates", ".bake-")] {
                let Ok(entries) = std::fs::read_dir(data_dir.join(dir)) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(prefix) && entry.path().is_dir() && !adopted.contains(&name)
                    {
                        tracing::info!(dir = %entry.path().display(), "removing what an earlier run left");
                        if let Err(e) = leftovers::remove_vm_dir(&entry.path(), None, &inner) {
                            tracing::warn!(dir = %entry.path().display(), error = %e, "removing leftovers");
                        }
                    }
                }
            }
            fork::remove_unused_captures(&inner);
        });
        results
    }

    /// Makes no new sandboxes from now on (creates, forks and bakes fail with
    /// [`EngineError::Stopping`]) and waits up to `limit` for those in flight to end, so that
    /// a stopping daemon's last list of sandboxes holds every one; whether they all ended.
    pub async fn stop_creating(&self, limit: Duration) -> bool {
        self.inner.creating.send_modify(|_| {
            self.inner
                .closed
                .store(true, std::sync::atomic::Ordering::SeqCst)
        });
        let mut in_flight = self.inner.creating.subscribe();
        let drained = tokio::time::timeout(limit, in_flight.wait_for(|n| *n == 0))
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                creates = *self.inner.creating.borrow(),
                "creates still in flight after {} s: their sandboxes may be left for the next start to clean up",
                limit.as_secs()
            );
        }
        drained
    }

    /// Lets every sandbox run on without this engine (their VMMs, namespaces, cgroups and
    /// files stay, for the next run to adopt with [`Engine::recover`]); pre-started VMMs are
    /// removed, and creates in flight end first ([`STOP_WAIT`]).
    pub async fn detach_all(&self) {
        self.shutdown_prestarted().await;
        self.stop_creating(STOP_WAIT).await;
        let sandboxes: Vec<Arc<Sandbox>> = std::mem::take(&mut *lock(&self.inner.sandboxes))
            .into_values()
            .collect();
        for sandbox in sandboxes {
            sandbox.detach();
        }
    }

    /// Removes what a sandbox `id` of an earlier run of the daemon left behind: its network
    /// namespace, cgroup and directory (its VMM must already be gone). A live sandbox of this
    /// engine is left alone.
    pub fn remove_leftovers(&self, id: &str) -> Result<(), EngineError> {
        if lock(&self.inner.sandboxes).contains_key(id) {
            return Err(EngineError::Invalid(format!("sandbox `{id}` is live")));
        }
        if id.is_empty() || id.contains('/') || id.contains("..") {
            return Err(EngineError::Invalid(format!("`{id}` is not a sandbox id")));
        }
        let dir = self.data_dir().join("sandboxes").join(id);
        leftovers::remove_vm_dir(&dir, Some(id), &self.inner)
    }

    /// Destroys the sandbox `id`: its VMM, network namespace, cgroup and files.
    pub async fn destroy(&self, id: &str) -> Result<(), EngineError> {
        self.get(id)?.destroy().await
    }
}
