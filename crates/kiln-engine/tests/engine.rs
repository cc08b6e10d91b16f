//! The engine end to end under QEMU (TCG here): bake `base`, create sandboxes by restoring
//! it, prove their disks are isolated, their RNGs differ and their clocks match the host's
//! (each with a negative control), then destroy them and prove nothing is left.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::BTreeSet;
use std::sync::Arc;

use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};

fn engine(data_dir: &Path) -> Engine {
    Engine::new(EngineConfig {
        guest_log: std::env::var("KILN_GUEST_LOG").ok(),
        ..EngineConfig::new(data_dir)
    })
    .expect("engine")
}

/// A `Name:` line of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("process status")
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

async fn sh(sandbox: &Sandbox, script: &str) -> String {
    kiln_testinfra::sh(sandbox.agent(), script).await
}

fn host_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bake_create_isolate_reseed_and_destroy() {
    let data = tempfile::tempdir().expect("data dir");
    let engine = engine(data.path());
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build");
    let template = engine.bake(&images).await.expect("bake");
    let baked_at = host_now();
    eprintln!("bake: {:?}", template.meta.timings);

    let state_before = kiln_image::cache::sha256_file(&template.state()).expect("hash");
    let again = engine.bake(&images).await.expect("second bake is a lookup");
    assert_eq!(again.dir, template.dir);
    assert_eq!(
        kiln_image::cache::sha256_file(&template.state()).expect("hash"),
        state_before,
        "not re-baked"
    );

    // Negative control for the RNG: without the post-restore call, clones share the kernel
    // RNG's state. Reading it right after a restore races with what the guest itself draws
    // early on (the agent's threads, the kernel's batched randomness), so a single read of
    // two clones can differ by timing alone (seen under load); but if their states were
    // independent, equal 128-bit reads would have a chance of 2^-128. So: each clone is read
    // four times at once after its restore, and the control holds when some pair of clones
    // agrees on a read (tried for up to eight pairs).
    let random = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let probe =
        "for i in 1 2 3 4; do head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; done";
    let raw = CreateOptions {
        post_restore: false,
        ..CreateOptions::default()
    };
    let mut seen = Vec::new();
    let shared = 'pairs: {
        for _ in 0..8 {
            let x = engine.create(&template, raw.clone()).await.expect("create");
            let rx = sh(&x, probe).await;
            let y = engine.create(&template, raw.clone()).await.expect("create");
            let ry = sh(&y, probe).await;
            engine.destroy(x.id()).await.expect("destroy");
            engine.destroy(y.id()).await.expect("destroy");
            if rx.lines().zip(ry.lines()).any(|(a, b)| a == b) {
                break 'pairs true;
            }
            seen.push((rx, ry));
        }
        false
    };
    assert!(
        shared,
        "without a reseed clones share the RNG (negative control); reads: {seen:?}"
    );

    let mut sandboxes = Vec::new();
    // Three cold creates, then two from warmed VMMs (the template's guest restored and run
    // ahead of the create, the same in both): all must come out distinct.
    for i in 0..5 {
        if i == 3 {
            engine.prestart(&template);
        }
        if i >= 3 {
            let deadline = Instant::now() + Duration::from_secs(120);
            while engine.prestarted_pids().is_empty() {
                assert!(Instant::now() < deadline, "no warmed VMM");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let sandbox = engine
            .create(&template, CreateOptions::default())
            .await
            .expect("create");
        eprintln!("create {}: {:?}", sandbox.id(), sandbox.timings().phases);
        let warmed = sandbox
            .timings()
            .phases
            .iter()
            .any(|(name, _)| name == "take warmed VMM");
        assert_eq!(warmed, i >= 3, "{:?}", sandbox.timings().phases);
        if i == 0 {
            // A create opens no pool for a template never passed to `prestart` (a tenant's
            // own template, a snapshot): nothing is started for it after.
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(
                engine.prestarted_pids().is_empty(),
                "a VMM was pre-started for a template without a pool"
            );
        }
        sandboxes.push(sandbox);
    }
    let pids: Vec<u32> = sandboxes.iter().filter_map(|s| s.pid()).collect();
    assert_eq!(pids.len(), sandboxes.len());
    assert_eq!(
        engine.list().len(),
        sandboxes.len(),
        "listed: {:?}",
        engine.list()
    );

    // Confinement: every VMM runs as its own unprivileged user, without capabilities, under
    // a seccomp filter, in its own cgroups with the template's limits.
    let mut uids = BTreeSet::new();
    let mut cgroup_dirs = Vec::new();
    for sandbox in &sandboxes {
        let pid = sandbox.pid().expect("running");
        let uid = sandbox.vm_uid().expect("an unprivileged VMM user");
        assert_ne!(uid, 0);
        assert_eq!(
            status_field(pid, "Uid"),
            format!("{uid}\t{uid}\t{uid}\t{uid}")
        );
        assert_eq!(
            status_field(pid, "Gid"),
            format!("{uid}\t{uid}\t{uid}\t{uid}")
        );
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");
        uids.insert(uid);
        let dirs = sandbox.cgroup_dirs();
        assert!(!dirs.is_empty(), "a cgroup per sandbox");
        for dir in &dirs {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("cgroup.procs");
            assert!(
                procs.lines().any(|l| l.trim() == pid.to_string()),
                "QEMU {pid} not in {}",
                dir.display()
            );
        }
        cgroup_dirs.extend(dirs);
    }
    assert_eq!(uids.len(), sandboxes.len(), "one user per sandbox");

    // Every sandbox answers, with its own identity.
    for sandbox in &sandboxes {
        // The name, /etc/hostname and the /etc/hosts line that names the guest agree.
        assert_eq!(
            sh(
                sandbox,
                "hostname; cat /etc/hostname; grep -c \"^127.0.1.1[[:space:]]$(hostname)$\" /etc/hosts"
            )
            .await,
            format!("{0}\n{0}\n1", sandbox.id())
        );
    }

    // Each sandbox has its own network namespace; the guest reaches its gateway (the tap in
    // that namespace) and nothing else exists there.
    let netns = sandboxes[0]
        .netns()
        .expect("a network namespace")
        .to_owned();
    assert_eq!(
        sh(&sandboxes[0], "ip -4 -o addr show eth0 | awk '{print $4}'").await,
        "172.31.255.2/30"
    );
    let listener = std::process::Command::new("ip")
        .args(["netns", "exec", &netns, "python3", "-c"])
        .arg("import socket; s=socket.socket(); s.bind(('172.31.255.1', 8471)); s.listen(1); c,_=s.accept(); print(c.recv(64).decode().strip())")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("listener in the sandbox namespace");
    let mut sent = false;
    for _ in 0..50 {
        let script = "bash -c 'echo hello-gateway > /dev/tcp/172.31.255.1/8471' 2>/dev/null && echo sent || echo retry";
        if sh(&sandboxes[0], script).await == "sent" {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sent, "the guest could not reach its gateway");
    let heard = listener.wait_with_output().expect("listener");
    assert_eq!(
        String::from_utf8_lossy(&heard.stdout).trim(),
        "hello-gateway"
    );
    assert_ne!(sandboxes[0].netns(), sandboxes[1].netns());

    // Disks are isolated: a file written in one is absent in the others and the template.
    for (i, sandbox) in sandboxes.iter().enumerate() {
        sh(sandbox, &format!("echo {i} > /root/marker-{i} && sync")).await;
    }
    for (i, sandbox) in sandboxes.iter().enumerate() {
        let listing = sh(sandbox, "ls /root").await;
        assert_eq!(
            listing,
            format!("marker-{i}"),
            "sandbox {i} sees only its own file"
        );
    }
    let fresh = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    assert_eq!(
        sh(&fresh, "ls /root").await,
        "",
        "the template's disk is untouched"
    );

    // The RNG differs between sandboxes restored from the same snapshot...
    let a = sh(&sandboxes[0], random).await;
    let b = sh(&sandboxes[1], random).await;
    assert_ne!(a, b, "restored sandboxes must not share random state");
    // ...and the guest clock is within 1 s of the host's.
    let skew = sh(&sandboxes[2], "date +%s.%N")
        .await
        .parse::<f64>()
        .expect("a time")
        - host_now();
    assert!(skew.abs() < 1.0, "guest clock off by {skew:.3} s");

    // Negative control for the clock: without the post-restore call the guest clock still
    // shows the moment of the snapshot.
    let wait = (baked_at + 2.0 - host_now()).max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    let z = engine.create(&template, raw.clone()).await.expect("create");
    let stale = sh(&z, "date +%s.%N").await.parse::<f64>().expect("a time") - host_now();
    assert!(
        stale < -1.0,
        "without a clock update the guest lags the host (skew {stale:.3} s)"
    );

    // Destroy everything: no QEMU, no files.
    let mut all = sandboxes;
    all.extend([fresh, z]);
    let all_pids: Vec<u32> = all.iter().filter_map(|s| s.pid()).collect();
    let all: Vec<Arc<Sandbox>> = all;
    let namespaces: Vec<String> = all
        .iter()
        .filter_map(|s| s.netns().map(str::to_owned))
        .collect();
    for sandbox in all {
        sandbox.destroy().await.expect("destroy");
    }
    for pid in pids.iter().chain(&all_pids) {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "QEMU {pid} still running"
        );
    }
    for name in &namespaces {
        assert!(
            !Path::new("/run/netns").join(name).exists(),
            "network namespace {name} left"
        );
    }
    for dir in &cgroup_dirs {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
    assert!(
        engine.list().is_empty(),
        "still listed: {:?}",
        engine.list()
    );
    // The pre-started VMM (no guest state) goes with the engine.
    let prestarted = engine.prestarted_pids();
    assert!(prestarted.len() <= kiln_engine::MAX_PRESTART);
    engine.shutdown_prestarted().await;
    for pid in &prestarted {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pre-started VMM {pid} outlived the engine"
        );
    }
    let left: Vec<_> = std::fs::read_dir(data.path().join("sandboxes"))
        .expect("dir")
        .collect();
    assert!(left.is_empty(), "sandbox files left: {left:?}");
}
