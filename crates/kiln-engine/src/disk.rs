//! Copy-on-write root disks: a qcow2 overlay on a read-only base works on any filesystem;
//! a reflink copy (XFS, btrfs) is the faster path where the data directory supports it.

use std::path::Path;
use std::process::Command;

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

/// Creates `overlay`, an empty qcow2 image of `virtual_size` bytes with no backing file in
/// its header: the layers it reads through to are named by kiln when a VM opens it
/// ([`kiln_vmm::driver::DiskLayer`]), never by a header, so opening it can never lead to
/// another file. Nothing is read to make it.
pub fn qcow2_overlay(overlay: &Path, virtual_size: u64) -> Result<(), DiskError> {
    let output = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(overlay)
        .arg(virtual_size.to_string())
        .output()
        .map_err(|e| DiskError::QemuImg(format!("{e} (bash scripts/up.sh installs qemu-utils)")))?;
    if !output.status.success() {
        return Err(DiskError::QemuImg(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// Rewrites `untrusted`, a qcow2 layer a VMM wrote (it read through `below`, a chain kiln
/// names), into `out`, a new file no VMM ever held, whose backing is `below`'s top layer.
/// Only the clusters `untrusted` holds are copied. The header `untrusted` carries is never
/// followed: `qemu-img` gets the whole chain spelled out, and itself runs in a jail as
/// `jail.run_as` (its parsing of a hostile image can reach nothing but these files), within
/// `cgroups`, for at most `timeout`.
pub fn rewrite_qcow2(
    jail_root: &Path,
    run_as: Option<(u32, u32)>,
    cgroups: Vec<std::os::fd::OwnedFd>,
    untrusted: &Path,
    below: &[kiln_vmm::driver::DiskLayer],
    out: &Path,
    timeout: std::time::Duration,
) -> Result<(), DiskError> {
    use kiln_vmm::jail::{Bind, Jail, Launch};
    let io = |context: &str| {
        let context = context.to_owned();
        move |source| DiskError::Io { context, source }
    };
    let layer_path = |index: usize| format!("/vm/layer{index}");
    // The source, as QEMU's JSON pseudo-protocol: every layer and its backing named here.
    let mut chain = serde_json::Value::Null;
    for (index, layer) in below.iter().enumerate().rev() {
        let mut node = serde_json::json!({
            "driver": layer.format.qemu_name(),
            "file": { "driver": "file", "filename": layer_path(index + 1) },
        });
        if layer.format == kiln_vmm::driver::DiskFormat::Qcow2 {
            node["backing"] = chain;
        }
        chain = node;
    }
    let source = serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": "/vm/in" },
        "backing": chain,
    });
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(io("creating the rewritten disk"))?;
    }
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(out, Some(uid), Some(gid))
            .map_err(io("handing the rewritten disk to the jail's user"))?;
    }
    let mut binds = vec![
        Bind::read_only(untrusted, "/vm/in"),
        Bind::writable(out, "/vm/out"),
    ];
    for (index, layer) in below.iter().enumerate() {
        binds.push(Bind::read_only(&layer.path, layer_path(index + 1)));
    }
    let mut args: Vec<String> = vec![
        "convert".into(),
        "-q".into(),
        format!("json:{source}"),
        "-O".into(),
        "qcow2".into(),
    ];
    if let Some(top) = below.first() {
        // The backing is named as the whole chain too: by a plain path, qemu-img would open
        // that layer and follow its header (a layer rewritten here names `/vm/layer1`,
        // itself, and following that never ends). The name lands in the new header, where
        // nothing of kiln's reads it; qcow2 keeps at most 1023 bytes of it.
        let backing = format!("json:{chain}");
        if backing.len() > 1023 {
            return Err(DiskError::QemuImg(format!(
                "a disk chain of {} layers is too deep to rewrite a layer over",
                below.len()
            )));
        }
        args.extend([
            "-B".into(),
            backing,
            "-F".into(),
            top.format.qemu_name().into(),
        ]);
    }
    args.push("/vm/out".into());
    let program =
        kiln_vmm::jail::find_program(Path::new("qemu-img")).map_err(io("finding qemu-img"))?;
    // Non-blocking: a chatty qemu-img loses messages rather than stalling on a full pipe.
    let (stderr_read, stderr_write) = kiln_vmm::jail::pipe(true).map_err(io("making a pipe"))?;
    let mut child = kiln_vmm::jail::spawn(
        &Jail {
            root: jail_root.to_owned(),
            binds,
            devices: Vec::new(),
            run_as,
        },
        Launch {
            program,
            args,
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            netns: None,
            cgroups,
            fds: Vec::new(),
            stderr: Some(stderr_write),
        },
    )
    .map_err(io("starting qemu-img in a jail"))?;
    let ended = kiln_vmm::pidfd::exited(
        child.pidfd(),
        i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX),
    )
    .map_err(io("waiting for qemu-img"))?;
    if !ended {
        let _ = child.kill();
        return Err(DiskError::QemuImg(format!(
            "qemu-img convert did not finish within {} s",
            timeout.as_secs()
        )));
    }
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io("waiting for qemu-img"))? {
            break status;
        }
    };
    if !status.success() {
        use std::io::Read;
        let mut message = Vec::new();
        let _ = std::fs::File::from(stderr_read)
            .take(16 << 10)
            .read_to_end(&mut message);
        return Err(DiskError::QemuImg(format!(
            "rewriting {}: qemu-img convert {status}: {}",
            untrusted.display(),
            String::from_utf8_lossy(&message).trim()
        )));
    }
    Ok(())
}

