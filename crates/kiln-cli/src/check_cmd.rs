//! `kiln check`: the reliability suite's checks, against a running daemon over its API.
//!
//! `kiln check faults`: a sandbox's VMM killed with SIGKILL is marked failed with a reason,
//! refuses work, can be destroyed, and its neighbour carries on.
//!
//! `kiln check suite`: the checks in one run, by profile (quick for CI, full for the
//! published figures). `kiln check escape` (the escape probes) is in `check_escape.rs`, the
//! abuses in `check_abuse.rs`.
//!
//! `kiln check soak`: a steady mixed load (create, exec, upload and download with the bytes
//! compared, fork, pause and resume, destroy) for a while, with every error counted and the
//! daemon's memory, descriptors and threads sampled from start to end; nothing of the
//! check's may be left. Fails (exit status 1) on any error or anything left; the daemon's
//! growth is reported, not judged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_api::types::{ExecResultBody, ForkedBody, SandboxBody, SandboxList};
use reqwest::Method;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Mutex;

use crate::client_cmd::Client;
use crate::stats::Summary;

/// Options of `kiln check soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakOptions {
    /// Seconds of load (the quick profile's 120; the full one's 1800).
    #[arg(long, default_value_t = 120)]
    pub duration_secs: u64,
    /// Sandboxes worked on at once.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Template of the sandboxes.
    #[arg(long, default_value = "base")]
    pub template: String,
    /// The daemon's process id on this host, to sample its memory, open descriptors and
    /// threads (without it they are not reported).
    #[arg(long)]
    pub daemon_pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What one kind of operation did.
#[derive(Debug, Default, Clone, Serialize)]
struct OperationFigures {
    count: usize,
    errors: usize,
    #[serde(skip)]
    samples: Vec<Duration>,
    latency: Option<Summary>,
}

/// The daemon's figures at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct DaemonSample {
    pub(crate) at_secs: f64,
    pub(crate) rss_mib: f64,
    pub(crate) open_fds: usize,
    pub(crate) threads: usize,
}

#[derive(Debug, Serialize)]
struct SoakReport {
    duration_secs: f64,
    workers: usize,
    template: String,
    cycles: usize,
    operations: Vec<(String, OperationFigures)>,
    errors: usize,
    first_errors: Vec<String>,
    daemon_start: Option<DaemonSample>,
    /// The first sample after a tenth of the run: what the daemon holds once its caches and
    /// pools have filled, against which the end shows growth.
    daemon_settled: Option<DaemonSample>,
    daemon_end: Option<DaemonSample>,
    daemon_max_rss_mib: Option<f64>,
    sandboxes_left: usize,
    passed: bool,
}

/// Operations in the order they are reported.
const OPERATIONS: [&str; 7] = [
    "create",
    "exec",
    "upload",
    "download",
    "fork",
    "pause+resume",
    "destroy",
];

#[derive(Debug, Default)]
struct Tally {
    operations: Vec<OperationFigures>,
    first_errors: Vec<String>,
    cycles: usize,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            operations: vec![OperationFigures::default(); OPERATIONS.len()],
            ..Tally::default()
        }
    }
}

/// Times `operation` (one of [`OPERATIONS`]) and counts it, or its error.
async fn timed<T>(
    tally: &Mutex<Tally>,
    operation: &str,
    future: impl std::future::Future<Output = Result<T>>,
) -> Option<T> {
    let index = OPERATIONS
        .iter()
        .position(|o| *o == operation)
        .unwrap_or_default();
    let started = Instant::now();
    let result = future.await;
    let mut tally = tally.lock().await;
    let figures = &mut tally.operations[index];
    figures.count += 1;
    match result {
        Ok(value) => {
            figures.samples.push(started.elapsed());
            Some(value)
        }
        Err(e) => {
            figures.errors += 1;
            if tally.first_errors.len() < 5 {
                tally.first_errors.push(format!("{operation}: {e:#}"));
            }
            None
        }
    }
}

/// Runs the shell command `command` in sandbox `id`; its standard output if it exited 0.
pub(crate) async fn exec(client: &Client, id: &str, command: &str) -> Result<String> {
    // Bounded: in the guest (killed after 2 minutes) and on the wire (a hung guest).
    let request = client
        .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .timeout(Duration::from_secs(180))
        .json(&json!({"command": command, "timeout_ms": 120_000}));
    let result: ExecResultBody = client.json(request).await?;
    ensure!(
        result.exit_code == Some(0),
        "`{command}` exited {:?}: {}",
        result.exit_code,
        result.stderr
    );
    Ok(result.stdout)
}

