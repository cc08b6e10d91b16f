//! Running the external tools an image build uses, with errors that say what to install.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::error::ImageError;

/// Which Debian package provides each tool the builder runs.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "mmdebstrap" => "mmdebstrap",
        "newuidmap" | "newgidmap" => "uidmap",
        "mkfs.ext4" => "e2fsprogs",
        "apt-get" | "apt-cache" => "apt",
        "dpkg-deb" => "dpkg",
        "unshare" | "chroot" => "util-linux",
        "xz" => "xz-utils",
        "depmod" => "kmod",
        "zstd" => "zstd",
        "qemu-system-x86_64" => "qemu-system-x86",
        "qemu-img" => "qemu-utils",
        _ => "the package that provides it",
    }
}

/// When a build must be over, and the limit that set it (for the error).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// The moment.
    pub at: Instant,
    /// How long the build was allowed.
    pub limit: Duration,
}

impl Deadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + limit,
            limit,
        }
    }
}

/// Runs `command` like [`run`], its stdout into `stdout` if given (captured otherwise), and
/// stops it with everything it started (its process group) at `deadline`.
pub fn run_until(
    command: &mut Command,
    what: &str,
    stdout: Option<Stdio>,
    deadline: Option<Deadline>,
) -> Result<Output, ImageError> {
    command
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    match stdout {
        Some(stdout) => command.stdout(stdout),
        None => command.stdout(Stdio::piped()),
    };
    let program = command.get_program().to_string_lossy().into_owned();
    let spawned = command.spawn();
    // The command keeps what it was given for stdout: drop it, or a pipe's reader would
    // never see the end.
    command.stdout(Stdio::null());
    let mut child = spawned.map_err(|e| spawn_error(&program, e))?;
    let drain = |stream: Option<Box<dyn Read + Send>>| {
        stream.map(|mut stream| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = stream.read_to_end(&mut bytes);
                bytes
            })
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let waited = |e| ImageError::Io {
        context: format!("waiting for {program}"),
        source: e,
    };
    let status = loop {
        match deadline {
            None => break child.wait().map_err(waited)?,
            Some(deadline) => {
                if let Some(status) = child.try_wait().map_err(waited)? {
                    break status;
                }
                if Instant::now() >= deadline.at {
                    // The group's leader is our child, so the group is ours alone.
                    let group = nix::unistd::Pid::from_raw(child.id() as i32);
                    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait();
                    return Err(ImageError::TimedOut {
                        what: what.to_owned(),
                        limit_secs: deadline.limit.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let join = |reader: Option<std::thread::JoinHandle<Vec<u8>>>| {
        reader
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default()
    };
    check(
        Output {
            status,
            stdout: join(out),
            stderr: join(err),
        },
        what,
    )
}

/// Runs `command`, capturing its output; a non-zero exit is an error that carries the tail
/// of stderr.
pub fn run(command: &mut Command, what: &str) -> Result<Output, ImageError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(&program, e))?;
    check(output, what)
}

fn spawn_error(program: &str, e: std::io::Error) -> ImageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ImageError::MissingTool {
            package: package_of(program).to_owned(),
            tool: program.to_owned(),
        }
    } else {
        ImageError::Io {
            context: format!("running {program}"),
            source: e,
        }
    }
}

/// `output` if its command succeeded; an error with the tail of its stderr otherwise.
fn check(output: Output, what: &str) -> Result<Output, ImageError> {
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        return Err(ImageError::CommandFailed {
            what: what.to_owned(),
            status: output.status.to_string(),
            stderr: tail,
        });
    }
    Ok(output)
}

/// Quotes `s` for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_name_their_package() {
        let err = run(&mut Command::new("mkfs.ext4-does-not-exist"), "x").expect_err("missing");
        assert!(matches!(err, ImageError::MissingTool { .. }));
        let err = run(
            Command::new("sh").args(["-c", "echo bad >&2; exit 3"]),
            "failing step",
        )
        .expect_err("fails");
        let text = err.to_string();
        assert!(
            text.contains("failing step") && text.contains("bad"),
            "{text}"
        );
    }

    #[test]
    fn a_deadline_stops_the_command_and_what_it_started() {
        let dir = tempfile::tempdir().expect("dir");
        let marker = dir.path().join("survivor");
        // The shell starts a child that would write the marker after the deadline.
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let started = Instant::now();
        let err = run_until(
            Command::new("sh").args(["-c", &script]),
            "a slow step",
            None,
            Some(Deadline::after(Duration::from_millis(300))),
        )
        .expect_err("stopped");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(&err, ImageError::TimedOut { what, .. } if what == "a slow step"),
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "the child outlived the deadline");

        // Within its time, output comes back as with `run`, into a file if given.
        let out = run_until(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            "a quick step",
            None,
            Some(Deadline::after(Duration::from_secs(30))),
        )
        .expect("runs");
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let file = std::fs::File::create(dir.path().join("out")).expect("file");
        run_until(
            Command::new("echo").arg("to file"),
            "x",
            Some(file.into()),
            None,
        )
        .expect("runs");
        assert_eq!(
            std::fs::read(dir.path().join("out")).expect("read"),
            b"to file\n"
        );
        let failed =
            run_until(&mut Command::new("false"), "failing", None, None).expect_err("fails");
        assert!(
            matches!(failed, ImageError::CommandFailed { .. }),
            "{failed}"
        );
    }

    #[test]
    fn quoting_survives_the_shell() {
        let tricky = "it's a \"test\" $HOME `x`";
        let out = run(
            Command::new("sh").args(["-c", &format!("printf %s {}", shell_quote(tricky))]),
            "q",
        )
        .expect("runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), tricky);
    }
}
