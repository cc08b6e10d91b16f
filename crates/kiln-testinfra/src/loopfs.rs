//! A filesystem of the test's own on a loop device: for tests that need a filesystem kind
//! the machine's disk is not (XFS for reflinks) or a small one they may fill.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A filesystem in a sparse image file, mounted on a loop device; unmounted, detached and
/// deleted on drop (also when the test fails).
#[derive(Debug)]
pub struct LoopFs {
    _dir: tempfile::TempDir,
    loop_device: Option<String>,
    mount_point: PathBuf,
    mounted: bool,
}

/// Runs `program` and returns its output; panics with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
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

impl LoopFs {
    /// A `size`-byte filesystem made by `mkfs` (e.g. `["mkfs.xfs", "-q"]`; the image's path
    /// is appended), mounted under a temporary directory.
    pub fn new(size: u64, mkfs: &[&str]) -> LoopFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("sparse image");
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).expect("mount point");
        let mut fs = LoopFs {
            _dir: dir,
            loop_device: None,
            mount_point,
            mounted: false,
        };
        let image = image.to_str().expect("utf-8 path");
        let (program, args) = mkfs.split_first().expect("a mkfs command");
        let mut args = args.to_vec();
        args.push(image);
        run(program, &args);
        fs.loop_device = Some(run("losetup", &["--find", "--show", image]));
        let device = fs.loop_device.clone().expect("loop device");
        run(
            "mount",
            &[&device, fs.mount_point.to_str().expect("utf-8 path")],
        );
        fs.mounted = true;
        fs
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount_point
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let unmounted = Command::new("umount")
                .arg(&self.mount_point)
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                // Still busy (a failed test's VMM may hold a file): detached now, released
                // with the last user.
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mount_point)
                    .status();
            }
        }
        if let Some(device) = &self.loop_device {
            let _ = Command::new("losetup").args(["-d", device]).status();
        }
    }
}
