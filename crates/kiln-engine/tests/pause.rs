//! Pause to disk and resume under QEMU (TCG here): five cycles in a row, each writing a file
//! to the disk and one to a tmpfs (held only in guest RAM) while a process counts in memory,
//! nothing lost; a paused sandbox holds no VMM process or cgroup; a resume by a new engine
//! that took the paused sandbox over from disk (the daemon restarted); a resume through a
//! disk whose qcow2 header was rewritten to name a host file (kiln names the chain, the
//! header is not read); paused when its time to live runs out (as asked), destroyed when it
//! runs out again, nothing left.

use std::path::Path;
use std::time::Duration;

use kiln_engine::{
    AdoptRequest, CreateOptions, Engine, EngineConfig, EngineError, OnExpiry, Sandbox, SandboxState,
};

async fn sh(sandbox: &Sandbox, script: &str) -> String {
    kiln_testinfra::sh(sandbox.agent(), script).await
}

/// The count the parent's counter keeps in guest RAM, and the counter's pid.
async fn counter(sandbox: &Sandbox) -> (u64, String) {
    kiln_testinfra::ram_counter(sandbox.agent()).await
}

/// Everything the files of cycles `1..=cycles` say, disk and RAM.
async fn files(sandbox: &Sandbox, cycles: u32) -> String {
    let mut script = String::new();
    for cycle in 1..=cycles {
        script.push_str(&format!(
            "cat /root/disk-{cycle} /mnt/ram/ram-{cycle} 2>&1; "
        ));
    }
    sh(sandbox, &script).await
}

