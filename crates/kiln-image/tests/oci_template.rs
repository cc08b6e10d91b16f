//! An image archive as a template source, end to end: archive -> root filesystem tree ->
//! agent and files installed -> ext4 image, with the image's runtime config carried over.

use std::path::Path;

use kiln_image::cache::{Cache, Origin};
use kiln_image::progress::{BuildEvent, NoProgress, Progress};
use kiln_image::rootfs::build_rootfs;
use kiln_image::spec::TemplateSpec;
use kiln_proto::messages::Command;

mod common;

use common::{outer_tar, sha256_hex, Layer, OciLayout};

/// A two-layer `docker save` archive; the second layer deletes a file of the first.
fn docker_archive(path: &Path) {
    let layer1 = Layer::new()
        .dir("etc/", 0o755)
        .file("etc/app.conf", 0o644, "greeting=hello\n")
        .file("etc/old.conf", 0o644, "remove me\n")
        .bytes();
    let layer2 = Layer::new()
        .dir("app/", 0o755)
        .file("app/run", 0o755, "#!/bin/sh\necho run\n")
        .file("etc/.wh.old.conf", 0o644, "")
        .bytes();
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
    let archive = outer_tar(&[
        ("config.json".into(), config.to_string().into_bytes()),
        ("l1/layer.tar".into(), layer1),
        ("l2/layer.tar".into(), layer2),
        ("manifest.json".into(), manifest.to_string().into_bytes()),
    ]);
    std::fs::write(path, archive).expect("write archive");
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
    let other = TemplateSpec::parse(
        "name = \"other\"\n[base]\nimage = \"app.tar\"\n[resources]\ndisk_mib = 128\n",
        "other.toml",
    )
    .expect("valid spec");
    let other_built =
        build_rootfs(&other, dir.path(), &agent, &cache, &NoProgress).expect("builds");
    std::fs::write(dir.path().join("extra.txt"), b"changed\n").expect("write");
    let rebuilt = build_rootfs(&spec, dir.path(), &agent, &cache, &NoProgress).expect("rebuilds");
    assert_eq!(
        rebuilt.origin,
        Origin::Built,
        "a changed input file causes a rebuild"
    );
    assert_eq!(debugfs(&rebuilt.image, "cat /etc/extra.txt"), "changed\n");
    let other_again =
        build_rootfs(&other, dir.path(), &agent, &cache, &NoProgress).expect("cached");
    assert_eq!(
        (other_again.origin, other_again.dir),
        (Origin::Cached, other_built.dir),
        "only what changed is rebuilt"
    );
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

/// Records build events.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<BuildEvent>>);

impl Progress for Recorder {
    fn event(&self, event: BuildEvent) {
        self.0.lock().expect("not poisoned").push(event);
    }
}

impl Recorder {
    fn take(&self) -> Vec<BuildEvent> {
        std::mem::take(&mut self.0.lock().expect("not poisoned"))
    }
}

/// A layer with a working `/bin/sh`: the host's dash with the C library it links, so build
/// steps can run in a chroot of the image without a Debian download.
fn shell_layer() -> Vec<u8> {
    let mut layer = Layer::new();
    for dir in ["bin/", "etc/", "lib/", "lib/x86_64-linux-gnu/", "lib64/"] {
        layer = layer.dir(dir, 0o755);
    }
    for (host, image) in [
        ("/bin/dash", "bin/sh"),
        (
            "/lib/x86_64-linux-gnu/libc.so.6",
            "lib/x86_64-linux-gnu/libc.so.6",
        ),
        ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
    ] {
        let bytes = std::fs::read(host).expect("the host has dash and glibc");
        layer = layer.raw(
            tar::EntryType::Regular,
            image.as_bytes(),
            b"",
            0o755,
            0,
            &bytes,
        );
    }
    layer.bytes()
}

/// An OCI image layout tarball with one layer and a config.
fn oci_layout_archive(path: &Path, layer: Vec<u8>) {
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Env": ["PATH=/bin"], "WorkingDir": "/" },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer))]}
    });
    let mut layout = OciLayout::default();
    let manifest = layout.add_manifest(
        &config,
        vec![("application/vnd.oci.image.layer.v1.tar", layer)],
    );
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [manifest] });
    std::fs::write(path, layout.archive(&index, None)).expect("write archive");
}