/// SHA-256 of a (sparse) file's contents and layout: its length, then every data extent's
/// offset, length and bytes. Holes are not read, so a 2 GiB disk with 450 MiB of data costs
/// 450 MiB of reading. Any change of contents changes it (as can a change of layout alone,
/// which only makes a check stricter).
pub fn sparse_sha256(path: &Path) -> std::io::Result<String> {
    use nix::unistd::{lseek, Whence};
    use sha2::Digest;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut file = std::fs::File::open(path)?;
    let len = i64::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    let mut hasher = sha2::Sha256::new();
    hasher.update(len.to_le_bytes());
    let mut offset = 0i64;
    let mut buffer = vec![0u8; 1 << 20];
    while offset < len {
        let data = match lseek(file.as_raw_fd(), offset, Whence::SeekData) {
            Ok(at) => at,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(file.as_raw_fd(), data, Whence::SeekHole).map_err(std::io::Error::from)?;
        hasher.update(data.to_le_bytes());
        hasher.update((hole - data).to_le_bytes());
        lseek(file.as_raw_fd(), data, Whence::SeekSet).map_err(std::io::Error::from)?;
        let mut left = u64::try_from(hole - data).map_err(std::io::Error::other)?;
        while left > 0 {
            let want = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(buffer.len());
            let n = file.read(&mut buffer[..want])?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while hashing",
                ));
            }
            hasher.update(&buffer[..n]);
            left -= n as u64;
        }
        offset = hole;
    }
    Ok(hex::encode(hasher.finalize()))
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
    fn overlays_name_no_backing_file() {
        let dir = tempfile::tempdir().expect("dir");
        let overlay = dir.path().join("overlay.qcow2");
        qcow2_overlay(&overlay, 1 << 30).expect("overlay");
        let info = Command::new("qemu-img")
            .arg("info")
            .arg(&overlay)
            .output()
            .expect("qemu-img info");
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(
            text.contains("file format: qcow2")
                && text.contains("virtual size: 1 GiB")
                && !text.contains("backing file"),
            "{text}"
        );
        assert!(qcow2_overlay(&dir.path().join("no/such/dir/x.qcow2"), 1 << 20).is_err());
    }

    /// Runs `qemu-io` on `image_opts` (a JSON description) with `commands`.
    fn qemu_io(image: &serde_json::Value, commands: &[&str]) -> String {
        let mut command = Command::new("qemu-io");
        for c in commands {
            command.args(["-c", c]);
        }
        let output = command
            .arg(format!("json:{image}"))
            .output()
            .expect("qemu-io");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    #[test]
    fn a_rewritten_layer_keeps_its_data_and_never_follows_its_header() {
        use kiln_vmm::driver::DiskLayer;
        let dir = tempfile::tempdir().expect("dir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![b'B'; 4 << 20]).expect("base");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, vec![b'S'; 4 << 20]).expect("secret");
        let untrusted = dir.path().join("untrusted.qcow2");
        qcow2_overlay(&untrusted, 4 << 20).expect("overlay");
        let chain = |top: &Path| {
            serde_json::json!({
                "driver": "qcow2",
                "file": { "driver": "file", "filename": top },
                "backing": { "driver": "raw", "file": { "driver": "file", "filename": base } },
            })
        };
        qemu_io(&chain(&untrusted), &["write -P 0x41 1M 64k"]);
        // What a compromised VMM would do: name a host file as the backing file.
        let rebase = Command::new("qemu-img")
            .args(["rebase", "-u", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&secret)
            .arg(&untrusted)
            .output()
            .expect("qemu-img rebase");
        assert!(rebase.status.success(), "{rebase:?}");
        let info = Command::new("qemu-img")
            .arg("info")
            .arg(&untrusted)
            .output()
            .expect("info");
        assert!(
            String::from_utf8_lossy(&info.stdout).contains(&secret.display().to_string()),
            "the tampered header names the secret (negative control)"
        );
        let jail = dir.path().join("jail");
        std::fs::create_dir(&jail).expect("jail");
        let out = dir.path().join("sealed.qcow2");
        rewrite_qcow2(
            &jail,
            Some((2_000_065_010, 2_000_065_010)),
            Vec::new(),
            &untrusted,
            &[DiskLayer::raw(&base)],
            &out,
            std::time::Duration::from_secs(60),
        )
        .expect("rewrite");
        let read = qemu_io(
            &chain(&out),
            &[
                "read -P 0x41 1M 64k",
                "read -P 0x42 0 64k",
                "read -P 0x42 2M 64k",
            ],
        );
        assert!(!read.contains("Pattern verification failed"), "{read}");
        let info = Command::new("qemu-img")
            .args(["info", "-U"])
            .arg(&out)
            .output()
            .expect("info");
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(!text.contains(&secret.display().to_string()), "{text}");
        // The new header names the chain as the jail saw it, never a host path.
        assert!(
            text.contains(r#"backing file: json:{"driver":"raw","file":{"driver":"file","filename":"/vm/layer1"}}"#),
            "{text}"
        );
    }

    #[test]
    fn sparse_hashes_follow_contents_not_holes() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("disk");
        let mut file = std::fs::File::create(&path).expect("create");
        file.set_len(256 << 20).expect("size");
        file.seek(SeekFrom::Start(100 << 20)).expect("seek");
        file.write_all(&[5u8; 8192]).expect("write");
        file.sync_all().expect("sync");
        let first = sparse_sha256(&path).expect("hash");
        assert_eq!(first, sparse_sha256(&path).expect("hash"), "stable");
        file.seek(SeekFrom::Start((100 << 20) + 4096))
            .expect("seek");
        file.write_all(&[6u8]).expect("write");
        file.sync_all().expect("sync");
        assert_ne!(first, sparse_sha256(&path).expect("hash"), "a changed byte");
        file.seek(SeekFrom::Start(200 << 20)).expect("seek");
        file.write_all(&[0u8; 4096]).expect("write");
        let with_zeroes = sparse_sha256(&path).expect("hash");
        file.set_len(300 << 20).expect("grow");
        assert_ne!(
            with_zeroes,
            sparse_sha256(&path).expect("hash"),
            "a new length"
        );
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
