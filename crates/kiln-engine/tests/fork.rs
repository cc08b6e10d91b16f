//! Fork under QEMU (TCG here): a parent with a process counting in guest RAM (a tmpfs) and
//! files on its disk is forked twice; every child continues from the parent's moment (same
//! process, count not behind it, files written before the fork) with its own identity
//! (hostname, RNG output) and the parent's guest address; files written after the fork are
//! in one sandbox only; a child forks again, and is forked while it is destroyed; a snapshot
//! of a grandchild outlives the captures' sandboxes; 20 fork/destroy cycles leave no capture
//! behind.

use std::time::Duration;

use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};

async fn sh(sandbox: &Sandbox, script: &str) -> String {
    kiln_testinfra::sh(sandbox.agent(), script).await
}

/// The count the parent's counter keeps in guest RAM, and the counter's pid.
async fn counter(sandbox: &Sandbox) -> (u64, String) {
    kiln_testinfra::ram_counter(sandbox.agent()).await
}

/// Captures (directories `fork-*`) under the engine's templates.
fn captures(data: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data.join("templates"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("fork-") || name.starts_with(".bake-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_continue_from_the_parent_and_diverge() {
    let data = tempfile::tempdir().expect("data dir");
    let engine = Engine::new(EngineConfig {
        guest_log: std::env::var("KILN_GUEST_LOG").ok(),
        ..EngineConfig::new(data.path())
    })
    .expect("engine");
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build");
    let template = engine.bake(&images).await.expect("bake");
    let parent = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    kiln_testinfra::start_ram_counter(parent.agent()).await;
    sh(&parent, "echo before > /root/before").await;
    let (at_fork, counting) = counter(&parent).await;
    let address = sh(&parent, "ip -4 -o addr show eth0 | awk '{print $4}'").await;

    let (children, report) = engine
        .fork(&parent, 2, CreateOptions::default())
        .await
        .expect("fork");
    eprintln!("fork: {report:?}");
    assert_eq!(children.len(), 2);
    assert!(report.bytes_written > 0, "{report:?}");
    // The capture writes the pages the parent changed, not its RAM.
    let ram = u64::from(template.meta.machine.memory_mib) << 20;
    assert!(
        report.ram_bytes_written > 0 && report.ram_bytes_written < ram / 2,
        "{} bytes of RAM written for a guest of {ram}",
        report.ram_bytes_written
    );
    let mut randoms = Vec::new();
    for child in &children {
        assert_ne!(child.id(), parent.id());
        assert_eq!(sh(child, "cat /root/before").await, "before");
        let (count, pid) = counter(child).await;
        assert_eq!(pid, counting, "the parent's process runs on in the child");
        assert!(
            count >= at_fork,
            "the child's count is behind the parent's: {count} < {at_fork}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            counter(child).await.0 > count,
            "the child's process stopped counting"
        );
        assert_eq!(sh(child, "hostname").await, child.id());
        assert_eq!(
            sh(child, "ip -4 -o addr show eth0 | awk '{print $4}'").await,
            address,
            "the same guest address"
        );
        randoms.push(
            sh(
                child,
                "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
            )
            .await,
        );
    }
    assert_ne!(randoms[0], randoms[1], "the children's RNGs diverge");
    // After the fork, each goes its own way.
    sh(
        &children[0],
        "echo mine > /root/after; echo mine > /mnt/ram/after",
    )
    .await;
    for other in [&children[1], &parent] {
        assert_eq!(
            sh(other, "ls /root/after /mnt/ram/after 2>/dev/null | wc -l").await,
            "0",
            "a file written in one child after the fork is in another sandbox"
        );
    }
    let (parent_count, _) = counter(&parent).await;
    assert!(parent_count >= at_fork, "the parent runs on");

    // A child forks again: the grandchild has what the child wrote.
    let (grandchildren, _) = engine
        .fork(&children[0], 1, CreateOptions::default())
        .await
        .expect("fork a child");
    assert_eq!(
        sh(&grandchildren[0], "cat /root/after /mnt/ram/after").await,
        "mine\nmine"
    );
    assert_eq!(sh(&grandchildren[0], "cat /root/before").await, "before");
    // Its capture stands on the child's; destroying the child keeps what the grandchild needs.
    children[0].destroy().await.expect("destroy");
    assert_eq!(
        sh(
            &grandchildren[0],
            "sync; echo 3 > /proc/sys/vm/drop_caches; cat /root/before"
        )
        .await,
        "before"
    );
    // A child destroyed while it is being forked: the destroy waits for the capture, and
    // then the new capture stands on the child's, which must stay for the grandchild.
    let forking = engine.fork(&children[1], 1, CreateOptions::default());
    let destroying = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !captures(data.path())
            .iter()
            .any(|c| c.starts_with(".bake-"))
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        children[1].destroy().await
    };
    let (forked, destroyed) = tokio::join!(forking, destroying);
    destroyed.expect("destroy");
    let (late, _) = forked.expect("a fork under way outlives its parent's destroy");
    assert_eq!(
        sh(
            &late[0],
            "sync; echo 3 > /proc/sys/vm/drop_caches; cat /root/before"
        )
        .await,
        "before"
    );
    // A snapshot of a fork's grandchild stands on the captures below it: they stay while it
    // does, and go with it.
    let snapshot = engine.snapshot(&late[0]).await.expect("snapshot");
    for sandbox in grandchildren.iter().chain(&late) {
        sandbox.destroy().await.expect("destroy");
    }
    let restored = engine
        .create(&snapshot, CreateOptions::default())
        .await
        .expect("a sandbox from the snapshot of a fork's grandchild");
    assert_eq!(
        sh(
            &restored,
            "sync; echo 3 > /proc/sys/vm/drop_caches; cat /root/before"
        )
        .await,
        "before"
    );
    restored.destroy().await.expect("destroy");
    engine
        .remove_snapshot(&snapshot)
        .expect("remove the snapshot");
    assert!(
        captures(data.path()).is_empty(),
        "captures left: {:?}",
        captures(data.path())
    );

    // Fork and destroy, 20 times: nothing accumulates.
    for cycle in 0..20 {
        let (children, _) = engine
            .fork(&parent, 1, CreateOptions::default())
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        children[0].destroy().await.expect("destroy");
    }
    assert!(
        captures(data.path()).is_empty(),
        "captures left: {:?}",
        captures(data.path())
    );
    parent.destroy().await.expect("destroy");
    engine.shutdown_prestarted().await;
    let sandboxes: Vec<_> = std::fs::read_dir(data.path().join("sandboxes"))
        .expect("sandboxes")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        sandboxes.is_empty(),
        "sandbox directories left: {sandboxes:?}"
    );
}
