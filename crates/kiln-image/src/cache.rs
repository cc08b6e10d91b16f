//! The artefact cache: every built artefact (kernel, initramfs, root filesystem) lives under
//! `<root>/<kind>/<key>/`, where the key is a hash of every input that went into it.
//!
//! An artefact is built in a temporary directory beside its final place and renamed into it
//! once complete, so a crash mid-build never leaves a half-built artefact that looks valid.
//! A lock file per key keeps two builders from doing the same work at once.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Default cache root.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/kiln";

/// Version of the image builder; part of every key, bumped when its output changes.
pub const BUILDER_VERSION: &str = "1";

/// Name of the file that marks a complete artefact and records its inputs.
const MANIFEST: &str = "manifest.json";

/// Collects the inputs of an artefact and hashes them into its key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inputs {
    entries: Vec<(String, String)>,
}

impl Inputs {
    /// Starts a key for an artefact of `kind`; the builder version is always included.
    pub fn new(kind: &str) -> Inputs {
        Inputs::for_builder(kind, BUILDER_VERSION)
    }

    /// Starts a key for an artefact of `kind` made by builder version `builder`.
    fn for_builder(kind: &str, builder: &str) -> Inputs {
        let mut inputs = Inputs::default();
        inputs.add("kind", kind);
        inputs.add("builder", builder);
        inputs
    }

    /// Adds a named input; its value is recorded in the manifest.
    pub fn add(&mut self, name: &str, value: impl Into<String>) -> &mut Inputs {
        self.entries.push((name.to_owned(), value.into()));
        self
    }

    /// Adds a named input by the SHA-256 of `bytes`.
    pub fn add_bytes(&mut self, name: &str, bytes: &[u8]) -> &mut Inputs {
        self.add(name, sha256_hex(bytes))
    }

    /// Adds a file's contents (by hash) as an input.
    pub fn add_file(&mut self, name: &str, path: &Path) -> io::Result<&mut Inputs> {
        Ok(self.add(name, sha256_file(path)?))
    }

    /// The key: a SHA-256 over every name and value, length-prefixed so no two input lists
    /// collide. Shortened to 32 hex characters for path names.
    pub fn key(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, value) in &self.entries {
            for part in [name, value] {
                hasher.update((part.len() as u64).to_le_bytes());
                hasher.update(part.as_bytes());
            }
        }
        hex::encode(hasher.finalize())[..32].to_owned()
    }

    /// The recorded inputs.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of a file's contents, hex; streams the file.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// What the manifest of a complete artefact records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub version: u32,
    /// The key.
    pub key: String,
    /// Everything that went into the key.
    pub inputs: Inputs,
    /// Seconds the build took.
    pub build_secs: f64,
}

/// Whether an artefact came from the cache or was just built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Found complete in the cache.
    Cached,
    /// Built now.
    Built,
}

/// A content-addressed artefact store.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// Makes a freshly built artefact immutable and readable: its files 0444, its directory 0755.
/// VMMs read kernels, initramfs and root filesystems through read-only binds in their jails
/// with their own rights; nobody else gets that far, since the cache root is root's alone.
fn seal_artefact(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o444))?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

impl Cache {
    /// A cache rooted at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the artefact of `kind` with `inputs` lives (complete or not).
    pub fn path(&self, kind: &str, inputs: &Inputs) -> PathBuf {
        self.root.join(kind).join(inputs.key())
    }

