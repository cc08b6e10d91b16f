//! Fork: a running sandbox captured once into an artefact shaped like a baked template
//! (memory file, device state, disk), from which its children are made through the create
//! path: restored into pre-started-style confined VMMs, RAM mapped privately from the
//! capture, each with its own copy-on-write disk layer and a new identity.
//!
//! A parent whose RAM is a private mapping of its template's memory file (every sandbox
//! made by a create or a fork) is captured by what it changed:
//! 1. The parent stops; QEMU saves its device state alone, kiln reads the pages the guest
//!    wrote (the VMM's own copies, see [`crate::ramdelta`]) into `ram.delta`, and copies its
//!    writable disk layer as below; the parent continues.
//! 2. The capture's `memory` is the template's memory file itself (a hard link: nothing is
//!    copied); each child's VMM maps it privately and gets `ram.delta` written into its
//!    mapping before it loads the device state. Bytes written follow the pages changed.
//!
//! A parent whose RAM is anonymous (resumed from a pause an earlier engine made) is captured
//! whole, in three steps:
//! 1. The parent stops; QEMU writes its device state and all of its RAM into a stream
//!    (`x-ignore-shared` off: the parent's RAM is a private mapping, which QEMU migrates
//!    whole); its writable disk layer is copied by kiln into a file its VMM never held (a
//!    reflink of a raw disk, a jailed rewrite of a qcow2 layer, its header never followed);
//!    the parent continues.
//! 2. A helper VMM (confined like any other, never running guest code) with its RAM in a new
//!    shared memory file loads that stream, then saves its device state alone
//!    (`x-ignore-shared` on, as a bake does): RAM is now in the memory file.
//! 3. The files are sealed (root's, read-only) and described by a `meta.json` whose disk chain
//!    names every layer below the capture's (the parent's template's, or an earlier
//!    capture's for a fork of a child).
//!
//! Captures live under `<data_dir>/templates/fork-*` and are removed once no sandbox uses
//! them (as its source or as a layer of its source's disk chain).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_vmm::driver::{DiskFormat, DiskLayer, MemoryBacking, PhaseTimings};

use crate::bake::{BakedMeta, BakedTemplate};
use crate::sandbox::{record, Sandbox, SandboxState};
use crate::{lock, persist, CreateOptions, EngineError, Inner};

/// Prefix of fork capture directories under `<data_dir>/templates`.
pub(crate) const CAPTURE_PREFIX: &str = "fork-";
/// Prefix of snapshot directories under `<data_dir>/templates`.
pub(crate) const SNAPSHOT_PREFIX: &str = "snap-";

/// What a capture is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaptureKind {
    /// A fork's: removed with its last child.
    Fork,
    /// A snapshot: kept until deleted, durable, its files hashed like a template's.
    Snapshot,
}

/// The capture's stream: the parent's state with all of its RAM.
const STREAM: &str = "stream";

/// The file name of a disk of `format` in a sandbox's or template's directory.
fn disk_name(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Raw => "disk.raw",
        DiskFormat::Qcow2 => "disk.qcow2",
    }
}

/// What a fork cost.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ForkReport {
    /// How long the parent was stopped.
    pub parent_paused_ms: f64,
    /// Bytes written to capture the parent: its changed pages (or for a parent captured
    /// whole, the stream of its device state and RAM and the capture's memory file), its
    /// device state and its disk layer.
    pub bytes_written: u64,
    /// Of those, the guest RAM pages written (the pages the parent had changed, or all of
    /// its RAM that is not zero).
    pub ram_bytes_written: u64,
    /// Phases of the capture and the creates.
    pub phases: Vec<(String, f64)>,
}

/// Allocated bytes of `path` (what was written, holes not counted).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

