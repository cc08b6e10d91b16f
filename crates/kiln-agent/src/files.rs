//! File operations: streamed read and write (atomic replace), list, stat, mkdir, remove,
//! rename, exists. The guest belongs to the sandbox's user, so paths are not confined; the
//! host-side API decides what a caller may ask for.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kiln_proto::frame::{Frame, FrameKind, DATA_CHUNK};
use kiln_proto::messages::{
    AgentError, ErrorKind, FileReadEvent, FileStat, FileType, FileWriteEnd, FileWriteResponse,
    FileWriteStart, ListResponse,
};
use kiln_proto::stream::{FrameReader, FrameSender};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::users::resolve_user;

/// Most entries one listing returns.
pub const MAX_LIST_ENTRIES: usize = 10_000;

/// Most bytes the entries of one listing take once encoded as JSON. Long paths make entries
/// large, and a listing must reach the host as a truncated answer, never as a body over the
/// host's [`kiln_proto::MAX_JSON_BODY`]; a quarter of that is left for the envelope.
pub const MAX_LIST_BYTES: usize = kiln_proto::MAX_JSON_BODY / 4 * 3;

/// Maps an I/O error on `path` to a typed agent error.
pub fn io_error(path: &Path, e: &io::Error) -> AgentError {
    let kind = match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorKind::PermissionDenied,
        Some(libc::EISDIR) => ErrorKind::IsADirectory,
        Some(libc::ENOTDIR) => ErrorKind::NotADirectory,
        Some(libc::EEXIST) => ErrorKind::AlreadyExists,
        Some(libc::ENOTEMPTY) => ErrorKind::DirectoryNotEmpty,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorKind::NoSpace,
        Some(libc::EINVAL | libc::ENAMETOOLONG | libc::ELOOP) => ErrorKind::InvalidArgument,
        _ => match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            _ => ErrorKind::Io,
        },
    };
    let message = match kind {
        ErrorKind::NotFound => format!("path `{}` does not exist", path.display()),
        _ => format!("{}: {e}", path.display()),
    };
    AgentError::new(kind, message)
}

fn file_type(meta: &std::fs::Metadata) -> FileType {
    let ft = meta.file_type();
    if ft.is_file() {
        FileType::File
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Other
    }
}

fn to_stat(path: &Path, meta: &std::fs::Metadata) -> FileStat {
    let link_target = if meta.file_type().is_symlink() {
        std::fs::read_link(path)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    FileStat {
        path: path.to_string_lossy().into_owned(),
        file_type: file_type(meta),
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        modified_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        link_target,
    }
}

/// Metadata of `path` (symlinks are not followed).
pub async fn stat(path: PathBuf) -> Result<FileStat, AgentError> {
    blocking(move || {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io_error(&path, &e))?;
        Ok(to_stat(&path, &meta))
    })
    .await
}

/// Whether `path` exists (symlinks are not followed).
pub async fn exists(path: PathBuf) -> Result<bool, AgentError> {
    blocking(move || match std::fs::symlink_metadata(&path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(false),
        Err(e) => Err(io_error(&path, &e)),
    })
    .await
}

/// Lists `path` down to `depth` levels (1: the directory's own entries).
pub async fn list(path: PathBuf, depth: u32) -> Result<ListResponse, AgentError> {
    if depth == 0 {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            "depth must be at least 1",
        ));
    }
    blocking(move || {
        let meta = std::fs::metadata(&path).map_err(|e| io_error(&path, &e))?;
        if !meta.is_dir() {
            return Err(AgentError::new(
                ErrorKind::NotADirectory,
                format!("{} is not a directory", path.display()),
            ));
        }
        let mut listing = Listing::default();
        let truncated = walk(&path, depth, &mut listing)?;
        Ok(ListResponse {
            entries: listing.entries,
            truncated,
        })
    })
    .await
}

/// Entries gathered by a listing, bounded by [`MAX_LIST_ENTRIES`] and [`MAX_LIST_BYTES`].
#[derive(Debug, Default)]
struct Listing {
    entries: Vec<FileStat>,
    encoded_bytes: usize,
}

impl Listing {
    /// Adds `entry` if it fits within both limits; returns false if it does not.
    fn try_push(&mut self, entry: FileStat) -> bool {
        if self.entries.len() >= MAX_LIST_ENTRIES {
            return false;
        }
        // Its JSON and the comma before the next one.
        let size = serde_json::to_vec(&entry).map_or(usize::MAX, |json| json.len() + 1);
        if size > MAX_LIST_BYTES - self.encoded_bytes {
            return false;
        }
        self.encoded_bytes += size;
        self.entries.push(entry);
        true
    }
}