    /// Returns the artefact's directory, building it with `build` first if it is not cached.
    /// `build` fills the directory it is given; on error nothing is published.
    pub fn get_or_build<E>(
        &self,
        kind: &str,
        inputs: &Inputs,
        build: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(PathBuf, Origin), E>
    where
        E: From<io::Error>,
    {
        let dir = self.root.join(kind);
        std::fs::create_dir_all(&dir)?;
        // Root's alone: artefacts hold tenants' files, env and start commands. VMMs see the
        // ones they need through binds in their jails, never through this directory.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))?;
        }
        let key = inputs.key();
        let target = dir.join(&key);
        if target.join(MANIFEST).is_file() {
            return Ok((target, Origin::Cached));
        }
        let lock_file = File::create(dir.join(format!("{key}.lock")))?;
        let _lock =
            Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
        // Someone else may have built it while this builder waited for the lock.
        if target.join(MANIFEST).is_file() {
            return Ok((target, Origin::Cached));
        }
        if target.exists() {
            // Left over from an interrupted publish; it has no manifest, so it is not valid.
            std::fs::remove_dir_all(&target)?;
        }
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{key}-"))
            .tempdir_in(&dir)?;
        let started = std::time::Instant::now();
        build(staging.path())?;
        seal_artefact(staging.path())?;
        let manifest = Manifest {
            version: 1,
            key: key.clone(),
            inputs: inputs.clone(),
            build_secs: started.elapsed().as_secs_f64(),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
        std::fs::write(staging.path().join(MANIFEST), json)?;
        let staged = staging.keep();
        std::fs::rename(&staged, &target)?;
        Ok((target, Origin::Built))
    }

    /// The lock file of the artefact at `artefact`, if it is one of this cache's.
    fn lock_of(&self, artefact: &Path) -> io::Result<PathBuf> {
        let (Some(key), Some(kind_dir)) = (
            artefact.file_name().and_then(|k| k.to_str()),
            artefact.parent(),
        ) else {
            return Err(not_an_artefact(artefact));
        };
        if kind_dir.parent() != Some(self.root.as_path())
            || key.is_empty()
            || !key.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(not_an_artefact(artefact));
        }
        Ok(kind_dir.join(format!("{key}.lock")))
    }

