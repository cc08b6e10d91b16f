//! Template specs: the TOML file a template is built from.
//!
//! ```toml
//! name = "python"
//! description = "Debian with Python 3"
//!
//! [base]
//! suite = "bookworm"          # a Debian suite built with mmdebstrap ...
//! # image = "app.tar"         # ... or an OCI / docker-save image archive
//!
//! packages = ["python3", "python3-pip"]
//! run = ["python3 -m compileall -q /usr/lib/python3.11"]
//! env = { LANG = "C.UTF-8" }
//! workdir = "/root"
//! user = "root"
//!
//! [[files]]
//! src = "files/sitecustomize.py"   # relative to the spec file
//! dest = "/usr/lib/python3.11/sitecustomize.py"
//! mode = 0o644
//!
//! [start]
//! command = "python3 -m http.server 8000"
//! readiness = { tcp_port = 8000 }
//! timeout_secs = 60
//!
//! [resources]
//! vcpus = 1
//! memory_mib = 512
//! disk_mib = 2048
//! ```
//!
//! Unknown keys are errors. Every validation error names the field it is about.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A parsed and validated template spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// Template name: lowercase letters, digits, `-`, `_` and `.`; at most 63 characters.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Where the root filesystem comes from.
    pub base: BaseSpec,
    /// Debian packages installed on top of the base.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Files copied into the image.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Build-time shell commands, run in order in a chroot of the image (no network).
    #[serde(default)]
    pub run: Vec<String>,
    /// Default environment of every process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Default working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Default user (`name`, `uid` or `uid:gid`).
    #[serde(default)]
    pub user: Option<String>,
    /// A long-running process started before the template snapshot is taken.
    #[serde(default)]
    pub start: Option<StartSpec>,
    /// VM size.
    #[serde(default)]
    pub resources: Resources,
}

/// The base of a root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseSpec {
    /// Debian suite (`bookworm`), built with mmdebstrap.
    #[serde(default)]
    pub suite: Option<String>,
    /// mmdebstrap variant.
    #[serde(default = "default_variant")]
    pub variant: String,
    /// An OCI image layout or `docker save` archive (relative to the spec file).
    #[serde(default)]
    pub image: Option<PathBuf>,
}

fn default_variant() -> String {
    "minbase".into()
}

/// A file copied into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Source on the build host, relative to the spec file.
    pub src: PathBuf,
    /// Absolute destination in the image.
    pub dest: String,
    /// Permission bits (default 0644).
    #[serde(default)]
    pub mode: Option<u32>,
}

/// How readiness of the start command is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ReadinessSpec {
    /// A TCP port on the guest's loopback accepts connections.
    TcpPort(u16),
    /// A shell command exits 0.
    Exec(String),
}

/// The start command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartSpec {
    /// Shell command.
    pub command: String,
    /// Readiness check; ready as soon as started if absent.
    #[serde(default)]
    pub readiness: Option<ReadinessSpec>,
    /// Give up after this long.
    #[serde(default = "default_start_timeout")]
    pub timeout_secs: u64,
}

fn default_start_timeout() -> u64 {
    60
}

/// VM size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest memory.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Root disk size.
    #[serde(default = "default_disk")]
    pub disk_mib: u32,
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory() -> u32 {
    256
}

fn default_disk() -> u32 {
    1024
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
            disk_mib: default_disk(),
        }
    }
}

