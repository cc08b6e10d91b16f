//! Baking a template: boot it cold, run its start command, sync, and snapshot it (RAM in a
//! shared memory file, device state through migration with `x-ignore-shared`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_agent_client::{AgentClient, ClientConfig, UnixConnector};
use kiln_image::cache::{sha256_file, Inputs};
use kiln_image::template::TemplateImages;
use kiln_proto::messages::{Command, ExecRequest, InitRequest};
use kiln_vmm::qemu::{BootConfig, DiskFormat, MemoryBacking, PhaseTimings, QemuProcess};
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

    /// A boot configuration of this shape.
    pub fn boot_config(
        &self,
        accel: kiln_vmm::accel::Accel,
        run_dir: &Path,
        disk: &Path,
        disk_format: DiskFormat,
        memory: MemoryBacking,
        incoming: bool,
    ) -> BootConfig {
        BootConfig {
            accel,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            root_disk: disk.to_owned(),
            root_disk_format: disk_format,
            root_disk_snapshot: false,
            extra_cmdline: self.extra_cmdline.clone(),
            run_dir: run_dir.to_owned(),
            memory,
            incoming,
            // The descriptor number is filled in by whoever starts QEMU (see `attach_tap`).
            nic: self
                .nic_mac
                .clone()
                .map(|mac| kiln_vmm::qemu::GuestNic { mac, tap_fd: -1 }),
        }
    }
}

/// A network namespace with the guest's tap, and the matching QEMU attachments.
pub fn sandbox_network(
    name: &str,
    config: &mut BootConfig,
) -> Result<(kiln_net::netns::NetNs, kiln_vmm::qemu::Attachments), EngineError> {
    use std::os::fd::AsRawFd;
    let ns = kiln_net::netns::NetNs::create(name)
        .map_err(|e| EngineError::io("creating the network namespace", e))?;
    let tap = kiln_net::tap::create_tap(&ns).map_err(|e| EngineError::io("creating the tap", e))?;
    if let Some(nic) = &mut config.nic {
        nic.tap_fd = tap.as_raw_fd();
    }
    let netns = ns
        .open()
        .map_err(|e| EngineError::io("opening the network namespace", e))?;
    Ok((
        ns,
        kiln_vmm::qemu::Attachments {
            netns: Some(netns),
            tap: Some(tap),
        },
    ))
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
    config: &BootConfig,
    qemu_version: &str,
    init: &InitRequest,
) -> Inputs {
    let mut inputs = Inputs::new("baked-template");
    inputs
        .add("kernel", images.kernel.dir.display().to_string())
        .add("rootfs", images.rootfs.dir.display().to_string())
        .add("qemu", qemu_version)
        .add("accel", config.accel.qemu_name())
        .add("devices", config.device_signature())
        .add("init", serde_json::to_string(init).unwrap_or_default());
    inputs
}

/// Everything one bake needs.
#[derive(Debug)]
pub(crate) struct BakeJob<'a> {
    pub(crate) shape: MachineShape,
    pub(crate) images: &'a TemplateImages,
    pub(crate) qemu_binary: &'a Path,
    pub(crate) accel: kiln_vmm::accel::Accel,
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
        qemu_binary,
        accel,
        inputs,
        init,
        out,
        options,
    } = job;
    let started = Instant::now();
    let mut timings = PhaseTimings::default();
    let disk = out.join("disk.qcow2");
    crate::disk::qcow2_overlay(&images.rootfs.image, DiskFormat::Raw, &disk)?;
    let run_dir = out.join("run");
    let memory = MemoryBacking::File {
        path: out.join("memory"),
        shared: true,
    };
    let mut config = shape.boot_config(accel, &run_dir, &disk, DiskFormat::Qcow2, memory, false);
    let ns_name = format!("kiln-bake-{}", hex::encode(rand::random::<[u8; 4]>()));
    let (netns, attachments) = sandbox_network(&ns_name, &mut config)?;
    let mut qemu = QemuProcess::spawn_with(qemu_binary, config, attachments)
        .map_err(|e| EngineError::io("starting QEMU", e))?;
    qemu.wait_for_agent_socket(Duration::from_secs(30))
        .map_err(|e| EngineError::io("waiting for QEMU", e))?;
    let client = AgentClient::new(
        std::sync::Arc::new(UnixConnector::new(qemu.config().agent_socket())),
        ClientConfig {
            handshake_timeout: Duration::from_secs(180),
            ..ClientConfig::default()
        },
    );
    if let Err(e) = client.connect().await {
        return Err(EngineError::Boot(format!(
            "{e}; QEMU: {}; console:\n{}",
            qemu.stderr_tail(),
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
    let snapshot = tokio::task::block_in_place(|| qemu.snapshot_to(&state))?;
    drop(client);
    timings.phases.extend(snapshot.phases);
    qemu.kill()
        .map_err(|e| EngineError::io("stopping the bake VM", e))?;
    drop(qemu);
    netns
        .remove()
        .map_err(|e| EngineError::io("removing the bake's network namespace", e))?;
    let _ = std::fs::remove_dir_all(&run_dir);
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
        disk_format: DiskFormat::Qcow2,
        accel,
        state_sha256,
        memory_sha256,
        timings: timings.phases,
        init: init.clone(),
    };
    persist::write(&out.join("meta.json"), META_VERSION, &meta)?;
    Ok(BakedTemplate {
        dir: out.to_owned(),
        meta,
    })
}