/// Creates a sandbox of `template` that lives at most 10 minutes (a check that fails
/// half-way leaves nothing for long).
pub(crate) async fn create(client: &Client, template: &str) -> Result<String> {
    let request = client
        .request(Method::POST, "/v1/sandboxes")
        .timeout(Duration::from_secs(180))
        .json(&json!({"template": template, "ttl_secs": 600}));
    Ok(client.json::<SandboxBody>(request).await?.id)
}

pub(crate) async fn delete(client: &Client, id: &str) -> Result<()> {
    client
        .send(
            client
                .request(Method::DELETE, &format!("/v1/sandboxes/{id}"))
                .timeout(Duration::from_secs(120)),
        )
        .await?;
    Ok(())
}

/// One sandbox's life under load; `cycle` picks whether it is also forked or paused.
async fn cycle(client: &Client, tally: &Mutex<Tally>, template: &str, cycle: usize) {
    let create = async {
        let request = client
            .request(Method::POST, "/v1/sandboxes")
            .json(&json!({"template": template, "ttl_secs": 600}));
        Ok(client.json::<SandboxBody>(request).await?.id)
    };
    let Some(id) = timed(tally, "create", create).await else {
        return;
    };
    let marker = format!("soak-{cycle}");
    timed(tally, "exec", async {
        let out = exec(client, &id, &format!("echo {marker}")).await?;
        ensure!(out.trim() == marker, "echo answered {out:?}");
        Ok(())
    })
    .await;
    // 256 KiB that differ per cycle, there and back, compared.
    let payload: Vec<u8> = (0..256 << 10)
        .map(|i: usize| (i.wrapping_mul(31) ^ cycle) as u8)
        .collect();
    let path = "/tmp/soak.bin";
    let uploaded = timed(tally, "upload", async {
        let request = client
            .request(Method::PUT, &format!("/v1/sandboxes/{id}/files/content"))
            .query(&[("path", path)])
            .body(payload.clone());
        client.send(request).await?;
        Ok(())
    })
    .await;
    if uploaded.is_some() {
        timed(tally, "download", async {
            let request = client
                .request(Method::GET, &format!("/v1/sandboxes/{id}/files/content"))
                .query(&[("path", path)]);
            let body = client.send(request).await?.bytes().await?;
            ensure!(
                body.as_ref() == payload.as_slice(),
                "the file came back changed"
            );
            Ok(())
        })
        .await;
    }
    match cycle % 4 {
        1 => {
            timed(tally, "fork", async {
                let request = client
                    .request(Method::POST, &format!("/v1/sandboxes/{id}/fork"))
                    .json(&json!({"count": 1}));
                let forked: ForkedBody = client.json(request).await?;
                let child = forked.sandboxes.first().context("no child")?.id.clone();
                let seen = exec(client, &child, &format!("wc -c < {path}")).await;
                delete(client, &child).await?;
                ensure!(
                    seen?.trim() == (256 << 10).to_string(),
                    "the child's copy differs"
                );
                Ok(())
            })
            .await;
        }
        3 => {
            timed(tally, "pause+resume", async {
                for action in ["pause", "resume"] {
                    let request =
                        client.request(Method::POST, &format!("/v1/sandboxes/{id}/{action}"));
                    client.send(request).await?;
                }
                exec(client, &id, "true").await?;
                Ok(())
            })
            .await;
        }
        _ => {}
    }
    timed(tally, "destroy", delete(client, &id)).await;
    tally.lock().await.cycles += 1;
}

/// The daemon's resident memory, open descriptors and threads now.
pub(crate) fn sample(pid: u32, started: Instant) -> Option<DaemonSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
    };
    Some(DaemonSample {
        at_secs: started.elapsed().as_secs_f64(),
        rss_mib: field("VmRSS:")? / 1024.0,
        threads: field("Threads:")? as usize,
        open_fds: std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count(),
    })
}