/// Why a spec was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read template spec {path}")]
    Read {
        /// The spec file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or a key has the wrong type or is unknown.
    #[error("{origin}: {message}")]
    Parse {
        /// File name or `<inline>`.
        origin: String,
        /// The TOML parser's message, with line, column and key.
        message: String,
    },
    /// A field has a value outside what kiln accepts.
    #[error("{origin}: `{field}`: {message}")]
    Invalid {
        /// File name or `<inline>`.
        origin: String,
        /// Dotted path of the field, e.g. `resources.memory_mib` or `files[2].dest`.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

impl TemplateSpec {
    /// Reads and validates a spec file.
    pub fn from_file(path: &Path) -> Result<TemplateSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        TemplateSpec::parse(&text, &path.display().to_string())
    }

    /// Parses and validates spec text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<TemplateSpec, SpecError> {
        let spec: TemplateSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        spec.validate()
            .map_err(|(field, message)| SpecError::Invalid {
                origin: origin.to_owned(),
                field,
                message,
            })?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let fail = |field: &str, message: &str| Err((field.to_owned(), message.to_owned()));
        if !valid_name(&self.name) {
            return fail(
                "name",
                "use 1 to 63 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or digit",
            );
        }
        match (&self.base.suite, &self.base.image) {
            (Some(_), Some(_)) => return fail("base", "set either `suite` or `image`, not both"),
            (None, None) => {
                return fail(
                    "base",
                    "set `suite` (a Debian suite) or `image` (an image archive)",
                )
            }
            (Some(suite), None) if !valid_word(suite) => {
                return fail("base.suite", "a Debian suite name such as `bookworm`")
            }
            (None, Some(image)) if !is_relative_inside(image) => {
                return fail(
                    "base.image",
                    "a path inside the spec's directory (relative, no `..`)",
                )
            }
            _ => {}
        }
        if !matches!(
            self.base.variant.as_str(),
            "minbase" | "essential" | "apt" | "required" | "important" | "standard"
        ) {
            return fail(
                "base.variant",
                "one of minbase, essential, apt, required, important, standard",
            );
        }
        if self.base.image.is_some() && !self.packages.is_empty() {
            return fail(
                "packages",
                "packages can only be installed on a Debian `suite` base",
            );
        }
        for (i, package) in self.packages.iter().enumerate() {
            if !valid_package(package) {
                return fail(
                    &format!("packages[{i}]"),
                    &format!("`{package}` is not a Debian package name"),
                );
            }
        }
        for (i, file) in self.files.iter().enumerate() {
            if !is_relative_inside(&file.src) {
                return fail(
                    &format!("files[{i}].src"),
                    "a path inside the spec's directory (relative, no `..`)",
                );
            }
            if !is_clean_absolute(&file.dest) {
                return fail(&format!("files[{i}].dest"), "an absolute path without `..`");
            }
            if file.mode.is_some_and(|m| m > 0o7777) {
                return fail(
                    &format!("files[{i}].mode"),
                    "permission bits, at most 0o7777",
                );
            }
        }
        for (i, step) in self.run.iter().enumerate() {
            if step.trim().is_empty() {
                return fail(&format!("run[{i}]"), "an empty command");
            }
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                return fail(
                    &format!("env.{key}"),
                    "variable names must be non-empty without `=`",
                );
            }
        }
        if let Some(workdir) = &self.workdir {
            if !is_clean_absolute(workdir) {
                return fail("workdir", "an absolute path without `..`");
            }
        }
        if self
            .user
            .as_ref()
            .is_some_and(|u| u.is_empty() || u.contains([' ', '\0']))
        {
            return fail("user", "a user name, uid or uid:gid");
        }
        if let Some(start) = &self.start {
            if start.command.trim().is_empty() {
                return fail("start.command", "an empty command");
            }
            if start.timeout_secs == 0 || start.timeout_secs > 3600 {
                return fail("start.timeout_secs", "between 1 and 3600");
            }
            if matches!(start.readiness, Some(ReadinessSpec::TcpPort(0))) {
                return fail("start.readiness.tcp_port", "a port between 1 and 65535");
            }
        }
        let r = &self.resources;
        if !(1..=64).contains(&r.vcpus) {
            return fail("resources.vcpus", "between 1 and 64");
        }
        if !(64..=262_144).contains(&r.memory_mib) {
            return fail("resources.memory_mib", "between 64 and 262144");
        }
        if !(64..=1_048_576).contains(&r.disk_mib) {
            return fail("resources.disk_mib", "between 64 and 1048576");
        }
        Ok(())
    }
}

/// The file name of a template's spec inside its directory (`templates/<name>/template.toml`).
pub const SPEC_FILE: &str = "template.toml";

/// The spec of the template `name` in the first of `dirs` that has one.
pub fn find_named(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter()
        .map(|dir| dir.join(name).join(SPEC_FILE))
        .find(|path| path.is_file())
}

fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

fn valid_word(word: &str) -> bool {
    !word.is_empty()
        && word.len() <= 64
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Debian policy: lowercase letters, digits, `+`, `-`, `.`; at least two characters,
/// starting with a letter or digit. An `:arch` suffix is allowed.
fn valid_package(name: &str) -> bool {
    let base = name
        .split_once(':')
        .map_or(name, |(b, arch)| if valid_word(arch) { b } else { "" });
    let bytes = base.as_bytes();
    bytes.len() >= 2
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        })
}

