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
/// `cgroups`, for at most `timeout`. The VMM that wrote the layer may still hold it, stopped
/// (a QMP `stop` flushes every block device to the file): it is read without QEMU's image
/// lock.
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
        // Share the input with the stopped VMM that holds its lock.
        "-U".into(),
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

/// How a disk file's checksum is computed (recorded next to the checksum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskHash {
    /// The length, then every data extent's offset, length and bytes: what kiln recorded
    /// before [`DiskHash::Content`]. Not stable: ext4 reports an unwritten extent (as
    /// `qemu-img` makes with `fallocate`) as data while its pages are cached and as a hole
    /// once they are evicted, so the same bytes can hash differently later. Only checked,
    /// for files recorded this way.
    #[default]
    Extents,
    /// The length, then every 64 KiB block that is not all zeroes, with its index: the
    /// file's bytes alone decide it, whatever the file system's extents.
    Content,
}

/// The size of the blocks [`DiskHash::Content`] hashes.
const HASH_BLOCK: u64 = 64 << 10;

/// SHA-256 of a (sparse) file's bytes ([`DiskHash::Content`]). Holes are not read, so a
/// 2 GiB disk with 450 MiB of data costs 450 MiB of reading.
pub fn sparse_sha256(path: &Path) -> std::io::Result<String> {
    sparse_sha256_as(path, DiskHash::Content)
}

