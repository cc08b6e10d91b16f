//! `kiln template build`: build a template's images into the artefact cache.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_image::cache::Cache;
use kiln_image::progress::PrintProgress;
use kiln_image::template::build_template_with_summary;

/// Where templates named on the command line are looked up.
pub fn templates_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("KILN_TEMPLATES_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.push(PathBuf::from("templates"));
    dirs.push(PathBuf::from("/usr/share/kiln/templates"));
    dirs
}

/// Resolves `template`: a spec file, a directory holding `template.toml`, or a name.
pub fn resolve_spec(template: &str) -> Result<PathBuf> {
    let path = Path::new(template);
    if path.is_file() {
        return Ok(path.to_owned());
    }
    let in_dir = path.join(kiln_image::spec::SPEC_FILE);
    if in_dir.is_file() {
        return Ok(in_dir);
    }
    if let Some(spec) = kiln_image::spec::find_named(&templates_dirs(), template) {
        return Ok(spec);
    }
    let searched: Vec<String> = templates_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    bail!(
        "template `{template}` not found: give a spec file, a directory with template.toml, or a name under {}",
        searched.join(", ")
    )
}

/// Builds the template and prints a summary.
pub fn build(template: &str, agent: Option<PathBuf>, cache_dir: &Path) -> Result<()> {
    let spec = resolve_spec(template)?;
    let agent = match agent {
        Some(agent) => agent,
        None => static_agent()?,
    };
    let cache = Cache::new(cache_dir);
    eprintln!(
        "building template {} (cache {})",
        spec.display(),
        cache_dir.display()
    );
    let (images, summary) = build_template_with_summary(&spec, &agent, &cache, &PrintProgress)
        .with_context(|| format!("building {}", spec.display()))?;
    println!("{summary}");
    println!("  kernel    {}", images.kernel.vmlinux.display());
    println!("  initramfs {}", images.kernel.initramfs.display());
    println!("  rootfs    {}", images.rootfs.image.display());
    Ok(())
}

/// The static agent: `$KILN_AGENT_BIN`, or the static build in this checkout.
pub fn static_agent() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let candidates = [
        PathBuf::from("target/x86_64-unknown-linux-gnu/release/kiln-agent"),
        PathBuf::from("/usr/lib/kiln/kiln-agent"),
    ];
    candidates.into_iter().find(|p| p.is_file()).context(
        "no static agent found: set KILN_AGENT_BIN or build it with \
         RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target x86_64-unknown-linux-gnu -p kiln-agent",
    )
}
