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

/// Copies `src` to `dst`: a reflink where the filesystem allows it, else a copy of the data
/// regions only (holes stay holes, so a sparse 1 GiB image with 250 MiB of data costs 250 MiB).
pub fn clone_or_copy(src: &Path, dst: &Path) -> Result<(), DiskError> {
    if reflink(src, dst).is_ok() {
        return Ok(());
    }
    sparse_copy(src, dst).map_err(|source| DiskError::Io {
        context: format!("copying {} to {}", src.display(), dst.display()),
        source,
    })
}

fn sparse_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let from = std::fs::File::open(src)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    let result = (|| {
        let len = from.metadata()?.len();
        to.set_len(len)?;
        let mut offset = 0i64;
        let end = i64::try_from(len).map_err(std::io::Error::other)?;
        while offset < end {
            let data = match lseek(from.as_raw_fd(), offset, Whence::SeekData) {
                Ok(at) => at,
                // No data after `offset`: the rest is a hole.
                Err(nix::errno::Errno::ENXIO) => break,
                Err(e) => return Err(e.into()),
            };
            let hole =
                lseek(from.as_raw_fd(), data, Whence::SeekHole).map_err(std::io::Error::from)?;
            copy_range(&from, &to, data, hole)?;
            offset = hole;
        }
        to.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Copies bytes `start..end` from `from` to the same offsets of `to`: in the kernel where it
/// can (same filesystem), through a buffer otherwise.
fn copy_range(
    from: &std::fs::File,
    to: &std::fs::File,
    start: i64,
    end: i64,
) -> std::io::Result<()> {
    use nix::errno::Errno;
    use std::os::unix::fs::FileExt;
    let short = || {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "source shrank while copying",
        )
    };
    let mut at = start;
    while at < end {
        let (mut off_in, mut off_out) = (at, at);
        let want = usize::try_from(end - at).unwrap_or(usize::MAX).min(1 << 30);
        match nix::fcntl::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            Ok(0) => return Err(short()),
            Ok(n) => at += n as i64,
            // Across filesystems (or where unsupported) copy through user space.
            Err(Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let mut buffer = vec![0u8; 1 << 20];
    while at < end {
        let want = usize::try_from(end - at)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let offset = u64::try_from(at).map_err(std::io::Error::other)?;
        let n = from.read_at(&mut buffer[..want], offset)?;
        if n == 0 {
            return Err(short());
        }
        to.write_all_at(&buffer[..n], offset)?;
        at += n as i64;
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
    fn copies_keep_holes_and_data() {
        let dir = tempfile::tempdir().expect("dir");
        let src = dir.path().join("sparse");
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut file = std::fs::File::create(&src).expect("create");
            file.set_len(64 << 20).expect("size");
            file.seek(SeekFrom::Start(32 << 20)).expect("seek");
            file.write_all(&[9u8; 1 << 20]).expect("write");
        }
        let dst = dir.path().join("copy");
        clone_or_copy(&src, &dst).expect("copy");
        assert_eq!(
            std::fs::read(&src).expect("read"),
            std::fs::read(&dst).expect("read")
        );
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&dst).expect("stat").blocks() * 512;
        assert!(
            allocated < 8 << 20,
            "holes were filled: {allocated} bytes allocated"
        );
        assert!(clone_or_copy(&src, &dst).is_err(), "never overwrites");
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
