//! `kiln bench idle`: what idle sandboxes cost the host, and what a full host costs its
//! users. CPU time of the idle VMMs (pre-started ones included) from their cgroups over a
//! measured window after they settle, their memory, and create and exec latency on the
//! empty host against the same on the full one.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};
use kiln_proto::messages::{Command, ExecRequest};
use serde::Serialize;

use crate::bench_create::{exec_true, pss_bytes};
use crate::stats::Summary;

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleBenchOptions {
    /// Template (spec, directory or name).
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Idle sandboxes that fill the host.
    #[arg(long, default_value_t = 20)]
    pub sandboxes: usize,
    /// Seconds the idle sandboxes settle before the window starts.
    #[arg(long, default_value_t = 20)]
    pub settle_secs: u64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 60)]
    pub measure_secs: u64,
    /// Creates (each with its first exec) and execs timed on the empty and on the full host.
    #[arg(long, default_value_t = 15)]
    pub samples: usize,
    /// Every idle sandbox holds an exec of a process that prints nothing (`sleep`) open through
    /// the settling and the window, as a quiet command or an idle terminal would: the host
    /// then pings each guest once a second. Measures what an open, silent call costs.
    #[arg(long)]
    pub silent_exec: bool,
    #[command(flatten)]
    pub engine: crate::stats::EngineArgs,
}

/// Latency on a host in one state.
#[derive(Debug, Serialize)]
struct Latency {
    /// Create until the first `true` has exited.
    create_first_exec: Summary,
    /// `true` in a running sandbox.
    exec: Summary,
}

#[derive(Debug, Serialize)]
struct Report {
    template: String,
    accel: String,
    sandboxes: usize,
    /// Whether every idle sandbox held a silent exec open (`--silent-exec`).
    silent_exec: bool,
    prestarted: usize,
    settle_secs: u64,
    measure_secs: f64,
    /// CPU time of every VMM (idle sandboxes and pre-started) per second of the window, in
    /// percent of one core.
    vmm_cpu_percent_of_one_core: f64,
    /// The same divided by the idle sandboxes.
    cpu_percent_of_one_core_per_sandbox: f64,
    /// The pre-started VMMs' share of the total.
    prestarted_cpu_percent_of_one_core: f64,
    /// The whole host's busy time over the window, in percent of all its cores.
    host_busy_percent: f64,
    /// The 1-minute load average at the end of the window.
    load_average_1m: f64,
    idle_pss_mib_mean: f64,
    empty_host: Latency,
    full_host: Latency,
    /// Full host's p50 / empty host's p50.
    create_ratio_p50: f64,
    exec_ratio_p50: f64,
}

/// Creates and execs timed one at a time; `keep` runs the execs.
async fn latency(
    engine: &Engine,
    template: &kiln_engine::BakedTemplate,
    keep: &Sandbox,
    samples: usize,
) -> Result<Latency> {
    let (mut creates, mut execs) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let start = Instant::now();
        let sandbox = engine.create(template, CreateOptions::default()).await?;
        exec_true(sandbox.agent()).await?;
        creates.push(start.elapsed());
        sandbox.destroy().await?;
        // Let the pool refill, as between a user's creates.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for _ in 0..samples.max(1) * 4 {
        let start = Instant::now();
        exec_true(keep.agent()).await?;
        execs.push(start.elapsed());
    }
    Ok(Latency {
        create_first_exec: Summary::of(&creates),
        exec: Summary::of(&execs),
    })
}

/// Busy and total jiffies of the whole host, from `/proc/stat`'s first line.
fn host_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait.
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds of the sandboxes' cgroups and of the pre-started VMMs'.
fn vmm_cpu_seconds(engine: &Engine, sandboxes: &[std::sync::Arc<Sandbox>]) -> Result<(f64, f64)> {
    let mut total = 0.0;
    for sandbox in sandboxes {
        total += sandbox
            .usage()
            .cpu_seconds
            .with_context(|| format!("no CPU figure for sandbox {}", sandbox.id()))?;
    }
    Ok((total, engine.prestarted_cpu_seconds()))
}