impl Sandbox {
    /// Captures the running sandbox into a new artefact directory (see the module's
    /// documentation); the sandbox runs on. Blocking parts run in place.
    /// `extra` bytes are admitted with the capture's own (a fork's children); `what` says what
    /// is refused if they do not fit.
    pub(crate) async fn capture(
        &self,
        engine: &Arc<Inner>,
        report: &mut ForkReport,
        kind: CaptureKind,
        extra: u64,
        what: &str,
    ) -> Result<BakedTemplate, EngineError> {
        let _operation = self.operation.lock().await;
        let template = self.source_template()?;
        crate::space::admit(
            engine,
            self.capture_bytes(&template).saturating_add(extra),
            what,
        )?;
        let templates = engine.config.data_dir.join("templates");
        let prefix = match kind {
            CaptureKind::Fork => CAPTURE_PREFIX,
            CaptureKind::Snapshot => SNAPSHOT_PREFIX,
        };
        let name = format!("{prefix}{}", hex::encode(rand::random::<[u8; 6]>()));
        // Built under a name the engine's clean-up removes if the daemon dies meanwhile.
        let building = templates.join(format!(".bake-{name}"));
        std::fs::create_dir(&building)
            .map_err(|e| EngineError::io("creating the capture directory", e))?;
        let cleanup = crate::prestart::DirGuard::new(building.clone());
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&building, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| EngineError::io("creating the capture directory", e))?;
        }
        let mut timings = PhaseTimings::default();
        let stream = building.join(STREAM);
        let disk = building.join(disk_name(template.meta.disk_format));
        let changed = tokio::task::block_in_place(|| {
            self.capture_parent(engine, &template, &building, &mut timings, report)
        })?;
        let _ = std::fs::remove_dir_all(building.join("jail"));
        let mut lower = template.disk_chain();
        if template.meta.disk_format == DiskFormat::Raw {
            // A reflinked raw disk stands alone.
            lower.clear();
        }
        let meta = if changed {
            report.bytes_written += allocated(&building.join("state"))
                + allocated(&building.join("ram.delta"))
                + allocated(&disk);
            tokio::task::block_in_place(|| seal_changed(&template, &building, &disk, &lower))?
        } else {
            report.bytes_written += allocated(&stream) + allocated(&disk);
            report.ram_bytes_written = allocated(&stream);
            let meta = tokio::task::block_in_place(|| {
                convert(
                    engine,
                    &template,
                    &building,
                    &stream,
                    &disk,
                    &lower,
                    &mut timings,
                )
            })?;
            report.bytes_written += allocated(&building.join("memory"));
            meta
        };
        let mut inputs = template.meta.inputs.clone();
        inputs.push(("captured from".into(), self.id.clone()));
        let mut meta = BakedMeta {
            key: name.clone(),
            inputs,
            timings: timings.phases.clone(),
            capture_of: Some(self.id.clone()),
            ..meta
        };
        if kind == CaptureKind::Snapshot {
            // Kept across restarts and host crashes: on stable storage, and hashed so that a
            // later run checks what it restores from.
            tokio::task::block_in_place(|| {
                let memory = building.join("memory");
                let delta = building.join("ram.delta");
                for file in [&memory, &disk, &building.join("state"), &delta] {
                    if file == &delta && !changed {
                        continue;
                    }
                    std::fs::File::open(file)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| EngineError::io("flushing the snapshot", e))?;
                }
                if !changed {
                    // A capture of changed pages shares the template's memory file, hashed
                    // with the template; a whole capture's is its own.
                    meta.memory_sha256 = crate::bake::sha256_file(&memory)
                        .map_err(|e| EngineError::io("hashing the memory file", e))?;
                }
                meta.disk_sha256 = crate::disk::sparse_sha256(&disk)
                    .map_err(|e| EngineError::io("hashing the disk", e))?;
                meta.disk_hash = crate::disk::DiskHash::Content;
                Ok::<_, EngineError>(())
            })?;
        }
        persist::write(
            &building.join("meta.json"),
            crate::bake::META_VERSION,
            &meta,
        )?;
        let dir = templates.join(&name);
        std::fs::rename(&building, &dir).map_err(|e| EngineError::io("naming the capture", e))?;
        if kind == CaptureKind::Snapshot {
            persist::sync_dir(&templates)
                .map_err(|e| EngineError::io("flushing the snapshot", e))?;
        }
        cleanup.disarm();
        report.phases.extend(timings.phases);
        Ok(BakedTemplate { dir, meta })
    }

    /// What a capture of it writes at most: its memory and its own disk layer.
    fn capture_bytes(&self, template: &BakedTemplate) -> u64 {
        let own = allocated(&self.dir.join(disk_name(template.meta.disk_format)));
        (self.limits.memory_mib << 20).saturating_add(own)
    }

    /// Stops the VM; writes its device state alone and the pages it changed into `dir`
    /// (returns `true`), or where its RAM is not its template's memory file, its state with
    /// all of RAM into `dir`'s stream (`false`); writes a sealed copy of its writable disk
    /// layer into `dir`'s disk (rewritten in a jail under `dir`); and lets it run again
    /// (blocking).
    fn capture_parent(
        &self,
        engine: &Inner,
        template: &BakedTemplate,
        dir: &Path,
        timings: &mut PhaseTimings,
        report: &mut ForkReport,
    ) -> Result<bool, EngineError> {
        let (mut vm, resources) = {
            let mut runtime = lock(&self.runtime);
            if runtime.state != SandboxState::Running {
                return Err(EngineError::Conflict(format!(
                    "sandbox `{}` is {}",
                    self.id,
                    runtime.state.name()
                )));
            }
            match (runtime.vm.take(), runtime.resources.take()) {
                (Some(vm), Some(resources)) => (vm, resources),
                (vm, resources) => {
                    runtime.vm = vm;
                    runtime.resources = resources;
                    return Err(EngineError::Conflict(format!(
                        "sandbox `{}` has no VM to fork",
                        self.id
                    )));
                }
            }
        };
        let stopped = Instant::now();
        // The capture's size was admitted before; the monitor limits the VMM again once it
        // is back in the sandbox.
        crate::space::lift(crate::space::Vmm {
            pid: vm.pid(),
            run_as: resources.run_as(),
        });
        let (stream, disk) = (
            dir.join(STREAM),
            dir.join(disk_name(template.meta.disk_format)),
        );
        let memory = template.memory();
        let changed = crate::ramdelta::maps(vm.pid(), &memory).unwrap_or(false);
        let ram_bytes = u64::from(template.meta.machine.memory_mib) << 20;
        let saved = if changed {
            crate::ramdelta::save_changed(
                vm.as_mut(),
                &memory,
                ram_bytes,
                &dir.join("state"),
                &dir.join("ram.delta"),
            )
            .map(|(timings, written)| {
                report.ram_bytes_written = written;
                timings
            })
        } else {
            vm.capture(&stream).map_err(EngineError::from)
        };
        let copied = saved.and_then(|saved| {
            timings.phases.extend(
                saved
                    .phases
                    .into_iter()
                    .map(|(name, ms)| (format!("parent: {name}"), ms)),
            );
            let mut phase = Instant::now();
            let own = self.dir.join(disk_name(template.meta.disk_format));
            let layer = match template.meta.disk_format {
                DiskFormat::Raw => DiskLayer::raw(&own),
                DiskFormat::Qcow2 => DiskLayer::qcow2(&own),
            };
            let mut chain = vec![layer];
            chain.extend(template.disk_chain());
            copy_disk(engine, resources.run_as(), &dir.join("jail"), &chain, &disk)?;
            record(timings, "copy disk", &mut phase);
            Ok(())
        });
        // The parent runs again whatever happened.
        let continued = vm.resume();
        report.parent_paused_ms = stopped.elapsed().as_secs_f64() * 1000.0;
        {
            let mut runtime = lock(&self.runtime);
            runtime.vm = Some(vm);
            runtime.resources = Some(resources);
        }
        copied?;
        continued?;
        Ok(changed)
    }
}

