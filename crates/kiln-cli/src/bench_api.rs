//! `kiln bench api`: the daemon measured through its HTTP API over loopback: create latency
//! (sequential and with concurrent clients), exec round trip, sustained create-and-destroy
//! throughput, and memory after.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_api::types::{CreateSandboxBody, ExecResultBody, SandboxBody};
use reqwest::Method;
use serde::Serialize;
use serde_json::json;

use crate::client_cmd::Client;
use crate::stats::Summary;

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiBenchOptions {
    /// Template.
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Sequential creates.
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Creates per concurrent client.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Exec round trips.
    #[arg(long, default_value_t = 200)]
    pub execs: usize,
    /// Seconds of sustained creates and destroys.
    #[arg(long, default_value_t = 60)]
    pub sustain_secs: u64,
    /// Workers creating and destroying in the sustained phase.
    #[arg(long, default_value_t = 4)]
    pub sustain_workers: usize,
    #[command(flatten)]
    pub daemon: crate::stats::DaemonArgs,
}

#[derive(Debug, Serialize)]
struct Report {
    template: String,
    accel: String,
    create_sequential: Summary,
    create_then_first_exec_sequential: Summary,
    create_concurrent: Summary,
    clients: usize,
    exec_round_trip: Summary,
    sustained_seconds: f64,
    sustained_workers: usize,
    sustained_creates: usize,
    sustained_creates_per_second: f64,
    sustained_errors: usize,
    daemon_rss_mib_before: f64,
    daemon_rss_mib_after: f64,
    vmms_left_after: usize,
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// The calls the benchmark makes, over the CLI's client of the in-process daemon.
#[derive(Debug, Clone)]
struct Api {
    client: Client,
}

impl Api {
    async fn create(&self, template: &str) -> Result<String> {
        let body = CreateSandboxBody {
            template: Some(template.to_owned()),
            ..CreateSandboxBody::default()
        };
        let request = self
            .client
            .request(Method::POST, "/v1/sandboxes")
            .json(&body);
        Ok(self.client.json::<SandboxBody>(request).await?.id)
    }

    async fn exec_true(&self, id: &str) -> Result<()> {
        let request = self
            .client
            .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
            .json(&json!({"command": ["true"]}));
        let result: ExecResultBody = self.client.json(request).await?;
        ensure!(result.exit_code == Some(0), "true failed: {result:?}");
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let request = self
            .client
            .request(Method::DELETE, &format!("/v1/sandboxes/{id}"));
        self.client.send(request).await?;
        Ok(())
    }
}

/// A daemon in this process on a loopback port with a key, for the API benchmarks.
pub(crate) struct InProcessDaemon {
    pub(crate) control: kiln_control::Control,
    pub(crate) client: Client,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _data: tempfile::TempDir,
}

impl InProcessDaemon {
    /// Starts one with `template` as its default, artefacts from `cache_dir`, and its engine
    /// configured by default but for what `configure` changes (its data directory is the
    /// daemon's own).
    pub(crate) async fn start(
        template: &str,
        cache_dir: &std::path::Path,
        configure: impl FnOnce(&mut kiln_engine::EngineConfig),
    ) -> Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("kiln-bench-api-")
            .tempdir()?;
        let control = kiln_control::Control::open(kiln_control::ControlConfig {
            cache_dir: cache_dir.to_owned(),
            templates_dirs: crate::template_cmd::templates_dirs(),
            agent_binary: crate::template_cmd::static_agent()?,
            engine: {
                let mut engine = kiln_engine::EngineConfig::new(data.path());
                configure(&mut engine);
                engine
            },
            default_template: template.to_owned(),
            default_ttl: Duration::from_secs(600),
            max_ttl: Duration::from_secs(3600),
            paused_retention: Duration::from_secs(3600),
            quotas: kiln_control::TenantQuotas::default(),
            spec_caps: kiln_control::SpecCaps::default(),
            forwards: None,
        })
        .await?;
        let store = kiln_control::open_store(data.path())?;
        let (_, key) = kiln_control::mint_key(&store, "bench", "bench", false)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = kiln_api::router(control.clone(), kiln_api::ApiConfig::default());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(InProcessDaemon {
            control,
            client: Client::with_key(&url, key),
            server,
            _data: data,
        })
    }

    /// Stops it, destroying its sandboxes.
    pub(crate) async fn stop(self) {
        self.server.abort();
        self.control.shutdown().await;
    }
}

