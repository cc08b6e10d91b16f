//! `kiln agent ...` and `kiln bench agent`: the guest agent run on this host, in private
//! namespaces, for a self-test and for benchmarks.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use kiln_agent_client::local::{find_agent_binary, LocalAgent, LocalAgentOptions};
use kiln_agent_client::{AgentClient, ExecOutput};
use kiln_proto::messages::{
    Command, ExecRequest, FileReadRequest, FileWriteStart, ProcessSelector, PtySize,
};
use serde::Serialize;
use tokio::io::{AsyncRead, ReadBuf};

use crate::stats::Summary;

async fn start_agent(agent: Option<PathBuf>) -> Result<LocalAgent> {
    let binary = match agent {
        Some(path) => path,
        None => find_agent_binary()?,
    };
    LocalAgent::start(&binary, LocalAgentOptions::default())
        .await
        .with_context(|| {
            format!(
                "starting {} (needs root and util-linux's unshare)",
                binary.display()
            )
        })
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(Command::Shell(script.to_owned()))
}

/// Runs a short end-to-end check of the agent and prints each step.
pub async fn selftest(agent: Option<PathBuf>) -> Result<()> {
    let started = Instant::now();
    let local = start_agent(agent).await?;
    let client = local.client();
    let step = |name: &str| println!("  ok  {name}");

    let welcome = client.connect().await?;
    step(&format!(
        "handshake (protocol {}, agent {})",
        welcome.protocol, welcome.agent_version
    ));

    let result = client
        .run(sh("echo out; echo err >&2; exit 3"), 4096)
        .await?;
    ensure!(
        result.stdout == b"out\n" && result.stderr == b"err\n",
        "unexpected output {result:?}"
    );
    ensure!(
        result.status.code == Some(3),
        "unexpected exit {:?}",
        result.status
    );
    step("exec: stdout, stderr and exit code");

    let mut request = sh("cat");
    request.stdin = true;
    let session = client.exec(request).await?;
    session.input().stdin(b"ping").await?;
    session.input().close_stdin().await?;
    ensure!(
        session.collect(4096).await?.stdout == b"ping",
        "stdin was not echoed"
    );
    step("exec: stdin streaming");

    let mut request = sh("stty size");
    request.pty = Some(PtySize { rows: 33, cols: 99 });
    let output = client.run(request, 4096).await?;
    ensure!(
        String::from_utf8_lossy(&output.stdout).contains("33 99"),
        "terminal size not applied"
    );
    step("exec: PTY");

    let mut request = sh("sleep 0.2; echo from-background");
    request.background = true;
    request.tag = Some("selftest".into());
    drop(client.exec(request).await?);
    let attached = client
        .attach(ProcessSelector::Tag("selftest".into()))
        .await?;
    ensure!(
        attached.collect(4096).await?.stdout == b"from-background\n",
        "re-attach lost output"
    );
    step("background process: re-attach by tag");

    let dir = tempfile::tempdir()?;
    let path = dir
        .path()
        .join("selftest.txt")
        .to_string_lossy()
        .into_owned();
    client.write_file(&path, b"hello kiln").await?;
    ensure!(
        client.read_file(&path, 100).await? == b"hello kiln",
        "file round trip failed"
    );
    ensure!(client.stat(&path).await?.size == 10, "stat size wrong");
    client.remove(&path, false).await?;
    ensure!(!client.exists(&path).await?, "remove failed");
    step("files: write, read, stat, remove");

    let info = client.info().await?;
    step(&format!(
        "health: uptime {:.0} s, {} MiB available",
        info.uptime_secs,
        info.memory.available_bytes >> 20
    ));
    local.stop().await?;
    println!(
        "agent self-test passed in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Results of `kiln bench agent`.
#[derive(Debug, Serialize)]
struct AgentBench {
    exec_true_round_trip: Summary,
    file_mib: u64,
    write_mib_per_s: f64,
    read_mib_per_s: f64,
}

/// Measures the exec round trip of `true` and file throughput over a unix socket.
pub async fn bench(
    agent: Option<PathBuf>,
    iterations: usize,
    file_mib: u64,
    json: bool,
) -> Result<()> {
    if iterations == 0 || file_mib == 0 {
        bail!("--iterations and --file-mib must be at least 1");
    }
    let local = start_agent(agent).await?;
    let client = local.client();
    client.connect().await?;
    // Warm up: first exec pays for page-cache misses and lazy set-up.
    for _ in 0..10 {
        exec_true(&client).await?;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        exec_true(&client).await?;
        samples.push(start.elapsed());
    }
    let exec = Summary::of(&samples);

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.bin").to_string_lossy().into_owned();
    let size = file_mib << 20;
    let start = Instant::now();
    let written = client
        .write_file_from(FileWriteStart::new(path.clone()), &mut Zeros(size))
        .await?;
    let write_secs = start.elapsed().as_secs_f64();
    ensure!(written == size, "wrote {written} of {size} bytes");
    let start = Instant::now();
    let read = client
        .read_file_to(
            FileReadRequest {
                path,
                offset: 0,
                limit: None,
            },
            &mut tokio::io::sink(),
        )
        .await?;
    let read_secs = start.elapsed().as_secs_f64();
    ensure!(read == size, "read {read} of {size} bytes");
    local.stop().await?;

    let result = AgentBench {
        exec_true_round_trip: exec,
        file_mib,
        write_mib_per_s: file_mib as f64 / write_secs,
        read_mib_per_s: file_mib as f64 / read_secs,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!("exec `true` round trip: {}", result.exec_true_round_trip);
        println!(
            "file write ({file_mib} MiB): {:.0} MiB/s",
            result.write_mib_per_s
        );
        println!(
            "file read  ({file_mib} MiB): {:.0} MiB/s",
            result.read_mib_per_s
        );
    }
    Ok(())
}

async fn exec_true(client: &AgentClient) -> Result<()> {
    let mut session = client
        .exec(ExecRequest::new(Command::Argv(vec!["true".into()])))
        .await?;
    while let Some(event) = session.next().await? {
        if let ExecOutput::Exited { status, .. } = event {
            ensure!(status.code == Some(0), "true exited with {status:?}");
        }
    }
    Ok(())
}

/// `size` zero bytes.
struct Zeros(u64);

impl AsyncRead for Zeros {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.0) as usize;
        buf.put_slice(&vec![0u8; n]);
        self.0 -= n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}
