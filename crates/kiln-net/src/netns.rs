//! Named network namespaces, compatible with `ip netns` (bind-mounted under /run/netns).
//!
//! `/run/netns` is set up the way iproute2 sets it up before its first namespace: a mount
//! point of its own with shared propagation. If kiln did not, the first `ip netns add` of
//! anyone else on the host would mount `/run/netns` over itself and hide every namespace
//! kiln had bound there (their removal would then fail with EINVAL).

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

/// Makes `command`'s child enter the network namespace `ns` (an open `/run/netns/...` or
/// `/proc/PID/ns/net`) before it execs; `ns` stays open as long as `command`.
pub fn exec_in(command: &mut std::process::Command, ns: OwnedFd) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // SAFETY: runs between fork and exec, where only async-signal-safe calls are allowed:
    // setns is one; the descriptor is owned by the closure, which lives as long as `command`.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `/run/netns` a shared mount point of its own, as `ip netns add` does (once per
/// process; a later `ip netns add` then finds it ready and mounts nothing over it).
fn prepare_netns_dir() -> io::Result<()> {
    static PREPARED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PREPARED
        .get_or_init(|| {
            std::fs::create_dir_all(NETNS_DIR).map_err(|e| e.to_string())?;
            let mut made_mount_point = false;
            loop {
                match mount(
                    Some(""),
                    NETNS_DIR,
                    Some("none"),
                    MsFlags::MS_SHARED | MsFlags::MS_REC,
                    None::<&str>,
                ) {
                    Ok(()) => return Ok(()),
                    // Not a mount point yet: make it one (a bind onto itself), then retry.
                    Err(nix::errno::Errno::EINVAL) if !made_mount_point => {
                        mount(
                            Some(NETNS_DIR),
                            NETNS_DIR,
                            Some("none"),
                            MsFlags::MS_BIND | MsFlags::MS_REC,
                            None::<&str>,
                        )
                        .map_err(|e| format!("making {NETNS_DIR} a mount point: {e}"))?;
                        made_mount_point = true;
                    }
                    Err(e) => return Err(format!("making {NETNS_DIR} shared: {e}")),
                }
            }
        })
        .clone()
        .map_err(io::Error::other)
}

/// A named network namespace, removed on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    removed: bool,
}

impl NetNs {
    /// Creates the namespace `name` (it must not exist).
    pub fn create(name: &str) -> io::Result<NetNs> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid namespace name `{name}`"),
            ));
        }
        prepare_netns_dir()?;
        let path = PathBuf::from(NETNS_DIR).join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let ns = NetNs {
            name: name.to_owned(),
            path: path.clone(),
            removed: false,
        };
        // unshare affects only the calling thread: do it on a thread of its own, pin the new
        // namespace with a bind mount, and let the thread end.
        std::thread::spawn(move || -> io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))??;
        Ok(ns)
    }

    /// The existing namespace `name`, if there is one (to clean up or re-adopt it).
    pub fn existing(name: &str) -> Option<NetNs> {
        let path = PathBuf::from(NETNS_DIR).join(name);
        (!name.contains('/') && path.exists()).then(|| NetNs {
            name: name.to_owned(),
            path,
            removed: false,
        })
    }

    /// Its name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens the namespace, e.g. to `setns` into it before exec.
    pub fn open(&self) -> io::Result<OwnedFd> {
        Ok(std::fs::File::open(&self.path)?.into())
    }

    /// `program`, to be run inside the namespace.
    pub fn command(&self, program: &str) -> io::Result<std::process::Command> {
        let mut command = std::process::Command::new(program);
        exec_in(&mut command, self.open()?);
        Ok(command)
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let fd = self.open()?;
        std::thread::spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }

    /// Stops managing the namespace: it stays when this handle goes (for a later run of the
    /// daemon to adopt by name).
    pub fn detach(mut self) {
        self.removed = true;
    }

    /// Removes the namespace (it lives on while processes are still in it).
    pub fn remove(mut self) -> io::Result<()> {
        self.remove_inner()
    }

    fn remove_inner(&mut self) -> io::Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        match umount2(&self.path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.remove_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(name: &str) -> bool {
        std::path::Path::new(NETNS_DIR).join(name).exists()
    }

    /// Needs root (as the whole suite does).
    #[test]
    fn create_enter_and_remove() {
        let name = format!("kiln-test-{}", std::process::id());
        let ns = NetNs::create(&name).expect("create");
        assert!(listed(&name));
        assert!(NetNs::create(&name).is_err(), "names are unique");
        let own = std::fs::read_link("/proc/thread-self/ns/net").expect("own ns");
        let inside = ns
            .run_in(|| std::fs::read_link("/proc/thread-self/ns/net"))
            .expect("enter");
        assert_ne!(own, inside, "a different namespace");
        let links = ns
            .run_in(|| Ok(std::fs::read_dir("/sys/class/net")?.count()))
            .expect("enter");
        assert!(links >= 1);
        let again = NetNs::existing(&name).expect("found by name");
        std::mem::forget(ns);
        again.remove().expect("remove");
        assert!(!listed(&name));
        assert!(NetNs::existing(&name).is_none());
        assert!(NetNs::create("bad/name").is_err());
    }

    /// Someone else's `ip netns add` (which mounts /run/netns over itself unless it already is
    /// a shared mount point) must not hide kiln's namespaces.
    #[test]
    fn another_users_ip_netns_does_not_hide_ours() {
        let pid = std::process::id();
        let ours: Vec<NetNs> = (0..3)
            .map(|i| NetNs::create(&format!("kiln-coexist-{pid}-{i}")).expect("create"))
            .collect();
        let theirs = format!("other-tool-{pid}");
        let run = |args: &[&str]| {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("ip");
            assert!(status.success(), "ip {args:?}");
        };
        run(&["netns", "add", &theirs]);
        run(&["netns", "del", &theirs]);
        for ns in &ours {
            // Still reachable by name, and still a namespace of its own.
            let inside = ns
                .run_in(|| std::fs::read_link("/proc/thread-self/ns/net"))
                .expect("enter");
            assert_ne!(
                inside,
                std::fs::read_link("/proc/thread-self/ns/net").expect("own")
            );
        }
        for ns in ours {
            let name = ns.name().to_owned();
            ns.remove()
                .expect("removed by name after another tool's ip netns");
            assert!(!listed(&name));
        }
        assert!(
            !std::fs::read_to_string("/proc/self/mountinfo")
                .expect("mountinfo")
                .contains(&format!("kiln-coexist-{pid}")),
            "no mount left"
        );
    }
}
