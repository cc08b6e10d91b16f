//! Copy-on-write root disks: a qcow2 overlay on a read-only base works on any filesystem;
//! a reflink copy (XFS, btrfs) is the faster path where the data directory supports it.

use std::path::Path;
use std::process::Command;

use kiln_vmm::qemu::DiskFormat;

/// Why a disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `qemu-img` failed or is missing.
    #[error("qemu-img create failed: {0}")]
    QemuImg(String),
    /// A file operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Creates `overlay`, a qcow2 image whose reads fall through to `backing` and whose writes
/// stay in the overlay. `backing` is never written.
pub fn qcow2_overlay(
    backing: &Path,
    backing_format: DiskFormat,
    overlay: &Path,
) -> Result<(), DiskError> {
    let output = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            backing_format.qemu_name(),
            "-b",
        ])
        .arg(backing)
        .arg(overlay)
        .output()
        .map_err(|e| DiskError::QemuImg(format!("{e} (apt-get install qemu-utils)")))?;
    if !output.status.success() {
        return Err(DiskError::QemuImg(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// Copies `src` to `dst` by sharing extents (FICLONE): constant time, copy-on-write.
pub fn reflink(src: &Path, dst: &Path) -> Result<(), DiskError> {
    use std::os::fd::AsRawFd;
    let io = |context: String| move |source| DiskError::Io { context, source };
    let from = std::fs::File::open(src).map_err(io(format!("opening {}", src.display())))?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io(format!("creating {}", dst.display())))?;
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::Ioctl = 0x4004_9409;
    // SAFETY: FICLONE takes the source descriptor as its argument; both files are open.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) };
    if rc < 0 {
        let error = std::io::Error::last_os_error();
        drop(to);
        let _ = std::fs::remove_file(dst);
        return Err(DiskError::Io {
            context: format!("reflinking {} to {}", src.display(), dst.display()),
            source: error,
        });
    }
    Ok(())
}

/// Whether files in `dir` can be reflinked (tries it on two small files).
pub fn supports_reflink(dir: &Path) -> bool {
    let Ok(probe) = tempfile::Builder::new()
        .prefix(".reflink-probe-")
        .tempdir_in(dir)
    else {
        return false;
    };
    let src = probe.path().join("a");
    if std::fs::write(&src, b"probe").is_err() {
        return false;
    }
    reflink(&src, &probe.path().join("b")).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_reads_through_and_keeps_the_base_untouched() {
        let dir = tempfile::tempdir().expect("dir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).expect("write");
        let overlay = dir.path().join("overlay.qcow2");
        qcow2_overlay(&base, DiskFormat::Raw, &overlay).expect("overlay");
        let info = Command::new("qemu-img")
            .arg("info")
            .arg(&overlay)
            .output()
            .expect("qemu-img info");
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(
            text.contains("file format: qcow2") && text.contains("backing file: "),
            "{text}"
        );
        assert!(qcow2_overlay(
            &dir.path().join("missing"),
            DiskFormat::Raw,
            &dir.path().join("x.qcow2")
        )
        .is_err());
    }

    #[test]
    fn reflink_fails_cleanly_where_unsupported() {
        // The repository's filesystem is not XFS/btrfs here; on one that is, this succeeds.
        let dir = tempfile::tempdir().expect("dir");
        let src = dir.path().join("src");
        std::fs::write(&src, b"data").expect("write");
        let dst = dir.path().join("dst");
        match reflink(&src, &dst) {
            Ok(()) => assert_eq!(std::fs::read(&dst).expect("read"), b"data"),
            Err(_) => assert!(!dst.exists(), "a failed reflink leaves no file"),
        }
        assert_eq!(
            supports_reflink(dir.path()),
            reflink(&src, &dir.path().join("again")).is_ok()
        );
    }
}
