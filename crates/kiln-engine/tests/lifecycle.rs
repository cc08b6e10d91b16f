//! Sandbox lifecycle under QEMU (TCG here): resource limits, crash detection (the VMM killed
//! from outside, a guest kernel panic), time to live, and bad requests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_engine::{CreateOptions, Engine, EngineConfig, EngineError, Sandbox, SandboxState};
use kiln_proto::messages::{Command, ExecRequest};

async fn sh(sandbox: &Sandbox, script: &str) -> String {
    kiln_testinfra::sh(sandbox.agent(), script).await
}

fn failure_reason(sandbox: &Sandbox) -> Option<String> {
    match sandbox.state() {
        SandboxState::Failed { reason } => Some(reason),
        _ => None,
    }
}

/// A cgroup setting of `sandbox`, whichever cgroup version holds it.
fn cgroup_value(sandbox: &Sandbox, v1: &str, v2: &str) -> String {
    sandbox
        .cgroup_dirs()
        .iter()
        .find_map(|dir| {
            std::fs::read_to_string(dir.join(v1))
                .or_else(|_| std::fs::read_to_string(dir.join(v2)))
                .ok()
        })
        .unwrap_or_else(|| panic!("neither {v1} nor {v2} in {:?}", sandbox.cgroup_dirs()))
        .trim()
        .to_owned()
}

