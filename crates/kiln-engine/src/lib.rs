//! kiln's microVM engine: bakes templates into snapshots and creates sandboxes by restoring
//! them, each with a copy-on-write root disk, a fresh RNG seed and the host's clock.
//!
//! The daemon drives this library; it holds no HTTP or CLI concerns.

pub mod bake;
pub mod disk;
pub mod persist;
pub mod sandbox;

use std::path::{Path, PathBuf};

use kiln_image::template::TemplateImages;
use kiln_proto::messages::InitRequest;
use kiln_vmm::accel::{AccelChoice, AccelDecision};
use kiln_vmm::qemu::MemoryBacking;

pub use bake::{BakeOptions, BakedTemplate};
pub use sandbox::{CreateOptions, Sandbox};

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
}

impl EngineError {
    pub(crate) fn io(context: &str, source: std::io::Error) -> EngineError {
        EngineError::Io {
            context: context.to_owned(),
            source,
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
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    accel: AccelDecision,
    qemu_version: String,
}

impl Engine {
    /// Opens the engine: resolves the accelerator and QEMU's version.
    pub fn new(config: EngineConfig) -> Result<Engine, EngineError> {
        let accel = kiln_vmm::accel::resolve(config.accel);
        tracing::info!(accel = accel.accel.qemu_name(), reason = %accel.reason, "accelerator chosen");
        let output = std::process::Command::new(&config.qemu)
            .arg("--version")
            .output()
            .map_err(|e| {
                EngineError::io(
                    &format!(
                        "running {} (apt-get install qemu-system-x86)",
                        config.qemu.display()
                    ),
                    e,
                )
            })?;
        let qemu_version = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        for dir in ["templates", "sandboxes"] {
            std::fs::create_dir_all(config.data_dir.join(dir))
                .map_err(|e| EngineError::io("creating the data directory", e))?;
        }
        Ok(Engine {
            config,
            accel,
            qemu_version,
        })
    }

    /// The accelerator in use and why.
    pub fn accel(&self) -> &AccelDecision {
        &self.accel
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Returns the baked snapshot of `images`, baking it first when there is none for
    /// exactly these inputs (a changed kernel, rootfs, QEMU, accelerator or device
    /// configuration means a new key, so a re-bake).
    pub async fn bake(&self, images: &TemplateImages) -> Result<BakedTemplate, EngineError> {
        self.bake_with(images, BakeOptions::default()).await
    }

    /// [`Engine::bake`] with options.
    pub async fn bake_with(
        &self,
        images: &TemplateImages,
        options: BakeOptions,
    ) -> Result<BakedTemplate, EngineError> {
        let init = InitRequest {
            env: images.rootfs.config.env.clone(),
            workdir: images.rootfs.config.workdir.clone(),
            user: images.rootfs.config.user.clone(),
            start: images.rootfs.config.start.clone(),
            hostname: Some(images.spec.name.clone()),
            network: Some(bake::guest_network()),
            ..InitRequest::default()
        };
        let mut shape = bake::MachineShape::of(images);
        if let Some(filter) = &self.config.guest_log {
            shape.extra_cmdline.push(format!("KILN_AGENT_LOG={filter}"));
        }
        let probe = shape.boot_config(
            self.accel.accel,
            Path::new("R"),
            Path::new("D"),
            kiln_vmm::qemu::DiskFormat::Qcow2,
            MemoryBacking::File {
                path: "M".into(),
                shared: true,
            },
            false,
        );
        let inputs = bake::bake_inputs(images, &probe, &self.qemu_version, &init);
        let key = inputs.key();
        let dir = self
            .config
            .data_dir
            .join("templates")
            .join(format!("{}-{key}", images.spec.name));
        if dir.join("meta.json").is_file() {
            match BakedTemplate::open(&dir) {
                Ok(baked) => return Ok(baked),
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
            .tempdir_in(self.config.data_dir.join("templates"))
            .map_err(|e| EngineError::io("creating the bake directory", e))?;
        let baked = bake::bake_into(bake::BakeJob {
            shape,
            images,
            qemu_binary: &self.config.qemu,
            accel: self.accel.accel,
            inputs: &inputs,
            init: &init,
            out: staging.path(),
            options,
        })
        .await?;
        let staged = staging.keep();
        std::fs::rename(&staged, &dir)
            .map_err(|e| EngineError::io("publishing the baked template", e))?;
        Ok(BakedTemplate {
            dir,
            meta: baked.meta,
        })
    }

    /// Describes how an earlier bake of `name` differs from `inputs`, if there is one.
    fn previous_bake(&self, name: &str, inputs: &kiln_image::cache::Inputs) -> Option<String> {
        let entries = std::fs::read_dir(self.config.data_dir.join("templates")).ok()?;
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

    /// Creates a sandbox by restoring `template`.
    pub async fn create(
        &self,
        template: &BakedTemplate,
        options: CreateOptions,
    ) -> Result<Sandbox, EngineError> {
        sandbox::create(self, template, options).await
    }

    pub(crate) fn qemu(&self) -> &Path {
        &self.config.qemu
    }
}