/// Depth-first walk; returns whether it stopped at a limit of the listing.
fn walk(dir: &Path, depth: u32, out: &mut Listing) -> Result<bool, AgentError> {
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, &e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    children.sort();
    for child in children {
        // Entries can vanish between readdir and lstat; skip them.
        let Ok(meta) = std::fs::symlink_metadata(&child) else {
            continue;
        };
        if !out.try_push(to_stat(&child, &meta)) {
            return Ok(true);
        }
        if depth > 1 && meta.is_dir() && walk(&child, depth - 1, out)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `mkdir -p path`, giving the directories it creates `mode` and `owner`.
pub async fn mkdir(
    path: PathBuf,
    mode: Option<u32>,
    owner: Option<String>,
) -> Result<(), AgentError> {
    blocking(move || {
        let ids = owner
            .map(|o| resolve_user(Path::new("/"), &o))
            .transpose()?;
        let mut missing = Vec::new();
        let mut cursor = path.as_path();
        loop {
            match std::fs::symlink_metadata(cursor) {
                Ok(meta) if meta.is_dir() => break,
                Ok(_) => {
                    return Err(AgentError::new(
                        ErrorKind::NotADirectory,
                        format!("{} exists and is not a directory", cursor.display()),
                    ))
                }
                Err(_) => missing.push(cursor.to_owned()),
            }
            match cursor.parent() {
                Some(parent) => cursor = parent,
                None => break,
            }
        }
        for dir in missing.iter().rev() {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => continue,
                Err(e) => return Err(io_error(dir, &e)),
            }
            let made = std::fs::File::open(dir).map_err(|e| io_error(dir, &e))?;
            set_owner_then_mode(&made, ids.as_ref(), mode.unwrap_or(0o755), dir)?;
        }
        Ok(())
    })
    .await
}

/// Removes a file, a symlink, an empty directory or (with `recursive`) a directory tree.
pub async fn remove(path: PathBuf, recursive: bool) -> Result<(), AgentError> {
    blocking(move || {
        if path.parent().is_none() {
            return Err(AgentError::new(
                ErrorKind::InvalidArgument,
                "refusing to remove /",
            ));
        }
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io_error(&path, &e))?;
        let result = if meta.is_dir() {
            if recursive {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_dir(&path)
            }
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(|e| io_error(&path, &e))
    })
    .await
}

/// Renames `from` to `to`.
pub async fn rename(from: PathBuf, to: PathBuf) -> Result<(), AgentError> {
    blocking(move || {
        std::fs::symlink_metadata(&from).map_err(|e| io_error(&from, &e))?;
        std::fs::rename(&from, &to).map_err(|e| io_error(&to, &e))
    })
    .await
}

/// Streams `path` from `offset` (at most `limit` bytes) into `out` as frames.
pub async fn read_to(path: PathBuf, offset: u64, limit: Option<u64>, out: FrameSender) {
    let event = match read_inner(&path, offset, limit, &out).await {
        Ok(Some(sent)) => FileReadEvent::End { sent },
        Ok(None) => return,
        Err(e) => FileReadEvent::Error(e),
    };
    // If the host went away there is nobody left to tell.
    let _ = out.send(&Frame::control(&event)).await;
}

/// `Ok(None)` when the host stopped reading.
async fn read_inner(
    path: &Path,
    offset: u64,
    limit: Option<u64>,
    out: &FrameSender,
) -> Result<Option<u64>, AgentError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| io_error(path, &e))?;
    let meta = file.metadata().await.map_err(|e| io_error(path, &e))?;
    if meta.is_dir() {
        return Err(AgentError::new(
            ErrorKind::IsADirectory,
            format!("{} is a directory", path.display()),
        ));
    }
    if offset > 0 {
        file.seek(io::SeekFrom::Start(offset))
            .await
            .map_err(|e| io_error(path, &e))?;
    }
    if out
        .send(&Frame::control(&FileReadEvent::Opened { size: meta.len() }))
        .await
        .is_err()
    {
        return Ok(None);
    }
    let mut remaining = limit.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    let mut buf = vec![0u8; DATA_CHUNK];
    while remaining > 0 {
        let want = usize::try_from(remaining.min(DATA_CHUNK as u64)).unwrap_or(DATA_CHUNK);
        let n = file
            .read(&mut buf[..want])
            .await
            .map_err(|e| io_error(path, &e))?;
        if n == 0 {
            break;
        }
        let frame = Frame::new(FrameKind::Data, Bytes::copy_from_slice(&buf[..n]));
        if out.send(&frame).await.is_err() {
            return Ok(None);
        }
        sent += n as u64;
        remaining -= n as u64;
    }
    Ok(Some(sent))
}