/// Everything a dead sandbox must not hold any more.
fn assert_released(netns: &str, cgroups: &[std::path::PathBuf], pid: u32) {
    assert!(
        !Path::new("/run/netns").join(netns).exists(),
        "network namespace {netns} left"
    );
    for dir in cgroups {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "VMM {pid} still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_crashes_and_time_to_live() {
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
    let vcpus = f64::from(template.meta.machine.vcpus);
    let template_disk_mib = template.meta.disk_bytes >> 20;

    // Bad requests are refused before anything is made.
    let bad = [
        CreateOptions {
            cpus: Some(0.0),
            ..CreateOptions::default()
        },
        CreateOptions {
            cpus: Some(vcpus + 1.0),
            ..CreateOptions::default()
        },
        CreateOptions {
            memory_mib: Some(10),
            ..CreateOptions::default()
        },
        // The guest's own memory: a resume (which loads all of it) would not fit.
        CreateOptions {
            memory_mib: Some(256),
            ..CreateOptions::default()
        },
        CreateOptions {
            cpus: Some(0.05),
            ..CreateOptions::default()
        },
        CreateOptions {
            memory_mib: Some(1 << 30),
            ..CreateOptions::default()
        },
        CreateOptions {
            disk_mib: Some(template_disk_mib - 1),
            ..CreateOptions::default()
        },
    ];
    for options in bad {
        let asked = format!("{options:?}");
        match engine.create(&template, options).await {
            Err(EngineError::Invalid(message)) => eprintln!("refused: {message}"),
            other => panic!("{asked}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(
        std::fs::read_dir(data.path().join("sandboxes"))
            .expect("dir")
            .count(),
        0,
        "a refused create leaves nothing"
    );
    assert!(matches!(
        engine.get("sb-000000000000"),
        Err(EngineError::NotFound(_))
    ));
    assert!(matches!(
        engine.destroy("sb-000000000000").await,
        Err(EngineError::NotFound(_))
    ));

    // Limits: a CPU quota and a memory limit below the template's, a bigger disk.
    let disk_mib = template_disk_mib + 512;
    let limited = engine
        .create(
            &template,
            CreateOptions {
                cpus: Some(0.5),
                memory_mib: Some(320),
                disk_mib: Some(disk_mib),
                ..CreateOptions::default()
            },
        )
        .await
        .expect("create with limits");
    let quota = cgroup_value(&limited, "cpu.cfs_quota_us", "cpu.max");
    assert!(
        quota == "50000" || quota == "50000 100000",
        "cpu quota {quota}"
    );
    assert_eq!(
        cgroup_value(&limited, "memory.limit_in_bytes", "memory.max"),
        (320u64 << 20).to_string()
    );
    // A task limit, far above what its QEMU runs.
    let tasks = kiln_engine::cgroup::VMM_TASKS;
    assert_eq!(
        cgroup_value(&limited, "pids.max", "pids.max"),
        tasks.to_string()
    );
    let running: u64 = cgroup_value(&limited, "pids.current", "pids.current")
        .parse()
        .expect("pids.current");
    assert!(
        (1..=tasks / 4).contains(&running),
        "its QEMU runs {running} tasks against a limit of {tasks}"
    );
    let sectors: u64 = sh(&limited, "cat /sys/block/vda/size")
        .await
        .parse()
        .expect("sectors");
    assert_eq!(
        sectors * 512,
        disk_mib << 20,
        "the guest sees the bigger disk"
    );
    let fs_mib: u64 = sh(&limited, "df -m / | awk 'NR==2 {print $2}'")
        .await
        .parse()
        .expect("size");
    assert!(
        fs_mib > template_disk_mib + 400,
        "root filesystem grown to {fs_mib} MiB (disk {disk_mib} MiB)"
    );

    // Space a guest frees comes back on the host by itself (no fstrim): 256 MiB of non-zero
    // data written, then deleted; the disk file's allocated blocks drop by most of it.
    let allocated = || limited.usage().disk_bytes.expect("a disk file");
    let before = allocated();
    sh(
        &limited,
        "yes kiln-fill-data | head -c 268435456 > /root/fill && sync",
    )
    .await;
    let filled = allocated();
    assert!(
        filled >= before + (240 << 20),
        "the write reached the host: {before} -> {filled} bytes"
    );
    sh(&limited, "rm /root/fill && sync").await;
    // Discards go out as ext4 commits its journal (every 5 s by default).
    let given_back = kiln_testinfra::wait_until(Duration::from_secs(30), || {
        allocated() < filled - (200 << 20)
    })
    .await;
    assert!(
        given_back,
        "deleted data still takes {} bytes on the host (before {before}, filled {filled})",
        allocated()
    );
    limited.destroy().await.expect("destroy");

    // Crash: the VMM killed from outside. The sandbox is marked failed with QEMU's reason, its
    // network namespace and cgroup are gone, it stays listed until destroyed.
    let victim = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    let pid = victim.pid().expect("running");
    let netns = victim.netns().expect("netns").to_owned();
    let cgroups = victim.cgroup_dirs();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the sandbox's own VMM");
    assert!(
        kiln_testinfra::wait_until(Duration::from_secs(10), || failure_reason(&victim)
            .is_some())
        .await,
        "not marked failed: {:?}",
        victim.state()
    );
    let reason = failure_reason(&victim).expect("failed");
    assert!(reason.contains("signal: 9"), "reason: {reason}");
    assert_released(&netns, &cgroups, pid);
    let listed = engine.list();
    assert!(
        listed
            .iter()
            .any(|s| s.id == victim.id() && s.state.name() == "failed" && s.pid.is_none()),
        "{listed:?}"
    );
    let exec = tokio::time::timeout(
        Duration::from_secs(30),
        victim
            .agent()
            .run(ExecRequest::new(Command::Argv(vec!["true".into()])), 64),
    )
    .await
    .expect("an exec in a dead sandbox fails, it does not hang");
    assert!(exec.is_err(), "exec in a dead sandbox: {exec:?}");
    engine.destroy(victim.id()).await.expect("destroy");
    assert!(!victim.dir().exists());
    assert!(engine.get(victim.id()).is_err());

    // Crash: the guest kernel panics. The reason comes from the guest console.
    let panicking = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    let pid = panicking.pid().expect("running");
    let cgroups = panicking.cgroup_dirs();
    let trigger = {
        let panicking = Arc::clone(&panicking);
        tokio::spawn(async move {
            let _ = panicking
                .agent()
                .run(
                    ExecRequest::new(Command::Shell("echo c > /proc/sysrq-trigger".into())),
                    64,
                )
                .await;
        })
    };
    assert!(
        kiln_testinfra::wait_until(Duration::from_secs(30), || failure_reason(&panicking)
            .is_some())
        .await,
        "not marked failed: {:?}",
        panicking.state()
    );
    let reason = failure_reason(&panicking).expect("failed");
    assert!(reason.contains("Kernel panic"), "reason: {reason}");
    let _ = tokio::time::timeout(Duration::from_secs(30), trigger).await;
    assert_released(panicking.netns().expect("netns"), &cgroups, pid);
    panicking.destroy().await.expect("destroy");

    // Time to live: given at create, or set later; the engine destroys the sandbox itself.
    let resources = |sandbox: &Sandbox| {
        (
            sandbox.pid().expect("running"),
            sandbox.netns().expect("netns").to_owned(),
            sandbox.cgroup_dirs(),
        )
    };
    let later = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    let later_resources = resources(&later);
    let short = engine
        .create(
            &template,
            CreateOptions {
                ttl: Some(Duration::from_secs(2)),
                ..CreateOptions::default()
            },
        )
        .await
        .expect("create");
    let short_resources = resources(&short);
    assert!(short.info().expires_at_ms.is_some());
    assert!(later.info().expires_at_ms.is_none());
    later.set_ttl(Some(Duration::from_millis(500)));
    assert!(later.info().expires_at_ms.is_some());
    for (sandbox, (pid, netns, cgroups)) in [(&short, short_resources), (&later, later_resources)] {
        assert!(
            kiln_testinfra::wait_until(Duration::from_secs(20), || !sandbox.dir().exists()).await,
            "{} outlived its time to live: {:?}",
            sandbox.id(),
            sandbox.state()
        );
        assert_eq!(sandbox.state(), SandboxState::Destroyed);
        assert!(engine.get(sandbox.id()).is_err());
        assert_released(&netns, &cgroups, pid);
    }
    assert!(engine.list().is_empty(), "{:?}", engine.list());
    engine.shutdown_prestarted().await;
    assert!(engine.prestarted_pids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bakes_nothing_uses_are_removed() {
    let data = tempfile::tempdir().expect("data dir");
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build task");
    let old = Engine::new(EngineConfig {
        prestart: 0,
        ..EngineConfig::new(data.path())
    })
    .expect("engine")
    .bake(&images)
    .await
    .expect("bake");
    // Another input (the guest's log filter is on the kernel's command line) makes another
    // bake of the same template: what a changed spec, agent or QEMU does.
    let engine = Engine::new(EngineConfig {
        prestart: 0,
        guest_log: Some("info".into()),
        ..EngineConfig::new(data.path())
    })
    .expect("engine");
    let new = engine.bake(&images).await.expect("second bake");
    assert_ne!(old.dir, new.dir, "a changed input makes another bake");
    let sandbox = engine
        .create(&old, CreateOptions::default())
        .await
        .expect("create from the earlier bake");

    let removed = engine.remove_unused_bakes("base", None, Some(&new)).await;
    assert!(
        removed.is_empty(),
        "a bake a sandbox runs on stays: {removed:?}"
    );
    // Another tenant's template of the same name is not this one.
    assert!(engine
        .remove_unused_bakes("base", Some("tenant-a"), Some(&new))
        .await
        .is_empty());
    assert_eq!(sh(&sandbox, "echo still-here").await, "still-here");

    sandbox.destroy().await.expect("destroy");
    let removed = engine.remove_unused_bakes("base", None, Some(&new)).await;
    assert_eq!(
        removed,
        vec![kiln_engine::RemovedBake {
            dir: old.dir.clone(),
            rootfs: Some(images.rootfs.dir.clone()),
        }]
    );
    assert!(!old.dir.exists() && new.dir.join("meta.json").is_file());
    // The kept bake still uses the root filesystem; nothing uses another path.
    assert!(engine.bakes_use_rootfs(&images.rootfs.dir));
    assert!(!engine.bakes_use_rootfs(&images.rootfs.dir.join("elsewhere")));
    let sandbox = engine
        .create(&new, CreateOptions::default())
        .await
        .expect("create from the bake kept");
    sandbox.destroy().await.expect("destroy");

    // A stopping engine waits for a create in flight (here: one that starts its own VMM,
    // seconds under TCG), so that its last list holds the sandbox; later creates are refused.
    let creating = {
        let (engine, new) = (engine.clone(), new.clone());
        tokio::spawn(async move { engine.create(&new, CreateOptions::default()).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(engine.stop_creating(Duration::from_secs(120)).await);
    let listed: Vec<String> = engine.list().into_iter().map(|info| info.id).collect();
    let sandbox = creating
        .await
        .expect("create task")
        .expect("the create in flight ends");
    assert_eq!(listed, vec![sandbox.id().to_owned()]);
    let refused = engine.create(&new, CreateOptions::default()).await;
    assert!(matches!(refused, Err(EngineError::Stopping)), "{refused:?}");
    sandbox.destroy().await.expect("destroy");

    // A bake copied into another data directory is what an engine with the same inputs finds
    // there instead of baking (a fresh bake's memory differs: its entropy was reseeded), and
    // it restores.
    let other = tempfile::tempdir().expect("other data dir");
    let engine = Engine::new(EngineConfig {
        prestart: 0,
        guest_log: Some("info".into()),
        ..EngineConfig::new(other.path())
    })
    .expect("engine on the other data directory");
    let copy = new
        .copy_into(&other.path().join("templates"))
        .expect("copy the bake");
    assert_eq!(copy.dir.file_name(), new.dir.file_name());
    let found = engine
        .bake(&images)
        .await
        .expect("bake on the other engine");
    assert_eq!(found.dir, copy.dir);
    assert_eq!(found.meta.memory_sha256, new.meta.memory_sha256);
    let sandbox = engine
        .create(&found, CreateOptions::default())
        .await
        .expect("create from the copy");
    assert_eq!(sh(&sandbox, "echo copied").await, "copied");
    sandbox.destroy().await.expect("destroy");
    // Copied again: the one there is kept.
    let again = new
        .copy_into(&other.path().join("templates"))
        .expect("copy again");
    assert_eq!(again.dir, copy.dir);

    // A bake of other inputs under this one's name is not used: it is baked afresh.
    let forged = tempfile::tempdir().expect("third data dir");
    let engine = Engine::new(EngineConfig {
        prestart: 0,
        ..EngineConfig::new(forged.path())
    })
    .expect("engine on the third data directory");
    let templates = forged.path().join("templates");
    let misnamed = new.copy_into(&templates).expect("copy the new bake");
    std::fs::rename(
        &misnamed.dir,
        templates.join(old.dir.file_name().expect("a name")),
    )
    .expect("rename it as the old bake");
    let baked = engine
        .bake(&images)
        .await
        .expect("bake over the misnamed one");
    assert_eq!(baked.meta.key, old.meta.key);
    assert_ne!(baked.meta.memory_sha256, new.meta.memory_sha256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bake_removed_while_its_vmm_warms_leaves_nothing() {
    let data = tempfile::tempdir().expect("data dir");
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build task");
    let engine = Engine::new(EngineConfig::new(data.path())).expect("engine");
    let baked = engine.bake(&images).await.expect("bake");
    engine.prestart(&baked);
    // The pool goes with its bake while its VMM is being started and warmed.
    let removed = engine.remove_unused_bakes("base", None, None).await;
    assert_eq!(removed.len(), 1, "{removed:?}");
    tokio::time::timeout(Duration::from_secs(120), engine.shutdown_prestarted())
        .await
        .expect("the warm-up in flight ends, and shutdown with it");
    assert!(engine.prestarted_pids().is_empty());
    let left: Vec<_> = std::fs::read_dir(data.path().join("sandboxes"))
        .expect("sandboxes dir")
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
}
