//! The reflink disk path: with the data directory on XFS (a loop-mounted image made here,
//! since the repository's filesystem is not XFS), the template's disk is a raw image and each
//! sandbox's disk a reflink of it that shares its extents until written.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};
use kiln_vmm::driver::DiskFormat;

/// An XFS filesystem on a loop device, unmounted and detached on drop.
struct XfsMount {
    _dir: tempfile::TempDir,
    loop_device: Option<String>,
    mount_point: PathBuf,
    mounted: bool,
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test.sh installs it)"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

impl XfsMount {
    fn new() -> XfsMount {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("xfs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(4 << 30))
            .expect("sparse image");
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).expect("mount point");
        let mut mount = XfsMount {
            _dir: dir,
            loop_device: None,
            mount_point,
            mounted: false,
        };
        let image = image.to_str().expect("utf-8 path");
        run("mkfs.xfs", &["-q", "-m", "reflink=1", image]);
        mount.loop_device = Some(run("losetup", &["--find", "--show", image]));
        let device = mount.loop_device.clone().expect("loop device");
        run(
            "mount",
            &[&device, mount.mount_point.to_str().expect("utf-8 path")],
        );
        mount.mounted = true;
        mount
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mount_point).status();
        }
        if let Some(device) = &self.loop_device {
            let _ = Command::new("losetup").args(["-d", device]).status();
        }
    }
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
    let xfs = XfsMount::new();
    let engine = Engine::new(EngineConfig::new(xfs.mount_point.join("kiln"))).expect("engine");
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
    // Nothing may keep the filesystem busy when it is unmounted.
    engine.shutdown_prestarted().await;
    drop(engine);
}
