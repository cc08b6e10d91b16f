//! `kiln bench images`: what the default templates cost to build and to boot. Each template
//! is built from nothing into an empty artefact cache (kernel and root filesystem; package
//! downloads included), built again from that cache, measured on disk, and cold-booted to its
//! first exec a number of times.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_engine::{Engine, EngineConfig};
use kiln_image::cache::{Cache, Origin};
use kiln_image::kernel::build_kernel;
use kiln_image::progress::{human_bytes, NoProgress, PrintProgress};
use kiln_image::rootfs::build_rootfs;
use kiln_image::spec::TemplateSpec;
use kiln_image::template::{allocated_bytes, build_template, file_bytes, TemplateImages};
use kiln_vmm::accel::AccelChoice;
use serde::Serialize;

use crate::stats::Summary;

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct ImagesBenchOptions {
    /// Templates (spec, directory or name); default: base and python.
    #[arg(long = "template", default_values_t = ["base".to_owned(), "python".to_owned()])]
    pub templates: Vec<String>,
    /// Cold boots per template.
    #[arg(long, default_value_t = 5)]
    pub boots: usize,
    /// Directory for the empty caches of the from-nothing builds (removed afterwards).
    #[arg(long, default_value = "/var/tmp")]
    pub scratch_dir: PathBuf,
    /// Accelerator for the boots: auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct TemplateReport {
    template: String,
    /// Kernel and initramfs from nothing (package download, extraction, modules, initramfs).
    kernel_from_nothing_s: f64,
    /// The root filesystem from nothing, with the kernel already built.
    rootfs_from_nothing_s: f64,
    /// Both, as a first build of the template on a fresh machine takes.
    template_from_nothing_s: f64,
    /// The same template again, every artefact found in the cache.
    from_cache_s: f64,
    vmlinux_bytes: u64,
    initramfs_bytes: u64,
    /// Blocks the root filesystem image occupies (it is sparse).
    rootfs_used_bytes: u64,
    /// The disk size the spec asks for.
    rootfs_disk_bytes: u64,
    cold_boot_to_first_exec: Summary,
}

#[derive(Debug, Serialize)]
struct Report {
    accel: String,
    templates: Vec<TemplateReport>,
}

async fn build(spec: &Path, agent: &Path, cache: &Cache) -> Result<TemplateImages> {
    let (spec, agent, cache) = (spec.to_owned(), agent.to_owned(), cache.clone());
    tokio::task::spawn_blocking(move || build_template(&spec, &agent, &cache, &NoProgress))
        .await?
        .context("building the template")
}

/// Runs the benchmark.
pub async fn run(options: ImagesBenchOptions) -> Result<()> {
    let agent = crate::template_cmd::static_agent()?;
    std::fs::create_dir_all(&options.scratch_dir)
        .with_context(|| format!("creating {}", options.scratch_dir.display()))?;
    let data = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let engine = Engine::new(EngineConfig {
        accel: options.accel,
        prestart: 0,
        ..EngineConfig::new(data.path())
    })?;
    let accel = format!(
        "{} ({})",
        engine.accel().accel.qemu_name(),
        engine.accel().reason
    );
    eprintln!("accelerator: {accel}");

    let mut reports = Vec::new();
    for template in &options.templates {
        let spec = crate::template_cmd::resolve_spec(template)?;
        let scratch = tempfile::Builder::new()
            .prefix("kiln-empty-cache-")
            .tempdir_in(&options.scratch_dir)?;
        let cache = Cache::new(scratch.path());
        eprintln!(
            "{template}: building from nothing into {} ...",
            scratch.path().display()
        );
        let (spec_path, agent_path, scratch_cache) = (spec.clone(), agent.clone(), cache.clone());
        let (images, kernel_s, rootfs_s) = tokio::task::spawn_blocking(move || {
            let spec = TemplateSpec::from_file(&spec_path)?;
            let spec_dir = spec_path.parent().unwrap_or(Path::new("."));
            let started = Instant::now();
            let kernel = build_kernel(&agent_path, &scratch_cache, &PrintProgress)?;
            let kernel_s = started.elapsed().as_secs_f64();
            let started = Instant::now();
            let rootfs =
                build_rootfs(&spec, spec_dir, &agent_path, &scratch_cache, &PrintProgress)?;
            let rootfs_s = started.elapsed().as_secs_f64();
            let images = TemplateImages {
                spec,
                kernel,
                rootfs,
            };
            Ok::<_, kiln_image::error::ImageError>((images, kernel_s, rootfs_s))
        })
        .await?
        .context("building the template")?;

        let started = Instant::now();
        let cached = build(&spec, &agent, &cache).await?;
        let from_cache_s = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            cached.kernel.origin == Origin::Cached && cached.rootfs.origin == Origin::Cached,
            "the second build did not come from the cache"
        );

        eprintln!("{template}: {} cold boots ...", options.boots);
        let mut boots: Vec<Duration> = Vec::new();
        for _ in 0..options.boots.max(1) {
            boots.push(engine.measure_cold_boot(&images).await?);
        }
        reports.push(TemplateReport {
            template: images.spec.name.clone(),
            kernel_from_nothing_s: kernel_s,
            rootfs_from_nothing_s: rootfs_s,
            template_from_nothing_s: kernel_s + rootfs_s,
            from_cache_s,
            vmlinux_bytes: file_bytes(&images.kernel.vmlinux),
            initramfs_bytes: file_bytes(&images.kernel.initramfs),
            rootfs_used_bytes: allocated_bytes(&images.rootfs.image),
            rootfs_disk_bytes: file_bytes(&images.rootfs.image),
            cold_boot_to_first_exec: Summary::of(&boots),
        });
        // The scratch cache (a few hundred MiB) goes with `scratch`.
    }

    let report = Report {
        accel,
        templates: reports,
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("accelerator: {}", report.accel);
        for t in &report.templates {
            println!("template {}", t.template);
            println!(
                "  from nothing:  {:.1} s (kernel {:.1} s, rootfs {:.1} s)",
                t.template_from_nothing_s, t.kernel_from_nothing_s, t.rootfs_from_nothing_s
            );
            println!("  from cache:    {:.2} s", t.from_cache_s);
            println!(
                "  sizes:         vmlinux {}, initramfs {}, rootfs {} used of a {} disk",
                human_bytes(t.vmlinux_bytes),
                human_bytes(t.initramfs_bytes),
                human_bytes(t.rootfs_used_bytes),
                human_bytes(t.rootfs_disk_bytes)
            );
            println!("  cold boot to first exec: {}", t.cold_boot_to_first_exec);
        }
    }
    Ok(())
}
