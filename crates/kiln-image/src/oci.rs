//! Container image archives as a root filesystem source.
//!
//! [`unpack_image_archive`] turns a `docker save` archive or an OCI image layout tarball into a
//! root filesystem directory and returns the image's runtime settings ([`ImageConfig`]).
//!
//! # Trust model
//!
//! The archive is hostile. Everything it says is checked before it touches the disk:
//!
//! - **Paths.** Entry paths are normalised by dropping a leading `./`; paths that are absolute
//!   (`/etc/passwd`) or contain a `..` component anywhere are rejected with an error, not
//!   rewritten. Real image layers never contain either, so a layer that does is broken or
//!   malicious and the whole import fails.
//! - **Symlinks.** Symlink targets are stored as written (absolute or dangling): they are only
//!   ever resolved inside the guest. The importer itself never follows a symlink: every parent
//!   component of an entry is checked with `lstat`, and an entry whose parent is a symlink is
//!   rejected, even when the symlink points inside the root filesystem. A symlink at the final
//!   component is replaced, not written through.
//! - **Hard links** must name a file extracted earlier in the root filesystem, under the same
//!   path rules. A hard link to a symlink is recreated as a copy of that symlink (the symlink is
//!   never followed); a hard link to a directory is an error.
//! - **Device nodes and FIFOs** are not created (the guest mounts its own `/dev`): they are
//!   skipped with a debug log, and whatever lower layers had at that path is removed.
//! - **Digests.** Every OCI blob that is read (manifest, config, layers) is checked against its
//!   sha256 digest and size before any layer is applied. In `docker save` archives, files stored
//!   under `blobs/sha256/<hex>` are checked the same way.
//! - **Memory** stays bounded: the archive is spooled once to a temporary directory, layers are
//!   streamed, and JSON documents and tar metadata records are size-limited. The spool lives
//!   in the system temporary directory (`TMPDIR`) and needs as much space as the archive
//!   (after outer decompression).
//!
//! # Layer semantics
//!
//! Layers are applied in manifest order with OCI rules: `.wh.NAME` removes `NAME` from lower
//! layers, `.wh..wh..opq` makes its directory opaque (lower content goes, content from the same
//! layer stays, whatever the order of entries in the tar), and an entry replacing a path of a
//! different type removes the old one first. Modes (including setuid/setgid/sticky bits) and
//! mtimes are preserved; numeric ownership is applied when the process may `chown` and
//! silently skipped otherwise, as are a regular file's capabilities (`security.capability`
//! in a PAX record, which the kernel checks when it is set). Not preserved: symlink mtimes,
//! other extended attributes, and atimes. Sparse entries and PAX size overrides (which no image
//! builder emits) are rejected.
//!
//! The root filesystem must not be modified by anyone else while an import runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tar::EntryType;
use tracing::debug;

/// The PAX record of a file's capabilities, as GNU tar writes it (`--xattrs`).
const CAPABILITY_RECORD: &[u8] = b"SCHILY.xattr.security.capability";

/// Upper bound for any JSON document read from the archive (index, manifest, config).
const MAX_METADATA_BYTES: u64 = 4 << 20;
/// Upper bound for a GNU long name or long link record.
const MAX_LONG_NAME_BYTES: u64 = 64 << 10;
/// Upper bound for a PAX extended header record.
const MAX_PAX_BYTES: u64 = 1 << 20;
/// Upper bound for the number of files in the outer archive.
const MAX_ARCHIVE_FILES: usize = 100_000;
/// How many image indexes may be nested before the manifest.
const MAX_INDEX_DEPTH: usize = 4;
/// How many symlinks or hard links inside the outer archive are followed to reach a file.
const MAX_ARCHIVE_LINK_HOPS: usize = 16;
/// The platform picked from a multi-platform index.
const TARGET_OS: &str = "linux";
const TARGET_ARCH: &str = "amd64";

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
/// aufs bookkeeping (`.wh..wh.plnk`, ...) found in very old Docker layers; never extracted.
const AUFS_METADATA_PREFIX: &[u8] = b".wh..wh.";

/// Runtime settings from the image config (`config` object of the image configuration JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// Environment, in image order; each `KEY=VALUE` string is split at the first `=`
    /// (an entry without `=` becomes `(KEY, "")`).
    pub env: Vec<(String, String)>,
    /// Working directory, `None` when unset or empty.
    pub workdir: Option<String>,
    /// User (`name`, `uid`, `uid:gid`, ...) as written in the image, `None` when unset or empty.
    pub user: Option<String>,
    /// Entrypoint argv; empty when unset.
    pub entrypoint: Vec<String>,
    /// Default arguments; empty when unset.
    pub cmd: Vec<String>,
}

