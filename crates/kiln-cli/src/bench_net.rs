//! `kiln bench net`: what sandbox networking costs. Create latency with and without it; a
//! real guest's TCP upload; the network path's throughput (iperf3) and connect latency from
//! a namespace standing in for a guest; and the overhead of the egress proxy (HTTP by name)
//! and of the ingress proxy. Traffic goes only to loopback and to a "bench internet"
//! namespace this benchmark makes and removes (the daemon's egress in it), never to the
//! machine's uplink.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_engine::{CreateOptions, Engine, EngineConfig};
use kiln_network::policy::{Destination, EgressPolicy};
use kiln_proto::messages::{Command, ExecRequest};
use kiln_testinfra::internet::{ShutdownOnDrop, TestInternet, WEB};
use serde::Serialize;

use crate::stats::Summary;

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct NetBenchOptions {
    /// Template (spec, directory or name).
    #[arg(long, default_value = "base")]
    pub template: String,
    /// Sequential creates with and without networking (taken in turns, so drift on the
    /// host weighs on both alike).
    #[arg(long, default_value_t = 40)]
    pub iterations: usize,
    /// Requests per proxy measurement and connects for the latency.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Seconds of iperf3.
    #[arg(long, default_value_t = 5)]
    pub iperf_secs: u32,
    /// MiB a guest uploads for its throughput.
    #[arg(long, default_value_t = 32)]
    pub upload_mib: u32,
    #[command(flatten)]
    pub engine: crate::stats::EngineArgs,
}

#[derive(Debug, Serialize)]
struct Report {
    template: String,
    accel: String,
    create_without_network: Summary,
    create_with_network: Summary,
    create_ratio_p50: f64,
    create_phases_p50_ms_without_network: BTreeMap<String, f64>,
    create_phases_p50_ms_with_network: BTreeMap<String, f64>,
    guest_upload_mib_per_s: Vec<f64>,
    iperf3_gbit_per_s: f64,
    connect_and_first_byte: Summary,
    http_direct: Summary,
    http_through_egress_proxy: Summary,
    egress_proxy_overhead_p50_ms: f64,
    http_to_guest_direct: Summary,
    http_through_ingress: Summary,
    ingress_overhead_p50_ms: f64,
}

/// Create latencies (until `true` has exited through the agent) and each phase's samples.
#[derive(Debug, Default)]
struct Creates {
    total: Vec<Duration>,
    phases: BTreeMap<String, Vec<Duration>>,
}

impl Creates {
    /// One create from `template`, timed, then destroyed.
    async fn one(&mut self, engine: &Engine, template: &kiln_engine::BakedTemplate) -> Result<()> {
        let start = Instant::now();
        let sandbox = engine.create(template, CreateOptions::default()).await?;
        let result = sandbox
            .agent()
            .run(ExecRequest::new(Command::Argv(vec!["true".into()])), 1024)
            .await?;
        ensure!(result.status.code == Some(0), "true failed");
        self.total.push(start.elapsed());
        for (name, ms) in &sandbox.timings().phases {
            self.phases
                .entry(name.clone())
                .or_default()
                .push(Duration::from_secs_f64(ms / 1000.0));
        }
        sandbox.destroy().await?;
        Ok(())
    }

    fn phases_p50_ms(&self) -> BTreeMap<String, f64> {
        self.phases
            .iter()
            .map(|(name, samples)| (name.clone(), Summary::of(samples).p50_ms))
            .collect()
    }
}

/// One HTTP/1.1 GET of `host`'s `/` at `addr` on a new connection, from the current thread's
/// namespace; the time until the whole body arrived.
fn http_get(addr: SocketAddr, host: &str) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !response.ends_with(b"\n") || !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    if !String::from_utf8_lossy(&response).contains("hello from") {
        return Err(std::io::Error::other("not the bench server's answer"));
    }
    Ok(start.elapsed())
}

fn policy(internet: bool, deny: &[&str]) -> EgressPolicy {
    EgressPolicy {
        internet,
        allow_out: Vec::new(),
        deny_out: deny
            .iter()
            .map(|d| Destination::parse(d).unwrap_or(Destination::Domain((*d).to_owned())))
            .collect(),
        bandwidth_mbit: None,
        max_connections: None,
    }
}

