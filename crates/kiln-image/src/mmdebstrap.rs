//! mmdebstrap, run unprivileged.
//!
//! Installing packages runs their maintainer scripts. kiln runs mmdebstrap as the system user
//! [`BUILD_USER`] in mmdebstrap's `unshare` mode: the scripts run as root of a user namespace
//! whose ids are that user's subordinate ids (`/etc/subuid`, `/etc/subgid`), which own nothing
//! on the host, in private mount, PID, IPC and UTS namespaces. Stopping mmdebstrap stops them
//! all and leaves no mount behind. The root filesystem comes back as a tar stream (ownership
//! and file capabilities as seen inside the namespace, so as the packages set them), which the
//! caller unpacks as root.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::error::{ImageError, IoContext};
use crate::tool::{run_until, Deadline};

/// The user mmdebstrap runs as.
pub const BUILD_USER: &str = "kiln-build";

/// Where builds make their temporary trees.
const BUILD_TMP: &str = "/var/tmp";

/// How to set the build user up, for errors that say what is missing.
const SET_UP: &str = "`bash scripts/up.sh` sets it up; by hand: `useradd --system --shell \
                      /usr/sbin/nologin kiln-build && usermod --add-subuids \
                      1900000000-1900065535 --add-subgids 1900000000-1900065535 kiln-build` \
                      and `apt-get install uidmap`";

/// Variables passed through to mmdebstrap (apt reaches its mirror through a proxy if the
/// host does).
const PASSED_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

/// The build user, checked to be usable by mmdebstrap's `unshare` mode.
#[derive(Debug, Clone, Copy)]
pub struct BuildUser {
    uid: u32,
    gid: u32,
}

impl BuildUser {
    /// Looks the build user up and checks what its builds need: subordinate ids and the
    /// setuid helpers that map them.
    pub fn find() -> Result<BuildUser, ImageError> {
        let user = nix::unistd::User::from_name(BUILD_USER)
            .ok()
            .flatten()
            .ok_or_else(|| {
                ImageError::BuildUser(format!(
                    "packages are installed as the unprivileged user `{BUILD_USER}`, which does \
                     not exist: {SET_UP}"
                ))
            })?;
        for file in ["/etc/subuid", "/etc/subgid"] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if !has_subordinate_ids(&text, BUILD_USER, user.uid.as_raw()) {
                return Err(ImageError::BuildUser(format!(
                    "`{BUILD_USER}` has no subordinate ids in {file} (at least 65536): {SET_UP}"
                )));
            }
        }
        for tool in ["newuidmap", "newgidmap"] {
            let found = crate::BUILD_PATH
                .split(':')
                .any(|dir| Path::new(dir).join(tool).is_file());
            if !found {
                return Err(ImageError::MissingTool {
                    tool: tool.into(),
                    package: "uidmap".into(),
                });
            }
        }
        Ok(BuildUser {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }

    /// Runs `mmdebstrap --mode=unshare` with `args` as this user, its stdout into `stdout` if
    /// given, stopped at `deadline`.
    pub fn mmdebstrap(
        &self,
        args: &[String],
        stdout: Option<Stdio>,
        what: &str,
        deadline: Option<Deadline>,
    ) -> Result<Output, ImageError> {
        // mmdebstrap builds the whole tree in its own temporary directory in here before it
        // streams it: on disk (`/var/tmp`; `/tmp` may be memory), owned by the user, and
        // passable by the namespace's root (a subordinate id).
        let work = tempfile::Builder::new()
            .prefix("kiln-build-")
            .tempdir_in(BUILD_TMP)
            .context(|| format!("making the build's temporary directory in {BUILD_TMP}"))?;
        std::os::unix::fs::chown(work.path(), Some(self.uid), Some(self.gid))
            .and_then(|()| {
                std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o711))
            })
            .context(|| format!("handing {} to {BUILD_USER}", work.path().display()))?;
        let mut command = Command::new("mmdebstrap");
        command
            .arg("--mode=unshare")
            .args(args)
            .current_dir(work.path())
            .env_clear()
            .env("PATH", crate::BUILD_PATH)
            .env("HOME", work.path())
            .env("TMPDIR", work.path())
            .env("LC_ALL", "C.UTF-8")
            .uid(self.uid)
            .gid(self.gid);
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        // The directory goes when `work` drops, with whatever a stopped run left in it.
        run_until(&mut command, what, stdout, deadline)
    }

    /// Runs mmdebstrap with `args` (which make it write a tar to stdout) as this user,
    /// unpacking the stream into `tree` (made here) as it comes.
    pub fn install_into(
        &self,
        args: &[String],
        tree: &Path,
        deadline: Option<Deadline>,
    ) -> Result<(), ImageError> {
        std::fs::create_dir(tree).context(|| format!("creating {}", tree.display()))?;
        let (reader, writer) = std::io::pipe().context(|| "making a pipe".into())?;
        let unpacking = {
            let (tree, mut reader) = (tree.to_owned(), reader);
            std::thread::spawn(move || {
                crate::oci::unpack_rootfs_tar(&mut reader, &tree)?;
                // The archive ends before the stream does (tar pads its last record): read
                // to the end, or the writer would fail on a closed pipe.
                std::io::copy(&mut reader, &mut std::io::sink())
                    .map_err(|e| crate::oci::OciError::Finalize(crate::oci::EntryError::Tar(e)))?;
                Ok(())
            })
        };
        let installed = self.mmdebstrap(args, Some(writer.into()), "mmdebstrap", deadline);
        let unpacked = unpacking.join().unwrap_or_else(|_| {
            Err(crate::oci::OciError::Finalize(crate::oci::EntryError::Tar(
                std::io::Error::other("the unpacking thread panicked"),
            )))
        });
        match (installed, unpacked) {
            (Ok(_), Ok(())) => Ok(()),
            // mmdebstrap's failure explains an unfinished stream; a failed unpacking (the
            // disk full, say) ends mmdebstrap with a broken pipe, so both are said.
            (
                Err(ImageError::CommandFailed {
                    what,
                    status,
                    stderr,
                }),
                Err(e),
            ) => Err(ImageError::CommandFailed {
                what,
                status,
                stderr: format!(
                    "{stderr}\n(unpacking its output: {})",
                    crate::error::chain(&e)
                ),
            }),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(ImageError::Oci(e)),
        }
    }
}

/// Whether `text` (an `/etc/subuid` or `/etc/subgid`) gives `user` (by name or id) a range
/// of at least 65536 ids.
fn has_subordinate_ids(text: &str, user: &str, uid: u32) -> bool {
    text.lines().any(|line| {
        let fields: Vec<&str> = line.trim().split(':').collect();
        matches!(fields.as_slice(), [owner, _start, count]
            if (*owner == user || owner.parse::<u32>() == Ok(uid))
                && count.parse::<u64>().is_ok_and(|count| count >= 65536))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ids_are_found_by_name_or_id() {
        let text = "alice:100000:65536\nkiln-build:1900000000:65536\n";
        assert!(has_subordinate_ids(text, "kiln-build", 995));
        assert!(has_subordinate_ids(
            "995:1900000000:70000\n",
            "kiln-build",
            995
        ));
        assert!(!has_subordinate_ids(text, "bob", 1000));
        assert!(!has_subordinate_ids(
            "kiln-build:1900000000:1000\n",
            "kiln-build",
            995
        ));
        assert!(!has_subordinate_ids("# kiln-build\n", "kiln-build", 995));
    }
}
