//! `kiln bench code`: stateful code execution through the HTTP API: create, the first
//! `run_code` in a new sandbox (the interpreter is warm from the snapshot), later runs, and a
//! first import of pandas in the warm context against a cold context, which shows what
//! starting the interpreter at bake saves.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_api::types::{CodeContextBody, CreateSandboxBody, ExecutionBody, SandboxBody};
use reqwest::Method;
use serde::Serialize;
use serde_json::json;

use crate::bench_api::InProcessDaemon;
use crate::client_cmd::Client;
use crate::stats::Summary;

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct CodeBenchOptions {
    /// Template (one that starts the code interpreter).
    #[arg(long, default_value = "python")]
    pub template: String,
    /// Sandboxes created and measured one after another.
    #[arg(long, default_value_t = 10)]
    pub iterations: usize,
    #[command(flatten)]
    pub daemon: crate::stats::DaemonArgs,
}

#[derive(Debug, Serialize)]
struct Report {
    template: String,
    accel: String,
    create: Summary,
    first_run: Summary,
    create_to_first_result: Summary,
    second_run: Summary,
    import_pandas_warm: Summary,
    import_pandas_cold_context: Summary,
}

async fn run_code(client: &Client, id: &str, code: &str, context: Option<&str>) -> Result<String> {
    let request = client
        .request(Method::POST, &format!("/v1/sandboxes/{id}/code"))
        .json(&json!({"code": code, "context": context}));
    let outcome: ExecutionBody = client.json(request).await?;
    ensure!(
        outcome.error.is_none(),
        "`{code}` raised: {:?}",
        outcome.error
    );
    let text = outcome
        .results
        .iter()
        .find(|r| r.is_main_result)
        .and_then(|r| r.data.get("text/plain"))
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .unwrap_or_default();
    Ok(text)
}

async fn timed<T>(
    samples: &mut Vec<Duration>,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let start = Instant::now();
    let value = work.await?;
    samples.push(start.elapsed());
    Ok(value)
}

/// Runs the benchmark against a daemon started in this process on a loopback port.
pub async fn run(options: CodeBenchOptions) -> Result<()> {
    ensure!(options.iterations > 0, "--iterations must be at least 1");
    let daemon =
        InProcessDaemon::start(&options.template, &options.daemon.cache_dir, |_| {}).await?;
    let client = daemon.client.clone();
    let create = || async {
        let body = CreateSandboxBody {
            template: Some(options.template.clone()),
            ..CreateSandboxBody::default()
        };
        let request = client.request(Method::POST, "/v1/sandboxes").json(&body);
        Ok::<_, anyhow::Error>(client.json::<SandboxBody>(request).await?.id)
    };
    eprintln!("preparing template {} ...", options.template);
    let warm = create().await.context("first create")?;
    run_code(&client, &warm, "1", None)
        .await
        .context("the template has no working code interpreter")?;
    client
        .send(client.request(Method::DELETE, &format!("/v1/sandboxes/{warm}")))
        .await?;

    let mut samples: [Vec<Duration>; 6] = Default::default();
    let [created, first, to_result, second, pandas_warm, pandas_cold] = &mut samples;
    for i in 0..options.iterations {
        eprintln!("sandbox {}/{} ...", i + 1, options.iterations);
        let start = Instant::now();
        let id = timed(created, create()).await?;
        let two = timed(first, run_code(&client, &id, "1 + 1", None)).await?;
        to_result.push(start.elapsed());
        ensure!(two == "2", "1 + 1 gave {two:?}");
        timed(second, run_code(&client, &id, "2 + 2", None)).await?;
        timed(
            pandas_warm,
            run_code(&client, &id, "import pandas as pd\npd.__name__", None),
        )
        .await?;
        let made: CodeContextBody = client
            .json(client.request(Method::POST, &format!("/v1/sandboxes/{id}/code/contexts")))
            .await?;
        timed(
            pandas_cold,
            run_code(
                &client,
                &id,
                "import pandas as pd\npd.__name__",
                Some(&made.id),
            ),
        )
        .await?;
        client
            .send(client.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))
            .await?;
    }
    let report = Report {
        template: options.template.clone(),
        accel: daemon.control.engine().accel().accel.qemu_name().into(),
        create: Summary::of(created),
        first_run: Summary::of(first),
        create_to_first_result: Summary::of(to_result),
        second_run: Summary::of(second),
        import_pandas_warm: Summary::of(pandas_warm),
        import_pandas_cold_context: Summary::of(pandas_cold),
    };
    daemon.stop().await;
    if options.daemon.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "template {} ({}), run_code through the HTTP API on loopback",
        report.template, report.accel
    );
    println!("create:                            {}", report.create);
    println!("first run_code (1 + 1):            {}", report.first_run);
    println!(
        "create -> first result:            {}",
        report.create_to_first_result
    );
    println!("second run_code:                   {}", report.second_run);
    println!(
        "import pandas, warm context:       {}",
        report.import_pandas_warm
    );
    println!(
        "import pandas, new (cold) context: {}",
        report.import_pandas_cold_context
    );
    println!(
        "first run / second run p50: {:.2}x; cold / warm pandas import p50: {:.1}x",
        report.first_run.p50_ms / report.second_run.p50_ms.max(0.001),
        report.import_pandas_cold_context.p50_ms / report.import_pandas_warm.p50_ms.max(0.001)
    );
    Ok(())
}
