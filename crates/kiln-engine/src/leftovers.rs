//! What an earlier run of the engine left behind when it was killed: VMM processes (they
//! outlive their parent), network namespaces, cgroups and directories.
//!
//! Every VM directory gets a `vmm.pid` file when its VMM starts: pid, start time in clock
//! ticks since boot (together they identify the process even if the pid was reused) and
//! the name its namespace and cgroup were made under.

use std::path::Path;
use std::time::Duration;

use crate::EngineError;

/// Name of the file that identifies a directory's VMM.
pub const PID_FILE: &str = "vmm.pid";

use kiln_vmm::process_start_ticks;

/// Records the VMM `pid` of the VM in `dir`, made under resource name `name`.
pub fn write_pid_file(dir: &Path, pid: u32, name: &str) -> std::io::Result<()> {
    let ticks = process_start_ticks(pid).unwrap_or_default();
    std::fs::write(dir.join(PID_FILE), format!("{pid} {ticks} {name}\n"))
}

/// The VMM recorded in `dir`: pid, start ticks, resource name.
pub(crate) fn read_pid_file(dir: &Path) -> Option<(u32, u64, String)> {
    let text = std::fs::read_to_string(dir.join(PID_FILE)).ok()?;
    let mut words = text.split_whitespace();
    let pid = words.next()?.parse().ok()?;
    let ticks = words.next()?.parse().ok()?;
    let name = words.next()?.to_owned();
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then_some((pid, ticks, name))
}

/// Kills process `pid` if it still is the process that started at `ticks`, and waits (up to
/// `timeout`) for it to be gone.
pub fn kill_if_same(pid: u32, ticks: u64, timeout: Duration) {
    let Ok(fd) = kiln_vmm::pidfd::open_if_same(pid, ticks) else {
        return;
    };
    match kiln_vmm::pidfd::kill_and_wait(&fd, timeout) {
        Ok(_) => tracing::info!(pid, "killed a VMM left by an earlier run"),
        Err(e) => tracing::warn!(pid, error = %e, "killing a VMM left by an earlier run"),
    }
}

/// Removes what the VM in `dir` left: its VMM (if still the same process, per its pid
/// record), its network namespace `kiln-<name>`, its cgroup `<name>`, and the directory.
/// `name` comes from the pid record, else `default_name`. Every part is tried; the first
/// failure is returned.
pub(crate) fn remove_vm_dir(
    dir: &Path,
    default_name: Option<&str>,
    engine: &crate::Inner,
) -> Result<(), EngineError> {
    let mut name = default_name.map(str::to_owned);
    if let Some((pid, ticks, recorded)) = read_pid_file(dir) {
        kill_if_same(pid, ticks, Duration::from_secs(5));
        name = Some(recorded);
    }
    let released = match &name {
        Some(name) => crate::confine::VmResources::existing(engine, name, None).release(),
        None => Ok(()),
    };
    let removed = crate::confine::remove_dir_if_present(dir)
        .map_err(|e| EngineError::io("removing a leftover directory", e));
    released.and(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_names_its_process_and_a_reused_pid_is_spared() {
        let dir = tempfile::tempdir().expect("dir");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        write_pid_file(dir.path(), pid, "sb-test").expect("write");
        let (read_pid, ticks, name) = read_pid_file(dir.path()).expect("read");
        assert_eq!((read_pid, name.as_str()), (pid, "sb-test"));
        // A different start time means a different process: left alone.
        kill_if_same(pid, ticks + 1, Duration::from_millis(100));
        assert!(child.try_wait().expect("status").is_none(), "spared");
        kill_if_same(pid, ticks, Duration::from_secs(5));
        let status = child.wait().expect("reaped");
        assert!(!status.success(), "killed: {status}");
        std::fs::write(dir.path().join(PID_FILE), "1 2 ../../etc\n").expect("write");
        assert!(
            read_pid_file(dir.path()).is_none(),
            "hostile names are refused"
        );
    }
}
