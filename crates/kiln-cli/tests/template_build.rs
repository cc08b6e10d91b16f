//! `kiln template build` as a user runs it: progress on stderr, a summary and the artefact
//! paths on stdout, clear errors for unknown templates and invalid specs.

use std::process::{Command, Output};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn kiln_template_build(template: &str) -> Output {
    Command::new(KILN)
        .args(["template", "build", template])
        .arg("--cache-dir")
        .arg(kiln_testinfra::cache().root())
        .env("KILN_AGENT_BIN", kiln_testinfra::static_agent())
        .env(
            "KILN_TEMPLATES_DIR",
            kiln_testinfra::repo_root().join("templates"),
        )
        .output()
        .expect("kiln runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn builds_a_default_template_with_progress_and_a_summary() {
    // The boot tests share this cache; a first build makes the artefacts, later ones find them.
    let output = kiln_template_build("base");
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("[rootfs base] resolve packages: done in ") && stderr.contains(" packages"),
        "progress names the step, its time and result: {stderr}"
    );
    assert!(
        stderr.contains("[kernel]") && stderr.contains("[rootfs base]"),
        "{stderr}"
    );
    let summary = stdout.lines().next().unwrap_or_default();
    assert!(
        summary.starts_with("template base: kernel ")
            && summary.contains("rootfs ")
            && summary.contains("of a 1.0 GiB disk"),
        "{summary}"
    );
    for (label, file) in [
        ("kernel", "vmlinux"),
        ("initramfs", "initramfs.cpio"),
        ("rootfs", "rootfs.ext4"),
    ] {
        let path = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(label).map(str::trim))
            .unwrap_or_else(|| panic!("{label} path in {stdout}"));
        assert!(
            path.ends_with(file) && std::path::Path::new(path).is_file(),
            "{label}: {path}"
        );
    }
}

#[test]
fn unknown_templates_and_invalid_specs_are_clear_errors() {
    let output = kiln_template_build("no-such-template");
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("template `no-such-template` not found") && stderr.contains("templates"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().expect("dir");
    let spec = dir.path().join("template.toml");
    std::fs::write(
        &spec,
        "name = \"bad\"\n[base]\nsuite = \"bookworm\"\n[resources]\nmemory_mib = 1\n",
    )
    .expect("write");
    let output = kiln_template_build(&spec.to_string_lossy());
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("resources.memory_mib"), "{stderr}");

    std::fs::write(
        &spec,
        "name = \"bad\"\n[base]\nsuite = \"bookworm\"\n[[files]]\nsrc = \"absent.txt\"\ndest = \"/a\"\n",
    )
    .expect("write");
    let output = kiln_template_build(&dir.path().to_string_lossy());
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("`files[0].src`") && stderr.contains("absent.txt"),
        "{stderr}"
    );
}
