//! `kiln check abuse`: one sandbox abuses its guest (fork bomb, memory bomb, every vCPU
//! busy, its disk filled, output without end, descriptors exhausted), one at a time, while a
//! neighbour's exec latency is measured against its baseline and the abuser's own agent is
//! timed (a call that starts nothing, and `true`). Fails (exit status 1) when a neighbour's
//! exec fails, the abuser cannot be destroyed or anything is left; with `--enforce-goals`
//! also past the goals (neighbour p50 at most 2x its baseline, the abuser's agent answering
//! within 2 s).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_api::types::{ExecResultBody, SandboxList};
use reqwest::Method;
use serde::Serialize;
use serde_json::json;

use crate::check_cmd::{create, delete};
use crate::client_cmd::Client;
use crate::stats::Summary;

/// Options of `kiln check abuse`.
#[derive(Debug, Clone, clap::Args)]
pub struct AbuseOptions {
    /// Template of the sandboxes.
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Neighbour execs timed for the baseline and under each abuse.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Seconds each abuse runs before the neighbour is timed.
    #[arg(long, default_value_t = 3)]
    pub ramp_secs: u64,
    /// Fail past the goals too (the full profile), not only on errors.
    #[arg(long)]
    pub enforce_goals: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Most a neighbour's exec p50 may grow under abuse, as a ratio to its baseline.
const NEIGHBOUR_GOAL: f64 = 2.0;
/// Longest the abuser's own agent may take to run a command under its abuse.
const ABUSER_GOAL: Duration = Duration::from_secs(2);
/// Longest the check waits for the abuser's timed `true` (reported, not judged).
const ABUSER_TRUE_WAIT: Duration = Duration::from_secs(12);

/// The abuses, each a shell script run as root in the guest, in the background, until the
/// sandbox is destroyed.
const ABUSES: &[(&str, &str)] = &[
    ("fork bomb", "b() { b | b & }; b"),
    ("memory bomb", "while :; do tail /dev/zero; done"),
    (
        "CPU hog on every vCPU",
        "for i in $(seq $(nproc)); do (while :; do :; done) & done; wait",
    ),
    (
        "disk filled",
        "dd if=/dev/zero of=/var/tmp/fill bs=1M; sync; sleep 3600",
    ),
    ("output flood", "yes kiln-output-flood"),
    (
        "descriptors exhausted",
        "for j in 1 2 3 4; do bash -c 'ulimit -n 1048576; i=10; \
         while eval \"exec $i</dev/null\"; do i=$((i+1)); done; sleep 3600' & done; wait",
    ),
];

#[derive(Debug, Serialize)]
struct AbuseFigures {
    abuse: String,
    /// The neighbour's execs that answered (`None`: none did).
    neighbour: Option<Summary>,
    neighbour_errors: usize,
    /// Neighbour exec p50 under the abuse over its baseline (`None`: no exec answered).
    neighbour_p50_ratio: Option<f64>,
    /// The abuser's agent answering a call that starts nothing (its process listing; `None`:
    /// it did not, the error is in `abuser_error`).
    abuser_agent_ms: Option<f64>,
    /// The abuser running `true` (`None`: it could not, the error is in `abuser_error`).
    abuser_exec_ms: Option<f64>,
    abuser_error: Option<String>,
    abuser_destroyed_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct AbuseReport {
    template: String,
    baseline: Summary,
    abuses: Vec<AbuseFigures>,
    sandboxes_left: usize,
    within_goals: bool,
    passed: bool,
}

/// Runs `true` in sandbox `id` and times it; an exit status other than 0 is an error.
async fn timed_true(client: &Client, id: &str) -> Result<Duration> {
    let started = Instant::now();
    let request = client
        .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .json(&json!({"command": ["true"], "timeout_ms": 10_000}));
    let result: ExecResultBody = client.json(request).await?;
    anyhow::ensure!(
        result.exit_code == Some(0),
        "`true` ended with exit code {:?}, signal {:?}{}",
        result.exit_code,
        result.signal,
        if result.timed_out { ", timed out" } else { "" }
    );
    Ok(started.elapsed())
}

/// Times a call that goes to sandbox `id`'s agent and starts nothing in the guest (its
/// process listing).
async fn timed_agent(client: &Client, id: &str) -> Result<Duration> {
    let started = Instant::now();
    client
        .send(client.request(Method::GET, &format!("/v1/sandboxes/{id}/processes")))
        .await?;
    Ok(started.elapsed())
}

/// `samples` timed execs in the neighbour, and how many failed.
async fn neighbour_execs(client: &Client, id: &str, samples: usize) -> (Vec<Duration>, usize) {
    let (mut times, mut errors) = (Vec::new(), 0);
    for _ in 0..samples {
        match timed_true(client, id).await {
            Ok(elapsed) => times.push(elapsed),
            Err(e) => {
                errors += 1;
                eprintln!("abuse: a neighbour's exec failed: {e:#}");
            }
        }
    }
    (times, errors)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One abuse: a new sandbox runs it while the neighbour is timed, then is destroyed.
async fn one(
    client: &Client,
    options: &AbuseOptions,
    neighbour: &str,
    baseline: &Summary,
    (name, script): (&str, &str),
) -> Result<AbuseFigures> {
    eprintln!("abuse: {name} ...");
    let abuser = create(client, &options.template)
        .await
        .context("creating the abuser")?;
    let request = client
        .request(Method::POST, &format!("/v1/sandboxes/{abuser}/exec"))
        .json(&json!({"command": script, "user": "root", "background": true}));
    if let Err(e) = client.send(request).await {
        let _ = delete(client, &abuser).await;
        return Err(e.context(format!("starting the {name}")));
    }
    tokio::time::sleep(Duration::from_secs(options.ramp_secs)).await;
    let (times, neighbour_errors) = neighbour_execs(client, neighbour, options.samples).await;
    let summary = (!times.is_empty()).then(|| Summary::of(&times));
    let mut abuser_error = None;
    let mut note = |e: anyhow::Error| {
        abuser_error.get_or_insert(format!("{e:#}"));
    };
    let abuser_agent_ms = timed_agent(client, &abuser)
        .await
        .map(ms)
        .map_err(&mut note)
        .ok();
    // Its exec's own timeout is 10 s; an abuse that holds the call longer (a fork bomb held
    // it for the whole agent call timeout once) is not waited out.
    let abuser_exec_ms = tokio::time::timeout(ABUSER_TRUE_WAIT, timed_true(client, &abuser))
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "`true` got no answer in {} s",
                ABUSER_TRUE_WAIT.as_secs()
            ))
        })
        .map(ms)
        .map_err(&mut note)
        .ok();
    let destroy_started = Instant::now();
    let destroyed = delete(client, &abuser).await;
    if let Err(e) = &destroyed {
        eprintln!("abuse: destroying the abuser of the {name} failed: {e:#}");
    }
    Ok(AbuseFigures {
        abuse: name.to_owned(),
        neighbour_p50_ratio: summary
            .as_ref()
            .map(|s| s.p50_ms / baseline.p50_ms.max(f64::MIN_POSITIVE)),
        neighbour: summary,
        neighbour_errors,
        abuser_agent_ms,
        abuser_exec_ms,
        abuser_error,
        abuser_destroyed_ms: destroyed.ok().map(|_| ms(destroy_started.elapsed())),
    })
}