/// Runs the benchmark against a daemon started in this process on a loopback port.
pub async fn run(options: ApiBenchOptions) -> Result<()> {
    let daemon =
        InProcessDaemon::start(&options.template, &options.daemon.cache_dir, |_| {}).await?;
    let control = daemon.control.clone();
    let api = Api {
        client: daemon.client.clone(),
    };

    eprintln!("preparing template {} ...", options.template);
    let warm = api
        .create(&options.template)
        .await
        .context("first create")?;
    api.exec_true(&warm).await?;

    eprintln!("exec round trips ({}) ...", options.execs);
    let mut execs = Vec::new();
    for _ in 0..options.execs {
        let start = Instant::now();
        api.exec_true(&warm).await?;
        execs.push(start.elapsed());
    }
    api.delete(&warm).await?;

    eprintln!("sequential creates ({}) ...", options.iterations);
    let (mut created, mut first_exec) = (Vec::new(), Vec::new());
    for _ in 0..options.iterations {
        let start = Instant::now();
        let id = api.create(&options.template).await?;
        created.push(start.elapsed());
        api.exec_true(&id).await?;
        first_exec.push(start.elapsed());
        api.delete(&id).await?;
    }

    eprintln!(
        "concurrent creates ({} clients x {}) ...",
        options.clients, options.rounds
    );
    let mut concurrent = Vec::new();
    for _ in 0..options.rounds {
        let tasks: Vec<_> = (0..options.clients)
            .map(|_| {
                let (api, template) = (api.clone(), options.template.clone());
                tokio::spawn(async move {
                    let start = Instant::now();
                    let id = api.create(&template).await?;
                    Ok::<_, anyhow::Error>((start.elapsed(), id))
                })
            })
            .collect();
        let mut ids = Vec::new();
        for task in tasks {
            let (elapsed, id) = task.await??;
            concurrent.push(elapsed);
            ids.push(id);
        }
        for id in ids {
            api.delete(&id).await?;
        }
    }

    eprintln!(
        "sustained create + destroy ({} s, {} workers) ...",
        options.sustain_secs, options.sustain_workers
    );
    let rss_before = rss_mib();
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.sustain_secs);
    let workers: Vec<_> = (0..options.sustain_workers)
        .map(|_| {
            let (api, template) = (api.clone(), options.template.clone());
            let (done, errors) = (done.clone(), errors.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let result = async {
                        let id = api.create(&template).await?;
                        api.delete(&id).await
                    }
                    .await;
                    match result {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("  error: {e:#}");
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let destroys settle before measuring what is left.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_mib();
    let vmms_left = control.engine().list().len();

    let report = Report {
        template: options.template.clone(),
        accel: control.engine().accel().accel.qemu_name().into(),
        create_sequential: Summary::of(&created),
        create_then_first_exec_sequential: Summary::of(&first_exec),
        create_concurrent: Summary::of(&concurrent),
        clients: options.clients,
        exec_round_trip: Summary::of(&execs),
        sustained_seconds: elapsed,
        sustained_workers: options.sustain_workers,
        sustained_creates: done.load(Ordering::Relaxed),
        sustained_creates_per_second: done.load(Ordering::Relaxed) as f64 / elapsed,
        sustained_errors: errors.load(Ordering::Relaxed),
        daemon_rss_mib_before: rss_before,
        daemon_rss_mib_after: rss_after,
        vmms_left_after: vmms_left,
    };
    daemon.stop().await;
    if options.daemon.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "template {} ({}), through the HTTP API on loopback",
            report.template, report.accel
        );
        println!(
            "create (sequential):            {}",
            report.create_sequential
        );
        println!(
            "create + first exec:            {}",
            report.create_then_first_exec_sequential
        );
        println!(
            "create ({} concurrent clients):  {}",
            report.clients, report.create_concurrent
        );
        println!("exec round trip (true):         {}", report.exec_round_trip);
        println!(
            "sustained: {} creates+destroys in {:.0} s by {} workers = {:.2}/s, {} errors",
            report.sustained_creates,
            report.sustained_seconds,
            report.sustained_workers,
            report.sustained_creates_per_second,
            report.sustained_errors
        );
        println!(
            "daemon RSS before/after sustained: {:.1} / {:.1} MiB; sandboxes left: {}",
            report.daemon_rss_mib_before, report.daemon_rss_mib_after, report.vmms_left_after
        );
    }
    Ok(())
}
