//! `kiln bench create`: create latency by snapshot restore, against a cold boot of the same
//! template measured in the same run, plus bake time and idle memory per sandbox.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_agent_client::AgentClient;
use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};
use kiln_proto::messages::{Command, ExecRequest};
use serde::Serialize;

use crate::stats::Summary;

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Template (spec, directory or name).
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Sequential creates.
    #[arg(long, default_value_t = 30)]
    pub iterations: usize,
    /// Creates per concurrent batch.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Concurrent batches.
    #[arg(long, default_value_t = 5)]
    pub batches: usize,
    /// Cold boots for the comparison.
    #[arg(long, default_value_t = 3)]
    pub cold_boots: usize,
    /// Sandboxes kept running for the idle-memory figure.
    #[arg(long, default_value_t = 20)]
    pub idle: usize,
    #[command(flatten)]
    pub engine: crate::stats::EngineArgs,
}

#[derive(Debug, Serialize)]
struct Report {
    template: String,
    accel: String,
    bake_ms: f64,
    bake_phases_ms: Vec<(String, f64)>,
    cold_boot: Summary,
    create_sequential: Summary,
    create_concurrent: Summary,
    concurrency: usize,
    cold_boot_to_create_ratio_p50: f64,
    create_phases_p50_ms: BTreeMap<String, f64>,
    idle_sandboxes: usize,
    idle_pss_mib_mean: f64,
    idle_pss_mib_max: f64,
    /// PSS of the VMMs kept pre-started (no guest state), which the density figure includes.
    prestarted_pss_mib: f64,
    /// (PSS of the idle sandboxes + PSS of the pre-started VMMs) / idle sandboxes.
    footprint_mib_per_sandbox: f64,
    /// Sequential creates that took a pre-started VMM.
    sequential_prestarted: usize,
}

pub(crate) async fn exec_true(agent: &AgentClient) -> Result<()> {
    let result = agent
        .run(ExecRequest::new(Command::Argv(vec!["true".into()])), 1024)
        .await?;
    ensure!(
        result.status.code == Some(0),
        "true failed: {:?}",
        result.status
    );
    Ok(())
}

/// One create, timed from the engine call until `true` has exited through the agent.
/// Also returns how long that first exec and a second one took.
async fn timed_create(
    engine: &Engine,
    template: &kiln_engine::BakedTemplate,
) -> Result<(Duration, Arc<Sandbox>, Duration, Duration)> {
    let start = Instant::now();
    let sandbox = engine.create(template, CreateOptions::default()).await?;
    let exec_start = Instant::now();
    exec_true(sandbox.agent()).await?;
    let total = start.elapsed();
    let first_exec = exec_start.elapsed();
    let second_start = Instant::now();
    exec_true(sandbox.agent()).await?;
    Ok((total, sandbox, first_exec, second_start.elapsed()))
}