fn expected_files(cycles: u32) -> String {
    (1..=cycles)
        .map(|c| format!("disk {c}\nram {c}"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn pause(sandbox: &Sandbox) {
    let pid = sandbox.pid().expect("a running VMM");
    let cgroups = sandbox.cgroup_dirs();
    let timings = sandbox.pause().await.expect("pause");
    assert_eq!(sandbox.state(), SandboxState::Paused);
    assert_eq!(sandbox.pid(), None, "a paused sandbox has no VMM");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the paused sandbox's VMM {pid} is still there"
    );
    for dir in cgroups {
        assert!(!dir.exists(), "cgroup {} left while paused", dir.display());
    }
    eprintln!("pause: {:?}", timings.phases);
}

async fn resume(sandbox: &Sandbox) {
    let timings = sandbox.resume().await.expect("resume");
    assert_eq!(sandbox.state(), SandboxState::Running);
    eprintln!("resume: {:?}", timings.phases);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_cycles_restart_and_tampered_disk() {
    let data = tempfile::tempdir().expect("data dir");
    let config = EngineConfig {
        guest_log: std::env::var("KILN_GUEST_LOG").ok(),
        ..EngineConfig::new(data.path())
    };
    let engine = Engine::new(config.clone()).expect("engine");
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build");
    let template = engine.bake(&images).await.expect("bake");
    let sandbox = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    let id = sandbox.id().to_owned();
    let netns = sandbox.netns().expect("a namespace").to_owned();

    // State held only in guest RAM: a tmpfs, and a process counting in it.
    kiln_testinfra::start_ram_counter(sandbox.agent()).await;
    let (_, counting) = counter(&sandbox).await;
    assert!(!counting.is_empty(), "the counter runs");

    for cycle in 1..=5u32 {
        sh(
            &sandbox,
            &format!("echo 'disk {cycle}' > /root/disk-{cycle}; echo 'ram {cycle}' > /mnt/ram/ram-{cycle}"),
        )
        .await;
        let (before, _) = counter(&sandbox).await;
        pause(&sandbox).await;
        // Asking again is not an error; the saved state is left as it is.
        sandbox.pause().await.expect("pausing a paused sandbox");
        resume(&sandbox).await;
        assert_eq!(
            files(&sandbox, cycle).await,
            expected_files(cycle),
            "cycle {cycle}"
        );
        let (after, pid) = counter(&sandbox).await;
        assert_eq!(pid, counting, "cycle {cycle}: the same process counts on");
        assert!(
            after >= before,
            "cycle {cycle}: the count went back: {before} -> {after}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (later, _) = counter(&sandbox).await;
        assert!(later > after, "cycle {cycle}: the process stopped counting");
    }

    // Paused, then the engine goes (as a daemon killed or stopped would) and a new one takes
    // the sandbox over from its directory; the disk's qcow2 header is rewritten meanwhile to
    // name a host file as its backing file.
    sh(
        &sandbox,
        "echo 'before restart' > /root/restart; echo 'ram restart' > /mnt/ram/restart",
    )
    .await;
    let bash_sum = sh(&sandbox, "md5sum /usr/bin/bash").await;
    pause(&sandbox).await;
    let created_at_ms = sandbox.info().created_at_ms;
    drop(sandbox);
    engine.detach_all().await;
    drop(engine);
    let disk = data.path().join("sandboxes").join(&id).join("disk.qcow2");
    if disk.exists() {
        let status = std::process::Command::new("qemu-img")
            .args(["rebase", "-u", "-F", "raw", "-b", "/etc/shadow"])
            .arg(&disk)
            .status()
            .expect("qemu-img");
        assert!(status.success(), "tampering with the header");
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&disk)
            .output()
            .expect("qemu-img info");
        assert!(
            String::from_utf8_lossy(&info.stdout).contains("/etc/shadow"),
            "the header names the host file (negative control)"
        );
    }
    let engine = Engine::new(config).expect("engine again");
    let adopted = engine
        .recover(vec![AdoptRequest {
            id: id.clone(),
            template: "base".into(),
            created_at_ms,
            expires_at_ms: None,
            egress: None,
            on_expiry: OnExpiry::Destroy,
        }])
        .await;
    let sandbox = match adopted.into_iter().next() {
        Some((_, Ok(sandbox))) => sandbox,
        other => panic!("not taken over: {other:?}"),
    };
    assert_eq!(sandbox.state(), SandboxState::Paused, "taken over paused");
    resume(&sandbox).await;
    assert_eq!(
        sh(&sandbox, "cat /root/restart /mnt/ram/restart").await,
        "before restart\nram restart"
    );
    assert_eq!(files(&sandbox, 5).await, expected_files(5));
    // The disk reads through to the template's layers, not the header's file: with the
    // guest's page cache dropped, a template file reads back as before the pause.
    let reread = "sync; echo 3 > /proc/sys/vm/drop_caches; md5sum /usr/bin/bash";
    assert_eq!(sh(&sandbox, reread).await, bash_sum);
    let (_, pid) = counter(&sandbox).await;
    assert_eq!(pid, counting, "the process survived the restart");

    // Its time to live runs out: paused, as asked; then, paused, it runs out again:
    // destroyed.
    let cgroups = sandbox.cgroup_dirs();
    let vmm = sandbox.pid().expect("VMM");
    sandbox.set_on_expiry(OnExpiry::Pause);
    sandbox.set_ttl(Some(Duration::from_millis(500)));
    assert!(
        kiln_testinfra::wait_until(Duration::from_secs(60), || sandbox.state()
            == SandboxState::Paused)
        .await,
        "not paused at expiry: {:?}",
        sandbox.state()
    );
    assert_eq!(
        sandbox.info().expires_at_ms,
        None,
        "no time to live while paused"
    );
    sandbox.set_ttl(Some(Duration::from_millis(500)));
    assert!(
        kiln_testinfra::wait_until(Duration::from_secs(60), || matches!(
            engine.get(&id),
            Err(EngineError::NotFound(_))
        ))
        .await,
        "a paused sandbox whose time ran out is destroyed"
    );
    assert!(
        !data.path().join("sandboxes").join(&id).exists(),
        "directory left"
    );
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "namespace left"
    );
    for dir in cgroups {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
    assert!(!Path::new(&format!("/proc/{vmm}")).exists(), "VMM left");
    engine.shutdown_prestarted().await;
}
