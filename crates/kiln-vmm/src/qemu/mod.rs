//! The QEMU driver: `microvm` machines in jailed, unprivileged QEMU processes
//! ([`crate::jail`]), snapshot and restore of their device state over QMP.

mod config;
mod process;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use config::{BootConfig, AGENT_PORT_NAME};
pub use process::{Attachments, QemuProcess, SnapshotError};

use crate::accel::{Accel, AccelChoice, AccelDecision};
use crate::driver::{
    AgentTransport, Capabilities, Confinement, DriverError, ExitReport, Hypervisor, PhaseTimings,
    Vm, VmSpec,
};

/// The QEMU generation kiln is built and tested against (see docs/qemu.md); older ones lack
/// what the jail relies on (a read-only memory file mapped privately, `file:` migration).
pub const MINIMUM_VERSION: (u32, u32) = (10, 0);

/// The QEMU driver.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    binary: PathBuf,
    accel: AccelDecision,
    /// The host's TSC frequency, under TCG.
    tsc_khz: Option<u32>,
    version: String,
}

/// `major.minor` from `qemu --version`'s first line.
fn parse_version(line: &str) -> Option<(u32, u32)> {
    let version = line.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

impl QemuDriver {
    /// Resolves the accelerator and asks `binary` for its version, which must be at least
    /// [`MINIMUM_VERSION`].
    pub fn new(binary: &Path, accel: AccelChoice) -> Result<QemuDriver, DriverError> {
        let accel = crate::accel::resolve(accel);
        let launch_error = |message: String| DriverError::Launch {
            driver: "qemu",
            source: io::Error::new(io::ErrorKind::NotFound, message),
        };
        let output = Command::new(binary)
            .arg("--version")
            .output()
            .map_err(|e| {
                launch_error(format!(
                    "running {}: {e} (bash scripts/up.sh installs QEMU {}.{})",
                    binary.display(),
                    MINIMUM_VERSION.0,
                    MINIMUM_VERSION.1
                ))
            })?;
        let version = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        match parse_version(&version) {
            Some(found) if found >= MINIMUM_VERSION => {}
            _ => {
                return Err(launch_error(format!(
                    "{} reports `{version}`; kiln needs QEMU {}.{} or later (bash scripts/up.sh installs it; see docs/qemu.md)",
                    binary.display(),
                    MINIMUM_VERSION.0,
                    MINIMUM_VERSION.1
                )))
            }
        }
        let tsc_khz = match accel.accel {
            Accel::Tcg => crate::tsc::host_tsc_khz(),
            Accel::Kvm => None,
        };
        Ok(QemuDriver {
            binary: binary.to_owned(),
            accel,
            tsc_khz,
            version,
        })
    }
}

impl QemuDriver {
    /// The agent's socket of VMs run in `run_dir` (the daemon's; QEMU has it as a descriptor).
    pub(crate) fn agent_socket_in(run_dir: &Path) -> PathBuf {
        run_dir.join("agent.sock")
    }

    /// The console log the daemon writes for VMs run in `run_dir`.
    pub(crate) fn console_log_in(run_dir: &Path) -> PathBuf {
        run_dir.join("console.log")
    }
}

impl Hypervisor for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn accel(&self) -> &AccelDecision {
        &self.accel
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            snapshot: true,
            private_memory_restore: true,
            pause: true,
            tap_descriptor: true,
            seccomp: true,
            run_as: true,
            agent_transport: AgentTransport::VirtioSerial,
        }
    }

    fn restore_signature(&self, spec: &VmSpec) -> String {
        BootConfig::from_spec(
            self.accel.accel,
            self.tsc_khz,
            spec.clone(),
            &Confinement::default(),
        )
        .device_signature()
    }

    fn run_files(&self, run_dir: &Path) -> (PathBuf, PathBuf) {
        (
            QemuDriver::agent_socket_in(run_dir),
            QemuDriver::console_log_in(run_dir),
        )
    }

    fn adopt(
        &self,
        run_dir: &Path,
        pid: u32,
        start_ticks: u64,
    ) -> Result<Box<dyn Vm>, DriverError> {
        let process = QemuProcess::adopt(run_dir, pid, start_ticks)?;
        Ok(Box::new(QemuVm { process }))
    }

    fn launch(&self, spec: VmSpec, confinement: Confinement) -> Result<Box<dyn Vm>, DriverError> {
        let config = BootConfig::from_spec(self.accel.accel, self.tsc_khz, spec, &confinement);
        let attachments = Attachments {
            netns: confinement.netns,
            tap: confinement.tap,
            cgroups: confinement.cgroups,
        };
        let process = QemuProcess::spawn(&self.binary, config, attachments).map_err(|source| {
            DriverError::Launch {
                driver: "qemu",
                source,
            }
        })?;
        Ok(Box::new(QemuVm { process }))
    }
}