/// Runs the benchmark.
pub async fn run(options: IdleBenchOptions) -> Result<()> {
    ensure!(options.sandboxes > 0, "--sandboxes must be at least 1");
    ensure!(options.samples > 0, "--samples must be at least 1");
    ensure!(
        options.measure_secs > 0,
        "--measure-secs must be at least 1"
    );
    let images = options.engine.images(&options.template).await?;
    let data = tempfile::Builder::new()
        .prefix("kiln-bench-idle-")
        .tempdir()?;
    let engine = Engine::new(EngineConfig {
        accel: options.engine.accel,
        ..EngineConfig::new(data.path())
    })?;
    ensure!(
        engine.cgroup_version().is_some(),
        "this benchmark reads the VMMs' cgroups, and this host gives kiln none"
    );
    eprintln!(
        "accelerator: {} ({})",
        engine.accel().accel.qemu_name(),
        engine.accel().reason
    );
    eprintln!("baking {} ...", images.spec.name);
    let template = engine.bake(&images).await.context("bake")?;
    engine.prestart(&template);

    let keep = engine.create(&template, CreateOptions::default()).await?;
    exec_true(keep.agent()).await?;
    eprintln!(
        "latency on the empty host ({} samples) ...",
        options.samples
    );
    let empty_host = latency(&engine, &template, &keep, options.samples).await?;

    eprintln!(
        "filling the host with {} idle sandboxes ...",
        options.sandboxes
    );
    let mut idle = vec![keep];
    while idle.len() < options.sandboxes {
        let sandbox = engine.create(&template, CreateOptions::default()).await?;
        exec_true(sandbox.agent()).await?;
        idle.push(sandbox);
        if idle.len() % 25 == 0 {
            eprintln!("  {} running", idle.len());
        }
    }
    // Dropping a session ends its process, so they live until the window is over.
    let mut silent = Vec::new();
    if options.silent_exec {
        for sandbox in &idle {
            let sleep = ExecRequest::new(Command::Argv(vec!["sleep".into(), "infinity".into()]));
            silent.push(sandbox.agent().exec(sleep).await.context("silent exec")?);
        }
    }
    eprintln!("settling for {} s ...", options.settle_secs);
    tokio::time::sleep(Duration::from_secs(options.settle_secs)).await;

    eprintln!("measuring {} s of idleness ...", options.measure_secs);
    let prestarted = engine.prestarted_pids().len();
    let (sandboxes_before, prestarted_before) = vmm_cpu_seconds(&engine, &idle)?;
    let host_before = host_jiffies().context("reading /proc/stat")?;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(options.measure_secs)).await;
    let window = start.elapsed().as_secs_f64();
    let (sandboxes_after, prestarted_after) = vmm_cpu_seconds(&engine, &idle)?;
    let host_after = host_jiffies().context("reading /proc/stat")?;
    let load_average_1m = load_average();
    drop(silent);
    let prestarted_cpu = (prestarted_after - prestarted_before).max(0.0);
    let vmm_cpu = sandboxes_after - sandboxes_before + prestarted_cpu;
    let host_busy_percent = 100.0 * (host_after.0 - host_before.0) as f64
        / (host_after.1 - host_before.1).max(1) as f64;
    let pss: Vec<f64> = idle
        .iter()
        .filter_map(|s| s.pid().and_then(pss_bytes))
        .map(|b| b as f64 / (1 << 20) as f64)
        .collect();

    eprintln!("latency on the full host ({} samples) ...", options.samples);
    let full_host = latency(&engine, &template, &idle[0], options.samples).await?;
    eprintln!("destroying ...");
    for sandbox in idle {
        sandbox.destroy().await?;
    }
    engine.shutdown_prestarted().await;

    let vmm_cpu_percent = 100.0 * vmm_cpu / window;
    let report = Report {
        template: images.spec.name.clone(),
        accel: engine.accel().accel.qemu_name().into(),
        sandboxes: options.sandboxes,
        silent_exec: options.silent_exec,
        prestarted,
        settle_secs: options.settle_secs,
        measure_secs: window,
        vmm_cpu_percent_of_one_core: vmm_cpu_percent,
        cpu_percent_of_one_core_per_sandbox: vmm_cpu_percent / options.sandboxes as f64,
        prestarted_cpu_percent_of_one_core: 100.0 * prestarted_cpu / window,
        host_busy_percent,
        load_average_1m,
        idle_pss_mib_mean: pss.iter().sum::<f64>() / pss.len().max(1) as f64,
        create_ratio_p50: full_host.create_first_exec.p50_ms / empty_host.create_first_exec.p50_ms,
        exec_ratio_p50: full_host.exec.p50_ms / empty_host.exec.p50_ms,
        empty_host,
        full_host,
    };
    if options.engine.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "template {} ({}), {} idle sandboxes{} + {} pre-started VMMs, window {:.0} s after {} s \
         to settle",
        report.template,
        report.accel,
        report.sandboxes,
        if report.silent_exec {
            " (each with a silent exec open)"
        } else {
            ""
        },
        report.prestarted,
        report.measure_secs,
        report.settle_secs
    );
    println!(
        "idle CPU (VMM cgroups):  {:.2}% of one core in all, {:.3}% per sandbox \
         (pre-started: {:.2}%)",
        report.vmm_cpu_percent_of_one_core,
        report.cpu_percent_of_one_core_per_sandbox,
        report.prestarted_cpu_percent_of_one_core
    );
    println!(
        "host:                    {:.1}% busy, load average {:.2}; idle PSS {:.1} MiB per sandbox",
        report.host_busy_percent, report.load_average_1m, report.idle_pss_mib_mean
    );
    println!(
        "create + first exec:     empty {}\n                         full  {}\n                         \
         ratio p50 {:.2}",
        report.empty_host.create_first_exec, report.full_host.create_first_exec, report.create_ratio_p50
    );
    println!(
        "exec (true):             empty {}\n                         full  {}\n                         \
         ratio p50 {:.2}",
        report.empty_host.exec, report.full_host.exec, report.exec_ratio_p50
    );
    Ok(())
}
