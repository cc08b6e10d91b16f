//! Baking a template: boot it cold, run its start command, sync, and snapshot it (RAM in a
//! shared memory file, device state through migration with `x-ignore-shared`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_agent_client::{AgentClient, ClientConfig, UnixConnector};
pub(crate) use kiln_image::cache::sha256_file;
use kiln_image::cache::Inputs;
use kiln_image::template::TemplateImages;
use kiln_proto::messages::{Command, ExecRequest, InitRequest};
use kiln_vmm::driver::{DiskFormat, DiskLayer, Hypervisor, MemoryBacking, PhaseTimings, VmSpec};
use serde::{Deserialize, Serialize};

use crate::disk::DiskHash;
use crate::persist;
use crate::EngineError;

/// Version of the baked-template metadata format.
pub(crate) const META_VERSION: u32 = 2;

/// Options of a bake.
#[derive(Debug, Clone, Default)]
pub struct BakeOptions {
    /// Take the snapshot while the host's agent session is still open. Restores must work
    /// either way; tests bake both ways to prove it.
    pub keep_agent_connected: bool,
    /// The tenant whose own template this is (`None`: a global template). Part of the bake
    /// key, so two tenants' byte-identical specs never share a bake (its start command ran
    /// with one tenant's inputs).
    pub owner: Option<String>,
    /// Publish the bake without first making a sandbox from it. By default a bake is
    /// checked so (a snapshot whose agent does not answer when restored is baked again, at
    /// most twice); a test of restores themselves skips the check to see every bake as made.
    pub skip_restore_check: bool,
}

/// What a restore needs, saved next to the snapshot files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BakedMeta {
    /// The template's name.
    pub name: String,
    /// The bake key (hash of every input a restore depends on).
    pub key: String,
    /// The inputs, for "why was this re-baked" messages.
    pub inputs: Vec<(String, String)>,
    /// The machine (kernel, initramfs, size).
    pub machine: MachineShape,
    /// Base root filesystem image (read-only backing of the template disk).
    pub rootfs: PathBuf,
    /// The template disk format: raw where sandbox disks are reflinks of it, else a qcow2
    /// layer over `rootfs`.
    pub disk_format: DiskFormat,
    /// SHA-256 of the template disk ([`crate::disk::sparse_sha256_as`] `disk_hash`),
    /// checked with the memory file.
    pub disk_sha256: String,
    /// How `disk_sha256` was computed (files from before content hashing say
    /// [`DiskHash::Extents`]).
    #[serde(default)]
    pub disk_hash: DiskHash,
    /// The accelerator it was baked for.
    pub accel: kiln_vmm::accel::Accel,
    /// SHA-256 of the device state file, checked on every restore.
    pub state_sha256: String,
    /// SHA-256 of the memory file, checked at bake and when the engine opens the template.
    pub memory_sha256: String,
    /// Size of the root disk as the guest sees it (sandboxes may grow it, never shrink it).
    #[serde(default)]
    pub disk_bytes: u64,
    /// How long the bake's phases took.
    pub timings: Vec<(String, f64)>,
    /// Default environment, workdir and user of the template's processes.
    pub init: InitRequest,
    /// For a fork's capture: every disk layer below its own (the parent's template's, or an
    /// earlier capture's), named by kiln. Empty for a template.
    #[serde(default)]
    pub lower: Vec<DiskLayer>,
    /// For a fork's capture: the sandbox it was captured from.
    #[serde(default)]
    pub capture_of: Option<String>,
    /// For a capture of changed pages: SHA-256 of `ram.delta` (the pages the sandbox had
    /// written over its memory file, which is `memory`), checked on every restore. `None`:
    /// `memory` holds all of RAM.
    #[serde(default)]
    pub ram_delta_sha256: Option<String>,
}

/// A baked template on disk.
#[derive(Debug, Clone)]
pub struct BakedTemplate {
    /// Its directory.
    pub dir: PathBuf,
    /// Its metadata.
    pub meta: BakedMeta,
}