/// Receives a file write stream; the target is replaced only when the stream completes with
/// a matching size. A temporary file next to the target is removed on any failure.
pub async fn write_from<B>(
    mut frames: FrameReader<B>,
    resolve: impl FnOnce(&FileWriteStart) -> Result<(PathBuf, Option<String>), AgentError>,
) -> Result<FileWriteResponse, AgentError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let bad = |m: String| AgentError::new(ErrorKind::InvalidRequest, m);
    let start: FileWriteStart = match frames.next().await.map_err(|e| bad(e.to_string()))? {
        Some(frame) => frame.parse_control().map_err(|e| bad(e.to_string()))?,
        None => return Err(bad("empty write stream".into())),
    };
    let (path, owner) = resolve(&start)?;
    // A path that ends in `/`, `.` or `..` names a directory, never a file to write.
    let file_name = path
        .file_name()
        .ok_or_else(|| {
            AgentError::new(
                ErrorKind::IsADirectory,
                format!("{} is a directory", path.display()),
            )
        })?
        .to_owned();
    let parent = path.parent().unwrap_or(Path::new("/")).to_owned();
    if start.create_parents {
        mkdir(parent.clone(), None, owner.clone()).await?;
    }
    let existing = tokio::fs::metadata(&path).await.ok();
    if existing.as_ref().is_some_and(|meta| meta.is_dir()) {
        return Err(AgentError::new(
            ErrorKind::IsADirectory,
            format!("{} is a directory", path.display()),
        ));
    }
    let mode = match start.mode {
        Some(mode) => mode & 0o7777,
        None => existing.map_or(0o644, |meta| meta.mode() & 0o7777),
    };
    let ids = owner
        .map(|o| resolve_user(Path::new("/"), &o))
        .transpose()?;

    // The temporary file is made, renamed and (on failure) removed relative to the parent
    // directory's descriptor: its path may pass PATH_MAX when the target's is near it, and
    // the directory cannot be swapped for another between the steps.
    let dir = std::sync::Arc::new(
        blocking({
            let parent = parent.clone();
            move || std::fs::File::open(&parent).map_err(|e| io_error(&parent, &e))
        })
        .await?,
    );
    let temp = temp_name(&file_name, rand::random());
    let file = blocking({
        let (dir, temp, path) = (dir.clone(), temp.clone(), path.clone());
        move || {
            use nix::fcntl::OFlag;
            nix::fcntl::openat(
                Some(dir.as_raw_fd()),
                temp.as_os_str(),
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            // SAFETY: openat returned a new descriptor that nothing else owns.
            .map(|fd| unsafe { std::fs::File::from_raw_fd(fd) })
            .map_err(|e| io_error(&path, &io::Error::from(e)))
        }
    })
    .await?;
    let guard = TempFile(Some((dir.clone(), temp.clone())));
    let mut file = tokio::fs::File::from_std(file);
    let mut written = 0u64;
    let end: FileWriteEnd = loop {
        let frame = frames
            .next()
            .await
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("write stream ended without its end frame".into()))?;
        match frame.kind {
            FrameKind::Data => {
                file.write_all(&frame.payload)
                    .await
                    .map_err(|e| io_error(&path, &e))?;
                written += frame.payload.len() as u64;
            }
            FrameKind::Control => break frame.parse_control().map_err(|e| bad(e.to_string()))?,
            other => return Err(bad(format!("unexpected {other:?} frame in a write stream"))),
        }
    };
    if end.size != written {
        return Err(bad(format!(
            "size mismatch: {written} bytes received, {} announced",
            end.size
        )));
    }
    file.flush().await.map_err(|e| io_error(&path, &e))?;
    file.sync_all().await.map_err(|e| io_error(&path, &e))?;
    let file = file.into_std().await;
    blocking(move || {
        set_owner_then_mode(&file, ids.as_ref(), mode, &path)?;
        drop(file);
        nix::fcntl::renameat(
            Some(dir.as_raw_fd()),
            temp.as_os_str(),
            Some(dir.as_raw_fd()),
            file_name.as_os_str(),
        )
        .map_err(|e| io_error(&path, &io::Error::from(e)))?;
        guard.disarm();
        // Make the rename durable; a failure here does not undo the write.
        let _ = dir.sync_all();
        Ok(())
    })
    .await?;
    Ok(FileWriteResponse { size: written })
}