/// Why an image archive could not be unpacked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OciError {
    /// The archive file could not be opened or its compression detected.
    #[error("cannot open image archive `{path}`")]
    OpenArchive {
        /// Archive path as given.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The temporary directory holding the archive's files could not be created or read.
    #[error("cannot use the temporary directory holding the image archive's files")]
    Spool(#[source] io::Error),
    /// The outer archive is not a readable tar stream.
    #[error("cannot read image archive")]
    Archive(#[source] EntryError),
    /// The target root filesystem is not an existing, empty directory.
    #[error("root filesystem `{path}` must be an existing empty directory")]
    RootfsNotEmptyDirectory {
        /// Root filesystem path as given.
        path: PathBuf,
    },
    /// Neither `manifest.json` nor `oci-layout` + `index.json` were found.
    #[error(
        "archive is neither a `docker save` archive (manifest.json) nor an OCI image layout \
         (oci-layout, index.json)"
    )]
    UnknownFormat,
    /// A file the manifest refers to is not in the archive.
    #[error("archive has no file `{name}`")]
    MissingFile {
        /// Path inside the archive.
        name: String,
    },
    /// A JSON document is larger than allowed.
    #[error("`{name}` is {size} bytes, more than the {limit} bytes allowed")]
    TooLarge {
        /// Path inside the archive.
        name: String,
        /// Actual size.
        size: u64,
        /// Allowed size.
        limit: u64,
    },
    /// A JSON document could not be parsed.
    #[error("`{name}` is not valid JSON of the expected shape")]
    Json {
        /// Path inside the archive.
        name: String,
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// `manifest.json` is an empty list.
    #[error("manifest.json lists no images")]
    EmptyDockerManifest,
    /// An image index lists no manifests.
    #[error("image index `{name}` lists no manifests")]
    EmptyIndex {
        /// Path inside the archive.
        name: String,
    },
    /// An image index lists platforms, but not the one kiln runs.
    #[error("image index `{name}` has no {TARGET_OS}/{TARGET_ARCH} manifest")]
    NoMatchingPlatform {
        /// Path inside the archive.
        name: String,
    },
    /// Image indexes nest deeper than allowed.
    #[error("image indexes are nested more than {MAX_INDEX_DEPTH} levels deep")]
    IndexTooDeep,
    /// A manifest has no `config` descriptor.
    #[error("image manifest `{name}` has no config descriptor")]
    ManifestWithoutConfig {
        /// Path inside the archive.
        name: String,
    },
    /// A digest is not `sha256:` followed by 64 lowercase hex digits.
    #[error("unsupported or malformed digest `{digest}` (expected sha256:<64 hex digits>)")]
    BadDigest {
        /// The digest as written.
        digest: String,
    },
    /// A blob's content does not hash to its digest.
    #[error(
        "blob `{name}` does not match its digest: expected sha256:{expected}, got sha256:{actual}"
    )]
    DigestMismatch {
        /// Path inside the archive.
        name: String,
        /// Hex digest from the descriptor or file name.
        expected: String,
        /// Hex digest of the content.
        actual: String,
    },
    /// A blob's size differs from its descriptor.
    #[error("blob `{name}` is {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        /// Path inside the archive.
        name: String,
        /// Size from the descriptor.
        expected: u64,
        /// Size of the content.
        actual: u64,
    },
    /// A layer could not be opened or decompressed.
    #[error("cannot open layer {index} (`{name}`)")]
    OpenLayer {
        /// 0-based position of the layer in the manifest.
        index: usize,
        /// Path inside the archive.
        name: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A layer is malformed, hostile, or could not be written.
    #[error("cannot apply layer {index} (`{name}`)")]
    Layer {
        /// 0-based position of the layer in the manifest.
        index: usize,
        /// Path inside the archive.
        name: String,
        /// What went wrong, naming the entry.
        #[source]
        source: EntryError,
    },
    /// Directory modes and mtimes could not be applied after the last layer.
    #[error("cannot finalise directory metadata in the root filesystem")]
    Finalize(#[source] EntryError),
}

/// A problem with one tar stream or one of its entries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The tar stream is corrupt or truncated, or decompression failed.
    #[error("malformed tar stream")]
    Tar(#[source] io::Error),
    /// A header field (mode, owner, mtime) is unreadable.
    #[error("entry `{path}` has an invalid header")]
    Header {
        /// Entry path.
        path: String,
        /// Parser error.
        #[source]
        source: io::Error,
    },
    /// A PAX header or GNU long name record is larger than allowed.
    #[error("tar metadata record of {size} bytes exceeds the {limit} bytes allowed")]
    MetadataTooLarge {
        /// Declared size.
        size: u64,
        /// Allowed size.
        limit: u64,
    },
    /// A tar feature the importer does not implement.
    #[error("entry `{path}` uses an unsupported tar feature: {feature}")]
    Unsupported {
        /// Entry path.
        path: String,
        /// The feature.
        feature: &'static str,
    },
    /// The outer archive has more files than allowed.
    #[error("archive has more than {limit} files")]
    TooManyFiles {
        /// Allowed number.
        limit: usize,
    },
    /// An absolute path; layers must use paths relative to the root.
    #[error("`{path}` is an absolute path; layer paths must be relative")]
    AbsolutePath {
        /// Path as written.
        path: String,
    },
    /// A path with a `..` component.
    #[error("`{path}` contains a `..` component")]
    ParentDirComponent {
        /// Path as written.
        path: String,
    },
    /// An entry that is not a directory targets the root itself.
    #[error("entry `{path}` targets the root directory")]
    RootEntry {
        /// Path as written.
        path: String,
    },
    /// A whiteout name appears as a directory component.
    #[error("`{path}` uses a whiteout name as a directory")]
    WhiteoutAsDirectory {
        /// Path as written.
        path: String,
    },
    /// `.wh.`, `.wh..` or `.wh...`.
    #[error("malformed whiteout `{path}`")]
    BadWhiteout {
        /// Entry path.
        path: String,
    },
    /// Writing the entry would go through a symlink.
    #[error("entry `{path}` would be written through the symlink `{symlink}`")]
    ThroughSymlink {
        /// Entry path.
        path: String,
        /// The symlink in its way.
        symlink: String,
    },
    /// A parent component exists but is not a directory.
    #[error("entry `{path}` needs `{parent}` to be a directory")]
    ParentNotDirectory {
        /// Entry path.
        path: String,
        /// The non-directory parent.
        parent: String,
    },
    /// A symlink or hard link entry without a link name.
    #[error("link entry `{path}` has no target")]
    MissingLinkTarget {
        /// Entry path.
        path: String,
    },
    /// A uid or gid that does not fit in 32 bits.
    #[error("entry `{path}` has owner id {id}, which does not fit in 32 bits")]
    OwnerOutOfRange {
        /// Entry path.
        path: String,
        /// The id.
        id: u64,
    },
    /// A hard link whose target is not a file extracted earlier.
    #[error("hard link `{path}` points at `{target}`, which is not a file extracted earlier")]
    HardLinkTarget {
        /// Entry path.
        path: String,
        /// Link target as written.
        target: String,
    },
    /// A filesystem operation failed.
    #[error("cannot {op} `{path}`")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// Path relative to the root filesystem (or inside the archive).
        path: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// Unpacks the image archive at `archive` into `rootfs` and returns the image's runtime config.
///
/// The archive is a `docker save` archive or an OCI image layout tarball, plain, gzip- or
/// zstd-compressed; the format is detected from its content. For a multi-platform OCI index,
/// the `linux/amd64` manifest is used. `rootfs` must be an existing empty directory; on error
/// it may hold a partial tree and should be discarded. See the module documentation for the
/// security rules applied to hostile archives.
pub fn unpack_image_archive(archive: &Path, rootfs: &Path) -> Result<ImageConfig, OciError> {
    check_empty_dir(rootfs)?;
    let spool = Spool::read(archive)?;
    let image = if spool.contains("oci-layout") && spool.contains("index.json") {
        debug!(archive = %archive.display(), "reading OCI image layout");
        oci_image(&spool)?
    } else if spool.contains("manifest.json") {
        debug!(archive = %archive.display(), "reading docker save archive");
        docker_image(&spool)?
    } else {
        return Err(OciError::UnknownFormat);
    };
    let config = parse_image_config(&image.config_name, &image.config)?;

    let mut extractor = Extractor::new(rootfs.to_path_buf());
    for (index, (name, layer)) in image.layers.iter().enumerate() {
        debug!(index, layer = %name, "applying layer");
        let open_error = |source| OciError::OpenLayer {
            index,
            name: name.clone(),
            source,
        };
        let file = File::open(&layer.path).map_err(open_error)?;
        let reader = open_decompressed(file).map_err(open_error)?;
        extractor
            .apply_layer(reader)
            .map_err(|source| OciError::Layer {
                index,
                name: name.clone(),
                source,
            })?;
    }
    extractor.finish().map_err(OciError::Finalize)?;
    Ok(config)
}

/// Unpacks a root filesystem tar stream (as `mmdebstrap --format=tar` writes one) into
/// `rootfs`, an existing empty directory, under the same rules as an image's layers (see the
/// module documentation): the stream is not trusted either.
pub fn unpack_rootfs_tar(reader: impl Read, rootfs: &Path) -> Result<(), OciError> {
    check_empty_dir(rootfs)?;
    let mut extractor = Extractor::new(rootfs.to_path_buf());
    extractor
        .apply_layer(BufReader::with_capacity(64 << 10, reader))
        .map_err(|source| OciError::Layer {
            index: 0,
            name: "root filesystem tar".into(),
            source,
        })?;
    extractor.finish().map_err(OciError::Finalize)
}

fn check_empty_dir(rootfs: &Path) -> Result<(), OciError> {
    let not_empty_dir = || OciError::RootfsNotEmptyDirectory {
        path: rootfs.to_path_buf(),
    };
    let mut entries = fs::read_dir(rootfs).map_err(|_| not_empty_dir())?;
    match entries.next() {
        None => Ok(()),
        Some(_) => Err(not_empty_dir()),
    }
}

// ---------------------------------------------------------------------------------------------
// Image formats

/// What the manifest resolves to: a verified config document and the layer files, in order.
struct ResolvedImage<'a> {
    config_name: String,
    config: Vec<u8>,
    layers: Vec<(String, &'a SpooledFile)>,
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

fn docker_image(spool: &Spool) -> Result<ResolvedImage<'_>, OciError> {
    let entries: Vec<DockerManifestEntry> = spool.read_json("manifest.json")?;
    let entry = entries
        .into_iter()
        .next()
        .ok_or(OciError::EmptyDockerManifest)?;
    let config_file = spool.file(&entry.config)?;
    verify_if_content_addressed(&entry.config, config_file)?;
    let config = spool.read_small(&entry.config)?;
    let layers = entry
        .layers
        .into_iter()
        .map(|name| {
            let file = spool.file(&name)?;
            verify_if_content_addressed(&name, file)?;
            Ok((name, file))
        })
        .collect::<Result<_, OciError>>()?;
    Ok(ResolvedImage {
        config_name: entry.config,
        config,
        layers,
    })
}

/// `docker save` archives from Docker 25+ store content under `blobs/sha256/<hex>`; check it.
fn verify_if_content_addressed(name: &str, file: &SpooledFile) -> Result<(), OciError> {
    let Some(hex_digest) = normalize_archive_key(name.as_bytes())
        .as_deref()
        .and_then(|key| key.strip_prefix("blobs/sha256/"))
        .map(str::to_owned)
    else {
        return Ok(());
    };
    if is_sha256_hex(&hex_digest) {
        verify_sha256(name, file, &hex_digest)?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

/// An image index or an image manifest; which one is told by the fields present.
#[derive(Deserialize)]
struct IndexOrManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

fn oci_image(spool: &Spool) -> Result<ResolvedImage<'_>, OciError> {
    let mut name = "index.json".to_owned();
    let mut document: IndexOrManifest = spool.read_json(&name)?;
    let mut depth = 0;
    while let Some(manifests) = &document.manifests {
        if depth == MAX_INDEX_DEPTH {
            return Err(OciError::IndexTooDeep);
        }
        depth += 1;
        let chosen = choose_manifest(&name, manifests)?;
        debug!(
            index = %name,
            digest = %chosen.digest,
            media_type = chosen.media_type.as_deref().unwrap_or("-"),
            "following image index"
        );
        let (blob_name, _) = spool.blob(chosen)?;
        document = spool.read_json(&blob_name)?;
        name = blob_name;
    }
    let config_descriptor = document
        .config
        .as_ref()
        .ok_or_else(|| OciError::ManifestWithoutConfig { name: name.clone() })?;
    let (config_name, _) = spool.blob(config_descriptor)?;
    let config = spool.read_small(&config_name)?;
    let layers = document
        .layers
        .iter()
        .map(|descriptor| spool.blob(descriptor))
        .collect::<Result<_, OciError>>()?;
    Ok(ResolvedImage {
        config_name,
        config,
        layers,
    })
}

/// Picks `linux/amd64` when descriptors name platforms, else the first descriptor.
fn choose_manifest<'d>(
    name: &str,
    manifests: &'d [Descriptor],
) -> Result<&'d Descriptor, OciError> {
    let first = manifests.first().ok_or_else(|| OciError::EmptyIndex {
        name: name.to_owned(),
    })?;
    let is_target =
        |platform: &Platform| platform.os == TARGET_OS && platform.architecture == TARGET_ARCH;
    if let Some(target) = manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(is_target))
    {
        return Ok(target);
    }
    if first.platform.is_none() {
        return Ok(first);
    }
    manifests
        .iter()
        .find(|d| d.platform.is_none())
        .ok_or_else(|| OciError::NoMatchingPlatform {
            name: name.to_owned(),
        })
}

