//! A template's images: its kernel (with the agent's initramfs) and its root filesystem.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cache::{Cache, Origin};
use crate::elf::is_static_executable;
use crate::error::{ImageError, IoContext};
use crate::kernel::{build_kernel, KernelArtefact};
use crate::progress::{human_bytes, Progress};
use crate::rootfs::{build_rootfs_until, RootfsArtefact};
use crate::spec::TemplateSpec;
use crate::tool::Deadline;

/// The template built when none is named.
pub const DEFAULT_TEMPLATE: &str = "python";

/// Everything a template needs to boot.
#[derive(Debug, Clone)]
pub struct TemplateImages {
    /// The validated spec.
    pub spec: TemplateSpec,
    /// Kernel and initramfs.
    pub kernel: KernelArtefact,
    /// Root filesystem and runtime defaults.
    pub rootfs: RootfsArtefact,
}

impl TemplateImages {
    /// A one-line summary for people.
    pub fn summary(&self, elapsed_secs: f64) -> String {
        let origin = |o: Origin| {
            if o == Origin::Cached {
                "cached"
            } else {
                "built"
            }
        };
        format!(
            "template {}: kernel {} ({}, vmlinux {}, initramfs {}), rootfs {} ({} used of a {} disk) in {:.1} s",
            self.spec.name,
            self.kernel.release,
            origin(self.kernel.origin),
            human_bytes(file_bytes(&self.kernel.vmlinux)),
            human_bytes(file_bytes(&self.kernel.initramfs)),
            origin(self.rootfs.origin),
            human_bytes(allocated_bytes(&self.rootfs.image)),
            human_bytes(file_bytes(&self.rootfs.image)),
            elapsed_secs,
        )
    }
}

/// A file's length in bytes (0 if it cannot be read).
pub fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Bytes a (sparse) file occupies on disk (0 if it cannot be read).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Builds (or takes from the cache) every image of the template at `spec_path`.
pub fn build_template(
    spec_path: &Path,
    agent: &Path,
    cache: &Cache,
    progress: &dyn Progress,
) -> Result<TemplateImages, ImageError> {
    build_template_until(spec_path, agent, cache, progress, None)
}

/// [`build_template`], with the root filesystem's build (its packages resolved and
/// installed) stopped, and failed, once it has taken `limit`. The kernel, shared by every
/// template, is not held to it.
pub fn build_template_until(
    spec_path: &Path,
    agent: &Path,
    cache: &Cache,
    progress: &dyn Progress,
    limit: Option<std::time::Duration>,
) -> Result<TemplateImages, ImageError> {
    let spec = TemplateSpec::from_file(spec_path)?;
    let agent_bytes =
        std::fs::read(agent).context(|| format!("reading the agent {}", agent.display()))?;
    if !is_static_executable(&agent_bytes) {
        return Err(ImageError::AgentNotStatic {
            path: agent.to_owned(),
        });
    }
    let spec_dir = spec_path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned);
    crate::rootfs::check_files(&spec, &spec_dir)?;
    let kernel = build_kernel(agent, cache, progress)?;
    let deadline = limit.map(Deadline::after);
    let rootfs = build_rootfs_until(&spec, &spec_dir, agent, cache, progress, deadline)?;
    Ok(TemplateImages {
        spec,
        kernel,
        rootfs,
    })
}

/// Builds a template and returns it with a summary line.
pub fn build_template_with_summary(
    spec_path: &Path,
    agent: &Path,
    cache: &Cache,
    progress: &dyn Progress,
) -> Result<(TemplateImages, String), ImageError> {
    let started = Instant::now();
    let images = build_template(spec_path, agent, cache, progress)?;
    let summary = images.summary(started.elapsed().as_secs_f64());
    Ok((images, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::TemplateConfig;

    #[test]
    fn summary_names_origins_and_sizes() {
        let dir = tempfile::tempdir().expect("dir");
        let file = |name: &str, len: usize| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![1u8; len]).expect("write");
            path
        };
        let spec = TemplateSpec::parse("name = \"base\"\n[base]\nsuite = \"bookworm\"\n", "t")
            .expect("valid");
        let image = file("rootfs.ext4", 3 << 20);
        let images = TemplateImages {
            kernel: KernelArtefact {
                dir: dir.path().to_owned(),
                vmlinux: file("vmlinux", 40 << 20),
                initramfs: file("initramfs", 2 << 20),
                release: "6.1.0-1-amd64".into(),
                origin: Origin::Cached,
            },
            rootfs: RootfsArtefact {
                dir: dir.path().to_owned(),
                image,
                config: TemplateConfig {
                    name: "base".into(),
                    env: Default::default(),
                    workdir: None,
                    user: None,
                    start: None,
                    resources: spec.resources.clone(),
                },
                origin: Origin::Built,
            },
            spec,
        };
        assert_eq!(
            images.summary(12.34),
            "template base: kernel 6.1.0-1-amd64 (cached, vmlinux 40.0 MiB, initramfs 2.0 MiB), \
             rootfs built (3.0 MiB used of a 3.0 MiB disk) in 12.3 s"
        );
    }
}
