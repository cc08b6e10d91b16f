//! Errors of image builds.

use std::path::PathBuf;

/// What can go wrong building an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A tool the build needs is not installed.
    #[error(
        "`{tool}` not found: install the Debian package `{package}` (apt-get install {package})"
    )]
    MissingTool {
        /// The command.
        tool: String,
        /// The package that provides it.
        package: String,
    },
    /// An external command ran past the time the build allows it; it was stopped.
    #[error("{what} took longer than the {limit_secs} s a build may take; it was stopped")]
    TimedOut {
        /// What was being done.
        what: String,
        /// The limit.
        limit_secs: u64,
    },
    /// The unprivileged user package installation runs as is not set up.
    #[error("{0}")]
    BuildUser(String),
    /// An external command failed.
    #[error("{what} failed ({status}):\n{stderr}")]
    CommandFailed {
        /// What was being done.
        what: String,
        /// Exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// A local file operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The template spec is invalid.
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    /// The image archive could not be imported.
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
    /// The root filesystem does not fit the disk size.
    #[error("the root filesystem needs about {needed_mib} MiB but `resources.disk_mib` is {disk_mib}; raise it")]
    DiskTooSmall {
        /// Size of the content.
        needed_mib: u64,
        /// The spec's disk size.
        disk_mib: u32,
    },
    /// The kernel package does not contain what kiln needs.
    #[error("kernel: {0}")]
    Kernel(String),
    /// The agent binary would not run in a guest.
    #[error("{path} is not a static executable; build the agent with: RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target x86_64-unknown-linux-gnu -p kiln-agent")]
    AgentNotStatic {
        /// The binary.
        path: PathBuf,
    },
    /// The package archive changed between resolving the package set and installing it.
    #[error("the package archive changed during the build (installed and resolved versions differ: {differing}); build again")]
    PackagesChanged {
        /// Some of the packages that differ.
        differing: String,
    },
    /// A file named by the spec is missing.
    #[error("`{field}`: {path} is not a file (paths in a spec are relative to the spec file)")]
    MissingFile {
        /// The spec field that names it (`files[0].src`, `base.image`).
        field: String,
        /// The missing path.
        path: PathBuf,
    },
}

impl From<std::io::Error> for ImageError {
    fn from(source: std::io::Error) -> Self {
        ImageError::Io {
            context: "I/O error".into(),
            source,
        }
    }
}

/// Adds context to I/O results.
pub trait IoContext<T> {
    /// Wraps the error with `context`.
    fn context(self, context: impl FnOnce() -> String) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, ImageError> {
        self.map_err(|source| ImageError::Io {
            context: context(),
            source,
        })
    }
}

/// `error` and its sources, one after another.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