#[derive(Deserialize)]
struct ImageConfigDocument {
    #[serde(default)]
    config: Option<RuntimeConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

fn parse_image_config(name: &str, bytes: &[u8]) -> Result<ImageConfig, OciError> {
    let document: ImageConfigDocument =
        serde_json::from_slice(bytes).map_err(|source| OciError::Json {
            name: name.to_owned(),
            source,
        })?;
    let runtime = document.config.unwrap_or_default();
    let env = runtime
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|entry| match entry.split_once('=') {
            Some((key, value)) => (key.to_owned(), value.to_owned()),
            None => (entry, String::new()),
        })
        .collect();
    let non_empty = |value: Option<String>| value.filter(|v| !v.is_empty());
    Ok(ImageConfig {
        env,
        workdir: non_empty(runtime.working_dir),
        user: non_empty(runtime.user),
        entrypoint: runtime.entrypoint.unwrap_or_default(),
        cmd: runtime.cmd.unwrap_or_default(),
    })
}

fn is_sha256_hex(hex_digest: &str) -> bool {
    hex_digest.len() == 64
        && hex_digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn parse_sha256_digest(digest: &str) -> Result<&str, OciError> {
    digest
        .strip_prefix("sha256:")
        .filter(|hex_digest| is_sha256_hex(hex_digest))
        .ok_or_else(|| OciError::BadDigest {
            digest: digest.to_owned(),
        })
}

fn verify_sha256(name: &str, file: &SpooledFile, expected: &str) -> Result<(), OciError> {
    let actual = hex::encode(file.sha256);
    if actual != expected {
        return Err(OciError::DigestMismatch {
            name: name.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The outer archive, spooled to a temporary directory

/// A regular file of the outer archive, copied to the spool directory.
struct SpooledFile {
    path: PathBuf,
    size: u64,
    sha256: [u8; 32],
}

/// The outer archive, read once: its regular files live in a temporary directory, named by
/// sequence number so that archive paths never become filesystem paths.
struct Spool {
    _dir: tempfile::TempDir,
    files: HashMap<String, SpooledFile>,
    /// Symlinks and hard links inside the archive, as normalised key -> normalised target key.
    aliases: HashMap<String, String>,
}

impl Spool {
    fn read(archive: &Path) -> Result<Self, OciError> {
        let open_error = |source| OciError::OpenArchive {
            path: archive.to_path_buf(),
            source,
        };
        let file = File::open(archive).map_err(open_error)?;
        let reader = open_decompressed(file).map_err(open_error)?;
        let dir = tempfile::Builder::new()
            .prefix("kiln-oci-")
            .tempdir()
            .map_err(OciError::Spool)?;
        let mut files = HashMap::new();
        let mut aliases = HashMap::new();
        let mut count = 0usize;
        for_each_member(reader, |member, data| {
            let Some(key) = normalize_archive_key(&member.path) else {
                return Ok(());
            };
            if member.kind.is_file() || member.kind == EntryType::Continuous {
                count += 1;
                if count > MAX_ARCHIVE_FILES {
                    return Err(EntryError::TooManyFiles {
                        limit: MAX_ARCHIVE_FILES,
                    });
                }
                let path = dir.path().join(count.to_string());
                let file = spool_file(&path, data).map_err(|source| EntryError::Io {
                    op: "buffer",
                    path: key.clone(),
                    source,
                })?;
                aliases.remove(&key);
                files.insert(key, file);
            } else if member.kind.is_symlink() || member.kind.is_hard_link() {
                let target = member.link.as_deref().unwrap_or_default();
                let target = if member.kind.is_symlink() && !target.starts_with(b"/") {
                    let parent = key.rsplit_once('/').map_or("", |(parent, _)| parent);
                    [parent.as_bytes(), b"/", target].concat()
                } else {
                    target.to_vec()
                };
                if let Some(target) = normalize_archive_key(&target) {
                    files.remove(&key);
                    aliases.insert(key, target);
                }
            }
            Ok(())
        })
        .map_err(OciError::Archive)?;
        Ok(Self {
            _dir: dir,
            files,
            aliases,
        })
    }

    fn resolve(&self, name: &str) -> Option<&SpooledFile> {
        let mut key = normalize_archive_key(name.as_bytes())?;
        for _ in 0..=MAX_ARCHIVE_LINK_HOPS {
            if let Some(file) = self.files.get(&key) {
                return Some(file);
            }
            key = self.aliases.get(&key)?.clone();
        }
        None
    }

    fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    fn file(&self, name: &str) -> Result<&SpooledFile, OciError> {
        self.resolve(name).ok_or_else(|| OciError::MissingFile {
            name: name.to_owned(),
        })
    }

    /// Reads a document of at most [`MAX_METADATA_BYTES`].
    fn read_small(&self, name: &str) -> Result<Vec<u8>, OciError> {
        let file = self.file(name)?;
        if file.size > MAX_METADATA_BYTES {
            return Err(OciError::TooLarge {
                name: name.to_owned(),
                size: file.size,
                limit: MAX_METADATA_BYTES,
            });
        }
        let io_error = OciError::Spool;
        let mut bytes = Vec::new();
        File::open(&file.path)
            .map_err(io_error)?
            .take(MAX_METADATA_BYTES)
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        Ok(bytes)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T, OciError> {
        let bytes = self.read_small(name)?;
        serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
            name: name.to_owned(),
            source,
        })
    }

    /// Finds the blob a descriptor points to and checks its digest and size.
    fn blob(&self, descriptor: &Descriptor) -> Result<(String, &SpooledFile), OciError> {
        let hex_digest = parse_sha256_digest(&descriptor.digest)?;
        let name = format!("blobs/sha256/{hex_digest}");
        let file = self.file(&name)?;
        if let Some(expected) = descriptor.size {
            if expected != file.size {
                return Err(OciError::SizeMismatch {
                    name,
                    expected,
                    actual: file.size,
                });
            }
        }
        verify_sha256(&name, file, hex_digest)?;
        Ok((name, file))
    }
}

/// Copies `data` to a new file at `path`, hashing it on the way.
fn spool_file(path: &Path, data: &mut dyn Read) -> io::Result<SpooledFile> {
    struct HashingWriter {
        file: File,
        hasher: Sha256,
    }
    impl Write for HashingWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let written = self.file.write(buf)?;
            self.hasher.update(&buf[..written]);
            Ok(written)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.file.flush()
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let mut writer = HashingWriter {
        file,
        hasher: Sha256::new(),
    };
    let size = io::copy(data, &mut writer)?;
    Ok(SpooledFile {
        path: path.to_path_buf(),
        size,
        sha256: writer.hasher.finalize().into(),
    })
}

/// Normalises a path inside the outer archive to `a/b/c` form: leading `/` and `.` components
/// are dropped, `..` pops a component. `None` for the root or a path escaping it.
fn normalize_archive_key(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let mut parts: Vec<&str> = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

// ---------------------------------------------------------------------------------------------
// Tar streams

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Plain,
    Gzip,
    Zstd,
}

impl Compression {
    fn detect(magic: &[u8]) -> Self {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::Plain
        }
    }
}

/// Wraps `file` in the decompressor its first bytes call for.
fn open_decompressed(mut file: File) -> io::Result<Box<dyn Read>> {
    let mut magic = [0u8; 4];
    let mut filled = 0;
    while filled < magic.len() {
        match file.read(&mut magic[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    file.seek(SeekFrom::Start(0))?;
    let reader = BufReader::with_capacity(64 << 10, file);
    Ok(match Compression::detect(&magic[..filled]) {
        Compression::Plain => Box::new(reader),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
    })
}

/// One tar member with GNU long names and PAX records already folded in. Numeric header
/// fields are parsed on demand: the outer archive does not need them.
struct Member {
    kind: EntryType,
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    header: tar::Header,
    pax_uid: Option<u64>,
    pax_gid: Option<u64>,
    pax_mtime: Option<u64>,
    /// Its file capabilities (the `security.capability` extended attribute).
    capability: Option<Vec<u8>>,
}

impl Member {
    fn header_error(&self) -> impl FnOnce(io::Error) -> EntryError + '_ {
        |source| EntryError::Header {
            path: String::from_utf8_lossy(&self.path).into_owned(),
            source,
        }
    }

    /// Permission bits, including setuid, setgid and sticky.
    fn mode(&self) -> Result<u32, EntryError> {
        Ok(self.header.mode().map_err(self.header_error())? & 0o7777)
    }

    /// Numeric owner and group.
    fn owner(&self) -> Result<(u32, u32), EntryError> {
        let uid = match self.pax_uid {
            Some(uid) => uid,
            None => self.header.uid().map_err(self.header_error())?,
        };
        let gid = match self.pax_gid {
            Some(gid) => gid,
            None => self.header.gid().map_err(self.header_error())?,
        };
        let id = |id: u64| {
            u32::try_from(id).map_err(|_| EntryError::OwnerOutOfRange {
                path: String::from_utf8_lossy(&self.path).into_owned(),
                id,
            })
        };
        Ok((id(uid)?, id(gid)?))
    }

    /// Modification time, `None` when it is not representable.
    fn mtime(&self) -> Result<Option<SystemTime>, EntryError> {
        let seconds = match self.pax_mtime {
            Some(mtime) => mtime,
            None => self.header.mtime().map_err(self.header_error())?,
        };
        Ok(SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds)))
    }
}

/// Extended-header state that applies to the next member.
#[derive(Default)]
struct PendingExtensions {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<u64>,
    capability: Option<Vec<u8>>,
    sparse: bool,
}

impl PendingExtensions {
    fn apply_pax(&mut self, records: &[u8]) -> Result<(), EntryError> {
        for record in tar::PaxExtensions::new(records) {
            let record = record.map_err(EntryError::Tar)?;
            let value = record.value_bytes();
            let number = || {
                let text = std::str::from_utf8(value).ok()?;
                // PAX times may carry a fraction; seconds are enough.
                text.split('.').next()?.parse::<u64>().ok()
            };
            match record.key_bytes() {
                b"path" => self.path = Some(value.to_vec()),
                b"linkpath" => self.link = Some(value.to_vec()),
                b"size" => self.size = number(),
                b"uid" => self.uid = number(),
                b"gid" => self.gid = number(),
                b"mtime" => self.mtime = number(),
                CAPABILITY_RECORD => self.capability = Some(value.to_vec()),
                key if key.starts_with(b"GNU.sparse.") => self.sparse = true,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Reads a metadata record (long name, PAX header) of bounded size.
fn read_bounded(data: &mut dyn Read, size: u64, limit: u64) -> Result<Vec<u8>, EntryError> {
    if size > limit {
        return Err(EntryError::MetadataTooLarge { size, limit });
    }
    let mut bytes = Vec::new();
    data.take(limit)
        .read_to_end(&mut bytes)
        .map_err(EntryError::Tar)?;
    Ok(bytes)
}

fn trim_nuls(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

/// Calls `visit` for every member of the tar stream, in order.
///
/// The tar crate is used in raw mode and long names and PAX records are folded in here, so that
/// their size is bounded (the crate itself reads them into memory whatever their size).
fn for_each_member<R: Read>(
    reader: R,
    mut visit: impl FnMut(&Member, &mut dyn Read) -> Result<(), EntryError>,
) -> Result<(), EntryError> {
    let mut archive = tar::Archive::new(reader);
    let mut pending = PendingExtensions::default();
    for entry in archive.entries().map_err(EntryError::Tar)?.raw(true) {
        let mut entry = entry.map_err(EntryError::Tar)?;
        let kind = entry.header().entry_type();
        let size = entry.size();
        match kind {
            EntryType::GNULongName => {
                let name = read_bounded(&mut entry, size, MAX_LONG_NAME_BYTES)?;
                pending.path = Some(trim_nuls(name));
                continue;
            }
            EntryType::GNULongLink => {
                let name = read_bounded(&mut entry, size, MAX_LONG_NAME_BYTES)?;
                pending.link = Some(trim_nuls(name));
                continue;
            }
            EntryType::XHeader => {
                let records = read_bounded(&mut entry, size, MAX_PAX_BYTES)?;
                pending.apply_pax(&records)?;
                continue;
            }
            EntryType::XGlobalHeader => continue,
            _ => {}
        }

        let extensions = std::mem::take(&mut pending);
        let header = entry.header();
        let path = extensions
            .path
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let display = String::from_utf8_lossy(&path).into_owned();
        if kind == EntryType::GNUSparse || extensions.sparse {
            return Err(EntryError::Unsupported {
                path: display,
                feature: "sparse files",
            });
        }
        if extensions.size.is_some_and(|pax_size| pax_size != size) {
            return Err(EntryError::Unsupported {
                path: display,
                feature: "PAX size override",
            });
        }
        let member = Member {
            kind,
            link: extensions
                .link
                .or_else(|| header.link_name_bytes().map(|link| link.into_owned())),
            header: header.clone(),
            pax_uid: extensions.uid,
            pax_gid: extensions.gid,
            pax_mtime: extensions.mtime,
            capability: extensions.capability,
            path,
        };
        visit(&member, &mut entry)?;
    }
    if pending.path.is_some() || pending.link.is_some() {
        return Err(EntryError::Tar(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "extended header at the end of the archive",
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Layer extraction

/// Turns an entry path into a path relative to the root: a leading `./` is dropped, absolute
/// paths and `..` components are errors. `None` means the root itself.
fn sanitize_entry_path(raw: &[u8]) -> Result<Option<PathBuf>, EntryError> {
    let display = || String::from_utf8_lossy(raw).into_owned();
    let mut relative = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::CurDir => {}
            Component::Normal(part) => relative.push(part),
            Component::RootDir | Component::Prefix(_) => {
                return Err(EntryError::AbsolutePath { path: display() })
            }
            Component::ParentDir => return Err(EntryError::ParentDirComponent { path: display() }),
        }
    }
    Ok((!relative.as_os_str().is_empty()).then_some(relative))
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> EntryError + 'a {
    move |source| EntryError::Io {
        op,
        path: display(path),
        source,
    }
}

/// Mode and mtime of a directory, applied after the last layer so that later writes into the
/// directory neither fail (read-only modes) nor bump its mtime.
struct DirMeta {
    mode: u32,
    mtime: Option<SystemTime>,
}

/// Applies layers to a root filesystem without ever following a symlink in it.
struct Extractor {
    root: PathBuf,
    /// Cleared after the first `chown` the process is not allowed to make.
    apply_ownership: bool,
    /// Directories declared by layer entries, keyed by path relative to the root.
    dirs: BTreeMap<PathBuf, DirMeta>,
}

impl Extractor {
    fn new(root: PathBuf) -> Self {
        Self {
            root,
            apply_ownership: true,
            dirs: BTreeMap::new(),
        }
    }

    fn apply_layer(&mut self, reader: impl Read) -> Result<(), EntryError> {
        // Paths this layer put in place, with all their ancestors: an opaque marker or
        // whiteout must not remove them, whatever the order of entries in the tar.
        let mut touched = HashSet::new();
        for_each_member(reader, |member, data| {
            self.apply_entry(member, data, &mut touched)
        })
    }

    fn apply_entry(
        &mut self,
        member: &Member,
        data: &mut dyn Read,
        touched: &mut HashSet<PathBuf>,
    ) -> Result<(), EntryError> {
        let raw_display = || String::from_utf8_lossy(&member.path).into_owned();
        let Some(rel) = sanitize_entry_path(&member.path)? else {
            if member.kind.is_dir() {
                debug!("skipping root directory entry");
                return Ok(());
            }
            return Err(EntryError::RootEntry {
                path: raw_display(),
            });
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        let parent_names = || parent.components().map(|c| c.as_os_str().as_bytes());
        if parent_names().any(|name| name.starts_with(AUFS_METADATA_PREFIX)) {
            debug!(path = %rel.display(), "ignoring aufs metadata entry");
            return Ok(());
        }
        if parent_names().any(|name| name.starts_with(WHITEOUT_PREFIX)) {
            return Err(EntryError::WhiteoutAsDirectory {
                path: raw_display(),
            });
        }
        let name = rel.file_name().unwrap_or_default().as_bytes();
        if name.starts_with(WHITEOUT_PREFIX) {
            mark_touched(touched, parent);
            return self.apply_whiteout(&rel, touched);
        }
        mark_touched(touched, &rel);

        let kind = member.kind;
        // Pre-POSIX tars mark directories with a trailing slash on a regular-file entry.
        let old_style_dir = kind == EntryType::Regular && member.path.ends_with(b"/");
        if kind.is_dir() || old_style_dir {
            self.make_dir(&rel, member)
        } else if kind.is_file() || kind == EntryType::Continuous {
            self.make_file(&rel, member, data)
        } else if kind.is_symlink() {
            self.make_symlink(&rel, member)
        } else if kind.is_hard_link() {
            self.make_hard_link(&rel, member)
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            debug!(path = %rel.display(), ?kind, "not creating device node or FIFO");
            if self.check_parents(&rel, false)? {
                self.remove_existing(&rel)?;
            }
            Ok(())
        } else {
            debug!(path = %rel.display(), ?kind, "skipping unsupported tar entry type");
            Ok(())
        }
    }

    /// Applies the whiteout file at `rel` (its name starts with `.wh.`).
    fn apply_whiteout(&mut self, rel: &Path, touched: &HashSet<PathBuf>) -> Result<(), EntryError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let name = rel.file_name().unwrap_or_default().as_bytes();
        if name == OPAQUE_WHITEOUT {
            if self.check_parents(rel, false)? {
                self.prune_lower(parent, touched)?;
            }
            return Ok(());
        }
        if name.starts_with(AUFS_METADATA_PREFIX) {
            debug!(path = %rel.display(), "ignoring aufs metadata entry");
            return Ok(());
        }
        let whiteout = &name[WHITEOUT_PREFIX.len()..];
        if matches!(whiteout, b"" | b"." | b"..") {
            return Err(EntryError::BadWhiteout { path: display(rel) });
        }
        let victim = parent.join(OsStr::from_bytes(whiteout));
        if !self.check_parents(&victim, false)? {
            return Ok(());
        }
        if touched.contains(&victim) {
            // Whiteouts only hide lower layers: keep what this layer put there.
            let is_dir = fs::symlink_metadata(self.root.join(&victim)).is_ok_and(|m| m.is_dir());
            if is_dir {
                self.prune_lower(&victim, touched)?;
            }
            return Ok(());
        }
        self.remove_existing(&victim)
    }

    /// Removes everything under the directory `dir` that the current layer did not put there.
    fn prune_lower(&mut self, dir: &Path, touched: &HashSet<PathBuf>) -> Result<(), EntryError> {
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            let full = self.root.join(&dir);
            let children = fs::read_dir(&full)
                .and_then(|entries| entries.collect::<io::Result<Vec<_>>>())
                .map_err(io_error("list", &dir))?;
            for child in children {
                let child_rel = dir.join(child.file_name());
                if touched.contains(&child_rel) {
                    // DirEntry::file_type does not follow symlinks.
                    let file_type = child.file_type().map_err(io_error("inspect", &child_rel))?;
                    if file_type.is_dir() {
                        pending.push(child_rel);
                    }
                } else {
                    self.remove_existing(&child_rel)?;
                }
            }
        }
        Ok(())
    }

    /// Checks every parent component of `rel` without following symlinks; creates missing
    /// directories when `create` is set. Returns whether all parents exist.
    fn check_parents(&self, rel: &Path, create: bool) -> Result<bool, EntryError> {
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        let mut current = self.root.clone();
        let mut current_rel = PathBuf::new();
        for component in parent.components() {
            current.push(component);
            current_rel.push(component);
            match fs::symlink_metadata(&current) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(EntryError::ThroughSymlink {
                        path: display(rel),
                        symlink: display(&current_rel),
                    })
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(EntryError::ParentNotDirectory {
                        path: display(rel),
                        parent: display(&current_rel),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    DirBuilder::new()
                        .mode(0o755)
                        .create(&current)
                        .map_err(io_error("create directory", &current_rel))?;
                }
                Err(e) => return Err(io_error("inspect", &current_rel)(e)),
            }
        }
        Ok(true)
    }

    /// Removes whatever is at `rel` (a whole tree for a directory); never follows a symlink.
    fn remove_existing(&mut self, rel: &Path) -> Result<(), EntryError> {
        let full = self.root.join(rel);
        match fs::symlink_metadata(&full) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("inspect", rel)(e)),
            Ok(meta) if meta.is_dir() => {
                // remove_dir_all does not follow symlinks inside the tree.
                fs::remove_dir_all(&full).map_err(io_error("remove", rel))?;
                self.forget_dirs(rel);
                Ok(())
            }
            Ok(_) => fs::remove_file(&full).map_err(io_error("remove", rel)),
        }
    }

    /// Drops recorded directory metadata for `rel` and everything below it.
    fn forget_dirs(&mut self, rel: &Path) {
        let doomed: Vec<PathBuf> = self
            .dirs
            .range::<Path, _>((Bound::Included(rel), Bound::Unbounded))
            .take_while(|(path, _)| path.starts_with(rel))
            .map(|(path, _)| path.clone())
            .collect();
        for path in doomed {
            self.dirs.remove(&path);
        }
    }

    /// Runs a `chown`; after the first one the process may not make, ownership is skipped.
    fn set_owner(
        &mut self,
        rel: &Path,
        chown: impl FnOnce() -> io::Result<()>,
    ) -> Result<(), EntryError> {
        if !self.apply_ownership {
            return Ok(());
        }
        match chown() {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput
                ) =>
            {
                debug!(path = %rel.display(), error = %e, "cannot set ownership; skipping it from now on");
                self.apply_ownership = false;
                Ok(())
            }
            Err(e) => Err(io_error("set the owner of", rel)(e)),
        }
    }

    fn make_dir(&mut self, rel: &Path, member: &Member) -> Result<(), EntryError> {
        let (uid, gid) = member.owner()?;
        self.check_parents(rel, true)?;
        let full = self.root.join(rel);
        let is_dir = match fs::symlink_metadata(&full) {
            Ok(meta) => meta.is_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_error("inspect", rel)(e)),
        };
        if !is_dir {
            self.remove_existing(rel)?;
            DirBuilder::new()
                .mode(0o755)
                .create(&full)
                .map_err(io_error("create directory", rel))?;
        }
        self.set_owner(rel, || {
            std::os::unix::fs::lchown(&full, Some(uid), Some(gid))
        })?;
        self.dirs.insert(
            rel.to_path_buf(),
            DirMeta {
                mode: member.mode()?,
                mtime: member.mtime()?,
            },
        );
        Ok(())
    }

    fn make_file(
        &mut self,
        rel: &Path,
        member: &Member,
        data: &mut dyn Read,
    ) -> Result<(), EntryError> {
        let (uid, gid) = member.owner()?;
        self.check_parents(rel, true)?;
        self.remove_existing(rel)?;
        // create_new (O_EXCL) never follows a symlink at the final component.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.root.join(rel))
            .map_err(io_error("create", rel))?;
        io::copy(data, &mut file).map_err(io_error("extract", rel))?;
        // chown before chmod: chown clears setuid and setgid bits.
        self.set_owner(rel, || {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
        })?;
        file.set_permissions(Permissions::from_mode(member.mode()?))
            .map_err(io_error("set the mode of", rel))?;
        if let Some(mtime) = member.mtime()? {
            file.set_modified(mtime)
                .map_err(io_error("set the mtime of", rel))?;
        }
        // Last: a chown or chmod would clear it.
        if let Some(capability) = &member.capability {
            self.set_capability(rel, &file, capability)?;
        }
        Ok(())
    }

    /// Gives the file `rel` the capabilities `value` (a `vfs_cap_data` as the kernel takes
    /// it, which it checks); skipped where the process may not.
    fn set_capability(&self, rel: &Path, file: &File, value: &[u8]) -> Result<(), EntryError> {
        use std::os::fd::AsRawFd;
        // SAFETY: the name is NUL-terminated and the value's pointer and length describe a
        // live slice; the descriptor is open for the call's length.
        let set = unsafe {
            nix::libc::fsetxattr(
                file.as_raw_fd(),
                c"security.capability".as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if set == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(nix::libc::EPERM | nix::libc::ENOTSUP) => {
                debug!(path = %rel.display(), error = %e, "cannot set file capabilities; skipping them");
                Ok(())
            }
            _ => Err(io_error("set the capabilities of", rel)(e)),
        }
    }

    fn make_symlink(&mut self, rel: &Path, member: &Member) -> Result<(), EntryError> {
        let (uid, gid) = member.owner()?;
        let target = member
            .link
            .as_deref()
            .ok_or_else(|| EntryError::MissingLinkTarget { path: display(rel) })?;
        self.check_parents(rel, true)?;
        self.remove_existing(rel)?;
        let full = self.root.join(rel);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &full)
            .map_err(io_error("create symlink", rel))?;
        self.set_owner(rel, || {
            std::os::unix::fs::lchown(&full, Some(uid), Some(gid))
        })
    }

    fn make_hard_link(&mut self, rel: &Path, member: &Member) -> Result<(), EntryError> {
        let raw_target = member
            .link
            .as_deref()
            .ok_or_else(|| EntryError::MissingLinkTarget { path: display(rel) })?;
        let bad_target = || EntryError::HardLinkTarget {
            path: display(rel),
            target: String::from_utf8_lossy(raw_target).into_owned(),
        };
        let target = sanitize_entry_path(raw_target)?.ok_or_else(bad_target)?;
        if !self.check_parents(&target, false)? {
            return Err(bad_target());
        }
        let target_full = self.root.join(&target);
        let target_meta = match fs::symlink_metadata(&target_full) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(bad_target()),
            Err(e) => return Err(io_error("inspect", &target)(e)),
        };
        if target_meta.is_dir() {
            return Err(bad_target());
        }
        if target == rel {
            return Ok(());
        }
        self.check_parents(rel, true)?;
        self.remove_existing(rel)?;
        let full = self.root.join(rel);
        if target_meta.file_type().is_symlink() {
            // Never link to (or through) a symlink: recreate it, which the guest cannot tell
            // apart except by inode number.
            let destination = fs::read_link(&target_full).map_err(io_error("read", &target))?;
            std::os::unix::fs::symlink(destination, &full)
                .map_err(io_error("create symlink", rel))?;
            let (uid, gid) = (target_meta.uid(), target_meta.gid());
            return self.set_owner(rel, || {
                std::os::unix::fs::lchown(&full, Some(uid), Some(gid))
            });
        }
        // On Linux, hard_link (linkat without AT_SYMLINK_FOLLOW) links the named inode itself.
        fs::hard_link(&target_full, &full).map_err(io_error("create hard link", rel))
    }

    /// Applies directory modes and mtimes, deepest first.
    fn finish(&mut self) -> Result<(), EntryError> {
        for (rel, meta) in self.dirs.iter().rev() {
            if !self.check_parents(rel, false)? {
                continue;
            }
            let full = self.root.join(rel);
            let lstat = fs::symlink_metadata(&full).map_err(io_error("inspect", rel))?;
            if !lstat.is_dir() {
                continue;
            }
            let dir = File::open(&full).map_err(io_error("open", rel))?;
            let opened = dir.metadata().map_err(io_error("inspect", rel))?;
            if (opened.dev(), opened.ino()) != (lstat.dev(), lstat.ino()) {
                return Err(EntryError::ThroughSymlink {
                    path: display(rel),
                    symlink: display(rel),
                });
            }
            if let Some(mtime) = meta.mtime {
                dir.set_modified(mtime)
                    .map_err(io_error("set the mtime of", rel))?;
            }
            dir.set_permissions(Permissions::from_mode(meta.mode))
                .map_err(io_error("set the mode of", rel))?;
        }
        Ok(())
    }
}

/// Records `path` and its ancestors as put in place by the current layer.
fn mark_touched(touched: &mut HashSet<PathBuf>, path: &Path) {
    for ancestor in path.ancestors() {
        if ancestor.as_os_str().is_empty() || !touched.insert(ancestor.to_path_buf()) {
            // Ancestors of a recorded path are recorded already.
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_are_normalised_or_rejected() {
        let ok = |raw: &str| sanitize_entry_path(raw.as_bytes()).ok().flatten();
        assert_eq!(ok("./usr/bin/"), Some(PathBuf::from("usr/bin")));
        assert_eq!(ok("usr/./bin"), Some(PathBuf::from("usr/bin")));
        assert_eq!(ok(".//etc"), Some(PathBuf::from("etc")));
        assert!(matches!(sanitize_entry_path(b"./"), Ok(None)));
        assert!(matches!(
            sanitize_entry_path(b"/etc/passwd"),
            Err(EntryError::AbsolutePath { .. })
        ));
        assert!(matches!(
            sanitize_entry_path(b"a/../b"),
            Err(EntryError::ParentDirComponent { .. })
        ));
    }

    #[test]
    fn archive_keys_stay_inside_the_archive() {
        assert_eq!(
            normalize_archive_key(b"./a//b/../c").as_deref(),
            Some("a/c")
        );
        assert_eq!(
            normalize_archive_key(b"/manifest.json").as_deref(),
            Some("manifest.json")
        );
        assert_eq!(normalize_archive_key(b"../x"), None);
        assert_eq!(normalize_archive_key(b"./"), None);
    }

    #[test]
    fn digests_must_be_lowercase_sha256() {
        let hex_digest = "a".repeat(64);
        assert!(parse_sha256_digest(&format!("sha256:{hex_digest}")).is_ok());
        assert!(parse_sha256_digest(&format!("sha512:{hex_digest}")).is_err());
        assert!(parse_sha256_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(parse_sha256_digest("sha256:../../etc/passwd").is_err());
    }

    #[test]
    fn compression_is_detected_by_magic() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"usr/"), Compression::Plain);
        assert_eq!(Compression::detect(b""), Compression::Plain);
    }

    #[test]
    fn env_splits_at_first_equals_and_empty_strings_are_unset() -> Result<(), OciError> {
        let config = parse_image_config(
            "config.json",
            br#"{"config":{"Env":["A=b=c","EMPTY=","BARE"],"WorkingDir":"","User":"","Cmd":null}}"#,
        )?;
        assert_eq!(
            config.env,
            vec![
                ("A".to_owned(), "b=c".to_owned()),
                ("EMPTY".to_owned(), String::new()),
                ("BARE".to_owned(), String::new()),
            ]
        );
        assert_eq!(config.workdir, None);
        assert_eq!(config.user, None);
        assert!(config.cmd.is_empty());
        Ok(())
    }

    fn descriptor(platform: Option<(&str, &str)>) -> Descriptor {
        Descriptor {
            media_type: None,
            digest: String::new(),
            size: None,
            platform: platform.map(|(os, architecture)| Platform {
                os: os.to_owned(),
                architecture: architecture.to_owned(),
            }),
        }
    }

    #[test]
    fn manifest_choice_prefers_linux_amd64() -> Result<(), OciError> {
        let manifests = [
            descriptor(Some(("linux", "arm64"))),
            descriptor(Some(("linux", "amd64"))),
        ];
        let chosen = choose_manifest("index.json", &manifests)?;
        assert!(std::ptr::eq(chosen, &manifests[1]));

        let unlabelled = [descriptor(None), descriptor(None)];
        let chosen = choose_manifest("index.json", &unlabelled)?;
        assert!(std::ptr::eq(chosen, &unlabelled[0]));

        let foreign = [descriptor(Some(("linux", "arm64")))];
        assert!(matches!(
            choose_manifest("index.json", &foreign),
            Err(OciError::NoMatchingPlatform { .. })
        ));
        Ok(())
    }
}