/// Runs every abuse in turn beside one neighbour. Returns whether the check passed.
pub async fn abuse(client: &Client, options: &AbuseOptions) -> Result<bool> {
    anyhow::ensure!(options.samples > 0, "--samples must be at least 1");
    let neighbour = create(client, &options.template)
        .await
        .context("creating the neighbour")?;
    // Its first command runs guest code for the first time: not part of the baseline.
    timed_true(client, &neighbour).await?;
    let (times, errors) = neighbour_execs(client, &neighbour, options.samples).await;
    anyhow::ensure!(errors == 0, "the neighbour's baseline execs failed");
    let baseline = Summary::of(&times);
    let mut abuses = Vec::new();
    for abuse in ABUSES {
        abuses.push(one(client, options, &neighbour, &baseline, *abuse).await?);
    }
    delete(client, &neighbour).await?;
    let left = client
        .json::<SandboxList>(client.request(Method::GET, "/v1/sandboxes?limit=500"))
        .await?
        .sandboxes
        .len();
    let within_goals = abuses.iter().all(|a| {
        a.neighbour_p50_ratio
            .is_some_and(|ratio| ratio <= NEIGHBOUR_GOAL)
            && a.abuser_agent_ms
                .is_some_and(|ms| ms <= ABUSER_GOAL.as_secs_f64() * 1000.0)
    });
    let sound = abuses
        .iter()
        .all(|a| a.neighbour_errors == 0 && a.abuser_destroyed_ms.is_some())
        && left == 0;
    let report = AbuseReport {
        template: options.template.clone(),
        baseline,
        abuses,
        sandboxes_left: left,
        within_goals,
        passed: sound && (within_goals || !options.enforce_goals),
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(report.passed)
}

fn print_report(report: &AbuseReport) {
    println!(
        "abuse: one sandbox at a time abuses its guest beside a neighbour ({})",
        report.template
    );
    println!(
        "  neighbour's exec baseline: p50 {:.1} ms, p99 {:.1} ms",
        report.baseline.p50_ms, report.baseline.p99_ms
    );
    println!(
        "  {:<24} {:>8} {:>8} {:>6} {:>6} {:>14} {:>13} {:>10}",
        "abuse",
        "p50 ms",
        "p99 ms",
        "x p50",
        "errors",
        "abuser's agent",
        "abuser's true",
        "destroyed"
    );
    for a in &report.abuses {
        let timing =
            |v: Option<f64>| v.map_or_else(|| "failed".to_owned(), |ms| format!("{ms:.0} ms"));
        let destroyed = a
            .abuser_destroyed_ms
            .map_or_else(|| "FAILED".to_owned(), |ms| format!("{ms:.0} ms"));
        let figure = |v: Option<f64>, digits: usize| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
        };
        println!(
            "  {:<24} {:>8} {:>8} {:>6} {:>6} {:>14} {:>13} {:>10}",
            a.abuse,
            figure(a.neighbour.as_ref().map(|s| s.p50_ms), 1),
            figure(a.neighbour.as_ref().map(|s| s.p99_ms), 1),
            figure(a.neighbour_p50_ratio, 2),
            a.neighbour_errors,
            timing(a.abuser_agent_ms),
            timing(a.abuser_exec_ms),
            destroyed
        );
        if let Some(error) = &a.abuser_error {
            println!("      abuser: {error}");
        }
    }
    println!(
        "  goals (neighbour p50 at most {NEIGHBOUR_GOAL}x, the abuser's agent within {} s): {}",
        ABUSER_GOAL.as_secs(),
        if report.within_goals { "met" } else { "missed" }
    );
    println!("  sandboxes left: {}", report.sandboxes_left);
    println!(
        "result: {}",
        if report.passed { "passed" } else { "FAILED" }
    );
}
