//! The reflink disk path: with the data directory on XFS (a loop-mounted image made here,
//! since the repository's filesystem is not XFS), the template's disk is a raw image and each
//! sandbox's disk a reflink of it that shares its extents until written.

use std::path::Path;

use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};
use kiln_vmm::driver::DiskFormat;

use kiln_testinfra::loopfs::{run, LoopFs};

/// An XFS filesystem (4 GiB, reflinks on) of the test's own.
fn xfs() -> LoopFs {
    LoopFs::new(4 << 30, &["mkfs.xfs", "-q", "-m", "reflink=1"])
}

async fn sh(sandbox: &Sandbox, script: &str) -> String {
    kiln_testinfra::sh(sandbox.agent(), script).await
}

/// Whether `filefrag` reports extents of `file` shared with another file.
fn has_shared_extents(file: &Path) -> bool {
    run("filefrag", &["-v", file.to_str().expect("utf-8 path")]).contains("shared")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_disks_are_reflinks_on_xfs() {
    let xfs = xfs();
    let engine = Engine::new(EngineConfig::new(xfs.path().join("kiln"))).expect("engine");
    assert_eq!(engine.disk_strategy(), "reflink");
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build");
    let template = engine.bake(&images).await.expect("bake");
    assert_eq!(template.meta.disk_format, DiskFormat::Raw);
    assert!(template.disk().ends_with("disk.raw"));
    let template_disk = kiln_image::cache::sha256_file(&template.disk()).expect("hash");

    let a = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    let b = engine
        .create(
            &template,
            CreateOptions {
                disk_mib: Some((template.meta.disk_bytes >> 20) + 256),
                ..CreateOptions::default()
            },
        )
        .await
        .expect("create with a bigger disk");
    for sandbox in [&a, &b] {
        let disk = sandbox.dir().join("disk.raw");
        assert!(disk.is_file(), "raw disk in {}", sandbox.dir().display());
        assert!(
            has_shared_extents(&disk),
            "{} shares no extents with the template",
            disk.display()
        );
    }

    // Copy-on-write: what one sandbox writes, no other sandbox and not the template sees.
    sh(&a, "echo only-a > /root/marker && sync").await;
    assert_eq!(sh(&a, "cat /root/marker").await, "only-a");
    assert_eq!(sh(&b, "ls /root").await, "");
    let c = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    assert_eq!(sh(&c, "ls /root").await, "");
    let mib: u64 = sh(&b, "df -m / | awk 'NR==2 {print $2}'")
        .await
        .parse()
        .expect("size");
    assert!(
        mib > (template.meta.disk_bytes >> 20) + 200,
        "raw disk grown: {mib} MiB"
    );
    for sandbox in [a, b, c] {
        sandbox.destroy().await.expect("destroy");
    }
    assert_eq!(
        kiln_image::cache::sha256_file(&template.disk()).expect("hash"),
        template_disk,
        "the template's disk changed"
    );

    // Copied into a data directory without reflinks (the repository's filesystem), the bake
    // is found under its key's name but not used: every sandbox would copy its raw disk
    // whole. It is baked afresh there, with a qcow2 disk.
    let plain = tempfile::tempdir().expect("a data directory without reflinks");
    let plain_engine = Engine::new(EngineConfig {
        prestart: 0,
        ..EngineConfig::new(plain.path())
    })
    .expect("engine without reflinks");
    assert_eq!(plain_engine.disk_strategy(), "qcow2");
    let copy = template
        .copy_into(&plain.path().join("templates"))
        .expect("copy the bake");
    assert_eq!(copy.meta.disk_format, DiskFormat::Raw);
    let rebaked = plain_engine
        .bake(&images)
        .await
        .expect("bake over the copy");
    assert_eq!(rebaked.dir, copy.dir);
    assert_eq!(rebaked.meta.disk_format, DiskFormat::Qcow2);
    plain_engine.shutdown_prestarted().await;

    // Nothing may keep the filesystem busy when it is unmounted.
    engine.shutdown_prestarted().await;
    drop(engine);
}