/// Runs the soak and prints its report; returns whether it passed.
pub async fn soak(client: &Client, options: &SoakOptions) -> Result<bool> {
    ensure!(options.workers > 0, "--workers must be at least 1");
    if let Some(pid) = options.daemon_pid {
        ensure!(
            sample(pid, Instant::now()).is_some(),
            "no process {pid} to sample: --daemon-pid takes the daemon's pid on this host"
        );
    }
    let tally = Arc::new(Mutex::new(Tally::new()));
    eprintln!(
        "soak: {} s, {} workers, template {} ...",
        options.duration_secs, options.workers, options.template
    );
    // A first cycle makes the template ready before the clock starts.
    cycle(client, &tally, &options.template, 0).await;
    let warm = std::mem::replace(&mut *tally.lock().await, Tally::new());
    ensure!(
        warm.first_errors.is_empty(),
        "the first sandbox already failed: {}",
        warm.first_errors.join("; ")
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.duration_secs);
    let first = options.daemon_pid.and_then(|pid| sample(pid, started));
    let mut samples: Vec<DaemonSample> = first.into_iter().collect();
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.workers {
        let (client, tally, counter) = (client.clone(), tally.clone(), counter.clone());
        let template = options.template.clone();
        workers.spawn(async move {
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                cycle(&client, &tally, &template, n).await;
            }
        });
    }
    while !workers.is_empty() {
        tokio::select! {
            _ = workers.join_next() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                samples.extend(options.daemon_pid.and_then(|pid| sample(pid, started)));
            }
        }
    }
    let duration = started.elapsed();
    samples.extend(options.daemon_pid.and_then(|pid| sample(pid, started)));
    let left = client
        .json::<SandboxList>(client.request(Method::GET, "/v1/sandboxes?limit=500"))
        .await
        .context("listing what is left")?
        .sandboxes
        .len();

    let tally = std::mem::take(&mut *tally.lock().await);
    let errors: usize = tally.operations.iter().map(|o| o.errors).sum();
    let operations = OPERATIONS
        .iter()
        .zip(tally.operations)
        .map(|(name, mut figures)| {
            figures.latency = (!figures.samples.is_empty()).then(|| Summary::of(&figures.samples));
            (name.to_string(), figures)
        })
        .collect();
    let report = SoakReport {
        duration_secs: duration.as_secs_f64(),
        workers: options.workers,
        template: options.template.clone(),
        cycles: tally.cycles,
        operations,
        errors,
        first_errors: tally.first_errors,
        daemon_start: samples.first().copied(),
        daemon_settled: samples
            .iter()
            .find(|s| s.at_secs >= duration.as_secs_f64() / 10.0)
            .copied(),
        daemon_end: samples.last().copied(),
        daemon_max_rss_mib: samples.iter().map(|s| s.rss_mib).reduce(f64::max),
        sandboxes_left: left,
        passed: errors == 0 && left == 0,
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_soak(&report);
    }
    Ok(report.passed)
}

fn print_soak(report: &SoakReport) {
    println!(
        "soak: {:.0} s, {} workers, template {}, {} sandboxes made and destroyed",
        report.duration_secs, report.workers, report.template, report.cycles
    );
    println!(
        "{:<14} {:>7} {:>7} {:>9} {:>9}",
        "operation", "count", "errors", "p50 ms", "p99 ms"
    );
    for (name, figures) in &report.operations {
        let (p50, p99) = figures
            .latency
            .as_ref()
            .map_or((f64::NAN, f64::NAN), |s| (s.p50_ms, s.p99_ms));
        println!(
            "{name:<14} {:>7} {:>7} {p50:>9.1} {p99:>9.1}",
            figures.count, figures.errors
        );
    }
    if let (Some(start), Some(end)) = (report.daemon_start, report.daemon_end) {
        // No sample after a tenth of the run (a run shorter than the sampling interval).
        let settled = report.daemon_settled;
        let at = |f: fn(&DaemonSample) -> String| settled.as_ref().map_or("-".into(), f);
        println!(
            "daemon         start  settled      end  (at {:.0} s, {} s and {:.0} s)",
            start.at_secs,
            at(|s| format!("{:.0}", s.at_secs)),
            end.at_secs
        );
        println!(
            "  rss MiB   {:>9.1} {:>8} {:>8.1}  (max {:.1})",
            start.rss_mib,
            at(|s| format!("{:.1}", s.rss_mib)),
            end.rss_mib,
            report.daemon_max_rss_mib.unwrap_or(end.rss_mib)
        );
        println!(
            "  open fds  {:>9} {:>8} {:>8}",
            start.open_fds,
            at(|s| s.open_fds.to_string()),
            end.open_fds
        );
        println!(
            "  threads   {:>9} {:>8} {:>8}",
            start.threads,
            at(|s| s.threads.to_string()),
            end.threads
        );
    }
    println!("sandboxes left: {}", report.sandboxes_left);
    for error in &report.first_errors {
        println!("error: {error}");
    }
    println!(
        "result: {}",
        if report.passed {
            "passed (no error, nothing left)"
        } else {
            "FAILED"
        }
    );
}