impl BakedTemplate {
    /// The shared memory file.
    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }

    /// The device state file.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The changed pages of a capture (see [`BakedMeta::ram_delta_sha256`]).
    pub fn ram_delta(&self) -> PathBuf {
        self.dir.join("ram.delta")
    }

    /// Reads the changed pages a restore writes over the memory file, if this is a capture of
    /// changed pages, and checks their structure (every restore does). `hash`: also their
    /// checksum, which [`BakedTemplate::verify`] does once per run of the daemon, as for the
    /// memory file (the file is root's and sealed; the checksum finds corruption).
    pub(crate) fn read_ram_delta(
        &self,
        hash: bool,
    ) -> Result<Option<crate::ramdelta::Delta>, EngineError> {
        let Some(expected) = &self.meta.ram_delta_sha256 else {
            return Ok(None);
        };
        let bytes = std::fs::read(self.ram_delta())
            .map_err(|e| EngineError::io("reading the capture's changed pages", e))?;
        if hash && &kiln_image::cache::sha256_hex(&bytes) != expected {
            return Err(EngineError::Corrupt(format!(
                "{}: changed pages checksum mismatch",
                self.dir.display()
            )));
        }
        let ram = u64::from(self.meta.machine.memory_mib) << 20;
        crate::ramdelta::Delta::parse(bytes, ram)
            .map(Some)
            .map_err(|e| EngineError::Corrupt(format!("{}: {e}", self.ram_delta().display())))
    }

    /// The template's root disk (backing of every sandbox disk).
    pub fn disk(&self) -> PathBuf {
        self.dir.join(match self.meta.disk_format {
            DiskFormat::Qcow2 => "disk.qcow2",
            DiskFormat::Raw => "disk.raw",
        })
    }

    /// The read-only layers a sandbox disk reads through to, as kiln names them: the
    /// template disk, and (for a qcow2 template disk) the root filesystem below it.
    pub fn disk_chain(&self) -> Vec<DiskLayer> {
        if self.meta.capture_of.is_some() {
            let own = match self.meta.disk_format {
                DiskFormat::Raw => DiskLayer::raw(self.disk()),
                DiskFormat::Qcow2 => DiskLayer::qcow2(self.disk()),
            };
            return std::iter::once(own)
                .chain(self.meta.lower.iter().cloned())
                .collect();
        }
        match self.meta.disk_format {
            DiskFormat::Raw => vec![DiskLayer::raw(self.disk())],
            DiskFormat::Qcow2 => vec![
                DiskLayer::qcow2(self.disk()),
                DiskLayer::raw(&self.meta.rootfs),
            ],
        }
    }

    /// Reads and checks a baked template's metadata.
    pub fn open(dir: &Path) -> Result<BakedTemplate, EngineError> {
        let meta: BakedMeta = persist::read(&dir.join("meta.json"), META_VERSION)?;
        Ok(BakedTemplate {
            dir: dir.to_owned(),
            meta,
        })
    }

    /// Copies this template into `templates` (another data directory's `templates`, where an
    /// engine whose bake inputs are the same finds it instead of baking): its metadata and
    /// sealed files only, reflinked where the filesystem allows and holes kept, published
    /// under the same name in one rename. A fork's capture is refused (its layers name
    /// directories of this data directory). Like every template, the copy is verified when
    /// an engine first uses it. Returns the copy (the one already there, if any).
    pub fn copy_into(&self, templates: &Path) -> Result<BakedTemplate, EngineError> {
        if self.meta.capture_of.is_some() {
            return Err(EngineError::Invalid(format!(
                "{} is a fork's capture, not a template",
                self.dir.display()
            )));
        }
        let name = self
            .dir
            .file_name()
            .ok_or_else(|| EngineError::Invalid(format!("{} has no name", self.dir.display())))?;
        let target = templates.join(name);
        if target.join("meta.json").is_file() {
            return BakedTemplate::open(&target);
        }
        // Named as a bake in progress: an engine's start removes one a killed copy left.
        let staging = tempfile::Builder::new()
            .prefix(".bake-copy-")
            .tempdir_in(templates)
            .map_err(|e| EngineError::io("creating a template copy's directory", e))?;
        for file in [self.memory(), self.state(), self.disk()] {
            let to = staging.path().join(
                file.file_name()
                    .expect("memory(), state() and disk() name files"),
            );
            crate::disk::clone_or_copy(&file, &to)?;
            seal(&to)?;
        }
        std::fs::copy(self.dir.join("meta.json"), staging.path().join("meta.json"))
            .map_err(|e| EngineError::io("copying a template's metadata", e))?;
        std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| EngineError::io("publishing a template copy", e))?;
        match std::fs::rename(staging.path(), &target) {
            Ok(()) => {
                // Renamed away: nothing left for the guard to remove.
                let _ = staging.keep();
            }
            // Another copy was published first; this one goes with its guard.
            Err(_) if target.join("meta.json").is_file() => {}
            Err(e) => return Err(EngineError::io("publishing a template copy", e)),
        }
        BakedTemplate::open(&target)
    }

    /// Re-hashes the memory file, the template disk and the device state (slow: done at bake
    /// and when the daemon first uses the template; every restore checks the state again).
    pub fn verify(&self) -> Result<(), EngineError> {
        self.read_state()?;
        let memory = sha256_file(&self.memory())
            .map_err(|e| EngineError::io("hashing the memory file", e))?;
        if memory != self.meta.memory_sha256 {
            return Err(EngineError::Corrupt(format!(
                "{}: memory file checksum mismatch",
                self.dir.display()
            )));
        }
        let disk = crate::disk::sparse_sha256_as(&self.disk(), self.meta.disk_hash)
            .map_err(|e| EngineError::io("hashing the template disk", e))?;
        if disk != self.meta.disk_sha256 {
            return Err(EngineError::Corrupt(format!(
                "{}: template disk checksum mismatch",
                self.dir.display()
            )));
        }
        self.read_ram_delta(true)?;
        Ok(())
    }

    /// Reads the device state, checking its checksum (done on every restore).
    pub fn read_state(&self) -> Result<Vec<u8>, EngineError> {
        let bytes = std::fs::read(self.state())
            .map_err(|e| EngineError::io("reading the device state", e))?;
        if kiln_image::cache::sha256_hex(&bytes) != self.meta.state_sha256 {
            return Err(EngineError::Corrupt(format!(
                "{}: device state checksum mismatch",
                self.dir.display()
            )));
        }
        Ok(bytes)
    }
}

