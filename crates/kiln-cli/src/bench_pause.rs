//! `kiln bench pause`: pause to disk and resume, by guest size and by how much of its memory
//! the guest dirtied: pause latency (until the VMM is gone and the state durable), resume
//! latency (until the agent answers), the first exec after it, and the saved state's size.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};
use kiln_proto::messages::{Command, ExecRequest};
use serde::Serialize;

use crate::stats::Summary;

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct PauseBenchOptions {
    /// Template (spec, directory or name); baked once per guest size.
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Guest sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    pub memory_mib: Vec<u32>,
    /// Pause/resume cycles per case.
    #[arg(long, default_value_t = 5)]
    pub iterations: usize,
    #[command(flatten)]
    pub engine: crate::stats::EngineArgs,
}

#[derive(Debug, Serialize)]
struct Case {
    memory_mib: u32,
    dirtied_mib: u32,
    pause: Summary,
    resume: Summary,
    first_exec_after_resume: Summary,
    state_mib: f64,
    pause_phases_p50_ms: BTreeMap<String, f64>,
    resume_phases_p50_ms: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    template: String,
    accel: String,
    cases: Vec<Case>,
}

async fn run_true(sandbox: &Sandbox) -> Result<Duration> {
    let start = Instant::now();
    let result = sandbox
        .agent()
        .run(ExecRequest::new(Command::Argv(vec!["true".into()])), 1024)
        .await?;
    ensure!(result.status.code == Some(0), "true failed");
    Ok(start.elapsed())
}

/// p50 of each named phase over `runs`.
fn phases_p50(runs: &[Vec<(String, f64)>]) -> BTreeMap<String, f64> {
    let mut by_name: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for run in runs {
        for (name, ms) in run {
            if name != "state bytes" {
                by_name
                    .entry(name.clone())
                    .or_default()
                    .push(Duration::from_secs_f64(ms / 1000.0));
            }
        }
    }
    by_name
        .into_iter()
        .map(|(name, samples)| (name, Summary::of(&samples).p50_ms))
        .collect()
}

/// One guest size and amount of dirtied memory, `iterations` cycles.
async fn case(
    engine: &Engine,
    template: &kiln_engine::BakedTemplate,
    dirtied_mib: u32,
    iterations: usize,
) -> Result<Case> {
    let sandbox = engine.create(template, CreateOptions::default()).await?;
    let dirty = format!(
        "mkdir -p /mnt/ram && mount -t tmpfs -o size={}m ram /mnt/ram && \
         head -c {dirtied_mib}M /dev/urandom > /mnt/ram/blob",
        dirtied_mib + 16
    );
    let result = sandbox
        .agent()
        .run(ExecRequest::new(Command::Shell(dirty)), 4096)
        .await?;
    ensure!(
        result.status.code == Some(0),
        "dirtying memory: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let (mut pauses, mut resumes, mut execs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pause_phases, mut resume_phases) = (Vec::new(), Vec::new());
    let mut state_bytes = 0.0;
    for _ in 0..iterations {
        let start = Instant::now();
        let timings = sandbox.pause().await.context("pause")?;
        pauses.push(start.elapsed());
        state_bytes = timings
            .phases
            .iter()
            .find(|(name, _)| name == "state bytes")
            .map_or(0.0, |(_, bytes)| *bytes);
        pause_phases.push(timings.phases);
        let start = Instant::now();
        let timings = sandbox.resume().await.context("resume")?;
        resumes.push(start.elapsed());
        resume_phases.push(timings.phases);
        execs.push(run_true(&sandbox).await?);
    }
    sandbox.destroy().await?;
    Ok(Case {
        memory_mib: template.meta.machine.memory_mib,
        dirtied_mib,
        pause: Summary::of(&pauses),
        resume: Summary::of(&resumes),
        first_exec_after_resume: Summary::of(&execs),
        state_mib: state_bytes / f64::from(1u32 << 20),
        pause_phases_p50_ms: phases_p50(&pause_phases),
        resume_phases_p50_ms: phases_p50(&resume_phases),
    })
}

/// `template`'s spec with its guest memory set to `memory_mib`, written into `dir`.
fn sized_spec(template: &str, memory_mib: u32, dir: &std::path::Path) -> Result<String> {
    let spec = crate::template_cmd::resolve_spec(template)?;
    let text = std::fs::read_to_string(&spec).with_context(|| spec.display().to_string())?;
    let mut value: toml::Value = toml::from_str(&text).context("the template's spec")?;
    value
        .get_mut("resources")
        .and_then(toml::Value::as_table_mut)
        .context("the spec has no [resources]")?
        .insert("memory_mib".into(), toml::Value::Integer(memory_mib.into()));
    let path = dir.join(format!("{memory_mib}.toml"));
    std::fs::write(&path, toml::to_string(&value)?)?;
    Ok(path.display().to_string())
}

/// Runs the benchmark.
pub async fn run(options: PauseBenchOptions) -> Result<()> {
    let specs = tempfile::tempdir()?;
    let data = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let engine = Engine::new(EngineConfig {
        accel: options.engine.accel,
        ..EngineConfig::new(data.path())
    })?;
    let mut report = Report {
        template: options.template.clone(),
        accel: engine.accel().accel.qemu_name().into(),
        cases: Vec::new(),
    };
    for &memory_mib in &options.memory_mib {
        let spec = sized_spec(&options.template, memory_mib, specs.path())?;
        let images = options.engine.images(&spec).await?;
        eprintln!("baking a {memory_mib} MiB guest ...");
        let template = engine.bake(&images).await.context("bake")?;
        engine.prestart(&template);
        for dirtied_mib in [1, memory_mib / 2] {
            eprintln!(
                "{memory_mib} MiB guest, {dirtied_mib} MiB dirtied: {} pauses and resumes ...",
                options.iterations
            );
            report
                .cases
                .push(case(&engine, &template, dirtied_mib, options.iterations).await?);
        }
        engine.shutdown_prestarted().await;
    }
    if options.engine.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("template {} ({})", report.template, report.accel);
    for case in &report.cases {
        println!(
            "{} MiB guest, {} MiB dirtied: state {:.1} MiB",
            case.memory_mib, case.dirtied_mib, case.state_mib
        );
        println!("  pause:  {}", case.pause);
        println!("  resume: {}", case.resume);
        println!(
            "  first exec after resume: {}",
            case.first_exec_after_resume
        );
        println!("  pause phases (p50 ms):  {:?}", case.pause_phases_p50_ms);
        println!("  resume phases (p50 ms): {:?}", case.resume_phases_p50_ms);
    }
    Ok(())
}