    /// Keeps the complete artefact at `artefact` from being removed while the hold lives
    /// (builds and other holds go on); `None` if it is not there (removed since it was
    /// returned: build it again).
    pub fn hold(&self, artefact: &Path) -> io::Result<Option<ArtefactHold>> {
        let lock_file = File::create(self.lock_of(artefact)?)?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockShared).map_err(|(_, e)| io::Error::from(e))?;
        Ok(artefact
            .join(MANIFEST)
            .is_file()
            .then_some(ArtefactHold { _lock: lock }))
    }

    /// Removes the artefact at `artefact` (a directory [`Cache::get_or_build`] returned)
    /// unless `keep` says otherwise, asked once builds of the same key and holds on it are
    /// over; returns whether it removed one. A path that is not an artefact of this cache is
    /// refused.
    pub fn remove_unless(&self, artefact: &Path, keep: impl FnOnce() -> bool) -> io::Result<bool> {
        let lock_file = File::create(self.lock_of(artefact)?)?;
        let _lock =
            Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
        if keep() {
            return Ok(false);
        }
        let (Some(kind_dir), Some(key)) = (artefact.parent(), artefact.file_name()) else {
            return Err(not_an_artefact(artefact));
        };
        match std::fs::symlink_metadata(artefact) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
            Ok(meta) if !meta.is_dir() => return Err(not_an_artefact(artefact)),
            Ok(_) => {}
        }
        // Unpublished first (no manifest: not valid to a reader that looks now), then gone;
        // what an interrupted removal left goes first.
        let doomed = kind_dir.join(format!(".{}-removing", key.to_string_lossy()));
        match std::fs::remove_dir_all(&doomed) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::rename(artefact, &doomed)?;
        std::fs::remove_dir_all(&doomed)?;
        Ok(true)
    }

    /// Reads the manifest of a complete artefact.
    pub fn manifest(artefact: &Path) -> io::Result<Manifest> {
        let bytes = std::fs::read(artefact.join(MANIFEST))?;
        if bytes.len() > 1 << 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "manifest too large",
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// An artefact kept from removal ([`Cache::hold`]).
#[derive(Debug)]
pub struct ArtefactHold {
    _lock: Flock<File>,
}

fn not_an_artefact(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{} is not an artefact of this cache", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artefacts_are_removed_and_nothing_else_is() {
        let dir = tempfile::tempdir().expect("dir");
        let cache = Cache::new(dir.path().join("cache"));
        let mut inputs = Inputs::new("rootfs");
        inputs.add("spec", "x");
        let (artefact, origin) = cache
            .get_or_build("rootfs", &inputs, |out| {
                std::fs::write(out.join("file"), b"content")
            })
            .expect("built");
        assert_eq!(origin, Origin::Built);
        // Kept while held, or while the caller says so.
        let hold = cache.hold(&artefact).expect("hold").expect("there");
        let (tx, rx) = std::sync::mpsc::channel();
        let remover = {
            let (cache, artefact) = (cache.clone(), artefact.clone());
            std::thread::spawn(move || {
                let removed = cache.remove_unless(&artefact, || false);
                tx.send(()).expect("send");
                removed
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "removed under a hold"
        );
        assert!(artefact.join(MANIFEST).is_file());
        drop(hold);
        assert!(remover.join().expect("thread").expect("removed"));
        assert!(!artefact.exists());
        assert!(
            cache.hold(&artefact).expect("hold").is_none(),
            "nothing to hold"
        );
        assert!(!cache
            .remove_unless(&artefact, || false)
            .expect("gone already"));
        // Built again from nothing after.
        let (_, origin) = cache
            .get_or_build("rootfs", &inputs, |out| {
                std::fs::write(out.join("file"), b"content")
            })
            .expect("built");
        assert_eq!(origin, Origin::Built);
        assert!(!cache.remove_unless(&artefact, || true).expect("kept"));
        assert!(artefact.join(MANIFEST).is_file());
        let outside = dir.path().join("elsewhere");
        std::fs::create_dir_all(outside.join("rootfs/abc")).expect("mkdir");
        for path in [
            outside.join("rootfs/abc"),
            dir.path().join("cache/rootfs"),
            dir.path().join("cache/rootfs/../rootfs/abc"),
            dir.path().join("cache/rootfs/.abc-removing"),
            dir.path().join("cache"),
        ] {
            let refused = cache.remove_unless(&path, || false);
            assert!(
                refused
                    .as_ref()
                    .is_err_and(|e| e.kind() == io::ErrorKind::InvalidInput),
                "{}: {refused:?}",
                path.display()
            );
        }
        assert!(outside.join("rootfs/abc").is_dir());
    }

    #[test]
    fn key_changes_with_every_input_and_is_unambiguous() {
        let mut a = Inputs::new("rootfs");
        a.add("spec", "x").add("agent", "y");
        let mut b = Inputs::new("rootfs");
        b.add("spec", "x").add("agent", "z");
        assert_ne!(a.key(), b.key());
        let mut c = Inputs::new("rootfs");
        c.add("spec", "xa").add("gent", "y");
        assert_ne!(a.key(), c.key(), "length prefixes keep boundaries apart");
        assert_ne!(Inputs::new("kernel").key(), Inputs::new("rootfs").key());
        assert_eq!(a.key(), a.clone().key());
    }

    /// A new builder version (bumped when the builder's output changes) rebuilds everything.
    #[test]
    fn builder_version_is_part_of_every_key() {
        let current = Inputs::new("rootfs");
        assert!(current
            .entries()
            .contains(&("builder".to_owned(), BUILDER_VERSION.to_owned())));
        assert_eq!(
            current.key(),
            Inputs::for_builder("rootfs", BUILDER_VERSION).key()
        );
        assert_ne!(
            current.key(),
            Inputs::for_builder("rootfs", &format!("{BUILDER_VERSION}.next")).key()
        );
    }

    #[test]
    fn builds_once_then_serves_from_cache() {
        let root = tempfile::tempdir().expect("temp dir");
        let cache = Cache::new(root.path());
        let mut inputs = Inputs::new("thing");
        inputs.add("v", "1");
        let mut builds = 0;
        let (path, origin) = cache
            .get_or_build::<io::Error>("thing", &inputs, |dir| {
                builds += 1;
                std::fs::write(dir.join("out"), b"data")
            })
            .expect("build");
        assert_eq!(origin, Origin::Built);
        assert_eq!(std::fs::read(path.join("out")).expect("read"), b"data");
        let (again, origin) = cache
            .get_or_build::<io::Error>("thing", &inputs, |_| panic!("must not rebuild"))
            .expect("cached");
        assert_eq!((again, origin, builds), (path.clone(), Origin::Cached, 1));
        assert_eq!(Cache::manifest(&path).expect("manifest").inputs, inputs);
    }

    #[test]
    fn failed_build_publishes_nothing() {
        let root = tempfile::tempdir().expect("temp dir");
        let cache = Cache::new(root.path());
        let inputs = Inputs::new("thing");
        let result = cache.get_or_build("thing", &inputs, |dir| {
            std::fs::write(dir.join("half"), b"x")?;
            Err(io::Error::other("boom"))
        });
        assert!(result.is_err());
        assert!(!cache.path("thing", &inputs).exists());
        let leftovers: Vec<_> = std::fs::read_dir(root.path().join("thing"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| !n.to_string_lossy().ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
    }
}