/// Options of `kiln check faults`.
#[derive(Debug, Clone, clap::Args)]
pub struct FaultOptions {
    /// Template of the sandboxes.
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct FaultReport {
    vmm_killed_marked_failed_ms: Option<f64>,
    reason: Option<String>,
    failed_sandbox_refuses_exec: bool,
    failed_sandbox_destroyed: bool,
    neighbour_exec_after_ms: Option<f64>,
    sandboxes_left: usize,
    passed: bool,
}

/// The VMM process of sandbox `id`: the QEMU process in its cgroup (`.../kiln/<id>`).
pub(crate) fn vmm_of(id: &str) -> Option<u32> {
    let suffix = format!("/kiln/{id}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).ok()?;
            (comm.starts_with("qemu-system") && cgroup.lines().any(|l| l.ends_with(&suffix)))
                .then_some(pid)
        })
}

/// A VMM killed with SIGKILL (as a guest that escaped into it and crashed it would end it):
/// its sandbox is marked failed with a reason, refuses work, can be destroyed, and a
/// neighbour is not affected. Must run as root on the daemon's host.
pub async fn faults(client: &Client, options: &FaultOptions) -> Result<bool> {
    let victim = create(client, &options.template)
        .await
        .context("creating the victim")?;
    let neighbour = create(client, &options.template)
        .await
        .context("creating the neighbour")?;
    exec(client, &neighbour, "true").await?;
    let pid = vmm_of(&victim).with_context(|| {
        format!("no VMM of {victim} in this host's /proc: run kiln check faults as root on the daemon's host")
    })?;
    eprintln!("faults: killing the VMM of {victim} (pid {pid}) ...");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .context("killing the VMM")?;
    let killed = Instant::now();
    let (mut marked, mut reason) = (None, None);
    while killed.elapsed() < Duration::from_secs(20) {
        let state: SandboxBody = client
            .json(client.request(Method::GET, &format!("/v1/sandboxes/{victim}")))
            .await?;
        if serde_json::to_value(state.state)?.as_str() == Some("failed") {
            marked = Some(killed.elapsed().as_secs_f64() * 1000.0);
            reason = state.reason;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refuses = exec(client, &victim, "true").await.is_err();
    let neighbour_started = Instant::now();
    let neighbour_ok = exec(client, &neighbour, "echo fine").await;
    let neighbour_ms = neighbour_ok
        .as_ref()
        .ok()
        .filter(|out| out.trim() == "fine")
        .map(|_| neighbour_started.elapsed().as_secs_f64() * 1000.0);
    let destroyed = delete(client, &victim).await.is_ok();
    delete(client, &neighbour).await?;
    let left = client
        .json::<SandboxList>(client.request(Method::GET, "/v1/sandboxes?limit=500"))
        .await?
        .sandboxes
        .len();
    let report = FaultReport {
        vmm_killed_marked_failed_ms: marked,
        passed: marked.is_some()
            && reason.as_deref().is_some_and(|r| !r.is_empty())
            && refuses
            && destroyed
            && neighbour_ms.is_some()
            && left == 0,
        reason,
        failed_sandbox_refuses_exec: refuses,
        failed_sandbox_destroyed: destroyed,
        neighbour_exec_after_ms: neighbour_ms,
        sandboxes_left: left,
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let ms = |v: Option<f64>| v.map_or_else(|| "never".to_owned(), |ms| format!("{ms:.0} ms"));
        println!("faults: a VMM killed with SIGKILL");
        println!(
            "  marked failed after     {}",
            ms(report.vmm_killed_marked_failed_ms)
        );
        println!(
            "  reason                  {}",
            report.reason.as_deref().unwrap_or("-")
        );
        println!(
            "  refuses an exec         {}",
            report.failed_sandbox_refuses_exec
        );
        println!(
            "  destroyed               {}",
            report.failed_sandbox_destroyed
        );
        println!(
            "  neighbour's exec after  {}",
            ms(report.neighbour_exec_after_ms)
        );
        println!("  sandboxes left          {}", report.sandboxes_left);
        println!(
            "result: {}",
            if report.passed { "passed" } else { "FAILED" }
        );
    }
    Ok(report.passed)
}

/// How much of the reliability suite `kiln check suite` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// For CI: each escape probe once (as root) with its control, a 2-minute soak, 500
    /// fuzzed API requests and 50,000 hostile agent frames, a VMM killed, the recovery
    /// faults with 10 sandboxes, the abuses with their goals reported.
    Quick,
    /// For the published figures: each escape probe as root and as an unprivileged user, a
    /// 30-minute soak, 10,000 fuzzed API requests and 1,000,000 hostile agent frames, a VMM
    /// killed, the recovery faults with 50 sandboxes, the abuses with their goals enforced.
    Full,
}

/// Options of `kiln check suite`.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteOptions {
    /// Which profile.
    #[arg(long, value_enum, default_value_t = Profile::Quick)]
    pub profile: Profile,
    /// Template of the sandboxes.
    #[arg(long, default_value = "base")]
    pub template: String,
    /// The daemon's process id on this host (its memory, descriptors and threads are
    /// sampled during the soak).
    #[arg(long)]
    pub daemon_pid: Option<u32>,
    /// Seconds of soak in place of the profile's (120 quick, 1800 full).
    #[arg(long)]
    pub soak_secs: Option<u64>,
    /// Template of the escape probes' sandboxes (its guest needs Python 3 and iproute2).
    #[arg(long, default_value = "python")]
    pub escape_template: String,
    #[command(flatten)]
    pub inputs: crate::check_daemon::DaemonInputs,
}