/// The name of the temporary file an upload to `file_name` is written to: hidden, beside it,
/// and (cut short for a long name) within the 255 bytes a name may have.
fn temp_name(file_name: &std::ffi::OsStr, suffix: u64) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let tail = format!(".kiln-{suffix:016x}");
    let room = 255 - 1 - tail.len();
    let name = file_name.as_bytes();
    let mut temp = Vec::with_capacity(255);
    temp.push(b'.');
    temp.extend_from_slice(&name[..name.len().min(room)]);
    temp.extend_from_slice(tail.as_bytes());
    std::ffi::OsString::from_vec(temp)
}

/// Removes a temporary file (a name in a directory) on drop unless disarmed.
struct TempFile(Option<(std::sync::Arc<std::fs::File>, std::ffi::OsString)>);

impl TempFile {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some((dir, name)) = self.0.take() {
            let _ = nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                name.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::new(ErrorKind::Internal, format!("file task failed: {e}")))?
}

/// Gives the open file or directory `target` its owner (if any), then its mode: in this
/// order, because a chown clears the setuid and setgid bits the mode may set. Errors name
/// `shown` (the path the caller asked for, when `target` is a temporary file beside it).
fn set_owner_then_mode(
    target: &std::fs::File,
    ids: Option<&crate::users::UserIds>,
    mode: u32,
    shown: &Path,
) -> Result<(), AgentError> {
    if let Some(ids) = ids {
        std::os::unix::fs::fchown(target, Some(ids.uid), Some(ids.gid))
            .map_err(|e| io_error(shown, &e))?;
    }
    target
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error(shown, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mkdir_list_stat_rename_remove() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_owned();
        mkdir(root.join("a/b/c"), Some(0o700), None)
            .await
            .expect("mkdir -p");
        mkdir(root.join("a/b/c"), None, None)
            .await
            .expect("mkdir -p is idempotent");
        std::fs::write(root.join("a/b/file"), b"12345").expect("write");
        let st = stat(root.join("a/b/file")).await.expect("stat");
        assert_eq!((st.file_type, st.size), (FileType::File, 5));
        assert_eq!(stat(root.join("a/b/c")).await.expect("stat").mode, 0o700);

        let shallow = list(root.join("a"), 1).await.expect("list");
        assert_eq!(shallow.entries.len(), 1);
        let deep = list(root.join("a"), 3).await.expect("list");
        let names: Vec<_> = deep
            .entries
            .iter()
            .map(|e| e.path.trim_start_matches(root.to_str().expect("utf8")))
            .collect();
        assert_eq!(names, ["/a/b", "/a/b/c", "/a/b/file"]);

        rename(root.join("a/b/file"), root.join("a/moved"))
            .await
            .expect("rename");
        assert!(!exists(root.join("a/b/file")).await.expect("exists"));
        assert!(exists(root.join("a/moved")).await.expect("exists"));

        assert_eq!(
            remove(root.join("a"), false).await.map_err(|e| e.kind),
            Err(ErrorKind::DirectoryNotEmpty)
        );
        remove(root.join("a"), true).await.expect("rm -r");
        assert!(!exists(root.join("a")).await.expect("exists"));
    }

    #[test]
    fn temporary_names_fit_a_long_name() {
        use std::os::unix::ffi::OsStrExt;
        let long = "n".repeat(255);
        let temp = temp_name(std::ffi::OsStr::new(&long), 7);
        assert_eq!(temp.as_bytes().len(), 255);
        assert!(temp.as_bytes().starts_with(b".nnn"));
        assert_eq!(
            temp_name(std::ffi::OsStr::new("f"), 1),
            ".f.kiln-0000000000000001"
        );
    }

    #[tokio::test]
    async fn errors_are_typed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        assert_eq!(
            stat(dir.path().join("nope")).await.map_err(|e| e.kind),
            Err(ErrorKind::NotFound)
        );
        assert_eq!(
            list(file.clone(), 1).await.map_err(|e| e.kind),
            Err(ErrorKind::NotADirectory)
        );
        assert_eq!(
            mkdir(file.join("sub"), None, None)
                .await
                .map_err(|e| e.kind),
            Err(ErrorKind::NotADirectory)
        );
        assert_eq!(
            list(dir.path().into(), 0).await.map_err(|e| e.kind),
            Err(ErrorKind::InvalidArgument)
        );
        assert_eq!(
            remove("/".into(), true).await.map_err(|e| e.kind),
            Err(ErrorKind::InvalidArgument)
        );
    }
}
