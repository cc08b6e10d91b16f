//! Building a template's root filesystem: a Debian suite through mmdebstrap or an OCI image
//! archive as the base, then the agent, the spec's files and build steps, then an ext4 image
//! made without mounting (`mkfs.ext4 -d`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_proto::messages::{Command as AgentCommand, ReadinessCheck, StartCommand};
use serde::{Deserialize, Serialize};

use crate::cache::{sha256_file, Cache, Inputs, Origin};
use crate::error::{ImageError, IoContext};
use crate::mmdebstrap::BuildUser;
use crate::progress::{human_bytes, step, BuildEvent, Progress};
use crate::spec::{ReadinessSpec, Resources, TemplateSpec};
use crate::tool::{run, shell_quote, Deadline};

/// Where the agent is installed in every image.
pub const AGENT_PATH: &str = "/sbin/kiln-agent";

/// Runtime defaults of a template, stored beside its disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateConfig {
    /// Template name.
    pub name: String,
    /// Default environment.
    pub env: BTreeMap<String, String>,
    /// Default working directory.
    pub workdir: Option<String>,
    /// Default user.
    pub user: Option<String>,
    /// Start command, from the spec or the image's entrypoint.
    pub start: Option<StartCommand>,
    /// VM size.
    pub resources: Resources,
}

/// A built root filesystem.
#[derive(Debug, Clone)]
pub struct RootfsArtefact {
    /// The artefact directory.
    pub dir: PathBuf,
    /// The ext4 disk image.
    pub image: PathBuf,
    /// Runtime defaults.
    pub config: TemplateConfig,
    /// Built now or found in the cache.
    pub origin: Origin,
}

const IMAGE_FILE: &str = "rootfs.ext4";
const CONFIG_FILE: &str = "config.json";
const PACKAGES_FILE: &str = "packages.txt";

/// Resolves the exact package set mmdebstrap would install (`name=version` lines, sorted),
/// so the cache key changes whenever the archive would give a different image.
pub fn resolve_packages(
    spec: &TemplateSpec,
    deadline: Option<Deadline>,
) -> Result<Vec<String>, ImageError> {
    let Some(suite) = &spec.base.suite else {
        return Ok(Vec::new());
    };
    let mut args = vec![
        "--simulate".to_owned(),
        "--verbose".to_owned(),
        format!("--variant={}", spec.base.variant),
    ];
    args.extend(include_arg(spec));
    args.extend([suite.clone(), "/dev/null".to_owned()]);
    let output = BuildUser::find()?.mmdebstrap(
        &args,
        None,
        "resolving packages (mmdebstrap --simulate)",
        deadline,
    )?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let packages = parse_simulated_installs(&text);
    if packages.is_empty() {
        return Err(ImageError::CommandFailed {
            what: "resolving packages".into(),
            status: "no packages listed".into(),
            stderr: text.lines().rev().take(10).collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(packages)
}

/// The `Inst name (version ...)` lines of an apt simulation as sorted `name=version` pairs.
fn parse_simulated_installs(text: &str) -> Vec<String> {
    let mut packages: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("Inst ")?;
            let (name, rest) = rest.split_once(" (")?;
            let version = rest.split_whitespace().next()?;
            Some(format!("{name}={version}"))
        })
        .collect();
    packages.sort();
    packages.dedup();
    packages
}

/// The packages installed in a root filesystem `tree`, from its dpkg status, as sorted
/// `name=version` pairs.
fn installed_packages(tree: &Path) -> Result<Vec<String>, ImageError> {
    let path = tree.join("var/lib/dpkg/status");
    let text = std::fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
    let mut packages: Vec<String> = text
        .split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                    .map(str::trim)
            };
            if field("Status")? != "install ok installed" {
                return None;
            }
            Some(format!("{}={}", field("Package")?, field("Version")?))
        })
        .collect();
    packages.sort();
    packages.dedup();
    Ok(packages)
}