/// The proportional set size of process `pid`, in bytes.
pub(crate) fn pss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Runs the benchmark.
pub async fn run(options: BenchOptions) -> Result<()> {
    let images = options.engine.images(&options.template).await?;
    let data = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let engine = Engine::new(EngineConfig {
        accel: options.engine.accel,
        guest_log: std::env::var("KILN_GUEST_LOG").ok(),
        ..EngineConfig::new(data.path())
    })?;
    eprintln!(
        "accelerator: {} ({})",
        engine.accel().accel.qemu_name(),
        engine.accel().reason
    );

    eprintln!("baking {} ...", images.spec.name);
    let start = Instant::now();
    let template = engine.bake(&images).await.context("bake")?;
    let bake_ms = start.elapsed().as_secs_f64() * 1000.0;
    // As the daemon does once a template is ready.
    engine.prestart(&template);

    eprintln!("cold boots ({}) ...", options.cold_boots);
    let mut cold = Vec::new();
    for _ in 0..options.cold_boots {
        cold.push(engine.measure_cold_boot(&images).await?);
    }

    eprintln!("sequential creates ({}) ...", options.iterations);
    let mut sequential = Vec::new();
    let mut phases: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut sequential_prestarted = 0;
    for _ in 0..options.iterations {
        let (elapsed, sandbox, first_exec, second_exec) = timed_create(&engine, &template).await?;
        sequential.push(elapsed);
        if sandbox
            .timings()
            .phases
            .iter()
            .any(|(name, _)| name == "take pre-started VMM" || name == "take warmed VMM")
        {
            sequential_prestarted += 1;
        }
        phases
            .entry("first exec (true)".into())
            .or_default()
            .push(first_exec);
        phases
            .entry("second exec (true), not in total".into())
            .or_default()
            .push(second_exec);
        for (name, ms) in &sandbox.timings().phases {
            phases
                .entry(name.clone())
                .or_default()
                .push(Duration::from_secs_f64(ms / 1000.0));
        }
        sandbox.destroy().await?;
    }

    eprintln!(
        "concurrent creates ({} x {}) ...",
        options.batches, options.concurrency
    );
    let template = Arc::new(template);
    let mut concurrent = Vec::new();
    for _ in 0..options.batches {
        let mut tasks = Vec::new();
        for _ in 0..options.concurrency {
            let (engine, template) = (engine.clone(), template.clone());
            tasks.push(tokio::spawn(async move {
                timed_create(&engine, &template).await
            }));
        }
        for task in tasks {
            let (elapsed, sandbox, _, _) = task.await??;
            concurrent.push(elapsed);
            sandbox.destroy().await?;
        }
    }

    eprintln!("idle memory ({} sandboxes) ...", options.idle);
    let mut idle = Vec::new();
    for _ in 0..options.idle {
        idle.push(engine.create(&template, CreateOptions::default()).await?);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pss: Vec<f64> = idle
        .iter()
        .filter_map(|s| s.pid().and_then(pss_bytes))
        .map(|b| b as f64 / (1 << 20) as f64)
        .collect();
    let prestarted_pss_mib: f64 = engine
        .prestarted_pids()
        .into_iter()
        .filter_map(pss_bytes)
        .map(|b| b as f64 / (1 << 20) as f64)
        .sum();
    for sandbox in idle {
        sandbox.destroy().await?;
    }

    let cold_summary = Summary::of(&cold);
    let sequential_summary = Summary::of(&sequential);
    let report = Report {
        template: images.spec.name.clone(),
        accel: engine.accel().accel.qemu_name().into(),
        bake_ms,
        bake_phases_ms: template.meta.timings.clone(),
        cold_boot_to_create_ratio_p50: cold_summary.p50_ms / sequential_summary.p50_ms,
        cold_boot: cold_summary,
        create_sequential: sequential_summary,
        create_concurrent: Summary::of(&concurrent),
        concurrency: options.concurrency,
        create_phases_p50_ms: phases
            .iter()
            .map(|(k, v)| (k.clone(), Summary::of(v).p50_ms))
            .collect(),
        idle_sandboxes: pss.len(),
        idle_pss_mib_mean: pss.iter().sum::<f64>() / pss.len().max(1) as f64,
        idle_pss_mib_max: pss.iter().copied().fold(0.0, f64::max),
        prestarted_pss_mib,
        footprint_mib_per_sandbox: (pss.iter().sum::<f64>() + prestarted_pss_mib)
            / pss.len().max(1) as f64,
        sequential_prestarted,
    };
    engine.shutdown_prestarted().await;
    if options.engine.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("template {} ({})", report.template, report.accel);
        println!("bake: {:.0} ms", report.bake_ms);
        println!("cold boot to first exec:   {}", report.cold_boot);
        println!(
            "create (sequential):       {} ({} of them on a pre-started VMM)",
            report.create_sequential, report.sequential_prestarted
        );
        println!(
            "create ({} concurrent):     {}",
            report.concurrency, report.create_concurrent
        );
        println!(
            "cold boot / create (p50):  {:.1}x",
            report.cold_boot_to_create_ratio_p50
        );
        println!(
            "create phases (p50, ms):   {:?}",
            report.create_phases_p50_ms
        );
        println!(
            "idle PSS per sandbox ({}): mean {:.1} MiB, max {:.1} MiB",
            report.idle_sandboxes, report.idle_pss_mib_mean, report.idle_pss_mib_max
        );
        println!(
            "footprint per sandbox:     {:.1} MiB (pre-started VMMs: {:.1} MiB in all)",
            report.footprint_mib_per_sandbox, report.prestarted_pss_mib
        );
    }
    Ok(())
}
