//! Baking a template: boot it cold, run its start command, sync, and snapshot it (RAM in a
//! shared memory file, device state through migration with `x-ignore-shared`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_agent_client::{AgentClient, ClientConfig, UnixConnector};
use kiln_image::cache::{sha256_file, Inputs};
use kiln_image::template::TemplateImages;
use kiln_proto::messages::{Command, ExecRequest, InitRequest};
use kiln_vmm::driver::{Hypervisor, VmSpec};
use kiln_vmm::qemu::{DiskFormat, MemoryBacking, PhaseTimings};
use serde::{Deserialize, Serialize};

use crate::persist;
use crate::EngineError;

/// Version of the baked-template metadata format.
const META_VERSION: u32 = 1;

/// Options of a bake.
#[derive(Debug, Clone, Copy, Default)]
pub struct BakeOptions {
    /// Take the snapshot while the host's agent session is still open. Restores must work
    /// either way; tests bake both ways to prove it.
    pub keep_agent_connected: bool,
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
    /// The template disk format.
    pub disk_format: DiskFormat,
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

    /// The template's root disk (backing of every sandbox disk).
    pub fn disk(&self) -> PathBuf {
        self.dir.join(match self.meta.disk_format {
            DiskFormat::Qcow2 => "disk.qcow2",
            DiskFormat::Raw => "disk.raw",
        })
    }

    /// Reads and checks a baked template's metadata.
    pub fn open(dir: &Path) -> Result<BakedTemplate, EngineError> {
        let meta: BakedMeta = persist::read(&dir.join("meta.json"), META_VERSION)?;
        Ok(BakedTemplate {
            dir: dir.to_owned(),
            meta,
        })
    }

    /// Re-hashes the memory file (slow: done at bake and when the engine starts).
    pub fn verify_memory(&self) -> Result<(), EngineError> {
        let actual = sha256_file(&self.memory())
            .map_err(|e| EngineError::io("hashing the memory file", e))?;
        if actual != self.meta.memory_sha256 {
            return Err(EngineError::Corrupt(format!(
                "{}: memory file checksum mismatch",
                self.dir.display()
            )));
        }
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
        }
    }

    /// A VM of this shape.
    pub fn vm_spec(
        &self,
        run_dir: &Path,
        disk: &Path,
        disk_format: DiskFormat,
        memory: MemoryBacking,
        incoming: bool,
    ) -> VmSpec {
        VmSpec {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            extra_cmdline: self.extra_cmdline.clone(),
            root_disk: disk.to_owned(),
            root_disk_format: disk_format,
            memory,
            incoming,
            nic_mac: self.nic_mac.clone(),
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
) -> Inputs {
    let mut inputs = Inputs::new("baked-template");
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
    // The bake VM writes the template's disk: a private copy of the root filesystem where
    // sandbox disks will be reflinks of it, else an overlay on the (read-only) image.
    let (disk, disk_format) = if engine.reflink {
        let disk = out.join("disk.raw");
        crate::disk::clone_or_copy(&images.rootfs.image, &disk)?;
        (disk, DiskFormat::Raw)
    } else {
        let disk = out.join("disk.qcow2");
        crate::disk::qcow2_overlay(&images.rootfs.image, DiskFormat::Raw, &disk)?;
        (disk, DiskFormat::Qcow2)
    };
    let run_dir = out.join("run");
    let memory = MemoryBacking::File {
        path: out.join("memory"),
        shared: true,
    };
    let spec = shape.vm_spec(&run_dir, &disk, disk_format, memory, false);
    let name = format!("bake-{}", hex::encode(rand::random::<[u8; 4]>()));
    let limits = crate::sandbox::default_limits(&shape);
    let (confinement, resources) = crate::sandbox::confine(engine, &name, limits, &[&disk])?;
    let mut qemu = crate::sandbox::launch_recorded(engine, spec, confinement, out, &name)?;
    qemu.wait_started(Duration::from_secs(30))?;
    let client = AgentClient::new(
        std::sync::Arc::new(UnixConnector::new(qemu.agent_socket())),
        ClientConfig {
            handshake_timeout: Duration::from_secs(180),
            ..ClientConfig::default()
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
    resources.release()?;
    let _ = std::fs::remove_dir_all(&run_dir);
    // From now on the disk is a read-only base: back to root, readable by VMM users.
    std::os::unix::fs::chown(&disk, Some(0), Some(0))
        .and_then(|()| std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o644)))
        .map_err(|e| EngineError::io("sealing the template disk", e))?;
    timings
        .phases
        .push(("snapshot".into(), phase.elapsed().as_secs_f64() * 1000.0));

    phase = Instant::now();
    let state_sha256 =
        sha256_file(&state).map_err(|e| EngineError::io("hashing the device state", e))?;
    let memory_sha256 = sha256_file(&out.join("memory"))
        .map_err(|e| EngineError::io("hashing the memory file", e))?;
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
        accel: engine.driver.accel().accel,
        state_sha256,
        memory_sha256,
        disk_bytes: std::fs::metadata(&images.rootfs.image)
            .map_err(|e| EngineError::io("reading the root filesystem's size", e))?
            .len(),
        timings: timings.phases,
        init: init.clone(),
    };
    persist::write(&out.join("meta.json"), META_VERSION, &meta)?;
    Ok(BakedTemplate {
        dir: out.to_owned(),
        meta,
    })
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
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .map_err(|e| EngineError::io("creating the cold-boot directory", e))?;
    let disk = dir.path().join("disk.qcow2");
    crate::disk::qcow2_overlay(&images.rootfs.image, DiskFormat::Raw, &disk)?;
    let spec = shape.vm_spec(
        &dir.path().join("run"),
        &disk,
        DiskFormat::Qcow2,
        MemoryBacking::Anonymous,
        false,
    );
    let name = format!("cold-{}", hex::encode(rand::random::<[u8; 4]>()));
    let limits = crate::sandbox::default_limits(&shape);
    let (confinement, resources) = crate::sandbox::confine(engine, &name, limits, &[&disk])?;
    let start = Instant::now();
    let mut vm = crate::sandbox::launch_recorded(engine, spec, confinement, dir.path(), &name)?;
    vm.wait_started(Duration::from_secs(30))?;
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
