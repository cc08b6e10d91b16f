//! Helpers shared by kiln's end-to-end tests (real QEMU, real templates).

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