/// The key names the package versions resolved before the build. If the tree holds others,
/// the archive may have changed in between: resolving again tells. A changed archive fails the
/// build (the image must not be cached under a key naming other versions); an unchanged one
/// means the simulation and the installation differ for this spec, which is deterministic, so
/// the difference is only logged.
fn check_installed_packages(
    spec: &TemplateSpec,
    tree: &Path,
    resolved: &[String],
) -> Result<(), ImageError> {
    let installed = installed_packages(tree)?;
    if installed == resolved {
        return Ok(());
    }
    let differing: Vec<&String> = installed
        .iter()
        .filter(|p| !resolved.contains(p))
        .chain(resolved.iter().filter(|p| !installed.contains(p)))
        .take(6)
        .collect();
    if resolve_packages(spec, None)? != resolved {
        return Err(ImageError::PackagesChanged {
            differing: format!("{differing:?}"),
        });
    }
    tracing::warn!(
        template = %spec.name,
        ?differing,
        "installed packages differ from mmdebstrap's simulation (archive unchanged)"
    );
    Ok(())
}

/// The cache inputs of a root filesystem.
pub fn rootfs_inputs(
    spec: &TemplateSpec,
    spec_dir: &Path,
    agent: &Path,
    packages: &[String],
) -> Result<Inputs, ImageError> {
    let mut inputs = Inputs::new("rootfs");
    let spec_json = serde_json::to_vec(spec).map_err(|e| ImageError::Io {
        context: "serializing the spec".into(),
        source: std::io::Error::other(e),
    })?;
    inputs.add_bytes("spec", &spec_json);
    inputs.add(
        "agent",
        sha256_file(agent).context(|| format!("reading agent {}", agent.display()))?,
    );
    inputs.add_bytes("packages", packages.join("\n").as_bytes());
    // How packages are installed (unprivileged, through a tar stream since this version).
    inputs.add("installer", "mmdebstrap-unshare-tar");
    for file in checked_files(spec, spec_dir)? {
        let path = &file.path;
        inputs.add(
            &file.input,
            sha256_file(path).context(|| format!("reading {}", path.display()))?,
        );
    }
    Ok(inputs)
}

/// A file a spec names.
struct NamedFile {
    /// The spec field that names it (`base.image`, `files[0].src`).
    field: String,
    /// Its name among the cache inputs (`image`, `file0`).
    input: String,
    /// Where it is.
    path: PathBuf,
}

/// The files a spec names: its image archive and the sources of `files`.
fn named_files(spec: &TemplateSpec, spec_dir: &Path) -> Vec<NamedFile> {
    let image = spec.base.image.iter().map(|image| NamedFile {
        field: "base.image".into(),
        input: "image".into(),
        path: spec_dir.join(image),
    });
    let files = spec.files.iter().enumerate().map(|(i, file)| NamedFile {
        field: format!("files[{i}].src"),
        input: format!("file{i}"),
        path: spec_dir.join(&file.src),
    });
    image.chain(files).collect()
}

/// The files the spec names, each checked to exist.
fn checked_files(spec: &TemplateSpec, spec_dir: &Path) -> Result<Vec<NamedFile>, ImageError> {
    let files = named_files(spec, spec_dir);
    match files.iter().find(|file| !file.path.is_file()) {
        Some(missing) => Err(ImageError::MissingFile {
            field: missing.field.clone(),
            path: missing.path.clone(),
        }),
        None => Ok(files),
    }
}

/// Checks that every file the spec names exists, so a typo is reported before any slow step.
pub fn check_files(spec: &TemplateSpec, spec_dir: &Path) -> Result<(), ImageError> {
    checked_files(spec, spec_dir).map(drop)
}

/// Builds (or finds in the cache) the root filesystem of `spec`.
pub fn build_rootfs(
    spec: &TemplateSpec,
    spec_dir: &Path,
    agent: &Path,
    cache: &Cache,
    progress: &dyn Progress,
) -> Result<RootfsArtefact, ImageError> {
    build_rootfs_until(spec, spec_dir, agent, cache, progress, None)
}

