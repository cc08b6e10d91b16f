//! Versioned, checksummed metadata files (the `Persist` pattern: plain serde state, never
//! live handles), size-limited when read back.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// Largest metadata file read back.
const MAX_METADATA: u64 = 1 << 20;

/// The body is kept as the exact bytes that were hashed (re-serialising parsed JSON need not
/// reproduce them, e.g. for floats).
#[derive(Serialize, Deserialize)]
struct Envelope {
    version: u32,
    sha256: String,
    body: Box<RawValue>,
}

/// Why a metadata file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Reading or writing failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is damaged, from an unknown version, or tampered with.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Writes `value` to `path` atomically with its version and checksum, and makes it durable
/// (the file and its directory entry reach stable storage before this returns).
pub fn write<T: Serialize>(path: &Path, version: u32, value: &T) -> Result<(), PersistError> {
    write_with(path, version, value, true)
}

/// [`write`] without waiting for stable storage (a host crash may lose it; a daemon crash
/// does not).
pub fn write_unsynced<T: Serialize>(
    path: &Path,
    version: u32,
    value: &T,
) -> Result<(), PersistError> {
    write_with(path, version, value, false)
}

fn write_with<T: Serialize>(
    path: &Path,
    version: u32,
    value: &T,
    durable: bool,
) -> Result<(), PersistError> {
    let io = |source| PersistError::Io {
        path: path.display().to_string(),
        source,
    };
    let body = serde_json::value::to_raw_value(value).map_err(|e| io(std::io::Error::other(e)))?;
    let envelope = Envelope {
        version,
        sha256: hex::encode(Sha256::digest(body.get().as_bytes())),
        body,
    };
    let bytes = serde_json::to_vec_pretty(&envelope).map_err(|e| io(std::io::Error::other(e)))?;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temp).map_err(io)?;
    std::io::Write::write_all(&mut file, &bytes)
        .and_then(|()| if durable { file.sync_all() } else { Ok(()) })
        .map_err(io)?;
    std::fs::rename(&temp, path).map_err(io)?;
    if durable {
        // The rename itself reaches the disk with its directory.
        sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(io)?;
    }
    Ok(())
}

/// Flushes a directory's entries (a file made, renamed or removed in it) to stable storage.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Reads a file written by [`write`], checking size, version and checksum.
pub fn read<T: DeserializeOwned>(path: &Path, version: u32) -> Result<T, PersistError> {
    let name = path.display().to_string();
    let invalid = |reason: String| PersistError::Invalid {
        path: name.clone(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|source| PersistError::Io {
        path: name.clone(),
        source,
    })?;
    if meta.len() > MAX_METADATA {
        return Err(invalid(format!(
            "{} bytes is too large for metadata",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|source| PersistError::Io {
        path: name.clone(),
        source,
    })?;
    let envelope: Envelope =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not valid metadata: {e}")))?;
    if envelope.version != version {
        return Err(invalid(format!(
            "version {} (this kiln reads {version})",
            envelope.version
        )));
    }
    if hex::encode(Sha256::digest(envelope.body.get().as_bytes())) != envelope.sha256 {
        return Err(invalid(
            "checksum mismatch: the file was damaged or modified".into(),
        ));
    }
    serde_json::from_str(envelope.body.get())
        .map_err(|e| invalid(format!("unexpected contents: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        name: String,
        #[serde(default)]
        added_later: u32,
        #[serde(default)]
        timing: f64,
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("meta.json");
        // Floats do not always survive a parse and re-serialisation bit for bit.
        let state = State {
            name: "t".into(),
            added_later: 3,
            timing: 3360.004623,
        };
        write(&path, 1, &state).expect("write");
        assert_eq!(read::<State>(&path, 1).expect("read"), state);
        assert!(matches!(
            read::<State>(&path, 2),
            Err(PersistError::Invalid { .. })
        ));
        let text = std::fs::read_to_string(&path)
            .expect("read")
            .replace("\"t\"", "\"x\"");
        std::fs::write(&path, text).expect("write");
        let err = read::<State>(&path, 1).expect_err("tampered");
        assert!(err.to_string().contains("checksum"), "{err}");
        std::fs::write(&path, vec![b' '; 2 << 20]).expect("write");
        assert!(read::<State>(&path, 1)
            .expect_err("huge")
            .to_string()
            .contains("too large"));
    }
}