fn step_names(events: &[BuildEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::StepDone { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// Build steps run in order in a chroot of the image, after the spec's files are in place,
/// as PID 1 of their own PID namespace with no network; their output lands in the disk
/// image, which has the spec's size. A failing step fails the build, names the step and
/// publishes nothing.
#[test]
fn build_steps_run_in_a_chroot_of_an_oci_layout_image() {
    let dir = tempfile::tempdir().expect("dir");
    oci_layout_archive(&dir.path().join("shell.tar"), shell_layer());
    std::fs::write(dir.path().join("greeting"), b"hello from a spec file\n").expect("write");
    let agent = dir.path().join("agent-binary");
    std::fs::write(&agent, b"\x7fELF stand-in for the agent").expect("write");
    let spec_text = |steps: &str| {
        format!(
            "name = \"steps\"\nrun = [{steps}]\n[base]\nimage = \"shell.tar\"\n\
             [[files]]\nsrc = \"greeting\"\ndest = \"/etc/greeting\"\n[resources]\ndisk_mib = 96\n"
        )
    };
    let steps = [
        r#"read -r line < /etc/greeting; echo "step saw: $line" > /etc/step-output"#,
        r#"while read -r line; do echo "$line"; done < /proc/net/dev > /etc/net-devices"#,
        r#"echo $$ > /etc/step-pid"#,
        r#"echo second >> /etc/step-output"#,
    ];
    let quoted: Vec<String> = steps
        .iter()
        .map(|s| toml::Value::String((*s).to_owned()).to_string())
        .collect();
    let spec = TemplateSpec::parse(&spec_text(&quoted.join(", ")), "steps.toml").expect("valid");
    let cache = Cache::new(dir.path().join("cache"));
    let progress = Recorder::default();

    let built = build_rootfs(&spec, dir.path(), &agent, &cache, &progress).expect("builds");
    assert_eq!(
        debugfs(&built.image, "cat /etc/step-output"),
        "step saw: hello from a spec file\nsecond\n",
        "steps ran in order, after the files were installed"
    );
    let devices = debugfs(&built.image, "cat /etc/net-devices");
    let interfaces: Vec<&str> = devices
        .lines()
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
        .collect();
    assert_eq!(interfaces, ["lo"], "no network in build steps: {devices}");
    assert_eq!(debugfs(&built.image, "cat /etc/step-pid"), "1\n");
    assert_eq!(
        std::fs::metadata(&built.image).expect("image").len(),
        96 << 20,
        "the disk has the spec's size"
    );
    assert_eq!(
        built.config.env.get("PATH").map(String::as_str),
        Some("/bin")
    );

    let events = progress.take();
    let names = step_names(&events);
    let mut expected = vec![
        "resolve packages".to_owned(),
        "unpack image archive".to_owned(),
        "install agent and files".to_owned(),
    ];
    expected.extend(
        steps
            .iter()
            .enumerate()
            .map(|(i, s)| format!("run[{i}]: {}", truncated(s))),
    );
    expected.push("make ext4 image".to_owned());
    assert_eq!(names, expected);
    let disk_detail = events.iter().find_map(|e| match e {
        BuildEvent::StepDone { name, detail, .. } if name == "make ext4 image" => detail.clone(),
        _ => None,
    });
    assert!(
        disk_detail
            .as_deref()
            .is_some_and(|d| d.ends_with("of files in a 96 MiB disk")),
        "{disk_detail:?}"
    );

    build_rootfs(&spec, dir.path(), &agent, &cache, &progress).expect("cached");
    let events = progress.take();
    assert!(
        matches!(events.last(), Some(BuildEvent::Cached { path, .. }) if Path::new(path) == built.dir),
        "{events:?}"
    );
    assert_eq!(
        step_names(&events),
        ["resolve packages"],
        "no step runs again"
    );

    let failing = TemplateSpec::parse(
        &spec_text("\"echo fine\", \"echo failing >&2; exit 3\""),
        "t",
    )
    .expect("valid");
    let err = build_rootfs(&failing, dir.path(), &agent, &cache, &NoProgress)
        .expect_err("a failing step fails the build");
    let text = err.to_string();
    assert!(
        text.contains("run[1]") && text.contains("exit status: 3") && text.contains("failing"),
        "{text}"
    );
    let published: Vec<_> = std::fs::read_dir(cache.root().join("rootfs"))
        .expect("cache dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert_eq!(
        published,
        [built.dir.file_name().expect("name").to_string_lossy()],
        "only the good build is in the cache"
    );
}

/// The step label as progress shows it (first line, at most 60 characters).
fn truncated(step: &str) -> String {
    if step.len() > 60 {
        format!("{}...", step.chars().take(57).collect::<String>())
    } else {
        step.to_owned()
    }
}