/// [`build_rootfs`], with package installation stopped (and the build failed) at `deadline`.
pub fn build_rootfs_until(
    spec: &TemplateSpec,
    spec_dir: &Path,
    agent: &Path,
    cache: &Cache,
    progress: &dyn Progress,
    deadline: Option<Deadline>,
) -> Result<RootfsArtefact, ImageError> {
    check_files(spec, spec_dir)?;
    let artefact = format!("rootfs {}", spec.name);
    let packages = step(progress, &artefact, "resolve packages", || {
        let packages = resolve_packages(spec, deadline)?;
        let detail = (!packages.is_empty()).then(|| format!("{} packages", packages.len()));
        Ok::<_, ImageError>((packages, detail))
    })?;
    let inputs = rootfs_inputs(spec, spec_dir, agent, &packages)?;
    let (dir, origin) = cache.get_or_build("rootfs", &inputs, |out| {
        build_into(
            spec, spec_dir, agent, &packages, out, &artefact, progress, deadline,
        )
    })?;
    if origin == Origin::Cached {
        progress.event(BuildEvent::Cached {
            artefact,
            path: dir.display().to_string(),
        });
    }
    let config_bytes =
        std::fs::read(dir.join(CONFIG_FILE)).context(|| format!("reading {}", dir.display()))?;
    let config = serde_json::from_slice(&config_bytes).map_err(|e| ImageError::Io {
        context: format!("parsing {}", dir.join(CONFIG_FILE).display()),
        source: std::io::Error::other(e),
    })?;
    Ok(RootfsArtefact {
        image: dir.join(IMAGE_FILE),
        dir,
        config,
        origin,
    })
}

