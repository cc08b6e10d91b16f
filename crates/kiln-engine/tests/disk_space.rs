//! The host's disk is protected from its sandboxes: with the data directory on a small
//! filesystem of the test's own, a guest that writes more than is left stops at the reserve
//! (then at the budget), its VM runs on, and new creates and pauses are refused with a clear
//! error.

use std::sync::Arc;

use kiln_engine::{
    CreateOptions, DiskLimits, DiskSpace, Engine, EngineConfig, EngineError, Sandbox,
};
use kiln_testinfra::loopfs::LoopFs;

const MIB: u64 = 1 << 20;

/// What the test allows past a limit: files the daemon itself writes beside a sandbox's disk
/// (its console log, its records), which the VMM's file-size limit does not cover.
const SLACK: u64 = 16 * MIB;

/// Writes `mib` MiB of non-zero bytes to `/root/fill`, each write straight to the disk (a
/// failed write fails dd at once, not a later writeback); returns dd's exit status and its
/// first line. Bounded: a guest stuck on its disk's errors fails the test with its console.
async fn fill(sandbox: &Sandbox, mib: u64) -> (String, String) {
    let script = format!(
        "out=$(yes kiln-disk-space | dd of=/root/fill bs=1M count={mib} iflag=fullblock \
         oflag=direct 2>&1); echo \"status $?\"; echo \"$out\" | head -n 1"
    );
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        kiln_testinfra::sh(sandbox.agent(), &script),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "writing {mib} MiB did not end; console:\n{}",
            sandbox.console_tail(30)
        )
    });
    let mut lines = out.lines();
    let status = lines.next().unwrap_or_default().to_owned();
    (status, lines.collect::<Vec<_>>().join(" "))
}

/// Checks that the sandbox's VM runs on and its agent answers (its disk's errors may keep
/// the guest busy for a while: the wait is generous).
async fn answers(sandbox: &Sandbox, when: &str) {
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(90),
        kiln_testinfra::sh(sandbox.agent(), "echo alive"),
    )
    .await;
    assert!(
        matches!(&answer, Ok(text) if text == "alive"),
        "the sandbox does not answer {when}: {answer:?}; console:\n{}",
        sandbox.console_tail(30)
    );
}

fn space(engine: &Engine) -> DiskSpace {
    engine.disk_space().expect("measuring the data directory")
}

async fn engine_with(dir: &std::path::Path, disk: DiskLimits) -> Engine {
    Engine::new(EngineConfig {
        prestart: 0,
        disk,
        ..EngineConfig::new(dir)
    })
    .expect("engine")
}

/// A sandbox destroyed when the test fails while holding it (its namespace and cgroup are
/// removed only by a destroy).
struct Held(Arc<Sandbox>);

impl Drop for Held {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let sandbox = Arc::clone(&self.0);
            tokio::task::block_in_place(|| {
                let _ = tokio::runtime::Handle::current().block_on(sandbox.destroy());
            });
        }
    }
}

/// Creates a sandbox under `engine`'s limits and has it write 400 MiB, more than they leave:
/// the write fails, `within` holds of the space measured after, the VM runs on and another
/// create is refused naming `limit`. Returns the sandbox, running.
async fn fill_to_the_limit(
    engine: &Engine,
    template: &kiln_engine::BakedTemplate,
    limit: &str,
    within: impl Fn(&DiskSpace) -> bool,
) -> Held {
    let sandbox = Held(
        engine
            .create(template, CreateOptions::default())
            .await
            .unwrap_or_else(|e| panic!("create under the {limit}: {e}")),
    );
    let (status, error) = fill(&sandbox.0, 400).await;
    assert_ne!(status, "status 0", "400 MiB fit under the {limit}");
    assert!(error.contains("error writing"), "dd: {status}: {error}");
    let after = space(engine);
    assert!(
        within(&after),
        "the guest wrote past the {limit}: {after:?} (dd: {error})"
    );
    answers(&sandbox.0, &format!("at the {limit}")).await;
    match engine.create(template, CreateOptions::default()).await {
        Err(EngineError::NoSpace(message)) => assert!(message.contains(limit), "{message}"),
        other => panic!("a create at the {limit}: {other:?}"),
    }
    sandbox
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_stop_at_the_reserve_and_the_budget_and_run_on() {
    // No blocks reserved for root: the filesystem's own reserve would stop the VMMs (not
    // root) first and hide kiln's.
    let fs = LoopFs::new(2 << 30, &["mkfs.ext4", "-q", "-m", "0"]);
    let data = fs.path().join("kiln");
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build task");
    let template = engine_with(&data, DiskLimits::default())
        .await
        .bake(&images)
        .await
        .expect("bake");

    // The reserve: all but 256 MiB of what is free now.
    let free = space(&engine_with(&data, DiskLimits::default()).await).available_bytes;
    let reserve = free - 256 * MIB;
    let limits = DiskLimits {
        reserve: Some(reserve),
        budget: None,
    };
    let engine = engine_with(&data, limits).await;
    let sandbox = fill_to_the_limit(&engine, &template, "reserve", |after| {
        after.available_bytes + SLACK >= reserve
    })
    .await;
    match sandbox.0.pause().await {
        Err(EngineError::NoSpace(message)) => assert!(message.contains("pause"), "{message}"),
        other => panic!("a pause at the reserve: {other:?}"),
    }
    answers(&sandbox.0, "after a refused pause").await;
    sandbox.0.destroy().await.expect("destroy");
    drop(engine);

    // The budget: sandboxes may hold 192 MiB more than now, whatever is free.
    let budget = space(&engine_with(&data, DiskLimits::default()).await).used_bytes + 192 * MIB;
    let limits = DiskLimits {
        reserve: Some(16 * MIB),
        budget: Some(budget),
    };
    let engine = engine_with(&data, limits).await;
    let sandbox = fill_to_the_limit(&engine, &template, "budget", |after| {
        after.used_bytes <= budget + SLACK
    })
    .await;
    sandbox.0.destroy().await.expect("destroy");
}
