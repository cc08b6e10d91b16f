//! `kiln bench tti`: time to interactive through the HTTP API, what a user waits for from
//! asking for a sandbox to the first output of a command in it: `POST /v1/sandboxes`, then
//! `POST .../exec` of `echo ok` (argv) until its output is received. Sequential and with
//! concurrent clients, with the create-only figure beside it and a per-phase breakdown
//! (the engine's phases, the first exec in the guest, HTTP and the daemon around them).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_api::types::{CreateSandboxBody, ExecResultBody, SandboxBody};
use kiln_testinfra::internet::{ShutdownOnDrop, TestInternet};
use reqwest::Method;
use serde::Serialize;
use serde_json::json;

use crate::bench_api::InProcessDaemon;
use crate::client_cmd::Client;
use crate::stats::Summary;

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct TtiBenchOptions {
    /// Template.
    #[arg(long, default_value = kiln_image::template::DEFAULT_TEMPLATE)]
    pub template: String,
    /// Sequential creates, each followed by its first exec.
    #[arg(long, default_value_t = 30)]
    pub iterations: usize,
    /// Time between the end of one sequential sample (its sandbox destroyed) and the next
    /// create, in ms: 0 sends them back to back, faster than pre-started VMMs are replaced
    /// on a small host; a user working in one sandbox at a time leaves more.
    #[arg(long, default_value_t = 0)]
    pub gap_ms: u64,
    /// VMMs kept pre-started for the template, 0 to 2 (as `kiln serve --prestart`).
    #[arg(long, default_value_t = 1)]
    pub prestart: usize,
    /// Whether pre-started VMMs restore and run the template's guest ahead of a create (as
    /// `kiln serve --warm-prestart`).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub warm_prestart: bool,
    /// Concurrent clients (0: none).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Creates per concurrent client.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Sandboxes without networking (by default each has its namespace and egress, which
    /// ends in a namespace this benchmark makes, never at the uplink).
    #[arg(long)]
    pub no_network: bool,
    #[command(flatten)]
    pub daemon: crate::stats::DaemonArgs,
}

#[derive(Debug, Serialize)]
struct Report {
    template: String,
    accel: String,
    network: bool,
    /// Time between sequential samples, ms.
    gap_ms: u64,
    prestart: usize,
    warm_prestart: bool,
    /// Create, then `echo ok`'s output received; one client.
    tti_sequential: Summary,
    /// The create call alone; one client.
    create_sequential: Summary,
    /// Per phase (p50, ms), in the order they happen.
    phases_p50_ms: Vec<(String, f64)>,
    /// Sequential creates that took a pre-started VMM (warmed or not).
    prestarted: usize,
    /// Of those, the ones that took a warmed VMM (its guest restored and run ahead).
    warmed: usize,
    clients: usize,
    tti_concurrent: Option<Summary>,
    create_concurrent: Option<Summary>,
}

/// One create and its first exec, timed.
struct Sample {
    create: Duration,
    tti: Duration,
    /// The engine's phases of the create, then the breakdown around them.
    phases: Vec<(String, f64)>,
}

async fn one(client: &Client, control: &kiln_control::Control, template: &str) -> Result<Sample> {
    let start = Instant::now();
    let body = CreateSandboxBody {
        template: Some(template.to_owned()),
        ..CreateSandboxBody::default()
    };
    let request = client.request(Method::POST, "/v1/sandboxes").json(&body);
    let id = client.json::<SandboxBody>(request).await?.id;
    let create = start.elapsed();
    let exec_start = Instant::now();
    let request = client
        .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .json(&json!({"command": ["echo", "ok"]}));
    let result: ExecResultBody = client.json(request).await?;
    let tti = start.elapsed();
    let exec = exec_start.elapsed();
    ensure!(
        result.exit_code == Some(0) && result.stdout == "ok\n",
        "echo ok answered {result:?}"
    );
    let engine_phases = control.engine().get(&id)?.timings().phases.clone();
    let engine_total = engine_phases
        .iter()
        .find(|(name, _)| name == "total")
        .map_or(0.0, |(_, ms)| *ms);
    let mut phases: Vec<(String, f64)> = engine_phases
        .into_iter()
        .filter(|(name, _)| name != "total")
        .map(|(name, ms)| (format!("create: {name}"), ms))
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    phases.push((
        "create: HTTP and daemon around the engine".into(),
        (ms(create) - engine_total).max(0.0),
    ));
    phases.push((
        "first exec: in the sandbox (daemon-measured)".into(),
        result.duration_ms,
    ));
    phases.push((
        "first exec: HTTP and daemon around it".into(),
        (ms(exec) - result.duration_ms).max(0.0),
    ));
    client
        .send(client.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))
        .await?;
    Ok(Sample {
        create,
        tti,
        phases,
    })
}