/// SHA-256 of a (sparse) file, computed as `scheme` says.
pub fn sparse_sha256_as(path: &Path, scheme: DiskHash) -> std::io::Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = sha2::Sha256::new();
    hasher.update(len.to_le_bytes());
    let mut buffer = vec![0u8; 1 << 20];
    // The first content block not yet hashed (a block can straddle two data extents).
    let mut next_block = 0u64;
    for extent in data_extents(&file, len) {
        let (data, hole) = extent?;
        match scheme {
            DiskHash::Extents => {
                hasher.update(data.to_le_bytes());
                hasher.update((hole - data).to_le_bytes());
                let mut at = data;
                while at < hole {
                    let n = usize::try_from(hole - at)
                        .unwrap_or(usize::MAX)
                        .min(buffer.len());
                    file.read_exact_at(&mut buffer[..n], at)?;
                    hasher.update(&buffer[..n]);
                    at += n as u64;
                }
            }
            DiskHash::Content => {
                let last = hole.div_ceil(HASH_BLOCK);
                for block in (data / HASH_BLOCK).max(next_block)..last {
                    let start = block * HASH_BLOCK;
                    let n = usize::try_from(HASH_BLOCK.min(len - start)).unwrap_or(0);
                    let bytes = &mut buffer[..n];
                    // Past a hole reads zeroes; a file cut short fails the read.
                    file.read_exact_at(bytes, start)?;
                    if bytes.iter().any(|&b| b != 0) {
                        hasher.update(block.to_le_bytes());
                        hasher.update(&*bytes);
                    }
                }
                next_block = next_block.max(last);
            }
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The `[data, hole)` ranges of the first `len` bytes of `file`, as `SEEK_DATA` and
/// `SEEK_HOLE` report them.
fn data_extents(
    file: &std::fs::File,
    len: u64,
) -> impl Iterator<Item = std::io::Result<(u64, u64)>> + '_ {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let mut offset = 0u64;
    std::iter::from_fn(move || {
        if offset >= len {
            return None;
        }
        let step = (|| {
            let at = i64::try_from(offset).map_err(std::io::Error::other)?;
            let data = match lseek(file.as_raw_fd(), at, Whence::SeekData) {
                Ok(data) => data,
                Err(nix::errno::Errno::ENXIO) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let hole = lseek(file.as_raw_fd(), data, Whence::SeekHole)?;
            let (data, hole) = (data.unsigned_abs(), hole.unsigned_abs().min(len));
            Ok(Some((data, hole)))
        })();
        match step {
            Ok(Some((data, hole))) => {
                offset = hole;
                Some(Ok((data, hole)))
            }
            Ok(None) => {
                offset = len;
                None
            }
            Err(e) => {
                offset = len;
                Some(Err(e))
            }
        }
    })
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
    let from = std::fs::File::open(src)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    let result = (|| {
        let len = from.metadata()?.len();
        to.set_len(len)?;
        for extent in data_extents(&from, len) {
            let (data, hole) = extent?;
            copy_range(&from, &to, data, hole)?;
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
    start: u64,
    end: u64,
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
        let offset = i64::try_from(at).map_err(std::io::Error::other)?;
        let (mut off_in, mut off_out) = (offset, offset);
        let want = usize::try_from(end - at).unwrap_or(usize::MAX).min(1 << 30);
        match nix::fcntl::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            Ok(0) => return Err(short()),
            Ok(n) => at += n as u64,
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
        let n = from.read_at(&mut buffer[..want], at)?;
        if n == 0 {
            return Err(short());
        }
        to.write_all_at(&buffer[..n], at)?;
        at += n as u64;
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
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("dir");
        let hash = |name: &str| sparse_sha256(&dir.path().join(name)).expect("hash");
        let extents_hash =
            |name: &str| sparse_sha256_as(&dir.path().join(name), DiskHash::Extents).expect("hash");
        // Data at 4 KiB offsets that share 64 KiB blocks with holes.
        let sparse = std::fs::File::create(dir.path().join("sparse")).expect("create");
        sparse.set_len(256 << 20).expect("size");
        for at in [100u64 << 20, (100 << 20) + (40 << 10), (200 << 20) + 4096] {
            sparse.write_all_at(&[5u8; 4096], at).expect("write");
        }
        sparse.sync_all().expect("sync");
        let first = hash("sparse");
        assert_eq!(first, hash("sparse"), "stable");

        // The same bytes, every one written: no holes at all.
        let dense = std::fs::File::create(dir.path().join("dense")).expect("create");
        let mut bytes = vec![0u8; 256 << 20];
        for at in [100usize << 20, (100 << 20) + (40 << 10), (200 << 20) + 4096] {
            bytes[at..at + 4096].fill(5);
        }
        dense.write_all_at(&bytes, 0).expect("write");
        dense.sync_all().expect("sync");
        assert_eq!(
            first,
            hash("dense"),
            "holes and written zeroes are the same bytes"
        );
        assert_ne!(
            extents_hash("sparse"),
            extents_hash("dense"),
            "the old scheme followed extents (this test could tell them apart)"
        );
        // Zeroes made by the file system (an unwritten extent, as qemu-img makes).
        match nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&dense),
            nix::fcntl::FallocateFlags::FALLOC_FL_ZERO_RANGE,
            10 << 20,
            50 << 20,
        ) {
            Ok(()) => assert_eq!(first, hash("dense"), "an unwritten extent reads as zeroes"),
            Err(nix::errno::Errno::EOPNOTSUPP) => {}
            Err(e) => panic!("fallocate: {e}"),
        }

        sparse
            .write_all_at(&[6u8], (100 << 20) + 100)
            .expect("write");
        assert_ne!(first, hash("sparse"), "a changed byte");
        sparse
            .write_all_at(&[5u8], (100 << 20) + 100)
            .expect("write");
        assert_eq!(first, hash("sparse"), "the byte restored");
        // The same block's bytes at another place.
        sparse
            .write_all_at(&[0u8; 4096], (200 << 20) + 4096)
            .expect("write");
        sparse
            .write_all_at(&[5u8; 4096], (201 << 20) + 4096)
            .expect("write");
        assert_ne!(first, hash("sparse"), "moved bytes");
        sparse.set_len(300 << 20).expect("grow");
        let grown = hash("sparse");
        assert_ne!(first, grown, "a new length");
        sparse.set_len(300 << 20).expect("same length");
        assert_eq!(grown, hash("sparse"));
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