#[allow(clippy::too_many_arguments)]
fn build_into(
    spec: &TemplateSpec,
    spec_dir: &Path,
    agent: &Path,
    packages: &[String],
    out: &Path,
    artefact: &str,
    progress: &dyn Progress,
    deadline: Option<Deadline>,
) -> Result<(), ImageError> {
    let tree = out.join("tree");
    let image_config = match (&spec.base.suite, &spec.base.image) {
        (Some(suite), _) => step(
            progress,
            artefact,
            &format!("mmdebstrap {suite} ({}, unprivileged)", spec.base.variant),
            || {
                // Not quiet: its progress lines are what a failure's tail says.
                let mut args = vec![
                    "--format=tar".to_owned(),
                    format!("--variant={}", spec.base.variant),
                ];
                args.extend(include_arg(spec));
                args.extend([suite.clone(), "-".to_owned()]);
                BuildUser::find()?.install_into(&args, &tree, deadline)?;
                check_installed_packages(spec, &tree, packages)?;
                Ok::<_, ImageError>((None, Some(format!("{} packages", packages.len()))))
            },
        )?,
        (None, Some(image)) => step(progress, artefact, "unpack image archive", || {
            std::fs::create_dir_all(&tree).context(|| format!("creating {}", tree.display()))?;
            let config = crate::oci::unpack_image_archive(&spec_dir.join(image), &tree)?;
            Ok::<_, ImageError>((Some(config), None))
        })?,
        (None, None) => unreachable!("validated specs have a base"),
    };

    step(progress, artefact, "install agent and files", || {
        for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/sbin", "/etc"] {
            let resolved = resolve_dir_in_root(&tree, Path::new(dir))?;
            if dir == "/tmp" {
                std::fs::set_permissions(&resolved, std::fs::Permissions::from_mode(0o1777))
                    .context(|| "chmod /tmp".into())?;
            }
        }
        install_file(agent, &tree, AGENT_PATH, 0o755)?;
        for file in &spec.files {
            install_file(
                &spec_dir.join(&file.src),
                &tree,
                &file.dest,
                file.mode.unwrap_or(0o644),
            )?;
        }
        let hostname =
            tempfile::NamedTempFile::new().context(|| "creating a temporary file".into())?;
        std::fs::write(hostname.path(), "kiln\n").context(|| "writing /etc/hostname".into())?;
        install_file(hostname.path(), &tree, "/etc/hostname", 0o644)?;
        Ok::<_, ImageError>(((), Some(format!("{} files", spec.files.len() + 1))))
    })?;

    for (i, command) in spec.run.iter().enumerate() {
        let shown = first_line(command);
        step(progress, artefact, &format!("run[{i}]: {shown}"), || {
            run_in_chroot(&tree, command, &format!("run[{i}] `{shown}`"))?;
            Ok::<_, ImageError>(((), None))
        })?;
    }

    let size = step(progress, artefact, "make ext4 image", || {
        let content = tree_size(&tree).context(|| "measuring the root filesystem".into())?;
        // ext4 needs room for its own metadata and the journal on top of the content.
        let needed_mib = (content + content / 8 + (48 << 20)) >> 20;
        if needed_mib > u64::from(spec.resources.disk_mib) {
            return Err(ImageError::DiskTooSmall {
                needed_mib,
                disk_mib: spec.resources.disk_mib,
            });
        }
        let image = out.join(IMAGE_FILE);
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "kiln-root", "-d"])
                .arg(&tree)
                .arg(&image)
                .arg(format!("{}M", spec.resources.disk_mib)),
            "mkfs.ext4",
        )?;
        Ok::<_, ImageError>((
            content,
            Some(format!(
                "{} of files in a {} MiB disk",
                human_bytes(content),
                spec.resources.disk_mib
            )),
        ))
    })?;
    tracing::debug!(size, "root filesystem content");
    std::fs::remove_dir_all(&tree).context(|| format!("removing {}", tree.display()))?;

    let config = template_config(spec, image_config.as_ref());
    let json = serde_json::to_vec_pretty(&config).map_err(|e| ImageError::Io {
        context: "serializing the template config".into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(out.join(CONFIG_FILE), json).context(|| "writing config.json".into())?;
    std::fs::write(out.join(PACKAGES_FILE), packages.join("\n") + "\n")
        .context(|| "writing packages.txt".into())?;
    Ok(())
}

/// mmdebstrap's `--include` of the spec's packages, if it has any.
fn include_arg(spec: &TemplateSpec) -> Option<String> {
    (!spec.packages.is_empty()).then(|| format!("--include={}", spec.packages.join(",")))
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.len() > 60 {
        format!(
            "{}...",
            &line[..line.char_indices().nth(57).map_or(line.len(), |(i, _)| i)]
        )
    } else {
        line.to_owned()
    }
}

/// Resolves the directory `dir` (absolute, as seen inside the image) to a host path under
/// `tree` the way a chroot would: symlinks are followed, absolute link targets restart at the
/// image root and `..` stops at it, so the result can never leave `tree`. Missing
/// directories are created.
fn resolve_dir_in_root(tree: &Path, dir: &Path) -> Result<PathBuf, ImageError> {
    let fail = |message: String| ImageError::Io {
        context: format!("resolving {} in the image", dir.display()),
        source: std::io::Error::other(message),
    };
    let mut pending: Vec<std::ffi::OsString> = dir
        .components()
        .rev()
        .filter_map(|c| match c {
            std::path::Component::Normal(name) => Some(name.to_owned()),
            std::path::Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut current: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            current.pop();
            continue;
        }
        let candidate = current
            .iter()
            .fold(tree.to_owned(), |p, c| p.join(c))
            .join(&name);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(fail("too many levels of symbolic links".into()));
                }
                let target = std::fs::read_link(&candidate)
                    .context(|| format!("reading link {}", candidate.display()))?;
                if target.is_absolute() {
                    current.clear();
                }
                for component in target.components().rev() {
                    match component {
                        std::path::Component::Normal(n) => pending.push(n.to_owned()),
                        std::path::Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(meta) if meta.is_dir() => current.push(name),
            Ok(_) => return Err(fail(format!("{} is not a directory", candidate.display()))),
            Err(_) => {
                std::fs::create_dir(&candidate)
                    .context(|| format!("creating {}", candidate.display()))?;
                current.push(name);
            }
        }
    }
    Ok(current.iter().fold(tree.to_owned(), |p, c| p.join(c)))
}

/// Copies `src` to `dest` inside `tree`. Parent directories resolve with chroot semantics
/// (see [`resolve_dir_in_root`]); a symlink at the destination itself is replaced, never
/// written through.
fn install_file(src: &Path, tree: &Path, dest: &str, mode: u32) -> Result<(), ImageError> {
    if !src.is_file() {
        return Err(ImageError::Io {
            context: format!("installing {dest}"),
            source: std::io::Error::other(format!("{} is not a file", src.display())),
        });
    }
    let dest_path = Path::new(dest);
    let name = dest_path.file_name().ok_or_else(|| ImageError::Io {
        context: format!("installing {dest}"),
        source: std::io::Error::other("destination has no file name"),
    })?;
    let parent = resolve_dir_in_root(tree, dest_path.parent().unwrap_or(Path::new("/")))?;
    let target = parent.join(name);
    if std::fs::symlink_metadata(&target).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(&target).context(|| format!("replacing {dest}"))?;
    }
    std::fs::copy(src, &target).context(|| format!("copying {} to {dest}", src.display()))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
        .context(|| format!("chmod {dest}"))?;
    Ok(())
}