/// Runs the benchmark.
pub async fn run(options: NetBenchOptions) -> Result<()> {
    let images = options.engine.images(&options.template).await?;
    let mut internet = TestInternet::new(0);
    let upstream = internet.start_dns();
    let sink = internet.start_sink();
    let iperf_server = internet.start_iperf3();

    let data_off = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let engine_off = Engine::new(EngineConfig {
        accel: options.engine.accel,
        ..EngineConfig::new(data_off.path())
    })?;
    let template_off = engine_off.bake(&images).await.context("bake")?;
    let data_on = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let engine = Engine::new(EngineConfig {
        accel: options.engine.accel,
        network: Some(kiln_network::NetworkConfig {
            dns_upstreams: vec![upstream],
            ..internet.network_config()
        }),
        ..EngineConfig::new(data_on.path())
    })?;
    let network = engine.network().context("networking")?.clone();
    let _cleanup = ShutdownOnDrop(network.clone());
    let template = engine.bake(&images).await.context("bake")?;

    eprintln!(
        "creates without and with networking, in turns ({} each) ...",
        options.iterations
    );
    engine_off.prestart(&template_off);
    engine.prestart(&template);
    let (mut without, mut with) = (Creates::default(), Creates::default());
    for i in 0..options.iterations {
        if i % 2 == 0 {
            without.one(&engine_off, &template_off).await?;
            with.one(&engine, &template).await?;
        } else {
            with.one(&engine, &template).await?;
            without.one(&engine_off, &template_off).await?;
        }
    }
    engine_off.shutdown_prestarted().await;
    let create_without = Summary::of(&without.total);
    let create_with = Summary::of(&with.total);

    eprintln!("a guest's upload ({} MiB, 3 times) ...", options.upload_mib);
    let guest = engine.create(&template, CreateOptions::default()).await?;
    let mut upload = Vec::new();
    for _ in 0..3 {
        let script = format!(
            "bash -c 's=$(date +%s%N); dd if=/dev/zero bs=1M count={} 2>/dev/null >/dev/tcp/{}/{}; echo $(( $(date +%s%N) - s ))'",
            options.upload_mib,
            sink.ip(),
            sink.port()
        );
        let result = guest
            .agent()
            .run(ExecRequest::new(Command::Shell(script)), 4096)
            .await?;
        let ns: f64 = String::from_utf8_lossy(&result.stdout)
            .trim()
            .parse()
            .context("the guest's timing")?;
        upload.push(f64::from(options.upload_mib) / (ns / 1e9));
    }
    guest.destroy().await?;
    engine.shutdown_prestarted().await;

    // The network path without a VM: a namespace behind a sandbox namespace's `tap0`.
    let tag = internet.tag.clone();
    let (direct_ns, direct_guest, direct_link) =
        kiln_testinfra::internet::wired_sandbox(&network, &tag, "bd", &policy(true, &[]));
    let (proxied_ns, proxied_guest, proxied_link) = kiln_testinfra::internet::wired_sandbox(
        &network,
        &tag,
        "bp",
        &policy(true, &["denied.test"]),
    );

    eprintln!("iperf3 ({} s) ...", options.iperf_secs);
    let secs = options.iperf_secs.to_string();
    let iperf = in_namespace(
        &direct_guest,
        "iperf3",
        &[
            "-c",
            &iperf_server.ip().to_string(),
            "-p",
            &iperf_server.port().to_string(),
            "-t",
            &secs,
            "-J",
        ],
    )?;
    let iperf: serde_json::Value = serde_json::from_str(&iperf).context("iperf3's JSON")?;
    let iperf3_gbit_per_s = iperf["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3's throughput")?
        / 1e9;

    eprintln!(
        "connects and HTTP through the egress proxy ({} each) ...",
        options.requests
    );
    let requests = options.requests;
    let connect = direct_guest.run_in(move || {
        let mut samples = Vec::new();
        for _ in 0..requests {
            let start = Instant::now();
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((WEB, 7000)), Duration::from_secs(5))?;
            let mut buf = [0u8; 64];
            s.read_exact(&mut buf[..5])?;
            samples.push(start.elapsed());
        }
        Ok(samples)
    })?;
    let web = SocketAddr::from((WEB, 80));
    let direct = direct_guest.run_in(move || {
        (0..requests)
            .map(|_| http_get(web, "web.test"))
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    let proxied = proxied_guest.run_in(move || {
        (0..requests)
            .map(|_| http_get(web, "web.test"))
            .collect::<std::io::Result<Vec<_>>>()
    })?;

    eprintln!("HTTP to a guest's server, directly and through ingress ({requests} each) ...");
    let guest_server = kiln_testinfra::internet::Server::start(
        &direct_guest,
        SocketAddr::from((kiln_net::GUEST_ADDRESS, 80)),
    );
    let target = SocketAddr::from((direct_link.sandbox, 80));
    let to_guest = tokio::task::spawn_blocking(move || {
        (0..requests)
            .map(|_| http_get(target, "guest"))
            .collect::<std::io::Result<Vec<_>>>()
    })
    .await??;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ingress_addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| async move {
        kiln_api::ingress::forward(request, target, "/".into(), "bench").await
    });
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let through_ingress = tokio::task::spawn_blocking(move || {
        (0..requests)
            .map(|_| http_get(ingress_addr, "guest"))
            .collect::<std::io::Result<Vec<_>>>()
    })
    .await??;
    server.abort();
    drop(guest_server);
    for (ns, guest, link) in [
        (direct_ns, direct_guest, direct_link),
        (proxied_ns, proxied_guest, proxied_link),
    ] {
        drop(guest);
        drop(ns);
        network.release(link);
    }

    let http_direct = Summary::of(&direct);
    let http_proxied = Summary::of(&proxied);
    let to_guest = Summary::of(&to_guest);
    let through_ingress = Summary::of(&through_ingress);
    let report = Report {
        template: images.spec.name.clone(),
        accel: engine.accel().accel.qemu_name().into(),
        create_ratio_p50: create_with.p50_ms / create_without.p50_ms,
        create_phases_p50_ms_without_network: without.phases_p50_ms(),
        create_phases_p50_ms_with_network: with.phases_p50_ms(),
        create_without_network: create_without,
        create_with_network: create_with,
        guest_upload_mib_per_s: upload,
        iperf3_gbit_per_s,
        connect_and_first_byte: Summary::of(&connect),
        egress_proxy_overhead_p50_ms: http_proxied.p50_ms - http_direct.p50_ms,
        http_direct,
        http_through_egress_proxy: http_proxied,
        ingress_overhead_p50_ms: through_ingress.p50_ms - to_guest.p50_ms,
        http_to_guest_direct: to_guest,
        http_through_ingress: through_ingress,
    };
    if options.engine.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("template {} ({})", report.template, report.accel);
        println!(
            "create without networking: {}",
            report.create_without_network
        );
        println!("create with networking:    {}", report.create_with_network);
        println!("  ratio p50: {:.3}", report.create_ratio_p50);
        for (name, without) in &report.create_phases_p50_ms_without_network {
            let with = report
                .create_phases_p50_ms_with_network
                .get(name)
                .copied()
                .unwrap_or(f64::NAN);
            println!("  {name:<28} p50 {without:>8.3} ms without, {with:>8.3} ms with");
        }
        println!("guest upload: {:?} MiB/s", report.guest_upload_mib_per_s);
        println!(
            "iperf3 (namespace path): {:.2} Gbit/s",
            report.iperf3_gbit_per_s
        );
        println!("connect + first byte: {}", report.connect_and_first_byte);
        println!("HTTP direct:            {}", report.http_direct);
        println!(
            "HTTP via egress proxy:  {}",
            report.http_through_egress_proxy
        );
        println!(
            "  overhead p50: {:.3} ms",
            report.egress_proxy_overhead_p50_ms
        );
        println!("HTTP to guest direct:   {}", report.http_to_guest_direct);
        println!("HTTP via ingress:       {}", report.http_through_ingress);
        println!("  overhead p50: {:.3} ms", report.ingress_overhead_p50_ms);
    }
    Ok(())
}

/// Runs `program args` inside `ns` and returns its standard output.
fn in_namespace(ns: &kiln_net::netns::NetNs, program: &str, args: &[&str]) -> Result<String> {
    let mut command = ns.command(program)?;
    command.args(args);
    let output = command
        .output()
        .with_context(|| format!("{program} (bash scripts/up.sh installs it)"))?;
    ensure!(
        output.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
