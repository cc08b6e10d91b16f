//! Helpers shared by kiln's end-to-end tests (real QEMU, real templates).

pub mod dns;
pub mod hostile_agent;
pub mod internet;
pub mod loopfs;

use std::path::{Path, PathBuf};

use kiln_image::cache::Cache;
use kiln_image::progress::PrintProgress;
use kiln_image::template::{build_template, TemplateImages};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static guest agent: `$KILN_AGENT_BIN` (as `scripts/test.sh` sets it), or built here.
pub fn static_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("KILN_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
                "-p",
                "kiln-agent",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(repo_root())
            .status()
            .expect("cargo runs");
    assert!(status.success(), "building the static agent failed");
    repo_root().join("target/x86_64-unknown-linux-gnu/release/kiln-agent")
}

/// The artefact cache: `$KILN_CACHE_DIR` or `/var/cache/kiln`.
pub fn cache() -> Cache {
    Cache::new(
        std::env::var_os("KILN_CACHE_DIR")
            .map_or_else(|| PathBuf::from("/var/cache/kiln"), PathBuf::from),
    )
}

/// Builds (or takes from the cache) the images of the repository template `name`.
pub fn template_images(name: &str) -> TemplateImages {
    let spec = repo_root()
        .join("templates")
        .join(name)
        .join("template.toml");
    build_template(&spec, &static_agent(), &cache(), &PrintProgress).expect("template images build")
}

/// Polls `check` (every 50 ms) until it holds or `timeout` passes; whether it held.
pub async fn wait_until(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    check()
}

/// Mounts a tmpfs at `/mnt/ram` in the guest (state held only in its RAM) and starts a
/// process counting in it (`/mnt/ram/count`, its pid in `/mnt/ram/pid`), detached from the
/// agent's session; returns once it counts.
pub async fn start_ram_counter(agent: &kiln_agent_client::AgentClient) {
    sh(
        agent,
        "mkdir -p /mnt/ram && mount -t tmpfs ram /mnt/ram && \
         { setsid sh -c 'echo $$ > /mnt/ram/pid; i=0; while :; do i=$((i+1)); echo $i > /mnt/ram/count; sleep 0.05; done' \
           </dev/null >/dev/null 2>&1 & } && \
         for i in $(seq 100); do [ -s /mnt/ram/count ] && [ -s /mnt/ram/pid ] && break; sleep 0.05; done",
    )
    .await;
}

/// The count of the process [`start_ram_counter`] started, and its pid.
pub async fn ram_counter(agent: &kiln_agent_client::AgentClient) -> (u64, String) {
    let out = sh(agent, "cat /mnt/ram/count; cat /mnt/ram/pid").await;
    let mut lines = out.lines();
    let count = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {out:?}"));
    (count, lines.next().unwrap_or_default().trim().to_owned())
}

/// Runs `script` with `sh -c` through `agent`, requires exit code 0, returns the trimmed
/// stdout.
pub async fn sh(agent: &kiln_agent_client::AgentClient, script: &str) -> String {
    use kiln_proto::messages::{Command, ExecRequest};
    let result = agent
        .run(ExecRequest::new(Command::Shell(script.to_owned())), 1 << 20)
        .await
        .expect("exec");
    assert_eq!(
        result.status.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8_lossy(&result.stdout).trim().to_owned()
}

/// A file a process holds open or has mapped, identified by device and inode (the paths a
/// jailed process sees are not the host's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldFile {
    /// What `/proc` shows for it (`fd 6 -> /vm/memory`, `map 7f..-7f.. rw-s /vm/memory`).
    pub what: String,
    /// Device and inode.
    pub id: (u64, u64),
    /// Held so that the process can write it (a writable descriptor or a shared writable
    /// mapping; a private writable mapping writes only copies).
    pub writable: bool,
}

/// Every regular file process `pid` holds through a descriptor or a mapping.
pub fn held_files(pid: u32) -> Vec<HeldFile> {
    use std::os::unix::fs::MetadataExt;
    let mut held = Vec::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&fd_dir).expect("fd dir").flatten() {
        let fd = entry.file_name().to_string_lossy().into_owned();
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        held.push(HeldFile {
            what: format!("fd {fd} -> {}", target.display()),
            id: (meta.dev(), meta.ino()),
            writable: flags & 0o3 != 0,
        });
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || fields[4] == "0" || !fields[5].starts_with('/') {
            continue;
        }
        let (perms, dev, inode) = (fields[1], fields[3], fields[4]);
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor), Ok(inode)) = (
            u64::from_str_radix(major, 16),
            u64::from_str_radix(minor, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        // st_dev as the kernel encodes it for these major/minor numbers.
        let dev = (major << 8) | (minor & 0xff) | ((minor & !0xff) << 12);
        held.push(HeldFile {
            what: format!("map {} {perms} {}", fields[0], fields[5]),
            id: (dev, inode),
            writable: perms.contains('w') && perms.contains('s'),
        });
    }
    held
}

/// Device and inode of `path`.
pub fn file_id(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.dev(), meta.ino())
}

/// Fails unless process `pid` holds none of `shared` writable (by descriptor or shared
/// mapping), and holds at least one of them at all (so the check saw something).
pub fn assert_no_writable_shared(pid: u32, kind: &str, shared: &[&Path]) {
    let ids: Vec<((u64, u64), &Path)> = shared.iter().map(|p| (file_id(p), *p)).collect();
    let held = held_files(pid);
    let mut seen = 0;
    for file in &held {
        if let Some((_, path)) = ids.iter().find(|(id, _)| *id == file.id) {
            seen += 1;
            assert!(
                !file.writable,
                "{kind} VMM {pid} holds shared {} writable: {}",
                path.display(),
                file.what
            );
        }
    }
    assert!(
        seen > 0,
        "{kind} VMM {pid} holds none of the shared files (the check saw nothing): {held:?}"
    );
}

/// Runs `program args` as user and group `uid` with no supplementary groups; returns whether
/// it succeeded and what it printed.
pub fn run_as_user(uid: u32, program: &str, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
            "--clear-groups",
            "--",
            program,
        ])
        .args(args)
        .output()
        .expect("setpriv");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}
