//! QEMU's `microvm` machine: command line and process handling for a cold boot.
//!
//! Devices are virtio-mmio only: a block device for the root disk, a serial port named
//! `kiln.agent` for the agent (a unix-socket chardev on the host), and the 8250 UART as the
//! console, written to a log file (the Debian kernel's virtio console is a module, so it does
//! not exist yet when the kernel opens `/dev/console`).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::accel::Accel;

/// Name of the virtio-serial port the agent serves on.
pub const AGENT_PORT_NAME: &str = "kiln.agent";

/// Everything a cold boot needs.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// Accelerator.
    pub accel: Accel,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Uncompressed ELF kernel (booted through PVH).
    pub kernel: PathBuf,
    /// Initramfs with the agent as `/init`.
    pub initramfs: PathBuf,
    /// Root disk image (raw ext4).
    pub root_disk: PathBuf,
    /// Discard writes to the root disk (QEMU keeps them in a temporary overlay).
    pub root_disk_snapshot: bool,
    /// Extra kernel command-line words.
    pub extra_cmdline: Vec<String>,
    /// Directory for the VM's sockets and logs.
    pub run_dir: PathBuf,
}

impl BootConfig {
    /// The agent's socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    /// The console log.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_owned(),
            "reboot=t".to_owned(),
            "panic=-1".to_owned(),
            "quiet".to_owned(),
            "kiln.root=/dev/vda".to_owned(),
        ];
        if self.accel == Accel::Tcg {
            // Under TCG, TSC calibration against the emulated PIT can take very long.
            words.push("tsc_early_khz=2400000".to_owned());
        }
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// QEMU's arguments.
    pub fn args(&self) -> Vec<String> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let cpu = match self.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        };
        let mut drive = format!(
            "id=root,file={},format=raw,if=none,cache=unsafe",
            path(&self.root_disk)
        );
        if self.root_disk_snapshot {
            drive.push_str(",snapshot=on");
        }
        vec![
            "-M".into(),
            "microvm,pit=on,pic=on,rtc=on".into(),
            "-accel".into(),
            self.accel.qemu_name().into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            path(&self.kernel),
            "-initrd".into(),
            path(&self.initramfs),
            "-append".into(),
            self.cmdline(),
            "-serial".into(),
            format!("file:{}", path(&self.console_log())),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                path(&self.agent_socket())
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
            "-drive".into(),
            drive,
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path(&self.qmp_socket())),
        ]
    }
}

/// A QEMU process this crate started; killed (by its own pid only) and reaped on drop.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    config: BootConfig,
}

impl QemuProcess {
    /// Starts QEMU for `config`.
    pub fn spawn(qemu: &Path, config: BootConfig) -> io::Result<QemuProcess> {
        std::fs::create_dir_all(&config.run_dir)?;
        let stderr = std::fs::File::create(config.run_dir.join("qemu.stderr"))?;
        let child = Command::new(qemu)
            .args(config.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{} not found: apt-get install qemu-system-x86",
                            qemu.display()
                        ),
                    )
                } else {
                    e
                }
            })?;
        Ok(QemuProcess { child, config })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &BootConfig {
        &self.config
    }

    /// Waits until the agent's socket exists (QEMU creates it early in start-up).
    pub fn wait_for_agent_socket(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let socket = self.config.agent_socket();
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "QEMU exited ({status}): {}",
                    self.stderr_tail()
                )));
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "QEMU did not create the agent socket",
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether QEMU has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// The last lines QEMU wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        tail(&self.config.run_dir.join("qemu.stderr"), 20)
    }

    /// The last lines of the guest console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.config.console_log(), lines)
    }

    /// Kills QEMU and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(pid = self.child.id(), error = %e, "could not kill QEMU");
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(accel: Accel) -> BootConfig {
        BootConfig {
            accel,
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            root_disk: "/r/rootfs.ext4".into(),
            root_disk_snapshot: true,
            extra_cmdline: vec!["KILN_AGENT_LOG=debug".into()],
            run_dir: "/run/kiln/vm1".into(),
        }
    }

    #[test]
    fn command_line_has_the_devices_and_the_port_name() {
        let args = config(Accel::Tcg).args().join(" ");
        for expected in [
            "-M microvm,pit=on,pic=on,rtc=on",
            "-accel tcg -cpu max -smp 2 -m 512M",
            "-nodefaults",
            "virtserialport,chardev=agent,name=kiln.agent",
            "socket,id=agent,path=/run/kiln/vm1/agent.sock,server=on,wait=off",
            "file=/r/rootfs.ext4,format=raw,if=none,cache=unsafe,snapshot=on",
            "-serial file:/run/kiln/vm1/console.log",
        ] {
            assert!(args.contains(expected), "missing `{expected}` in {args}");
        }
        let cmdline = config(Accel::Tcg).cmdline();
        assert!(cmdline.contains("kiln.root=/dev/vda") && cmdline.contains("tsc_early_khz"));
        assert!(cmdline.ends_with("KILN_AGENT_LOG=debug"));
        assert!(!config(Accel::Kvm).cmdline().contains("tsc_early_khz"));
        assert!(config(Accel::Kvm)
            .args()
            .join(" ")
            .contains("-accel kvm -cpu host"));
    }
}
