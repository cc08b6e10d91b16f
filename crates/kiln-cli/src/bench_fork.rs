//! `kiln bench fork`: forking a running sandbox into N children: how long the parent is
//! stopped, the bytes a capture writes, the time until the first and until every child
//! answers, and what the idle children cost in memory (PSS, the capture's pages shared); and
//! a snapshot of the same parent: its time and size on disk.

use std::time::Duration;

use anyhow::{Context, Result};
use kiln_engine::{CreateOptions, Engine, EngineConfig};
use serde::Serialize;

use crate::stats::Summary;

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct ForkBenchOptions {
    /// Template (spec, directory or name).
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Children per fork (1 to 32).
    #[arg(long, default_value_t = 8)]
    pub children: usize,
    /// Forks (each of a new parent).
    #[arg(long, default_value_t = 5)]
    pub iterations: usize,
    /// MiB of guest RAM each parent writes (random bytes into a tmpfs) before it is forked:
    /// what a fork captures follows it.
    #[arg(long, default_value_t = 0)]
    pub dirty_mib: u32,
    #[command(flatten)]
    pub engine: crate::stats::EngineArgs,
}

#[derive(Debug, Serialize)]
struct Report {
    template: String,
    accel: String,
    children: usize,
    parent_dirtied_mib: u32,
    parent_paused: Summary,
    capture: Summary,
    first_child_answers: Summary,
    all_children_answer: Summary,
    mib_written_per_fork: Vec<f64>,
    ram_mib_written_per_fork: Vec<f64>,
    idle_child_pss_mib_mean: f64,
    idle_child_pss_mib_max: f64,
    snapshot_ms: f64,
    snapshot_mib_on_disk: f64,
    phases_p50_ms: std::collections::BTreeMap<String, f64>,
}

/// Runs the benchmark.
pub async fn run(options: ForkBenchOptions) -> Result<()> {
    let images = options.engine.images(&options.template).await?;
    let data = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let engine = Engine::new(EngineConfig {
        accel: options.engine.accel,
        ..EngineConfig::new(data.path())
    })?;
    let template = engine.bake(&images).await.context("bake")?;
    engine.prestart(&template);
    let ms = |d: f64| Duration::from_secs_f64(d / 1000.0);
    let (mut paused, mut captures, mut firsts, mut alls) = (vec![], vec![], vec![], vec![]);
    let (mut written, mut ram_written) = (Vec::new(), Vec::new());
    let mut phases: std::collections::BTreeMap<String, Vec<Duration>> = Default::default();
    let mut pss = Vec::new();
    let (mut snapshot_ms, mut snapshot_mib) = (0.0, 0.0);
    for iteration in 0..options.iterations {
        eprintln!(
            "fork {} of {}: {} children ...",
            iteration + 1,
            options.iterations,
            options.children
        );
        let parent = engine.create(&template, CreateOptions::default()).await?;
        if options.dirty_mib > 0 {
            let script = format!(
                "mkdir -p /mnt/dirty && mount -t tmpfs -o size={m}m tmpfs /mnt/dirty && \
                 head -c {m}M /dev/urandom > /mnt/dirty/fill",
                m = options.dirty_mib + 1
            );
            let done = parent
                .agent()
                .run(
                    kiln_proto::messages::ExecRequest::new(kiln_proto::messages::Command::Shell(
                        script,
                    )),
                    1 << 16,
                )
                .await?;
            anyhow::ensure!(
                done.status.code == Some(0),
                "dirtying the parent's RAM: {}",
                String::from_utf8_lossy(&done.stderr)
            );
        }
        let (children, report) = engine
            .fork(&parent, options.children, CreateOptions::default())
            .await?;
        let phase = |name: &str| {
            report
                .phases
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |(_, ms)| *ms)
        };
        let total = phase("total");
        let creates = phase(&format!("{} creates", options.children));
        let capture = total - creates;
        let fastest_child = children
            .iter()
            .filter_map(|c| {
                c.timings()
                    .phases
                    .iter()
                    .find(|(n, _)| n == "total")
                    .map(|(_, ms)| *ms)
            })
            .fold(f64::INFINITY, f64::min);
        paused.push(ms(report.parent_paused_ms));
        captures.push(ms(capture));
        firsts.push(ms(capture + fastest_child));
        alls.push(ms(total));
        written.push(report.bytes_written as f64 / f64::from(1u32 << 20));
        ram_written.push(report.ram_bytes_written as f64 / f64::from(1u32 << 20));
        for (name, value) in &report.phases {
            phases.entry(name.clone()).or_default().push(ms(*value));
        }
        if iteration + 1 == options.iterations {
            // Idle children, settled: what each costs in memory.
            tokio::time::sleep(Duration::from_secs(3)).await;
            for child in &children {
                if let Some(bytes) = child.pid().and_then(crate::bench_create::pss_bytes) {
                    pss.push(bytes as f64 / f64::from(1u32 << 20));
                }
            }
        }
        for child in children {
            child.destroy().await?;
        }
        if iteration + 1 == options.iterations {
            // A snapshot of the same parent: its time and its files' size on disk.
            let start = std::time::Instant::now();
            let snapshot = engine.snapshot(&parent).await?;
            snapshot_ms = start.elapsed().as_secs_f64() * 1000.0;
            // Its own files: a memory file it shares with its template (a hard link) is not.
            snapshot_mib = std::fs::read_dir(&snapshot.dir)?
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| std::os::unix::fs::MetadataExt::nlink(m) == 1)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) as f64 * 512.0)
                .sum::<f64>()
                / f64::from(1u32 << 20);
            engine.remove_snapshot(&snapshot)?;
        }
        parent.destroy().await?;
    }
    engine.shutdown_prestarted().await;
    let report = Report {
        template: images.spec.name.clone(),
        accel: engine.accel().accel.qemu_name().into(),
        children: options.children,
        parent_dirtied_mib: options.dirty_mib,
        parent_paused: Summary::of(&paused),
        capture: Summary::of(&captures),
        first_child_answers: Summary::of(&firsts),
        all_children_answer: Summary::of(&alls),
        mib_written_per_fork: written,
        ram_mib_written_per_fork: ram_written,
        idle_child_pss_mib_mean: pss.iter().sum::<f64>() / pss.len().max(1) as f64,
        idle_child_pss_mib_max: pss.iter().copied().fold(0.0, f64::max),
        snapshot_ms,
        snapshot_mib_on_disk: snapshot_mib,
        phases_p50_ms: phases
            .into_iter()
            .map(|(name, samples)| (name, Summary::of(&samples).p50_ms))
            .collect(),
    };
    if options.engine.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "template {} ({}), {} children per fork, {} MiB dirtied by each parent",
        report.template, report.accel, report.children, report.parent_dirtied_mib
    );
    println!("parent stopped:       {}", report.parent_paused);
    println!("capture:              {}", report.capture);
    println!("first child answers:  {}", report.first_child_answers);
    println!("all children answer:  {}", report.all_children_answer);
    println!("MiB written per fork: {:?}", report.mib_written_per_fork);
    println!(
        "of which guest RAM:   {:?}",
        report.ram_mib_written_per_fork
    );
    println!(
        "idle child PSS: mean {:.1} MiB, max {:.1} MiB",
        report.idle_child_pss_mib_mean, report.idle_child_pss_mib_max
    );
    println!(
        "snapshot of the parent: {:.0} ms, {:.1} MiB on disk of its own",
        report.snapshot_ms, report.snapshot_mib_on_disk
    );
    println!("phases (p50 ms): {:?}", report.phases_p50_ms);
    Ok(())
}
