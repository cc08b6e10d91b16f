//! The agent channel across snapshots: bake/restore cycles, half with the host's agent
//! session open at snapshot time and half without; every restored agent must answer.
//!
//! Each cycle is a whole bake (a cold boot under TCG, ~8 s), so the suite runs 16 of them;
//! `KILN_SNAPSHOT_CYCLES=50` runs the long form (docs/performance.md quotes a 50-cycle run).

use kiln_engine::{BakeOptions, CreateOptions, Engine, EngineConfig};
use kiln_proto::messages::{Command, ExecRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_bake_restore_cycles_always_answer() {
    let cycles: usize = std::env::var("KILN_SNAPSHOT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build task");
    let mut failures = Vec::new();
    for cycle in 0..cycles {
        let connected = cycle % 2 == 1;
        // A fresh data directory forces a fresh bake every cycle.
        let data = tempfile::tempdir().expect("data dir");
        let engine = Engine::new(EngineConfig::new(data.path())).expect("engine");
        let template = engine
            .bake_with(
                &images,
                BakeOptions {
                    keep_agent_connected: connected,
                    // Every bake as made: the restores are what this test is about.
                    skip_restore_check: true,
                    ..BakeOptions::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle}: bake failed: {e}"));
        match engine.create(&template, CreateOptions::default()).await {
            Ok(sandbox) => {
                let result = sandbox
                    .agent()
                    .run(
                        ExecRequest::new(Command::Argv(vec![
                            "echo".into(),
                            format!("cycle-{cycle}"),
                        ])),
                        1024,
                    )
                    .await;
                match result {
                    Ok(r) if r.stdout == format!("cycle-{cycle}\n").as_bytes() => {}
                    other => failures.push(format!(
                        "cycle {cycle} (connected: {connected}): exec {other:?}"
                    )),
                }
                let handshake = sandbox
                    .timings()
                    .phases
                    .iter()
                    .find(|(n, _)| n == "agent handshake")
                    .map(|(_, ms)| *ms);
                eprintln!(
                    "cycle {cycle:2} connected={connected:5} handshake {:.0} ms",
                    handshake.unwrap_or(-1.0)
                );
                sandbox.destroy().await.expect("destroy");
            }
            Err(e) => failures.push(format!(
                "cycle {cycle} (connected: {connected}): create {e}"
            )),
        }
        engine.shutdown_prestarted().await;
    }
    assert!(
        failures.is_empty(),
        "{} of {cycles} restores failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