/// Runs the escape probes, the soak, the fuzz, the fault checks and the abuses in turn (each prints its report), then a
/// line per check. Returns whether all passed.
pub async fn suite(client: &Client, options: &SuiteOptions) -> Result<bool> {
    let full = options.profile == Profile::Full;
    let soak_options = SoakOptions {
        duration_secs: options.soak_secs.unwrap_or(if full { 1800 } else { 120 }),
        workers: 2,
        template: options.template.clone(),
        daemon_pid: options.daemon_pid,
        json: false,
    };
    let fault_options = FaultOptions {
        template: options.template.clone(),
        json: false,
    };
    let abuse_options = crate::check_abuse::AbuseOptions {
        template: options.template.clone(),
        samples: if full { 50 } else { 20 },
        ramp_secs: 3,
        enforce_goals: full,
        json: false,
    };
    let recovery_options = crate::check_recovery::RecoveryOptions {
        template: options.template.clone(),
        sandboxes: if full { 50 } else { 10 },
        inputs: options.inputs.clone(),
        json: false,
    };
    let escape_options = crate::check_escape::EscapeOptions {
        template: options.escape_template.clone(),
        inputs: options.inputs.clone(),
        root_only: !full,
        json: false,
    };
    let fuzz_options = crate::check_fuzz::FuzzOptions {
        requests: if full { 10_000 } else { 500 },
        frames: if full { 1_000_000 } else { 50_000 },
        seed: None,
        workers: 2,
        template: options.template.clone(),
        daemon_pid: options.daemon_pid,
        verbose: false,
        json: false,
    };
    let started = Instant::now();
    let mut results = Vec::new();
    // A check that cannot finish is a failed one; the others still run. The checks run one
    // after another: each took the time since the one before it ended.
    let mut ended = Instant::now();
    let mut outcome = |check: &'static str, result: Result<bool>| {
        if let Err(e) = &result {
            println!("{check}: could not finish: {e:#}");
        }
        results.push((
            check,
            result.unwrap_or(false),
            ended.elapsed().as_secs_f64(),
        ));
        ended = Instant::now();
    };
    outcome("escape", crate::check_escape::escape(&escape_options).await);
    outcome("soak", soak(client, &soak_options).await);
    outcome("fuzz", crate::check_fuzz::fuzz(client, &fuzz_options).await);
    outcome("faults", faults(client, &fault_options).await);
    outcome(
        "recovery",
        crate::check_recovery::recovery(&recovery_options).await,
    );
    outcome(
        "abuse",
        crate::check_abuse::abuse(client, &abuse_options).await,
    );
    println!(
        "suite ({} profile, {:.0} s):",
        if full { "full" } else { "quick" },
        started.elapsed().as_secs_f64()
    );
    for (check, passed, secs) in &results {
        let verdict = if *passed { "passed" } else { "FAILED" };
        println!("  {check:<8} {verdict:<6} {secs:>5.0} s");
    }
    Ok(results.iter().all(|(_, passed, _)| *passed))
}