/// The machine a template runs on: identical for the bake VM and every VM restored from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    /// Kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Extra kernel command-line words (e.g. `KILN_AGENT_LOG=debug`).
    #[serde(default)]
    pub extra_cmdline: Vec<String>,
    /// MAC address of the guest NIC (the same in every clone).
    #[serde(default)]
    pub nic_mac: Option<String>,
    /// Its saved states hold no configuration section (a fork's capture of changed pages:
    /// see [`kiln_vmm::driver::VmSpec::devices_state_only`]).
    #[serde(default)]
    pub devices_state_only: bool,
}

impl MachineShape {
    /// The shape of `images`, with the agent logging at `guest_log` (a filter), if given.
    pub fn with_guest_log(images: &TemplateImages, guest_log: Option<&str>) -> MachineShape {
        let mut shape = MachineShape::of(images);
        if let Some(filter) = guest_log {
            shape.extra_cmdline.push(format!("KILN_AGENT_LOG={filter}"));
        }
        shape
    }

    /// The shape of `images`.
    pub fn of(images: &TemplateImages) -> MachineShape {
        MachineShape {
            kernel: images.kernel.vmlinux.clone(),
            initramfs: images.kernel.initramfs.clone(),
            vcpus: images.spec.resources.vcpus,
            memory_mib: images.spec.resources.memory_mib,
            extra_cmdline: Vec::new(),
            nic_mac: Some(kiln_net::GUEST_MAC.to_owned()),
            devices_state_only: false,
        }
    }

    /// A VM of this shape.
    pub fn vm_spec(
        &self,
        run_dir: &Path,
        root_disk: Vec<DiskLayer>,
        memory: MemoryBacking,
        incoming: bool,
    ) -> VmSpec {
        VmSpec {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            extra_cmdline: self.extra_cmdline.clone(),
            root_disk,
            memory,
            incoming,
            nic_mac: self.nic_mac.clone(),
            devices_state_only: self.devices_state_only,
            run_dir: run_dir.to_owned(),
        }
    }
}

/// The guest's network configuration (the same in every clone).
pub fn guest_network() -> kiln_proto::messages::NetworkConfig {
    kiln_proto::messages::NetworkConfig {
        interface: "eth0".into(),
        address: kiln_net::GUEST_ADDRESS,
        prefix_len: kiln_net::PREFIX_LEN,
        gateway: Some(kiln_net::GATEWAY_ADDRESS),
        mtu: None,
    }
}

