//! Running the external tools an image build uses, with errors that say what to install.

use std::process::{Command, Output, Stdio};

use crate::error::ImageError;

/// Which Debian package provides each tool the builder runs.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "mmdebstrap" => "mmdebstrap",
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

/// Runs `command`, capturing its output; a non-zero exit is an error that carries the tail
/// of stderr.
pub fn run(command: &mut Command, what: &str) -> Result<Output, ImageError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ImageError::MissingTool {
                package: package_of(&program).to_owned(),
                tool: program.clone(),
            }
        } else {
            ImageError::Io {
                context: format!("running {program}"),
                source: e,
            }
        }
    })?;
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
