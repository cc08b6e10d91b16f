//! Running the system's network tools (`ip`, `nft`, `tc`, `conntrack`), on the host or inside a
//! sandbox's network namespace, each with a whole batch of work on its standard input so
//! that one set-up costs one process per tool.

use std::io::Write;
use std::os::fd::BorrowedFd;
use std::process::{Command, Stdio};

use crate::NetworkError;

/// Where a tool runs.
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    /// The daemon's own network namespace.
    Host,
    /// A sandbox's namespace (an open `/run/netns/...` or `/proc/PID/ns/net`).
    Namespace(BorrowedFd<'a>),
}

/// Runs `program args`, feeding `input` on its standard input, in `place`; fails with the
/// tool's own error output.
pub fn run(
    place: Place<'_>,
    program: &str,
    args: &[&str],
    input: &str,
) -> Result<String, NetworkError> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Place::Namespace(ns) = place {
        let ns = ns.try_clone_to_owned().map_err(|e| NetworkError::Tool {
            command: program.to_owned(),
            message: format!("the namespace's descriptor: {e}"),
        })?;
        kiln_net::netns::exec_in(&mut command, ns);
    }
    let describe = || format!("{program} {}", args.join(" "));
    let mut child = command.spawn().map_err(|e| NetworkError::Tool {
        command: describe(),
        message: if e.kind() == std::io::ErrorKind::NotFound {
            format!("{program} not found: bash scripts/up.sh installs it")
        } else {
            e.to_string()
        },
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| NetworkError::Tool {
                command: describe(),
                message: format!("writing its input: {e}"),
            })?;
    }
    let output = child.wait_with_output().map_err(|e| NetworkError::Tool {
        command: describe(),
        message: e.to_string(),
    })?;
    if !output.status.success() {
        return Err(NetworkError::Tool {
            command: describe(),
            message: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs an `nft` script (`nft -f -`) in `place`: applied atomically, all or nothing.
pub fn nft(place: Place<'_>, script: &str) -> Result<(), NetworkError> {
    run(place, "nft", &["-f", "-"], script).map(drop)
}

/// Runs `ip -batch -` with `commands` in `place`.
pub fn ip(place: Place<'_>, commands: &str) -> Result<(), NetworkError> {
    run(place, "ip", &["-batch", "-"], commands).map(drop)
}

/// Runs `tc -batch -` with `commands` in `place`.
pub fn tc(place: Place<'_>, commands: &str) -> Result<(), NetworkError> {
    run(place, "tc", &["-batch", "-"], commands).map(drop)
}

/// Writes a sysctl under `/proc/sys/net` of the calling thread's namespace.
pub fn sysctl(key: &str, value: &str) -> Result<(), NetworkError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|e| NetworkError::Io {
        context: format!("setting {key} = {value}"),
        source: e,
    })
}

/// Reads a sysctl of the calling thread's namespace.
pub fn read_sysctl(key: &str) -> Result<String, NetworkError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::read_to_string(&path)
        .map(|v| v.trim().to_owned())
        .map_err(|e| NetworkError::Io {
            context: format!("reading {key}"),
            source: e,
        })
}