/// The inputs a restore depends on.
pub fn bake_inputs(
    images: &TemplateImages,
    driver: &dyn Hypervisor,
    spec: &VmSpec,
    init: &InitRequest,
    owner: Option<&str>,
) -> Inputs {
    let mut inputs = Inputs::new("baked-template");
    if let Some(owner) = owner {
        inputs.add("owner", owner);
    }
    inputs
        .add("kernel", images.kernel.dir.display().to_string())
        .add("rootfs", images.rootfs.dir.display().to_string())
        .add("vmm", format!("{} {}", driver.name(), driver.version()))
        .add("accel", driver.accel().accel.qemu_name())
        .add("devices", driver.restore_signature(spec))
        .add("init", serde_json::to_string(init).unwrap_or_default());
    inputs
}

/// Everything one bake needs.
#[derive(Debug)]
pub(crate) struct BakeJob<'a> {
    pub(crate) shape: MachineShape,
    pub(crate) images: &'a TemplateImages,
    pub(crate) engine: &'a std::sync::Arc<crate::Inner>,
    pub(crate) inputs: &'a Inputs,
    pub(crate) init: &'a InitRequest,
    pub(crate) out: &'a Path,
    pub(crate) options: BakeOptions,
}

/// Boots the template cold and snapshots it into `job.out`.
pub(crate) async fn bake_into(job: BakeJob<'_>) -> Result<BakedTemplate, EngineError> {
    let BakeJob {
        shape,
        images,
        engine,
        inputs,
        init,
        out,
        options,
    } = job;
    let started = Instant::now();
    let mut timings = PhaseTimings::default();
    let rootfs_bytes = std::fs::metadata(&images.rootfs.image)
        .map_err(|e| EngineError::io("reading the root filesystem's size", e))?
        .len();
    // The bake VM writes a disk of its own: a private copy of the root filesystem where
    // sandbox disks will be reflinks, else a qcow2 layer over the (read-only) image. Either
    // way it is replaced afterwards by a file the VMM never held.
    let (vm_disk, disk_format) = if engine.reflink {
        let disk = out.join("bake-disk.raw");
        crate::disk::clone_or_copy(&images.rootfs.image, &disk)?;
        (vec![DiskLayer::raw(&disk)], DiskFormat::Raw)
    } else {
        let disk = out.join("bake-disk.qcow2");
        crate::disk::qcow2_overlay(&disk, rootfs_bytes)?;
        (
            vec![
                DiskLayer::qcow2(&disk),
                DiskLayer::raw(&images.rootfs.image),
            ],
            DiskFormat::Qcow2,
        )
    };
    // RAM is written through to the memory file, which the VMM must be able to write.
    let memory_file = out.join("memory");
    std::fs::File::create(&memory_file)
        .and_then(|file| file.set_len(u64::from(shape.memory_mib) << 20))
        .map_err(|e| EngineError::io("creating the memory file", e))?;
    let run_dir = out.join("run");
    let memory = MemoryBacking::File {
        path: memory_file.clone(),
        shared: true,
    };
    let spec = shape.vm_spec(&run_dir, vm_disk.clone(), memory, false);
    let name = format!("bake-{}", hex::encode(rand::random::<[u8; 4]>()));
    let limits = crate::confine::default_limits(&shape);
    let (confinement, resources) = crate::confine::confine(
        engine,
        &name,
        limits,
        &[&vm_disk[0].path, &memory_file],
        None,
    )?;
    let mut qemu = crate::confine::launch_recorded(engine, spec, confinement, out, &name)?;
    tokio::task::block_in_place(|| qemu.wait_started(Duration::from_secs(30)))?;
    // The init call answers once the template's start command is ready, which it may take
    // its whole `timeout_ms` to be.
    let defaults = ClientConfig::default();
    let call_timeout = init.start.as_ref().map_or(defaults.call_timeout, |start| {
        defaults.call_timeout + Duration::from_millis(start.timeout_ms)
    });
    let client = AgentClient::new(
        std::sync::Arc::new(UnixConnector::new(qemu.agent_socket())),
        ClientConfig {
            handshake_timeout: Duration::from_secs(180),
            call_timeout,
            ..defaults
        },
    );
    if let Err(e) = client.connect().await {
        return Err(EngineError::Boot(format!(
            "{e}; VMM: {}; console:\n{}",
            qemu.diagnostics(),
            qemu.console_tail(30)
        )));
    }
    let mut phase = Instant::now();
    timings.phases.push((
        "cold boot to agent".into(),
        started.elapsed().as_secs_f64() * 1000.0,
    ));
    client.init(init).await?;
    let sync = client
        .run(ExecRequest::new(Command::Argv(vec!["sync".into()])), 4096)
        .await?;
    if sync.status.code != Some(0) {
        return Err(EngineError::Boot(format!(
            "sync failed in the guest: {:?}",
            sync.status
        )));
    }
    // Reseed right before the snapshot: restored VMs then start from a freshly keyed CRNG
    // (and the post-restore call on each of them rekeys it again with its own entropy).
    let mut entropy = [0u8; 64];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut entropy);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    client
        .post_restore(&kiln_proto::messages::PostRestoreRequest {
            wall_clock_ns: now,
            entropy_hex: hex::encode(entropy),
            hostname: None,
            metadata: None,
        })
        .await?;
    timings.phases.push((
        "init and sync".into(),
        phase.elapsed().as_secs_f64() * 1000.0,
    ));
    // Normally the snapshot is taken with the host disconnected: restored agents then see a
    // fresh connection. (A session left open is handled too: the agent drops it when the
    // first hello arrives.)
    if !options.keep_agent_connected {
        client.disconnect().await;
    }
    phase = Instant::now();
    let state = out.join("state");
    let snapshot = tokio::task::block_in_place(|| qemu.snapshot(&state))?;
    drop(client);
    timings.phases.extend(snapshot.phases);
    qemu.kill()?;
    drop(qemu);
    timings
        .phases
        .push(("snapshot".into(), phase.elapsed().as_secs_f64() * 1000.0));

    // Seal: everything the VMM could write is now either replaced by a file it never held
    // (the disk) or root's and read-only (the memory file), and hashed.
    phase = Instant::now();
    let disk = out.join(match disk_format {
        DiskFormat::Raw => "disk.raw",
        DiskFormat::Qcow2 => "disk.qcow2",
    });
    tokio::task::block_in_place(|| seal_disk(&resources, &run_dir.join("jail"), &vm_disk, &disk))?;
    resources.release()?;
    let _ = std::fs::remove_dir_all(&run_dir);
    for file in [&disk, &memory_file, &state] {
        seal(file)?;
    }
    timings
        .phases
        .push(("seal disk".into(), phase.elapsed().as_secs_f64() * 1000.0));

    phase = Instant::now();
    let state_sha256 =
        sha256_file(&state).map_err(|e| EngineError::io("hashing the device state", e))?;
    let memory_sha256 =
        sha256_file(&memory_file).map_err(|e| EngineError::io("hashing the memory file", e))?;
    let disk_sha256 = crate::disk::sparse_sha256(&disk)
        .map_err(|e| EngineError::io("hashing the template disk", e))?;
    timings
        .phases
        .push(("checksums".into(), phase.elapsed().as_secs_f64() * 1000.0));
    timings
        .phases
        .push(("total".into(), started.elapsed().as_secs_f64() * 1000.0));
    let meta = BakedMeta {
        name: images.spec.name.clone(),
        key: inputs.key(),
        inputs: inputs.entries().to_vec(),
        machine: shape,
        rootfs: images.rootfs.image.clone(),
        disk_format,
        disk_sha256,
        disk_hash: DiskHash::Content,
        accel: engine.driver.accel().accel,
        state_sha256,
        memory_sha256,
        disk_bytes: rootfs_bytes,
        timings: timings.phases,
        init: init.clone(),
        lower: Vec::new(),
        capture_of: None,
        ram_delta_sha256: None,
    };
    persist::write(&out.join("meta.json"), META_VERSION, &meta)?;
    Ok(BakedTemplate {
        dir: out.to_owned(),
        meta,
    })
}

