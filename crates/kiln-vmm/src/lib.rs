//! kiln's VMM drivers behind one interface ([`driver::Hypervisor`], [`driver::Vm`]): QEMU's
//! `microvm` machine today (cold boot, snapshot, restore), Firecracker later; the jail every
//! VMM process runs in; what a VMM writes that the host keeps (console, stderr), bounded.

pub mod accel;
pub mod driver;
pub mod jail;
pub mod output;
pub mod pidfd;
pub mod qemu;
pub mod qmp;
pub mod tsc;

/// Start time of process `pid` in clock ticks since boot (field 22 of `/proc/PID/stat`):
/// with the pid, it identifies a process safely across pid reuse.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    after.split_whitespace().nth(19)?.parse().ok()
}
