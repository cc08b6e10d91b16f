//! A guest that escapes into its VMM finds nothing to steer the host with: no writable
//! handle on anything shared, no file of another sandbox or template it can read, and no
//! header in a disk it wrote that makes root (or any later VMM) open a file of the host.

use std::path::Path;
use std::time::Duration;

use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};

async fn sh(sandbox: &Sandbox, script: &str) -> String {
    kiln_testinfra::sh(sandbox.agent(), script).await
}

fn qemu_img(args: &[&str], path: &Path) -> String {
    let output = std::process::Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(output.status.success(), "qemu-img {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmms_hold_nothing_shared_writable_and_nobody_reads_what_is_not_theirs() {
    let data = tempfile::tempdir().expect("data dir");
    let engine = Engine::new(EngineConfig::new(data.path())).expect("engine");
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build");
    let template = engine.bake(&images).await.expect("bake");
    template.verify().expect("a fresh bake verifies");
    // The check also covers the device state: one flipped byte is found.
    let state = std::fs::read(template.state()).expect("read the device state");
    let mut flipped = state.clone();
    *flipped.last_mut().expect("a device state") ^= 1;
    std::fs::write(template.state(), &flipped).expect("tamper with the device state");
    let err = template
        .verify()
        .expect_err("a tampered device state fails its checksum");
    assert!(err.to_string().contains("device state checksum"), "{err}");
    std::fs::write(template.state(), &state).expect("put the device state back");
    template.verify().expect("verifies again");
    engine.prestart(&template);
    let a = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    let b = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    let mut prestarted = Vec::new();
    for _ in 0..600 {
        prestarted = engine.prestarted_pids();
        if !prestarted.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!prestarted.is_empty(), "a pre-started VMM");

    // No VMM (pre-started or sandbox) holds a shared artefact writable.
    let rootfs = template.meta.rootfs.clone();
    let shared: Vec<&Path> = vec![
        &template.meta.machine.kernel,
        &template.meta.machine.initramfs,
        &rootfs,
    ];
    let (memory, disk) = (template.memory(), template.disk());
    let mut shared_all = shared.clone();
    shared_all.push(&memory);
    shared_all.push(&disk);
    for pid in &prestarted {
        kiln_testinfra::assert_no_writable_shared(*pid, "pre-started", &shared_all);
    }
    for sandbox in [&a, &b] {
        let pid = sandbox.pid().expect("running");
        kiln_testinfra::assert_no_writable_shared(pid, "sandbox", &shared_all);
    }

    // A guest writing all over its RAM changes nothing in the template's memory file.
    sh(
        &a,
        "dd if=/dev/urandom of=/dev/shm/fill bs=1M count=100 2>/dev/null; sync; echo done",
    )
    .await;
    template
        .verify()
        .expect("template memory and disk unchanged after a guest wrote its RAM");

    // Nobody but root reads another's files: not a local user, not another sandbox's VMM
    // user. The data directory cannot even be traversed.
    let b_uid = b.vm_uid().expect("VMM user");
    let a_files = [
        a.dir().join("disk.qcow2"),
        a.dir().join("vmm.pid"),
        a.dir().join("run/console.log"),
        template.memory(),
        template.state(),
        template.disk(),
        template.dir.join("meta.json"),
    ];
    for file in &a_files {
        assert!(
            file.exists(),
            "{} exists (the check is real)",
            file.display()
        );
        for uid in [65534, b_uid] {
            let (ok, out) = kiln_testinfra::run_as_user(uid, "cat", &[&file.display().to_string()]);
            assert!(!ok, "uid {uid} read {}: {out}", file.display());
            assert!(out.contains("Permission denied"), "{out}");
        }
    }
    let (ok, out) = kiln_testinfra::run_as_user(
        65534,
        "ls",
        &[&data.path().join("sandboxes").display().to_string()],
    );
    assert!(!ok, "the sandboxes directory is not listable: {out}");
    // Negative control: the same user reads a file that is readable to it.
    let (ok, _) = kiln_testinfra::run_as_user(65534, "cat", &["/etc/hostname"]);
    assert!(ok, "the check can succeed");

    // A disk header a VMM could have written names a host file: it is never followed.
    // Stand-in for what a compromised bake would leave: the template disk's header rewritten
    // to name a host file as its backing file.
    let secret_dir = tempfile::tempdir().expect("dir");
    let secret = secret_dir.path().join("host-secret");
    // 64 MiB of a marker, so that reads through the tampered header land in it.
    std::fs::write(&secret, "KILN-HOST-SECRET".repeat(4 << 20)).expect("secret");
    drop(a);
    drop(b);
    engine.shutdown_prestarted().await;
    for sandbox in engine.list() {
        engine.destroy(&sandbox.id).await.expect("destroy");
    }
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    qemu_img(
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &secret.display().to_string(),
        ],
        &disk,
    );
    // Negative control: the tampered header does name the secret, and a reader that follows
    // headers reads it where the template disk holds no data of its own.
    assert!(qemu_img(&["info", "-U"], &disk).contains("host-secret"));
    let map: Vec<serde_json::Value> =
        serde_json::from_str(&qemu_img(&["map", "-U", "--output=json"], &disk)).expect("map");
    let offset = map
        .iter()
        .find(|e| e["depth"] == 1 && e["data"] == true && e["start"].as_u64() < Some(60 << 20))
        .and_then(|e| e["start"].as_u64())
        .expect("a range the template disk reads through to its backing");
    let followed = std::process::Command::new("qemu-io")
        .args(["-r", "-c", &format!("read -v {offset} 16")])
        .arg(&disk)
        .output()
        .expect("qemu-io");
    assert!(
        String::from_utf8_lossy(&followed.stdout).contains("KILN.HOST.SECRET"),
        "following the header reads the host file: {followed:?}"
    );
    // The check that runs before a template is used refuses it...
    let err = template
        .verify()
        .expect_err("a tampered disk fails its checksum");
    assert!(err.to_string().contains("template disk checksum"), "{err}");
    // ...and a VM made from it anyway reads through the chain kiln names, never the file.
    let c = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create from the tampered template");
    let secret_id = kiln_testinfra::file_id(&secret);
    let pid = c.pid().expect("running");
    assert!(
        kiln_testinfra::held_files(pid)
            .iter()
            .all(|f| f.id != secret_id),
        "the VMM opened the file its disk's header named"
    );
    assert_eq!(
        sh(&c, "cat /etc/debian_version | cut -d. -f1").await,
        "12",
        "the guest's disk reads through to the real root filesystem"
    );
    let seen = sh(
        &c,
        &format!("dd if=/dev/vda bs=16 count=1 iflag=skip_bytes skip={offset} 2>/dev/null | od -An -c | tr -d ' \\n'"),
    )
    .await;
    assert!(
        !seen.contains("KILN"),
        "the guest sees no host data: {seen}"
    );
    engine.destroy(c.id()).await.expect("destroy");
    engine.shutdown_prestarted().await;
    assert!(
        std::fs::read_dir(data.path().join("sandboxes"))
            .expect("sandboxes")
            .next()
            .is_none(),
        "nothing left"
    );
}