/// Replaces the bake VM's disk (`vm_disk[0]`, which the VMM wrote) by `sealed`, a file the
/// VMM never held: a reflink or copy of a raw disk, a jailed rewrite of a qcow2 layer (its
/// header never followed). The VMM's file is removed.
fn seal_disk(
    resources: &crate::confine::VmResources,
    jail_root: &Path,
    vm_disk: &[DiskLayer],
    sealed: &Path,
) -> Result<(), EngineError> {
    seal_disk_copy(
        resources.run_as(),
        resources.cgroup_procs()?,
        jail_root,
        vm_disk,
        sealed,
    )?;
    std::fs::remove_file(&vm_disk[0].path)
        .map_err(|e| EngineError::io("removing the bake VM's disk", e))
}

/// Copies a VM's writable disk layer (`vm_disk[0]`, over the rest of the chain) into
/// `sealed`, a file no VMM held: a reflink or copy of a raw disk, a rewrite of a qcow2 layer
/// run in a jail as `run_as` in the cgroups `cgroups` (its header never followed).
pub(crate) fn seal_disk_copy(
    run_as: Option<(u32, u32)>,
    cgroups: Vec<std::os::fd::OwnedFd>,
    jail_root: &Path,
    vm_disk: &[DiskLayer],
    sealed: &Path,
) -> Result<(), EngineError> {
    let untrusted = &vm_disk[0];
    match untrusted.format {
        DiskFormat::Raw => crate::disk::clone_or_copy(&untrusted.path, sealed)?,
        DiskFormat::Qcow2 => {
            std::fs::create_dir_all(jail_root)
                .map_err(|e| EngineError::io("making the jail for the disk rewrite", e))?;
            crate::disk::rewrite_qcow2(
                jail_root,
                run_as,
                cgroups,
                &untrusted.path,
                &vm_disk[1..],
                sealed,
                Duration::from_secs(600),
            )?;
        }
    }
    Ok(())
}

