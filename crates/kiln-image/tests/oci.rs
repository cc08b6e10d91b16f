//! Image archive import: `docker save` and OCI layouts built in the test, layer semantics,
//! digest checks, and hostile archives that try to write outside the root filesystem.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_image::oci::{unpack_image_archive, unpack_rootfs_tar, EntryError, ImageConfig, OciError};
use proptest::prelude::*;
use serde_json::json;
use tar::{EntryType, Header};

mod common;

use common::{
    file_capability, gzip, outer_tar, sha256_hex, zstd, Layer, OciLayout, INDEX_MEDIA_TYPE, MTIME,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------------------------
// Archive builders

fn image_config_json() -> serde_json::Value {
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello=world"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "Entrypoint": ["/usr/bin/tool"],
            "Cmd": ["--serve", "8080"],
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    })
}

fn expected_image_config() -> ImageConfig {
    ImageConfig {
        env: vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("GREETING".into(), "hello=world".into()),
        ],
        workdir: Some("/srv".into()),
        user: Some("1000:1000".into()),
        entrypoint: vec!["/usr/bin/tool".into()],
        cmd: vec!["--serve".into(), "8080".into()],
    }
}

/// A `docker save` archive: `manifest.json`, a config, and one file per layer.
fn docker_archive(layers: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let config = serde_json::to_vec(&image_config_json()).expect("a JSON value serialises");
    let config_name = format!("{}.json", sha256_hex(&config));
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": ["kiln/test:latest"],
        "Layers": layers.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
    }]);
    let mut files = vec![
        (
            "manifest.json".to_owned(),
            serde_json::to_vec(&manifest).expect("a JSON value serialises"),
        ),
        (config_name, config),
    ];
    files.extend(
        layers
            .iter()
            .map(|(name, data)| ((*name).to_owned(), data.clone())),
    );
    outer_tar(&files)
}

/// A scratch area: `root/` (empty rootfs), `outside/` (must stay untouched), and the archive.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Result<Self, std::io::Error> {
        let dir = tempfile::tempdir()?;
        fs::create_dir(dir.path().join("root"))?;
        fs::create_dir(dir.path().join("outside"))?;
        Ok(Self { dir })
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    fn unpack(&self, archive: &[u8]) -> Result<ImageConfig, OciError> {
        let path = self.dir.path().join("image.tar");
        fs::write(&path, archive).expect("the scratch directory is writable");
        unpack_image_archive(&path, &self.root())
    }

    fn outside_entries(&self) -> Vec<String> {
        list_dir(&self.outside())
    }
}

fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("test directories exist")
        .map(|entry| {
            entry
                .expect("listing a test directory")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Every path under `root` described as `dir MODE`, `file MODE CONTENT` or `symlink TARGET`.
fn snapshot(root: &Path) -> Result<BTreeMap<String, String>, std::io::Error> {
    let mut tree = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)?;
            let rel = path
                .strip_prefix(root)
                .expect("walked paths are under the root")
                .to_string_lossy()
                .into_owned();
            let mode = meta.permissions().mode() & 0o7777;
            let description = if meta.file_type().is_symlink() {
                format!("symlink {}", fs::read_link(&path)?.display())
            } else if meta.is_dir() {
                pending.push(path);
                format!("dir {mode:o}")
            } else if meta.is_file() {
                format!("file {mode:o} {}", fs::read_to_string(&path)?)
            } else {
                "special".to_owned()
            };
            tree.insert(rel, description);
        }
    }
    Ok(tree)
}

fn tree(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(path, description)| ((*path).to_owned(), (*description).to_owned()))
        .collect()
}

/// Whether this process may `chown` (creates a file and looks at its owner).
fn running_as_root(scratch: &Scratch) -> bool {
    let probe = scratch.dir.path().join("probe");
    fs::write(&probe, b"").expect("the scratch directory is writable");
    let root = fs::metadata(&probe).map(|m| m.uid() == 0).unwrap_or(false);
    fs::remove_file(&probe).expect("the probe file was just created");
    root
}