/// The last step of a capture of changed pages: its memory file is the template's (a hard
/// link), its files are sealed; returns its metadata (blocking).
fn seal_changed(
    template: &BakedTemplate,
    dir: &Path,
    disk: &Path,
    lower: &[DiskLayer],
) -> Result<BakedMeta, EngineError> {
    let (memory, state, delta) = (dir.join("memory"), dir.join("state"), dir.join("ram.delta"));
    std::fs::hard_link(template.memory(), &memory)
        .map_err(|e| EngineError::io("linking the template's memory file", e))?;
    for file in [disk, &state, &delta] {
        crate::bake::seal(file)?;
    }
    let hash = |file: &Path| {
        crate::bake::sha256_file(file).map_err(|e| EngineError::io("hashing the capture", e))
    };
    Ok(BakedMeta {
        state_sha256: hash(&state)?,
        ram_delta_sha256: Some(hash(&delta)?),
        // The template's own memory file, hashed with it.
        memory_sha256: template.meta.memory_sha256.clone(),
        disk_sha256: String::new(),
        lower: lower.to_vec(),
        machine: crate::bake::MachineShape {
            devices_state_only: true,
            ..template.meta.machine.clone()
        },
        ..template.meta.clone()
    })
}

/// Step 2: a helper VMM loads `stream` into a shared memory file in `dir` and saves the
/// device state alone; returns the capture's metadata (blocking).
fn convert(
    engine: &Arc<Inner>,
    template: &BakedTemplate,
    dir: &Path,
    stream: &Path,
    disk: &Path,
    lower: &[DiskLayer],
    timings: &mut PhaseTimings,
) -> Result<BakedMeta, EngineError> {
    let mut phase = Instant::now();
    // The capture's disk is final: root's and read-only before any VMM sees it.
    crate::bake::seal(disk)?;
    let shape = &template.meta.machine;
    let memory = dir.join("memory");
    std::fs::File::create(&memory)
        .and_then(|file| file.set_len(u64::from(shape.memory_mib) << 20))
        .map_err(|e| EngineError::io("creating the memory file", e))?;
    // The helper never runs the guest, and still gets a scratch layer on top: the capture's
    // own disk is never writable by any VMM.
    let scratch = dir.join("scratch.qcow2");
    crate::disk::qcow2_overlay(&scratch, template.meta.disk_bytes)?;
    let own = match template.meta.disk_format {
        DiskFormat::Raw => DiskLayer::raw(disk),
        DiskFormat::Qcow2 => DiskLayer::qcow2(disk),
    };
    let mut chain = vec![DiskLayer::qcow2(&scratch), own];
    chain.extend(lower.iter().cloned());
    let run_dir = dir.join("run");
    let spec = shape.vm_spec(
        &run_dir,
        chain,
        MemoryBacking::File {
            path: memory.clone(),
            shared: true,
        },
        true,
    );
    let name = format!("conv-{}", hex::encode(rand::random::<[u8; 4]>()));
    // Room for the memory file's pages in the page cache (charged to it) besides its own.
    let limits = crate::cgroup::CgroupLimits {
        memory_mib: 2 * u64::from(shape.memory_mib) + crate::confine::VMM_OVERHEAD_MIB,
        ..crate::confine::default_limits(shape)
    };
    let (confinement, resources) =
        crate::confine::confine(engine, &name, limits, &[&scratch, &memory], None)?;
    let mut helper = crate::confine::launch_recorded(engine, spec, confinement, dir, &name)?;
    helper.wait_started(Duration::from_secs(30))?;
    record(timings, "helper VMM", &mut phase);
    let file = std::fs::File::open(stream).map_err(|e| EngineError::io("opening the stream", e))?;
    let failed = |e: kiln_vmm::driver::DriverError, helper: &dyn kiln_vmm::driver::Vm| {
        EngineError::Boot(format!(
            "the capture's helper VMM: {e}; VMM: {}",
            helper.diagnostics()
        ))
    };
    if let Err(e) = helper.load_captured(&file) {
        return Err(failed(e, helper.as_ref()));
    }
    record(timings, "load into memory file", &mut phase);
    let state = dir.join("state");
    if let Err(e) = helper.snapshot(&state) {
        return Err(failed(e, helper.as_ref()));
    }
    helper.kill()?;
    drop(helper);
    resources.release()?;
    record(timings, "save device state alone", &mut phase);
    for leftover in [&scratch, stream] {
        std::fs::remove_file(leftover)
            .map_err(|e| EngineError::io("removing the capture's scratch files", e))?;
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_file(dir.join(crate::leftovers::PID_FILE));
    for file in [&memory, &state] {
        crate::bake::seal(file)?;
    }
    let state_sha256 = crate::bake::sha256_file(&state)
        .map_err(|e| EngineError::io("hashing the device state", e))?;
    record(timings, "seal", &mut phase);
    Ok(BakedMeta {
        state_sha256,
        // Not re-hashed: a capture is used at once by the daemon that made it, from files
        // only root can write; the device state is checked on every restore.
        memory_sha256: String::new(),
        disk_sha256: String::new(),
        lower: lower.to_vec(),
        // All of RAM is in the memory file.
        ram_delta_sha256: None,
        ..template.meta.clone()
    })
}

/// Copies the writable layer of `chain` into `disk` (see [`crate::bake::seal_disk_copy`]) as
/// `run_as`, in a cgroup of its own (the sandbox's has room for its VMM only).
fn copy_disk(
    engine: &Inner,
    run_as: Option<(u32, u32)>,
    jail_root: &Path,
    chain: &[DiskLayer],
    disk: &Path,
) -> Result<(), EngineError> {
    let cgroup = match &engine.cgroups {
        Some(cgroups) => Some(cgroups.create(
            &format!("copy-{}", hex::encode(rand::random::<[u8; 4]>())),
            crate::cgroup::CgroupLimits {
                cpus: 1.0,
                memory_mib: 1024,
            },
        )?),
        None => None,
    };
    let procs = match &cgroup {
        Some(cgroup) => cgroup.procs_files()?,
        None => Vec::new(),
    };
    let copied = crate::bake::seal_disk_copy(run_as, procs, jail_root, chain, disk);
    if let Some(cgroup) = cgroup {
        if let Err(e) = cgroup.remove() {
            tracing::warn!(error = %e, "removing the disk copy's cgroup");
        }
    }
    copied
}

/// Whether `dir` (a capture) is used: by a live sandbox (as its source, or as a layer of its
/// source's disk chain), by a fork making sandboxes from it, or as a layer under another
/// capture or snapshot (`layers`, from [`capture_layers`]): a fork under way whose parent is
/// destroyed has its children not yet counted as users, but its capture stands on the
/// parent's source.
fn in_use(engine: &Inner, dir: &Path, layers: &[PathBuf]) -> bool {
    !users(engine, dir).is_empty()
        || lock(&engine.pinned_captures).contains(dir)
        || layers.iter().any(|layer| layer.starts_with(dir))
}

/// The live sandboxes (running, paused or failed) whose memory or disk is backed by files
/// in `dir`: as their source, or as a layer of their source's disk chain.
pub(crate) fn users(engine: &Inner, dir: &Path) -> Vec<String> {
    lock(&engine.sandboxes)
        .values()
        .filter(|sandbox| {
            sandbox.source.as_ref().is_some_and(|source| {
                source.dir == dir || source.meta.lower.iter().any(|l| l.path.starts_with(dir))
            })
        })
        .map(|sandbox| sandbox.id().to_owned())
        .collect()
}

/// Whether `name`, an entry of the templates directory, holds a sandbox's capture (a fork's
/// or a snapshot, finished or being made) rather than a baked template.
pub(crate) fn is_capture_name(name: &str) -> bool {
    let name = name.strip_prefix(".bake-").unwrap_or(name);
    name.starts_with(CAPTURE_PREFIX) || name.starts_with(SNAPSHOT_PREFIX)
}

/// The disk layers the engine's captures and snapshots read through (paths into other
/// artefact directories).
pub(crate) fn capture_layers(engine: &Inner) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(engine.config.data_dir.join("templates")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| is_capture_name(&entry.file_name().to_string_lossy()))
        .filter_map(|entry| BakedTemplate::open(&entry.path()).ok())
        .flat_map(|capture| capture.meta.lower.into_iter().map(|layer| layer.path))
        .collect()
}

