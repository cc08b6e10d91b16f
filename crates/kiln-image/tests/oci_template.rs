//! An image archive as a template source, end to end: archive -> root filesystem tree ->
//! agent and files installed -> ext4 image, with the image's runtime config carried over.

use std::path::Path;

use kiln_image::cache::{Cache, Origin};
use kiln_image::progress::NoProgress;
use kiln_image::rootfs::build_rootfs;
use kiln_image::spec::TemplateSpec;
use kiln_proto::messages::Command;

fn tar_entry(builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mtime(1_700_000_000);
    builder
        .append_data(&mut header, path, data)
        .expect("append");
}

fn dir_entry(builder: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header.set_entry_type(tar::EntryType::Directory);
    builder
        .append_data(&mut header, path, &[][..])
        .expect("append");
}

/// A two-layer `docker save` archive; the second layer deletes a file of the first.
fn docker_archive(path: &Path) {
    let mut layer1 = tar::Builder::new(Vec::new());
    dir_entry(&mut layer1, "etc/");
    tar_entry(&mut layer1, "etc/app.conf", b"greeting=hello\n", 0o644);
    tar_entry(&mut layer1, "etc/old.conf", b"remove me\n", 0o644);
    let layer1 = layer1.into_inner().expect("layer");
    let mut layer2 = tar::Builder::new(Vec::new());
    dir_entry(&mut layer2, "app/");
    tar_entry(&mut layer2, "app/run", b"#!/bin/sh\necho run\n", 0o755);
    tar_entry(&mut layer2, "etc/.wh.old.conf", b"", 0o644);
    let layer2 = layer2.into_inner().expect("layer");
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "GREETING=from-image"],
            "WorkingDir": "/app", "User": "1000:1000",
            "Entrypoint": ["/app/run"], "Cmd": ["--serve"]
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    let manifest = serde_json::json!([{ "Config": "config.json", "RepoTags": ["app:latest"], "Layers": ["l1/layer.tar", "l2/layer.tar"] }]);
    let mut archive = tar::Builder::new(Vec::new());
    tar_entry(
        &mut archive,
        "config.json",
        config.to_string().as_bytes(),
        0o644,
    );
    tar_entry(&mut archive, "l1/layer.tar", &layer1, 0o644);
    tar_entry(&mut archive, "l2/layer.tar", &layer2, 0o644);
    tar_entry(
        &mut archive,
        "manifest.json",
        manifest.to_string().as_bytes(),
        0o644,
    );
    std::fs::write(path, archive.into_inner().expect("archive")).expect("write archive");
}

fn debugfs(image: &Path, request: &str) -> String {
    let output = std::process::Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn image_archive_becomes_a_root_filesystem_with_its_config() {
    let dir = tempfile::tempdir().expect("dir");
    docker_archive(&dir.path().join("app.tar"));
    std::fs::write(dir.path().join("extra.txt"), b"added by the spec\n").expect("write");
    let agent = dir.path().join("agent-binary");
    std::fs::write(&agent, b"\x7fELF stand-in for the agent").expect("write");
    let spec = TemplateSpec::parse(
        "name = \"app\"\nenv = { GREETING = \"from-spec\" }\n[base]\nimage = \"app.tar\"\n\
         [[files]]\nsrc = \"extra.txt\"\ndest = \"/etc/extra.txt\"\n[resources]\ndisk_mib = 128\n",
        "app.toml",
    )
    .expect("valid spec");
    let cache = Cache::new(dir.path().join("cache"));

    let built = build_rootfs(&spec, dir.path(), &agent, &cache, &NoProgress).expect("builds");
    assert_eq!(built.origin, Origin::Built);
    assert_eq!(
        debugfs(&built.image, "cat /etc/app.conf"),
        "greeting=hello\n"
    );
    assert_eq!(
        debugfs(&built.image, "cat /etc/extra.txt"),
        "added by the spec\n"
    );
    assert_eq!(
        debugfs(&built.image, "cat /sbin/kiln-agent").as_bytes(),
        b"\x7fELF stand-in for the agent"
    );
    assert!(debugfs(&built.image, "ls -l /etc").contains("app.conf"));
    assert!(
        !debugfs(&built.image, "ls -l /etc").contains("old.conf"),
        "whiteout honoured"
    );
    assert!(debugfs(&built.image, "stat /app/run").contains("Mode:  0755"));

    let config = &built.config;
    assert_eq!(
        config.env.get("GREETING").map(String::as_str),
        Some("from-spec")
    );
    assert_eq!(
        config.env.get("PATH").map(String::as_str),
        Some("/usr/bin:/bin")
    );
    assert_eq!(config.workdir.as_deref(), Some("/app"));
    assert_eq!(config.user.as_deref(), Some("1000:1000"));
    assert_eq!(
        config.start.as_ref().map(|s| s.command.clone()),
        Some(Command::Argv(vec!["/app/run".into(), "--serve".into()]))
    );

    let again = build_rootfs(&spec, dir.path(), &agent, &cache, &NoProgress).expect("cached");
    assert_eq!(
        (again.origin, again.dir),
        (Origin::Cached, built.dir.clone())
    );
    std::fs::write(dir.path().join("extra.txt"), b"changed\n").expect("write");
    let rebuilt = build_rootfs(&spec, dir.path(), &agent, &cache, &NoProgress).expect("rebuilds");
    assert_eq!(
        rebuilt.origin,
        Origin::Built,
        "a changed input file causes a rebuild"
    );
    assert_eq!(debugfs(&rebuilt.image, "cat /etc/extra.txt"), "changed\n");
}

#[test]
fn too_small_a_disk_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("dir");
    docker_archive(&dir.path().join("app.tar"));
    let agent = dir.path().join("agent-binary");
    std::fs::write(&agent, vec![0u8; 80 << 20]).expect("write a large stand-in agent");
    let spec = TemplateSpec::parse(
        "name = \"app\"\n[base]\nimage = \"app.tar\"\n[resources]\ndisk_mib = 64\n",
        "t",
    )
    .expect("valid spec");
    let err = build_rootfs(
        &spec,
        dir.path(),
        &agent,
        &Cache::new(dir.path().join("cache")),
        &NoProgress,
    )
    .expect_err("does not fit");
    assert!(err.to_string().contains("disk_mib"), "{err}");
}