fn layer_error(result: Result<ImageConfig, OciError>) -> EntryError {
    match result {
        Err(OciError::Layer { source, .. }) => source,
        other => panic!("expected a layer error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. docker save

fn docker_layers() -> Vec<(&'static str, Vec<u8>)> {
    let base = Layer::new()
        .dir("./", 0o755)
        .dir("./etc/", 0o755)
        .file("./etc/hostname", 0o644, "base\n")
        .file("./etc/motd", 0o644, "old motd\n")
        .file("./etc/remove-me", 0o644, "doomed\n")
        .owned_file("./etc/owned", 0o640, 1234, "owned\n")
        .dir("./opt/", 0o755)
        .dir("./opt/tree/", 0o755)
        .file("./opt/tree/a", 0o644, "a\n")
        .dir("./opt/tree/sub/", 0o755)
        .file("./opt/tree/sub/b", 0o644, "b\n")
        .dir("./var/", 0o755)
        .dir("./var/cache/", 0o750)
        .file("./var/cache/old1", 0o644, "lower\n")
        .dir("./var/cache/olddir/", 0o755)
        .file("./var/cache/olddir/x", 0o644, "lower x\n")
        .dir("./usr/", 0o755)
        .dir("./usr/bin/", 0o755)
        .file("./usr/bin/tool", 0o4755, "#!tool\n")
        .fifo("./dev-fifo")
        .file("./swap", 0o644, "a file first\n")
        .dir("./dirthenfile/", 0o755)
        .file("./dirthenfile/child", 0o644, "child\n")
        .bytes();
    let middle = Layer::new()
        .file("./etc/motd", 0o600, "new motd\n")
        .file("./etc/.wh.remove-me", 0o644, "")
        .file("./opt/.wh.tree", 0o644, "")
        .dir("./swap/", 0o755)
        .file("./swap/inside", 0o644, "inside\n")
        .hard_link("./usr/bin/tool-link", "./usr/bin/tool")
        .symlink("./usr/bin/rel", "tool")
        .symlink("./etc/abs", "/usr/bin/tool")
        .symlink("./etc/dangling", "/nonexistent/x")
        .bytes();
    let top = Layer::new()
        .file("./var/cache/new-before", 0o644, "before\n")
        .dir("./var/cache/olddir/", 0o700)
        .file("./var/cache/olddir/y", 0o644, "upper y\n")
        .file("./var/cache/.wh..wh..opq", 0o644, "")
        .file("./var/cache/new-after", 0o644, "after\n")
        .file("./dirthenfile", 0o644, "now a file\n")
        .bytes();
    vec![
        ("1111/layer.tar", base),
        ("2222/layer.tar", gzip(&middle)),
        ("3333/layer.tar", top),
    ]
}

fn expected_docker_tree() -> BTreeMap<String, String> {
    tree(&[
        ("dirthenfile", "file 644 now a file\n"),
        ("etc", "dir 755"),
        ("etc/abs", "symlink /usr/bin/tool"),
        ("etc/dangling", "symlink /nonexistent/x"),
        ("etc/hostname", "file 644 base\n"),
        ("etc/motd", "file 600 new motd\n"),
        ("etc/owned", "file 640 owned\n"),
        ("opt", "dir 755"),
        ("swap", "dir 755"),
        ("swap/inside", "file 644 inside\n"),
        ("usr", "dir 755"),
        ("usr/bin", "dir 755"),
        ("usr/bin/rel", "symlink tool"),
        ("usr/bin/tool", "file 4755 #!tool\n"),
        ("usr/bin/tool-link", "file 4755 #!tool\n"),
        ("var", "dir 755"),
        ("var/cache", "dir 750"),
        ("var/cache/new-after", "file 644 after\n"),
        ("var/cache/new-before", "file 644 before\n"),
        ("var/cache/olddir", "dir 700"),
        ("var/cache/olddir/y", "file 644 upper y\n"),
    ])
}

fn check_docker_image(archive: &[u8]) -> TestResult {
    let scratch = Scratch::new()?;
    let config = scratch.unpack(archive)?;
    assert_eq!(config, expected_image_config());

    let root = scratch.root();
    assert_eq!(snapshot(&root)?, expected_docker_tree());

    let tool = fs::metadata(root.join("usr/bin/tool"))?;
    let link = fs::metadata(root.join("usr/bin/tool-link"))?;
    assert_eq!(tool.ino(), link.ino(), "tool-link is a hard link to tool");
    assert_eq!(tool.nlink(), 2);
    assert_eq!(tool.mtime(), MTIME as i64);
    assert_eq!(fs::metadata(root.join("usr/bin"))?.mtime(), MTIME as i64);
    assert_eq!(fs::metadata(root.join("var/cache"))?.mtime(), MTIME as i64);
    if running_as_root(&scratch) {
        let owned = fs::metadata(root.join("etc/owned"))?;
        assert_eq!((owned.uid(), owned.gid()), (1234, 1234));
    }
    Ok(())
}

#[test]
fn docker_save_archive_is_unpacked_with_layer_semantics() -> TestResult {
    check_docker_image(&docker_archive(&docker_layers()))
}

#[test]
fn gzip_compressed_docker_save_archive_is_unpacked() -> TestResult {
    check_docker_image(&gzip(&docker_archive(&docker_layers())))
}

#[test]
fn rootfs_must_be_an_empty_directory() -> TestResult {
    let scratch = Scratch::new()?;
    fs::write(scratch.root().join("leftover"), b"")?;
    let result = scratch.unpack(&docker_archive(&docker_layers()));
    assert!(
        matches!(result, Err(OciError::RootfsNotEmptyDirectory { .. })),
        "{result:?}"
    );
    Ok(())
}

#[test]
fn unknown_archive_format_is_rejected() -> TestResult {
    let scratch = Scratch::new()?;
    let archive = outer_tar(&[("hello.txt".to_owned(), b"hi".to_vec())]);
    let result = scratch.unpack(&archive);
    assert!(matches!(result, Err(OciError::UnknownFormat)), "{result:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. OCI image layout

fn with_platform(mut descriptor: serde_json::Value, arch: &str) -> serde_json::Value {
    descriptor["platform"] = json!({"architecture": arch, "os": "linux"});
    descriptor
}

struct OciFixture {
    layout: OciLayout,
    index: serde_json::Value,
    /// Hex digests of the amd64 image's blobs: manifest, config, layers.
    amd64_blobs: Vec<String>,
}

fn oci_fixture() -> OciFixture {
    let mut layout = OciLayout::default();
    let arm_layer = Layer::new().file("ARM", 0o644, "wrong platform\n").bytes();
    let mut arm_config = image_config_json();
    arm_config["architecture"] = json!("arm64");
    let arm = layout.add_manifest(
        &arm_config,
        vec![("application/vnd.oci.image.layer.v1.tar", arm_layer)],
    );

    let first_blob = layout.blobs.len();
    let lower = Layer::new()
        .dir("bin/", 0o755)
        .file("bin/app", 0o755, "app v1\n")
        .dir("etc/", 0o755)
        .file("etc/conf", 0o644, "conf\n")
        .file("etc/keep", 0o644, "keep\n")
        .dir("data/", 0o755)
        .file("data/lower", 0o644, "lower\n")
        .bytes();
    let upper = Layer::new()
        .file("bin/app", 0o755, "app v2\n")
        .symlink("bin/sh", "/bin/app")
        .file("data/.wh..wh..opq", 0o644, "")
        .file("data/upper", 0o644, "upper\n")
        .file("etc/.wh.conf", 0o644, "")
        .bytes();
    let amd = layout.add_manifest(
        &image_config_json(),
        vec![
            ("application/vnd.oci.image.layer.v1.tar", lower),
            ("application/vnd.oci.image.layer.v1.tar+zstd", zstd(&upper)),
        ],
    );
    let amd64_blobs = layout.blobs[first_blob..]
        .iter()
        .map(|(hex_digest, _)| hex_digest.clone())
        .collect();

    let nested = layout.add_json(
        INDEX_MEDIA_TYPE,
        &json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [with_platform(arm, "arm64"), with_platform(amd, "amd64")],
        }),
    );
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [nested],
    });
    OciFixture {
        layout,
        index,
        amd64_blobs,
    }
}

#[test]
fn oci_layout_with_nested_index_picks_amd64() -> TestResult {
    let fixture = oci_fixture();
    let scratch = Scratch::new()?;
    let config = scratch.unpack(&fixture.layout.archive(&fixture.index, None))?;
    assert_eq!(config, expected_image_config());
    assert_eq!(
        snapshot(&scratch.root())?,
        tree(&[
            ("bin", "dir 755"),
            ("bin/app", "file 755 app v2\n"),
            ("bin/sh", "symlink /bin/app"),
            ("data", "dir 755"),
            ("data/upper", "file 644 upper\n"),
            ("etc", "dir 755"),
            ("etc/keep", "file 644 keep\n"),
        ])
    );
    Ok(())
}

#[test]
fn corrupt_oci_blobs_are_rejected_before_anything_is_written() -> TestResult {
    let fixture = oci_fixture();
    assert_eq!(fixture.amd64_blobs.len(), 4, "config, two layers, manifest");
    for corrupt in &fixture.amd64_blobs {
        let scratch = Scratch::new()?;
        let result = scratch.unpack(&fixture.layout.archive(&fixture.index, Some(corrupt)));
        match result {
            Err(OciError::DigestMismatch { expected, .. }) => assert_eq!(&expected, corrupt),
            other => panic!("corrupting blob {corrupt}: expected a digest mismatch, got {other:?}"),
        }
        assert!(list_dir(&scratch.root()).is_empty());
    }
    Ok(())
}

#[test]
fn oci_index_without_amd64_is_rejected() -> TestResult {
    let mut layout = OciLayout::default();
    let layer = Layer::new().file("ARM", 0o644, "arm\n").bytes();
    let arm = layout.add_manifest(
        &image_config_json(),
        vec![("application/vnd.oci.image.layer.v1.tar", layer)],
    );
    let index = json!({"schemaVersion": 2, "manifests": [with_platform(arm, "arm64")]});
    let scratch = Scratch::new()?;
    let result = scratch.unpack(&layout.archive(&index, None));
    assert!(
        matches!(result, Err(OciError::NoMatchingPlatform { .. })),
        "{result:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Hostile archives

#[test]
fn parent_dir_escape_is_rejected() -> TestResult {
    for path in ["../escape", "./a/../../escape", "a/.."] {
        let scratch = Scratch::new()?;
        let layer = Layer::new().file(path, 0o644, "pwned").bytes();
        let error = layer_error(scratch.unpack(&docker_archive(&[("l.tar", layer)])));
        assert!(
            matches!(error, EntryError::ParentDirComponent { .. }),
            "{path}: {error:?}"
        );
        assert!(!scratch.dir.path().join("escape").exists());
        assert!(list_dir(&scratch.root()).is_empty());
    }
    Ok(())
}

#[test]
fn long_and_pax_names_are_honoured() -> TestResult {
    let scratch = Scratch::new()?;
    let long_dir = "d".repeat(150);
    let layer = Layer::new()
        .file(&format!("{long_dir}/gnu-long-name"), 0o644, "gnu\n")
        .pax(&[("path", "pax/named"), ("mtime", "1700000000.5")])
        .file("header-name-ignored", 0o644, "pax\n")
        .bytes();
    scratch.unpack(&docker_archive(&[("l.tar", layer)]))?;
    let root = scratch.root();
    assert_eq!(
        snapshot(&root)?,
        tree(&[
            (long_dir.as_str(), "dir 755"),
            (&format!("{long_dir}/gnu-long-name"), "file 644 gnu\n"),
            ("pax", "dir 755"),
            ("pax/named", "file 644 pax\n"),
        ])
    );
    assert_eq!(fs::metadata(root.join("pax/named"))?.mtime(), 1_700_000_000);
    Ok(())
}

#[test]
fn a_root_filesystem_tar_keeps_file_capabilities() -> TestResult {
    let scratch = Scratch::new()?;
    if !running_as_root(&scratch) {
        return Err("setting file capabilities needs root".into());
    }
    // A revision 2 vfs_cap_data: permitted CAP_NET_RAW (bit 13), as Debian's ping has.
    let mut net_raw = vec![0u8; 20];
    net_raw[..4].copy_from_slice(&0x0200_0000u32.to_le_bytes());
    net_raw[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    let record = "SCHILY.xattr.security.capability";
    let layer = Layer::new()
        .dir("usr", 0o755)
        .pax_bytes(&[(record, &net_raw)])
        .file("usr/ping", 0o755, "elf\n")
        .file("usr/plain", 0o755, "elf\n")
        .bytes();
    let root = scratch.root();
    unpack_rootfs_tar(layer.as_slice(), &root)?;
    assert_eq!(file_capability(&root.join("usr/ping")), Some(net_raw));
    assert_eq!(file_capability(&root.join("usr/plain")), None);
    assert_eq!(fs::metadata(root.join("usr/ping"))?.mode() & 0o7777, 0o755);

    // One the kernel does not take is an error that names the file, not a silent skip.
    let broken = Layer::new()
        .pax_bytes(&[(record, b"\x01\x02")])
        .file("bad", 0o755, "elf\n")
        .bytes();
    let other = scratch.dir.path().join("other");
    fs::create_dir(&other)?;
    let error = unpack_rootfs_tar(broken.as_slice(), &other).expect_err("refused");
    assert!(format!("{error:?}").contains("bad"), "{error:?}");
    Ok(())
}

#[test]
fn oversized_tar_metadata_is_rejected_without_reading_it() -> TestResult {
    let scratch = Scratch::new()?;
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::GNULongName);
    header.set_size(1 << 40);
    header.set_cksum();
    let mut layer = header.as_bytes().to_vec();
    layer.extend_from_slice(&[0; 1024]);
    let error = layer_error(scratch.unpack(&docker_archive(&[("l.tar", layer)])));
    assert!(
        matches!(error, EntryError::MetadataTooLarge { .. }),
        "{error:?}"
    );
    Ok(())
}

#[test]
fn hostile_pax_path_is_checked_not_the_header_name() -> TestResult {
    let scratch = Scratch::new()?;
    let layer = Layer::new()
        .pax(&[("path", "../escape")])
        .file("harmless", 0o644, "pwned")
        .bytes();
    let error = layer_error(scratch.unpack(&docker_archive(&[("l.tar", layer)])));
    assert!(
        matches!(error, EntryError::ParentDirComponent { .. }),
        "{error:?}"
    );
    assert!(!scratch.dir.path().join("escape").exists());
    assert!(list_dir(&scratch.root()).is_empty());
    Ok(())
}

#[test]
fn absolute_paths_are_rejected() -> TestResult {
    let scratch = Scratch::new()?;
    let outside_file = scratch.outside().join("abs");
    let path = outside_file.to_string_lossy().into_owned();
    let layer = Layer::new().file(&path, 0o644, "pwned").bytes();
    let error = layer_error(scratch.unpack(&docker_archive(&[("l.tar", layer)])));
    assert!(
        matches!(error, EntryError::AbsolutePath { .. }),
        "{error:?}"
    );
    assert!(scratch.outside_entries().is_empty());
    assert!(list_dir(&scratch.root()).is_empty());
    Ok(())
}

#[test]
fn writing_through_an_escaping_symlink_in_the_same_layer_is_rejected() -> TestResult {
    let scratch = Scratch::new()?;
    let outside = scratch.outside().to_string_lossy().into_owned();
    let layer = Layer::new()
        .symlink("link", &outside)
        .file("link/file", 0o644, "pwned")
        .bytes();
    let error = layer_error(scratch.unpack(&docker_archive(&[("l.tar", layer)])));
    assert!(
        matches!(&error, EntryError::ThroughSymlink { symlink, .. } if symlink == "link"),
        "{error:?}"
    );
    assert!(scratch.outside_entries().is_empty());
    Ok(())
}

#[test]
fn writing_through_an_escaping_symlink_in_a_later_layer_is_rejected() -> TestResult {
    let scratch = Scratch::new()?;
    let outside = scratch.outside().to_string_lossy().into_owned();
    let lower = Layer::new()
        .symlink("link", &outside)
        .symlink("up", "../../../../../../..")
        .bytes();
    for upper in [
        Layer::new().file("link/file", 0o644, "pwned").bytes(),
        Layer::new().dir("link/newdir/", 0o755).bytes(),
        Layer::new().symlink("link/evil", "/").bytes(),
        Layer::new()
            .file(&format!("up{outside}/file"), 0o644, "pwned")
            .bytes(),
    ] {
        let scratch = Scratch::new()?;
        let archive = docker_archive(&[("lower.tar", lower.clone()), ("upper.tar", upper)]);
        let error = layer_error(scratch.unpack(&archive));
        assert!(
            matches!(error, EntryError::ThroughSymlink { .. }),
            "{error:?}"
        );
    }
    assert!(scratch.outside_entries().is_empty());
    Ok(())
}

#[test]
fn writing_through_a_symlink_inside_the_rootfs_is_rejected() -> TestResult {
    let scratch = Scratch::new()?;
    let layer = Layer::new()
        .dir("real/", 0o755)
        .symlink("alias", "real")
        .file("alias/x", 0o644, "through the alias")
        .bytes();
    let error = layer_error(scratch.unpack(&docker_archive(&[("l.tar", layer)])));
    assert!(
        matches!(error, EntryError::ThroughSymlink { .. }),
        "{error:?}"
    );
    assert!(list_dir(&scratch.root().join("real")).is_empty());
    Ok(())
}

#[test]
fn hard_links_must_not_escape() -> TestResult {
    for target in ["../../etc/passwd", "/etc/passwd"] {
        let scratch = Scratch::new()?;
        let layer = Layer::new().hard_link("pw", target).bytes();
        let error = layer_error(scratch.unpack(&docker_archive(&[("l.tar", layer)])));
        assert!(
            matches!(
                error,
                EntryError::ParentDirComponent { .. } | EntryError::AbsolutePath { .. }
            ),
            "{target}: {error:?}"
        );
        assert!(list_dir(&scratch.root()).is_empty());
    }

    // A hard link to a file behind a symlink would link an outside inode into the image.
    let scratch = Scratch::new()?;
    let secret = scratch.outside().join("secret");
    fs::write(&secret, b"secret")?;
    let outside = scratch.outside().to_string_lossy().into_owned();
    let layer = Layer::new()
        .symlink("ln", &outside)
        .hard_link("stolen", "ln/secret")
        .bytes();
    let error = layer_error(scratch.unpack(&docker_archive(&[("l.tar", layer)])));
    assert!(
        matches!(error, EntryError::ThroughSymlink { .. }),
        "{error:?}"
    );
    assert_eq!(fs::metadata(&secret)?.nlink(), 1);
    assert!(!scratch.root().join("stolen").exists());
    Ok(())
}

#[test]
fn hard_link_to_a_symlink_copies_the_symlink() -> TestResult {
    let scratch = Scratch::new()?;
    let layer = Layer::new()
        .symlink("passwd-link", "/etc/passwd")
        .hard_link("copy", "passwd-link")
        .bytes();
    scratch.unpack(&docker_archive(&[("l.tar", layer)]))?;
    assert_eq!(
        snapshot(&scratch.root())?,
        tree(&[
            ("copy", "symlink /etc/passwd"),
            ("passwd-link", "symlink /etc/passwd"),
        ])
    );
    Ok(())
}

#[test]
fn whiteouts_through_a_symlink_are_rejected() -> TestResult {
    for marker in ["ln/.wh.keep", "ln/.wh..wh..opq"] {
        let scratch = Scratch::new()?;
        fs::write(scratch.outside().join("keep"), b"keep")?;
        let outside = scratch.outside().to_string_lossy().into_owned();
        let lower = Layer::new().symlink("ln", &outside).bytes();
        let upper = Layer::new().file(marker, 0o644, "").bytes();
        let archive = docker_archive(&[("lower.tar", lower), ("upper.tar", upper)]);
        let error = layer_error(scratch.unpack(&archive));
        assert!(
            matches!(error, EntryError::ThroughSymlink { .. }),
            "{marker}: {error:?}"
        );
        assert_eq!(scratch.outside_entries(), ["keep"]);
    }
    Ok(())
}

#[test]
fn a_directory_replacing_a_symlink_does_not_follow_it() -> TestResult {
    let scratch = Scratch::new()?;
    let outside = scratch.outside().to_string_lossy().into_owned();
    let lower = Layer::new().symlink("evil", &outside).bytes();
    let upper = Layer::new()
        .dir("evil/", 0o755)
        .file("evil/passwd", 0o644, "inside\n")
        .bytes();
    scratch.unpack(&docker_archive(&[
        ("lower.tar", lower),
        ("upper.tar", upper),
    ]))?;
    assert_eq!(
        snapshot(&scratch.root())?,
        tree(&[("evil", "dir 755"), ("evil/passwd", "file 644 inside\n")])
    );
    assert!(scratch.outside_entries().is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Random entries never escape

const CANARY_PLACEHOLDER: &str = "@CANARY@";

/// Mostly ordinary names, so that archives get past their first entry; sometimes hostile ones.
fn arb_component() -> impl Strategy<Value = String> {
    prop_oneof![
        60 => "[a-c]{1,2}",
        15 => Just("link".to_owned()),
        5 => Just("outside".to_owned()),
        1 => Just("..".to_owned()),
        1 => Just(".".to_owned()),
        1 => Just(String::new()),
        1 => Just(".wh..wh..opq".to_owned()),
        1 => "\\.wh\\.[a-c]{0,2}",
        1 => "\\.wh\\.link",
        1 => "x{250,300}",
    ]
}

fn arb_path() -> impl Strategy<Value = String> {
    (
        prop_oneof![24 => Just(""), 10 => Just("./"), 1 => Just("/"), 1 => Just("../")],
        prop::collection::vec(arb_component(), 1..4),
    )
        .prop_map(|(prefix, parts)| format!("{prefix}{}", parts.join("/")))
}

fn arb_link_target() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(CANARY_PLACEHOLDER.to_owned()),
        1 => Just(format!("{CANARY_PLACEHOLDER}/f")),
        2 => Just("../outside".to_owned()),
        1 => Just("../../..".to_owned()),
        1 => Just("/".to_owned()),
        2 => Just("a".to_owned()),
        4 => arb_path(),
    ]
}

#[derive(Debug, Clone)]
enum ArbEntry {
    File(String),
    Dir(String),
    Symlink(String, String),
    HardLink(String, String),
}

fn arb_entry() -> impl Strategy<Value = ArbEntry> {
    prop_oneof![
        4 => arb_path().prop_map(ArbEntry::File),
        2 => arb_path().prop_map(ArbEntry::Dir),
        3 => (arb_path(), arb_link_target()).prop_map(|(p, t)| ArbEntry::Symlink(p, t)),
        1 => (arb_path(), arb_link_target()).prop_map(|(p, t)| ArbEntry::HardLink(p, t)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_entries_never_write_outside_the_rootfs(
        entries in prop::collection::vec(arb_entry(), 1..12),
    ) {
        let scratch = Scratch::new().expect("creating a scratch directory");
        let canary = scratch.outside().to_string_lossy().into_owned();
        let fill = |target: &str| target.replace(CANARY_PLACEHOLDER, &canary);
        let mut layer = Layer::new();
        for entry in &entries {
            layer = match entry {
                ArbEntry::File(path) => layer.file(path, 0o644, "data"),
                ArbEntry::Dir(path) => layer.dir(path, 0o755),
                ArbEntry::Symlink(path, target) => layer.symlink(path, &fill(target)),
                ArbEntry::HardLink(path, target) => layer.hard_link(path, &fill(target)),
            };
        }
        // Success or a clean error are both fine; a panic fails the test.
        let _ = scratch.unpack(&docker_archive(&[("l.tar", layer.bytes())]));
        prop_assert!(scratch.outside_entries().is_empty());
        prop_assert_eq!(list_dir(scratch.dir.path()), ["image.tar", "outside", "root"]);
    }
}