/// A relative path that stays inside its base directory.
fn is_relative_inside(path: &Path) -> bool {
    !path.as_os_str().is_empty()
        && path.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

fn is_clean_absolute(path: &str) -> bool {
    let p = Path::new(path);
    p.is_absolute()
        && !p.components().any(|c| c == std::path::Component::ParentDir)
        && !path.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "python"
description = "Debian with Python"
packages = ["python3", "python3-pip", "libc6:amd64"]
run = ["echo hi > /etc/motd"]
env = { LANG = "C.UTF-8" }
workdir = "/root"
user = "root"

[base]
suite = "bookworm"

[[files]]
src = "files/a.py"
dest = "/opt/a.py"
mode = 0o755

[start]
command = "python3 -m http.server 8000"
readiness = { tcp_port = 8000 }

[resources]
vcpus = 2
memory_mib = 512
disk_mib = 2048
"#;

    #[test]
    fn parses_a_full_spec() {
        let spec = TemplateSpec::parse(FULL, "t.toml").expect("valid");
        assert_eq!(spec.name, "python");
        assert_eq!(spec.base.suite.as_deref(), Some("bookworm"));
        assert_eq!(spec.base.variant, "minbase");
        assert_eq!(spec.files[0].mode, Some(0o755));
        assert_eq!(
            spec.start.as_ref().and_then(|s| s.readiness.clone()),
            Some(ReadinessSpec::TcpPort(8000))
        );
        assert_eq!(spec.start.as_ref().map(|s| s.timeout_secs), Some(60));
        assert_eq!(
            spec.resources,
            Resources {
                vcpus: 2,
                memory_mib: 512,
                disk_mib: 2048
            }
        );
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let spec = TemplateSpec::parse("name = \"base\"\n[base]\nsuite = \"bookworm\"\n", "t")
            .expect("valid");
        assert_eq!(spec.resources, Resources::default());
        assert!(spec.packages.is_empty() && spec.start.is_none());
    }

    fn invalid_field(text: &str) -> String {
        match TemplateSpec::parse(text, "t.toml") {
            Err(SpecError::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let base = "[base]\nsuite = \"bookworm\"\n";
        assert_eq!(
            invalid_field(&format!("name = \"Bad Name\"\n{base}")),
            "name"
        );
        assert_eq!(invalid_field("name = \"x\"\n[base]\n"), "base");
        assert_eq!(
            invalid_field("name = \"x\"\n[base]\nsuite = \"b\"\nimage = \"i.tar\"\n"),
            "base"
        );
        assert_eq!(
            invalid_field(&format!(
                "name = \"x\"\npackages = [\"ok\", \"NOT OK\"]\n{base}"
            )),
            "packages[1]"
        );
        assert_eq!(
            invalid_field(&format!("name = \"x\"\n{base}[[files]]\nsrc = \"a\"\ndest = \"/a\"\n[[files]]\nsrc = \"../x\"\ndest = \"/b\"\n")),
            "files[1].src"
        );
        assert_eq!(
            invalid_field(&format!(
                "name = \"x\"\n{base}[[files]]\nsrc = \"a\"\ndest = \"rel\"\n"
            )),
            "files[0].dest"
        );
        assert_eq!(
            invalid_field(&format!("name = \"x\"\nworkdir = \"/a/../b\"\n{base}")),
            "workdir"
        );
        assert_eq!(
            invalid_field(&format!(
                "name = \"x\"\n{base}[resources]\nmemory_mib = 16\n"
            )),
            "resources.memory_mib"
        );
        assert_eq!(
            invalid_field(&format!("name = \"x\"\n{base}[start]\ncommand = \"  \"\n")),
            "start.command"
        );
        assert_eq!(
            invalid_field(&format!(
                "name = \"x\"\n{base}[start]\ncommand = \"a\"\nreadiness = {{ tcp_port = 0 }}\n"
            )),
            "start.readiness.tcp_port"
        );
        assert_eq!(
            invalid_field("name = \"x\"\npackages = [\"vim\"]\n[base]\nimage = \"i.tar\"\n"),
            "packages"
        );
        let cases = [
            ("[base]\nsuite = \"../etc\"\n", "base.suite"),
            ("[base]\nsuite = \"bookworm\"\nvariant = \"huge\"\n", "base.variant"),
            (
                "[base]\nsuite = \"bookworm\"\n[[files]]\nsrc = \"a\"\ndest = \"/a\"\nmode = 0o17777\n",
                "files[0].mode",
            ),
            ("run = [\"true\", \" \"]\n[base]\nsuite = \"bookworm\"\n", "run[1]"),
            ("env = { \"A=B\" = \"x\" }\n[base]\nsuite = \"bookworm\"\n", "env.A=B"),
            ("[base]\nimage = \"../x.tar\"\n", "base.image"),
            ("[base]\nimage = \"/x.tar\"\n", "base.image"),
            ("user = \"a b\"\n[base]\nsuite = \"bookworm\"\n", "user"),
            (
                "[base]\nsuite = \"bookworm\"\n[start]\ncommand = \"a\"\ntimeout_secs = 0\n",
                "start.timeout_secs",
            ),
            ("[base]\nsuite = \"bookworm\"\n[resources]\nvcpus = 0\n", "resources.vcpus"),
            ("[base]\nsuite = \"bookworm\"\n[resources]\ndisk_mib = 8\n", "resources.disk_mib"),
        ];
        for (text, field) in cases {
            assert_eq!(
                invalid_field(&format!("name = \"x\"\n{text}")),
                field,
                "{text}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_point_at_the_line() {
        let err = TemplateSpec::parse(
            "name = \"x\"\nmemory = 5\n[base]\nsuite = \"bookworm\"\n",
            "t.toml",
        )
        .expect_err("unknown key");
        let text = err.to_string();
        assert!(
            text.contains("t.toml") && text.contains("memory") && text.contains("line 2"),
            "{text}"
        );
        let err = TemplateSpec::parse(
            "name = \"x\"\n[base]\nsuite = \"bookworm\"\n[resources]\nvcpus = \"two\"\n",
            "t.toml",
        )
        .expect_err("wrong type");
        assert!(err.to_string().contains("vcpus"), "{err}");
    }
}