/// Removes every capture nothing uses, until none is left to remove (removing one can leave
/// the capture it stood on unused).
pub(crate) fn remove_unused_captures(engine: &Inner) {
    let templates = engine.config.data_dir.join("templates");
    loop {
        let Ok(entries) = std::fs::read_dir(&templates) else {
            return;
        };
        let layers = capture_layers(engine);
        let mut removed = false;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(CAPTURE_PREFIX) {
                continue;
            }
            let dir = entry.path();
            if in_use(engine, &dir, &layers) {
                continue;
            }
            tracing::info!(capture = %dir.display(), "removing a capture nothing uses");
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed = true,
                Err(e) => {
                    tracing::warn!(capture = %dir.display(), error = %e, "removing a capture")
                }
            }
        }
        if !removed {
            return;
        }
    }
}

/// Forks `parent` `count` times (see [`crate::Engine::fork`]).
pub(crate) async fn fork(
    engine: &Arc<Inner>,
    parent: &Arc<Sandbox>,
    count: usize,
    options: CreateOptions,
) -> Result<(Vec<Arc<Sandbox>>, ForkReport), EngineError> {
    if !(1..=32).contains(&count) {
        return Err(EngineError::Invalid(format!(
            "count must be 1 to 32 (got {count})"
        )));
    }
    if parent.state() == SandboxState::Paused {
        parent.resume().await?;
    }
    let started = Instant::now();
    let mut report = ForkReport::default();
    let children_bytes = crate::space::NEW_SANDBOX_BYTES.saturating_mul(count as u64);
    let capture = parent
        .capture(
            engine,
            &mut report,
            CaptureKind::Fork,
            children_bytes,
            "fork the sandbox",
        )
        .await?;
    let pin = Pin::new(engine, &capture.dir);
    let phase = Instant::now();
    let options = CreateOptions {
        cpus: Some(parent.limits.cpus),
        memory_mib: Some(parent.limits.memory_mib),
        network: options.network.or_else(|| parent.egress()),
        ..options
    };
    let creates = (0..count).map(|_| crate::sandbox::create(engine, &capture, options.clone()));
    let results = futures_util::future::join_all(creates).await;
    let (children, failures): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let children: Vec<Arc<Sandbox>> = children.into_iter().filter_map(Result::ok).collect();
    if let Some(Err(e)) = failures.into_iter().next() {
        // All or nothing.
        for child in &children {
            if let Err(e) = child.destroy().await {
                tracing::warn!(sandbox = %child.id(), error = %e, "removing a fork's child");
            }
        }
        drop(pin);
        remove_unused_captures(engine);
        return Err(e);
    }
    drop(pin);
    report.phases.push((
        format!("{count} creates"),
        phase.elapsed().as_secs_f64() * 1000.0,
    ));
    report
        .phases
        .push(("total".into(), started.elapsed().as_secs_f64() * 1000.0));
    let _ = engine.events.send(crate::SandboxEvent::Forked {
        id: parent.id().to_owned(),
        children: children.iter().map(|c| c.id().to_owned()).collect(),
    });
    Ok((children, report))
}

/// Keeps a capture (or a baked template) from being removed while sandboxes are being made
/// from it.
pub(crate) struct Pin<'a> {
    engine: &'a Inner,
    dir: PathBuf,
}

impl<'a> Pin<'a> {
    pub(crate) fn new(engine: &'a Inner, dir: &Path) -> Pin<'a> {
        lock(&engine.pinned_captures).insert(dir.to_owned());
        Pin {
            engine,
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        lock(&self.engine.pinned_captures).remove(&self.dir);
    }
}