/// The p50 of each phase, in the order phases first appear.
fn phases_p50(samples: &[Sample]) -> Vec<(String, f64)> {
    let mut order = Vec::new();
    let mut all: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for sample in samples {
        for (name, ms) in &sample.phases {
            if !all.contains_key(name) {
                order.push(name.clone());
            }
            all.entry(name.clone())
                .or_default()
                .push(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
        }
    }
    order
        .into_iter()
        .map(|name| {
            let p50 = Summary::of(&all[&name]).p50_ms;
            (name, p50)
        })
        .collect()
}

/// Runs the benchmark against a daemon started in this process on a loopback port.
pub async fn run(options: TtiBenchOptions) -> Result<()> {
    ensure!(options.iterations > 0, "--iterations must be at least 1");
    ensure!(
        options.no_network || nix::unistd::geteuid().is_root(),
        "sandbox networking needs root (its namespaces and links): run as root, or pass \
         --no-network"
    );
    // Sandbox egress ends in a namespace of this benchmark's.
    let internet = (!options.no_network).then(|| TestInternet::new(0));
    let network = internet.as_ref().map(|internet| internet.network_config());
    let daemon = InProcessDaemon::start(&options.template, &options.daemon.cache_dir, |engine| {
        engine.network = network;
        engine.prestart = options.prestart;
        engine.warm_prestart = options.warm_prestart;
    })
    .await?;
    let _cleanup = daemon
        .control
        .engine()
        .network()
        .cloned()
        .map(ShutdownOnDrop);
    let (client, control) = (daemon.client.clone(), daemon.control.clone());

    eprintln!("preparing template {} ...", options.template);
    one(&client, &control, &options.template)
        .await
        .context("first create")?;

    eprintln!("sequential ({}) ...", options.iterations);
    let mut samples = Vec::new();
    for _ in 0..options.iterations {
        tokio::time::sleep(Duration::from_millis(options.gap_ms)).await;
        samples.push(one(&client, &control, &options.template).await?);
    }
    let took = |phase: &str| {
        samples
            .iter()
            .filter(|s| s.phases.iter().any(|(n, _)| n.ends_with(phase)))
            .count()
    };
    let warmed = took("take warmed VMM");
    let prestarted = took("take pre-started VMM") + warmed;

    let mut concurrent = Vec::new();
    if options.clients > 0 {
        eprintln!(
            "concurrent ({} clients x {}) ...",
            options.clients, options.rounds
        );
        for _ in 0..options.rounds {
            let tasks: Vec<_> = (0..options.clients)
                .map(|_| {
                    let (client, control) = (client.clone(), control.clone());
                    let template = options.template.clone();
                    tokio::spawn(async move { one(&client, &control, &template).await })
                })
                .collect();
            for task in tasks {
                concurrent.push(task.await??);
            }
        }
    }
    let accel = control.engine().accel().accel.qemu_name().to_owned();
    daemon.stop().await;
    drop(internet);

    let of = |samples: &[Sample], pick: fn(&Sample) -> Duration| {
        (!samples.is_empty()).then(|| Summary::of(&samples.iter().map(pick).collect::<Vec<_>>()))
    };
    let report = Report {
        template: options.template.clone(),
        accel,
        network: !options.no_network,
        gap_ms: options.gap_ms,
        prestart: options.prestart,
        warm_prestart: options.warm_prestart,
        tti_sequential: Summary::of(&samples.iter().map(|s| s.tti).collect::<Vec<_>>()),
        create_sequential: Summary::of(&samples.iter().map(|s| s.create).collect::<Vec<_>>()),
        phases_p50_ms: phases_p50(&samples),
        prestarted,
        warmed,
        clients: options.clients,
        tti_concurrent: of(&concurrent, |s| s.tti),
        create_concurrent: of(&concurrent, |s| s.create),
    };
    if options.daemon.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "template {} ({}), networking {}, {} pre-started VMM(s) per template{}, through the HTTP API on loopback",
        report.template,
        report.accel,
        if report.network { "on" } else { "off" },
        report.prestart,
        if report.warm_prestart { ", warmed" } else { "" }
    );
    println!("time to interactive (create, then `echo ok` received):");
    println!(
        "  sequential ({} ms apart): {}",
        report.gap_ms, report.tti_sequential
    );
    println!("  create alone:          {}", report.create_sequential);
    if let (Some(tti), Some(create)) = (&report.tti_concurrent, &report.create_concurrent) {
        println!("  {} clients at once:    {tti}", report.clients);
        println!("  create alone:          {create}");
    }
    println!(
        "phases, sequential (p50, ms; {} of {} took a pre-started VMM, {} of them warmed):",
        report.prestarted, report.tti_sequential.count, report.warmed
    );
    for (name, ms) in &report.phases_p50_ms {
        println!("  {name:<48} {ms:>8.1}");
    }
    Ok(())
}