/// Runs a build step in a chroot of `tree`, in private mount, PID and network namespaces:
/// the step gets /proc and /dev, no network, and leaves no mounts behind.
fn run_in_chroot(tree: &Path, command: &str, what: &str) -> Result<(), ImageError> {
    if !tree.join("bin/sh").exists() {
        return Err(ImageError::Io {
            context: "running build steps".into(),
            source: std::io::Error::other("the image has no /bin/sh"),
        });
    }
    let root = shell_quote(&tree.to_string_lossy());
    let script = format!(
        "mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && \
         exec chroot {root} /bin/sh -c {}",
        shell_quote(command)
    );
    run(
        Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--net",
                "--fork",
                "--kill-child",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .env("PATH", crate::BUILD_PATH)
            .env("HOME", "/root"),
        what,
    )?;
    Ok(())
}

/// Bytes used by the files under `dir` (rounded up to 4 KiB blocks), not following symlinks.
fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            total += meta.len().div_ceil(4096) * 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// The runtime defaults: the spec's, over the image's.
fn template_config(spec: &TemplateSpec, image: Option<&crate::oci::ImageConfig>) -> TemplateConfig {
    let mut env: BTreeMap<String, String> = image
        .map(|i| i.env.iter().cloned().collect())
        .unwrap_or_default();
    env.extend(spec.env.clone());
    let start = match &spec.start {
        Some(start) => Some(StartCommand {
            command: AgentCommand::Shell(start.command.clone()),
            readiness: start.readiness.as_ref().map(|r| match r {
                ReadinessSpec::TcpPort(port) => ReadinessCheck::TcpPort { port: *port },
                ReadinessSpec::Exec(command) => ReadinessCheck::Exec {
                    command: AgentCommand::Shell(command.clone()),
                },
            }),
            timeout_ms: start.timeout_secs * 1000,
            interval_ms: 100,
        }),
        None => image.and_then(|i| {
            let argv: Vec<String> = i.entrypoint.iter().chain(&i.cmd).cloned().collect();
            (!argv.is_empty()).then_some(StartCommand {
                command: AgentCommand::Argv(argv),
                readiness: None,
                timeout_ms: 60_000,
                interval_ms: 100,
            })
        }),
    };
    TemplateConfig {
        name: spec.name.clone(),
        env,
        workdir: spec
            .workdir
            .clone()
            .or_else(|| image.and_then(|i| i.workdir.clone())),
        user: spec
            .user
            .clone()
            .or_else(|| image.and_then(|i| i.user.clone())),
        start,
        resources: spec.resources.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_file_follows_links_like_a_chroot_and_never_leaves_the_tree() {
        let tree = tempfile::tempdir().expect("tree");
        let outside = tempfile::tempdir().expect("outside");
        let src = outside.path().join("src");
        std::fs::write(&src, b"x").expect("write");
        let root = tree.path();
        // Merged /usr, as in Debian: /sbin -> usr/sbin.
        std::fs::create_dir_all(root.join("usr/sbin")).expect("mkdir");
        std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).expect("symlink");
        install_file(&src, root, "/sbin/tool", 0o755).expect("install through merged /usr");
        assert!(root.join("usr/sbin/tool").is_file());
        // Hostile links resolve inside the tree, never outside it.
        std::os::unix::fs::symlink(outside.path(), root.join("evil")).expect("symlink");
        std::os::unix::fs::symlink("../../../../..", root.join("up")).expect("symlink");
        install_file(&src, root, "/evil/file", 0o644).expect("absolute link is re-rooted");
        install_file(&src, root, "/up/file2", 0o644).expect("`..` stops at the root");
        assert!(root.join("file2").is_file());
        let outside_entries: Vec<_> = std::fs::read_dir(outside.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            outside_entries,
            vec![std::ffi::OsString::from("src")],
            "nothing written outside"
        );
        // A symlink at the destination is replaced, not written through.
        std::os::unix::fs::symlink("/etc/passwd", root.join("dest")).expect("symlink");
        install_file(&src, root, "/dest", 0o600).expect("install");
        let meta = std::fs::symlink_metadata(root.join("dest")).expect("installed");
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        std::os::unix::fs::symlink("loop", root.join("loop")).expect("symlink");
        assert!(install_file(&src, root, "/loop/x", 0o644).is_err());
    }

    /// Every input of a root filesystem is part of its cache key: changing any of them
    /// selects a different artefact, so it is rebuilt.
    #[test]
    fn every_input_changes_the_key() {
        let dir = tempfile::tempdir().expect("dir");
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"agent v1").expect("write");
        std::fs::write(dir.path().join("f.txt"), b"file v1").expect("write");
        let text = "name = \"t\"\npackages = [\"vim\"]\n[base]\nsuite = \"bookworm\"\n[[files]]\nsrc = \"f.txt\"\ndest = \"/f\"\n";
        let spec = TemplateSpec::parse(text, "t").expect("valid");
        let packages = vec!["vim=2:9.0".to_owned()];
        let key = |spec: &TemplateSpec, packages: &[String]| {
            rootfs_inputs(spec, dir.path(), &agent, packages)
                .expect("inputs")
                .key()
        };
        let original = key(&spec, &packages);
        assert_eq!(original, key(&spec, &packages), "stable");

        let mut changed = spec.clone();
        changed.resources.disk_mib += 1;
        assert_ne!(original, key(&changed, &packages), "spec");
        assert_ne!(
            original,
            key(&spec, &["vim=2:9.1".to_owned()]),
            "resolved package versions"
        );
        std::fs::write(dir.path().join("f.txt"), b"file v2").expect("write");
        let after_file = key(&spec, &packages);
        assert_ne!(original, after_file, "copied file contents");
        std::fs::write(&agent, b"agent v2").expect("write");
        assert_ne!(after_file, key(&spec, &packages), "agent binary");
        assert!(
            rootfs_inputs(&spec, dir.path(), &agent, &packages)
                .expect("inputs")
                .entries()
                .contains(&("builder".into(), crate::cache::BUILDER_VERSION.into())),
            "builder version"
        );

        std::fs::write(dir.path().join("image.tar"), b"archive v1").expect("write");
        let image_spec = TemplateSpec::parse("name = \"i\"\n[base]\nimage = \"image.tar\"\n", "i")
            .expect("valid");
        let before = key(&image_spec, &[]);
        std::fs::write(dir.path().join("image.tar"), b"archive v2").expect("write");
        assert_ne!(before, key(&image_spec, &[]), "image archive contents");
        std::fs::remove_file(dir.path().join("image.tar")).expect("remove");
        let err = rootfs_inputs(&image_spec, dir.path(), &agent, &[]).expect_err("missing archive");
        assert!(err.to_string().contains("`base.image`"), "{err}");
        std::fs::remove_file(dir.path().join("f.txt")).expect("remove");
        let err = rootfs_inputs(&spec, dir.path(), &agent, &packages).expect_err("missing file");
        assert!(err.to_string().contains("`files[0].src`"), "{err}");
    }

    #[test]
    fn simulated_installs_parse_into_sorted_name_version_pairs() {
        let text = "I: running apt-get\n\
Inst libc6 (2.36-9+deb12u4 Debian:12.5/stable [amd64])\n\
Conf libc6 (2.36-9+deb12u4 Debian:12.5/stable [amd64])\n\
Inst base-files (12.4+deb12u5 Debian:12.5/stable [amd64])\n\
Inst python3.11-minimal (3.11.2-6 Debian:12.5/stable [amd64]) []\n\
Inst libc6 (2.36-9+deb12u4 Debian:12.5/stable [amd64])\n\
Inst broken-line-without-version\n";
        assert_eq!(
            parse_simulated_installs(text),
            vec![
                "base-files=12.4+deb12u5".to_owned(),
                "libc6=2.36-9+deb12u4".to_owned(),
                "python3.11-minimal=3.11.2-6".to_owned(),
            ]
        );
    }

    #[test]
    fn installed_packages_are_read_from_the_dpkg_status() {
        let tree = tempfile::tempdir().expect("tree");
        let status = tree.path().join("var/lib/dpkg");
        std::fs::create_dir_all(&status).expect("mkdir");
        std::fs::write(
            status.join("status"),
            "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9\n\n\
Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n\n\
Package: base-files\nStatus: install ok installed\nVersion: 12.4\n",
        )
        .expect("write");
        assert_eq!(
            installed_packages(tree.path()).expect("read"),
            vec!["base-files=12.4".to_owned(), "libc6=2.36-9".to_owned()]
        );
    }

    #[test]
    fn spec_start_command_becomes_the_agents_start_command() {
        let base = "name = \"x\"\nenv = { A = \"1\" }\nworkdir = \"/srv\"\nuser = \"app\"\n[base]\nsuite = \"bookworm\"\n";
        let spec = TemplateSpec::parse(
            &format!("{base}[start]\ncommand = \"serve --port 8080\"\nreadiness = {{ tcp_port = 8080 }}\ntimeout_secs = 20\n"),
            "t",
        )
        .expect("valid");
        let config = template_config(&spec, None);
        assert_eq!(
            config.start,
            Some(StartCommand {
                command: AgentCommand::Shell("serve --port 8080".into()),
                readiness: Some(ReadinessCheck::TcpPort { port: 8080 }),
                timeout_ms: 20_000,
                interval_ms: 100,
            })
        );
        assert_eq!(config.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(config.workdir.as_deref(), Some("/srv"));
        assert_eq!(config.user.as_deref(), Some("app"));

        let spec = TemplateSpec::parse(
            &format!("{base}[start]\ncommand = \"serve\"\nreadiness = {{ exec = \"test -e /run/ready\" }}\n"),
            "t",
        )
        .expect("valid");
        let start = template_config(&spec, None).start.expect("a start command");
        assert_eq!(
            start.readiness,
            Some(ReadinessCheck::Exec {
                command: AgentCommand::Shell("test -e /run/ready".into())
            })
        );
        let no_start = TemplateSpec::parse(base, "t").expect("valid");
        assert_eq!(template_config(&no_start, None).start, None);
    }

    #[test]
    fn spec_overrides_image_config() {
        let spec = TemplateSpec::parse(
            "name = \"x\"\nenv = { A = \"spec\" }\n[base]\nimage = \"i.tar\"\n",
            "t",
        )
        .expect("valid");
        let image = crate::oci::ImageConfig {
            env: vec![("A".into(), "image".into()), ("B".into(), "image".into())],
            workdir: Some("/app".into()),
            user: Some("1000".into()),
            entrypoint: vec!["/app/run".into()],
            cmd: vec!["--serve".into()],
        };
        let config = template_config(&spec, Some(&image));
        assert_eq!(config.env.get("A").map(String::as_str), Some("spec"));
        assert_eq!(config.env.get("B").map(String::as_str), Some("image"));
        assert_eq!(config.workdir.as_deref(), Some("/app"));
        assert_eq!(config.user.as_deref(), Some("1000"));
        assert_eq!(
            config.start.map(|s| s.command),
            Some(AgentCommand::Argv(vec![
                "/app/run".into(),
                "--serve".into()
            ]))
        );
    }
}
