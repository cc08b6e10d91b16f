//! Every default template boots under QEMU (TCG here) to a working agent: the agent runs as
//! PID 1 from the initramfs, loads the guest modules, switches to the root disk, serves on
//! the virtio-serial port, and runs commands; its init duties (hostname, clock, RNG,
//! power-off) run for real.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent_client::{AgentClient, ClientConfig, UnixConnector};
use kiln_image::template::TemplateImages;
use kiln_proto::messages::{Command, ExecRequest, InitRequest, PostRestoreRequest, ShutdownAction};
use kiln_vmm::accel::{resolve, Accel, AccelChoice};
use kiln_vmm::driver::{DiskLayer, MemoryBacking};
use kiln_vmm::qemu::{Attachments, BootConfig, QemuProcess};

async fn exec(client: &AgentClient, script: &str) -> (i32, String) {
    let result = client
        .run(ExecRequest::new(Command::Shell(script.to_owned())), 1 << 20)
        .await
        .expect("exec through the agent");
    let out = String::from_utf8_lossy(&result.stdout).into_owned();
    let err = String::from_utf8_lossy(&result.stderr).into_owned();
    (result.status.code.unwrap_or(-1), format!("{out}{err}"))
}

/// Boots `images` with `vcpus` vCPUs and the spec's memory, checks the agent, runs `check`,
/// powers off.
async fn boot_and_check(images: &TemplateImages, vcpus: u32, check: &str, expect: &str) {
    let run_dir = tempfile::tempdir().expect("run dir");
    // The guest writes to a layer of its own; the image stays untouched.
    let overlay = run_dir.path().join("disk.qcow2");
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&overlay)
        .arg(
            std::fs::metadata(&images.rootfs.image)
                .expect("rootfs")
                .len()
                .to_string(),
        )
        .status()
        .expect("qemu-img");
    assert!(created.success());
    // Under TCG on every host: the images must not depend on KVM to boot.
    let accel = resolve(AccelChoice::Fixed(Accel::Tcg));
    let config_tsc_known = kiln_vmm::tsc::host_tsc_khz().is_some();
    let config = BootConfig {
        accel: accel.accel,
        tsc_khz: kiln_vmm::tsc::host_tsc_khz(),
        vcpus,
        memory_mib: images.spec.resources.memory_mib,
        kernel: images.kernel.vmlinux.clone(),
        initramfs: images.kernel.initramfs.clone(),
        root_disk: vec![
            DiskLayer::qcow2(&overlay),
            DiskLayer::raw(&images.rootfs.image),
        ],
        extra_cmdline: Vec::new(),
        run_dir: run_dir.path().join("run"),
        memory: MemoryBacking::Anonymous,
        incoming: false,
        nic_mac: None,
        devices_state_only: false,
        run_as: None,
        // The strictest filter (no set*id at all) holds for a plain boot.
        seccomp: true,
    };
    let started = Instant::now();
    let mut qemu = QemuProcess::spawn(
        Path::new("qemu-system-x86_64"),
        config,
        Attachments::default(),
    )
    .expect("QEMU starts");
    qemu.wait_started().expect("QEMU answers");
    let client = AgentClient::new(
        Arc::new(UnixConnector::new(qemu.config().agent_socket())),
        ClientConfig {
            handshake_timeout: Duration::from_secs(120),
            ..ClientConfig::default()
        },
    );
    let welcome = match client.connect().await {
        Ok(welcome) => welcome,
        Err(e) => panic!(
            "agent did not answer: {e}\nconsole:\n{}",
            qemu.console_tail(40)
        ),
    };
    let boot = started.elapsed();
    eprintln!(
        "{}: agent ready {:.2} s after QEMU start ({}: {})",
        images.spec.name,
        boot.as_secs_f64(),
        accel.accel.qemu_name(),
        accel.reason
    );
    assert!(!welcome.initialized);

    let init = client
        .init(&InitRequest {
            hostname: Some(format!("{}-boot-test", images.spec.name)),
            env: images.rootfs.config.env.clone(),
            workdir: images.rootfs.config.workdir.clone(),
            user: images.rootfs.config.user.clone(),
            ..InitRequest::default()
        })
        .await
        .expect("init");
    assert_eq!(init.applied, ["hostname"]);

    let (code, out) = exec(&client, "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; grep ' / ' /proc/mounts; uname -r; grep VERSION_CODENAME /etc/os-release; pwd").await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("/init") || out.starts_with("/sbin/kiln-agent"),
        "PID 1 is the agent: {out}"
    );
    assert!(
        out.contains(&format!("{}-boot-test", images.spec.name)),
        "hostname set: {out}"
    );
    assert!(out.contains("/dev/vda / ext4"), "root is the disk: {out}");
    assert!(
        out.contains(&images.kernel.release),
        "kernel release: {out}"
    );
    assert!(out.contains("bookworm"), "{out}");

    // The guest keeps the TSC as its clock when told the host's rate (a tickless idle and
    // fine-grained time; see docs/qemu.md), and the agent quieted what wakes an idle kernel.
    let (code, out) = exec(
        &client,
        "cat /sys/devices/system/clocksource/clocksource0/current_clocksource \
         /proc/sys/vm/compaction_proactiveness /proc/sys/kernel/watchdog \
         /proc/sys/vm/stat_interval /sys/block/vda/queue/wbt_lat_usec",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let values: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        values[1..],
        ["0", "0", "10", "0"],
        "compaction_proactiveness, watchdog, stat_interval, wbt_lat_usec: {out}"
    );
    if config_tsc_known {
        assert_eq!(values[0], "tsc", "the guest's clocksource");
    }

    // The agent's init mounts, and the template's runtime defaults and VM size.
    let (code, out) = exec(&client, "cat /proc/mounts").await;
    assert_eq!(code, 0, "{out}");
    for (mount_point, fs_type) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/run", "tmpfs"),
        ("/tmp", "tmpfs"),
    ] {
        assert!(
            out.lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(1) == Some(&mount_point) && fields.get(2) == Some(&fs_type)
            }),
            "{mount_point} is mounted as {fs_type}:\n{out}"
        );
    }
    let config = &images.rootfs.config;
    let (_, out) = exec(&client, "pwd").await;
    assert_eq!(
        out.trim(),
        config.workdir.as_deref().unwrap_or("/"),
        "workdir"
    );
    for (name, value) in &config.env {
        let (_, out) = exec(&client, &format!("printenv {name}")).await;
        assert_eq!(out.trim_end_matches('\n'), value, "env {name}");
    }
    let (_, out) = exec(&client, "nproc; grep MemTotal /proc/meminfo").await;
    let mut lines = out.lines();
    assert_eq!(
        lines.next().and_then(|n| n.trim().parse::<u32>().ok()),
        Some(vcpus),
        "vCPUs: {out}"
    );
    let mem_total_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("MemTotal in {out}"));
    let memory_kib = u64::from(images.spec.resources.memory_mib) * 1024;
    assert!(
        mem_total_kib <= memory_kib && mem_total_kib > memory_kib * 3 / 4,
        "memory: {mem_total_kib} KiB of {memory_kib}"
    );

    let (code, out) = exec(&client, check).await;
    assert_eq!(code, 0, "{check}: {out}");
    assert!(out.contains(expect), "{check}: {out}");

    // Post-restore duties run for real in the guest: the clock jumps to what the host says.
    let target_ns: u64 = 2_000_000_000 * 1_000_000_000;
    let restored = client
        .post_restore(&PostRestoreRequest {
            wall_clock_ns: target_ns,
            entropy_hex: "ab".repeat(64),
            hostname: None,
            metadata: None,
        })
        .await
        .expect("post-restore");
    assert_eq!(restored.applied, ["clock", "rng"]);
    let (_, out) = exec(&client, "date -u +%Y").await;
    assert_eq!(out.trim(), "2033", "guest clock set from the host");

    client
        .shutdown(ShutdownAction::PowerOff)
        .await
        .expect("shutdown accepted");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if qemu.try_wait().expect("wait").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guest did not power off:\n{}",
            qemu.console_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_template_boots_to_a_working_agent() {
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build task");
    let vcpus = images.spec.resources.vcpus;
    boot_and_check(&images, vcpus, "ip -V; ps -e | wc -l", "iproute2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_template_boots_to_a_working_agent() {
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("python"))
        .await
        .expect("build task");
    // Two vCPUs (the spec says one, QEMU's default): the guest must see what it is given.
    boot_and_check(
        &images,
        2,
        "python3 -c 'import json, sqlite3, ssl, venv, numpy, pandas; print(\"py-ok\", numpy.__version__, pandas.__version__)' && pip --version",
        "py-ok",
    )
    .await;
}