/// A VM run by [`QemuDriver`].
#[derive(Debug)]
pub struct QemuVm {
    process: QemuProcess,
}

impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn agent_socket(&self) -> PathBuf {
        self.process.config().agent_socket()
    }

    fn console_log(&self) -> PathBuf {
        self.process.config().console_log()
    }

    fn wait_started(&mut self, _timeout: Duration) -> Result<(), DriverError> {
        Ok(self.process.wait_started()?)
    }

    fn restore(&mut self, state: &std::fs::File) -> Result<PhaseTimings, DriverError> {
        Ok(self.process.restore_from(state)?)
    }

    fn load(&mut self, state: &std::fs::File) -> Result<PhaseTimings, DriverError> {
        Ok(self.process.load_from(state)?)
    }

    fn capture(&mut self, state: &Path) -> Result<PhaseTimings, DriverError> {
        Ok(self.process.capture_to(state)?)
    }

    fn load_captured(&mut self, state: &std::fs::File) -> Result<PhaseTimings, DriverError> {
        Ok(self.process.load_captured_from(state)?)
    }

    fn snapshot(&mut self, state: &Path) -> Result<PhaseTimings, DriverError> {
        Ok(self.process.snapshot_to(state)?)
    }

    fn save_devices(&mut self, state: &Path) -> Result<PhaseTimings, DriverError> {
        Ok(self.process.save_devices_to(state)?)
    }

    fn pause(&mut self) -> Result<(), DriverError> {
        self.process.qmp()?.execute("stop", None)?;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DriverError> {
        self.process.qmp()?.execute("cont", None)?;
        Ok(())
    }

    fn resize_root_disk(&mut self, bytes: u64) -> Result<(), DriverError> {
        self.process.qmp()?.execute(
            "block_resize",
            Some(serde_json::json!({ "node-name": "root", "size": bytes })),
        )?;
        Ok(())
    }

    fn exited(&mut self) -> Result<Option<ExitReport>, DriverError> {
        let Some(status) = self.process.try_wait()? else {
            return Ok(None);
        };
        self.process.collect_output();
        let status_text =
            status.map_or_else(|| "exit status unknown".to_owned(), |s| s.to_string());
        let stderr = self.process.stderr_tail();
        let console = self.process.console_tail(200);
        // A clean exit is the guest's doing (its kernel panicked or powered off: `-no-reboot`
        // turns both into an exit), anything else QEMU's.
        let clean = status.is_some_and(|s| s.success());
        let reason = match guest_crash_line(&console) {
            Some(panic) if clean || stderr.trim().is_empty() => {
                format!("QEMU exited ({status_text}): the guest kernel crashed: {panic}")
            }
            _ if !clean && !stderr.trim().is_empty() => {
                format!("QEMU exited ({status_text}): {}", stderr.trim())
            }
            _ => {
                let tail: Vec<&str> = console.lines().collect();
                format!(
                    "QEMU exited ({status_text}); guest console:\n{}",
                    tail[tail.len().saturating_sub(10)..].join("\n")
                )
            }
        };
        Ok(Some(ExitReport { status, reason }))
    }

    fn kill(&mut self) -> Result<(), DriverError> {
        Ok(self.process.kill()?)
    }

    fn detach(self: Box<Self>) {
        self.process.detach();
    }

    fn diagnostics(&self) -> String {
        self.process.stderr_tail()
    }

    fn console_tail(&self, lines: usize) -> String {
        self.process.console_tail(lines)
    }
}

/// The line of a guest console that says why its kernel died, without the timestamp.
fn guest_crash_line(console: &str) -> Option<&str> {
    console
        .lines()
        .rev()
        .find(|line| line.contains("Kernel panic") || line.contains("kernel BUG"))
        .map(|line| match line.find("] ") {
            Some(at) if line.starts_with('[') => &line[at + 2..],
            _ => line,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_kernel_panic_is_found_in_the_console() {
        let console = "[    1.0] ok\n[    3.1] Kernel panic - not syncing: sysrq triggered crash\n[    3.2] CPU: 0 PID: 1\n[    3.3] Kernel Offset: disabled\n";
        assert_eq!(
            guest_crash_line(console),
            Some("Kernel panic - not syncing: sysrq triggered crash")
        );
        assert_eq!(guest_crash_line("[ 1.0] all fine\n"), None);
    }

    #[test]
    fn versions_are_read_and_old_ones_refused() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some((10, 0))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some((7, 2))
        );
        assert!(parse_version("QEMU emulator version 7.2.22").expect("parsed") < MINIMUM_VERSION);
        assert_eq!(parse_version("garbage"), None);
    }
}
