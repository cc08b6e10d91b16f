//! Template packages are installed unprivileged: mmdebstrap runs as the build user in its
//! `unshare` mode, so what packages run while they are installed is root of a user namespace
//! that owns nothing on the host; the tree still comes out owned as the packages set it, and
//! a build past its deadline is stopped with everything it started. Needs root, the build
//! user (`scripts/test.sh` sets it up) and the Debian mirror.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_image::mmdebstrap::BuildUser;
use kiln_image::tool::Deadline;
use kiln_image::ImageError;

mod common;

use common::file_capability;

/// A hook that runs where package scripts run (inside mmdebstrap's namespaces, before the
/// tree is packed) and writes down who it ran as.
const WHO_AM_I: &str =
    r#"--customize-hook=cat /proc/self/uid_map > "$1/uid_map"; id -u > "$1/uid""#;

/// The first mapping of a `uid_map`: (inside, outside, count).
fn first_mapping(tree: &Path) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(tree.join("uid_map")).expect("uid_map written by the hook");
    let fields: Vec<u64> = text
        .split_whitespace()
        .take(3)
        .map(|f| f.parse().expect("a number"))
        .collect();
    (fields[0], fields[1], fields[2])
}

fn args(variant: &str, extra: &[&str]) -> Vec<String> {
    ["--quiet", "--format=tar", variant]
        .iter()
        .chain(extra)
        .chain(&["bookworm", "-"])
        .map(|s| s.to_string())
        .collect()
}

/// Processes whose command line is exactly `argv`.
fn processes_running(argv: &[&str]) -> usize {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| cmdline == wanted)
        })
        .count()
}

#[test]
fn package_scripts_run_unprivileged_and_a_late_build_is_stopped() {
    let user = BuildUser::find().expect("the build user (scripts/test.sh sets it up)");
    let dir = tempfile::tempdir().expect("dir");

    // Unprivileged: root inside, a subordinate id outside; the tree is root's on the host.
    let tree = dir.path().join("unprivileged");
    // `apt` and ping: files of other groups, a setgid program, and file capabilities.
    let packages = args("--variant=apt", &["--include=iputils-ping", WHO_AM_I]);
    user.install_into(&packages, &tree, None)
        .expect("mmdebstrap as the build user");
    let (inside, outside, count) = first_mapping(&tree);
    assert_eq!(inside, 0);
    assert_ne!(outside, 0, "package scripts ran as the host's root");
    assert!(count <= 65536, "the namespace maps {count} ids");
    assert_eq!(
        std::fs::read_to_string(tree.join("uid"))
            .expect("uid")
            .trim(),
        "0"
    );
    let passwd = std::fs::symlink_metadata(tree.join("etc/passwd")).expect("etc/passwd");
    assert_eq!(
        (passwd.uid(), passwd.gid()),
        (0, 0),
        "ownership as packaged"
    );
    let shadow = std::fs::symlink_metadata(tree.join("etc/shadow")).expect("etc/shadow");
    assert_eq!(shadow.gid(), 42, "etc/shadow belongs to group shadow");
    let chage = std::fs::symlink_metadata(tree.join("usr/bin/chage")).expect("chage");
    assert_eq!(
        (chage.gid(), chage.mode() & 0o7777),
        (42, 0o2755),
        "setgid shadow"
    );
    // ping's CAP_NET_RAW (bit 13), as its package set it: a revision 2 vfs_cap_data.
    let capability = file_capability(&tree.join("usr/bin/ping")).expect("ping has capabilities");
    assert_eq!(capability.len(), 20, "{capability:?}");
    let permitted = u32::from_le_bytes(capability[4..8].try_into().expect("4 bytes"));
    assert_eq!(permitted, 1 << 13, "{capability:?}");

    // The negative control: the same hook in mmdebstrap's root mode sees the host's root,
    // so the check above would notice a privileged installation.
    let root_tree = dir.path().join("as-root");
    let status = Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--mode=root",
            "--variant=essential",
            WHO_AM_I,
            "bookworm",
        ])
        .arg(&root_tree)
        .status()
        .expect("mmdebstrap");
    assert!(status.success());
    assert_eq!(first_mapping(&root_tree), (0, 0, 4_294_967_295));

    // A build past its deadline is stopped, with what it started, and says why; the hook is
    // seen running before the deadline (so the check after means something).
    let argv = ["sleep", "301.25"];
    let started = Instant::now();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            while started.elapsed() < Duration::from_secs(5) {
                if processes_running(&argv) > 0 {
                    seen.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let late = user.install_into(
        &args(
            "--variant=essential",
            &[&format!("--setup-hook={}", argv.join(" "))],
        ),
        &dir.path().join("late"),
        Some(Deadline::after(Duration::from_secs(5))),
    );
    watcher.join().expect("watcher");
    assert!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        "the hook never ran before the deadline"
    );
    assert!(
        matches!(&late, Err(ImageError::TimedOut { limit_secs: 5, .. })),
        "{late:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(
        processes_running(&argv),
        0,
        "the hook outlived the deadline"
    );
}