/// Makes a template file root's and read-only for everyone: VMMs reach it only through a
/// read-only bind in their jail, and no one else can traverse the data directory.
pub(crate) fn seal(file: &Path) -> Result<(), EngineError> {
    std::os::unix::fs::chown(file, Some(0), Some(0))
        .and_then(|()| std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o444)))
        .map_err(|e| EngineError::io(&format!("sealing {}", file.display()), e))
}

/// See [`crate::Engine::measure_cold_boot`].
pub(crate) async fn cold_boot(
    engine: &std::sync::Arc<crate::Inner>,
    images: &TemplateImages,
) -> Result<Duration, EngineError> {
    let shape = MachineShape::with_guest_log(images, engine.config.guest_log.as_deref());
    let dir = tempfile::Builder::new()
        .prefix(".cold-")
        .tempdir_in(engine.config.data_dir.join("sandboxes"))
        .map_err(|e| EngineError::io("creating the cold-boot directory", e))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(|e| EngineError::io("creating the cold-boot directory", e))?;
    let disk = dir.path().join("disk.qcow2");
    let rootfs_bytes = std::fs::metadata(&images.rootfs.image)
        .map_err(|e| EngineError::io("reading the root filesystem's size", e))?
        .len();
    crate::disk::qcow2_overlay(&disk, rootfs_bytes)?;
    let spec = shape.vm_spec(
        &dir.path().join("run"),
        vec![
            DiskLayer::qcow2(&disk),
            DiskLayer::raw(&images.rootfs.image),
        ],
        MemoryBacking::Anonymous,
        false,
    );
    let name = format!("cold-{}", hex::encode(rand::random::<[u8; 4]>()));
    let limits = crate::confine::default_limits(&shape);
    let (confinement, resources) = crate::confine::confine(engine, &name, limits, &[&disk], None)?;
    let start = Instant::now();
    let mut vm = crate::confine::launch_recorded(engine, spec, confinement, dir.path(), &name)?;
    tokio::task::block_in_place(|| vm.wait_started(Duration::from_secs(30)))?;
    let client = AgentClient::new(
        std::sync::Arc::new(UnixConnector::new(vm.agent_socket())),
        ClientConfig {
            hello_interval: Duration::from_millis(20),
            handshake_timeout: Duration::from_secs(180),
            ..ClientConfig::default()
        },
    );
    let result = client
        .run(ExecRequest::new(Command::Argv(vec!["true".into()])), 1024)
        .await?;
    let elapsed = start.elapsed();
    if result.status.code != Some(0) {
        return Err(EngineError::Boot(format!(
            "`true` failed: {:?}",
            result.status
        )));
    }
    client.disconnect().await;
    vm.kill()?;
    drop(vm);
    resources.release()?;
    Ok(elapsed)
}
