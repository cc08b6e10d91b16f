//! A QEMU `microvm` command line, as the jailed process sees it: every file at a fixed path
//! inside the jail, every socket and the tap as a descriptor at a fixed number.
//!
//! Devices are virtio-mmio only: a block device for the root disk (its whole chain of layers
//! spelled out with `-blockdev`, so no image header chooses a file), a serial port named
//! `kiln.agent` for the agent, and the 8250 UART as the console (the Debian kernel's virtio
//! console is a module, so it does not exist yet when the kernel opens `/dev/console`).

use std::path::{Path, PathBuf};

use crate::accel::Accel;
use crate::driver::{Confinement, DiskFormat, DiskLayer, MemoryBacking, VmSpec};
use crate::jail::Bind;

/// Name of the virtio-serial port the agent serves on.
pub const AGENT_PORT_NAME: &str = "kiln.agent";

/// Descriptor numbers inside the VMM.
pub(crate) const QMP_FD: i32 = 3;
pub(crate) const AGENT_FD: i32 = 4;
pub(crate) const CONSOLE_FD: i32 = 5;
pub(crate) const TAP_FD: i32 = 6;

/// Where the VM's files are inside the jail.
const KERNEL: &str = "/vm/kernel";
const INITRAMFS: &str = "/vm/initramfs";
const MEMORY: &str = "/vm/memory";

/// Jail path of root-disk layer `index` (0 is the VM's own).
fn disk_path(index: usize) -> PathBuf {
    PathBuf::from(format!("/vm/disk{index}"))
}

/// Everything a VM needs.
#[derive(Debug, Clone, PartialEq)]
pub struct BootConfig {
    /// Accelerator.
    pub accel: Accel,
    /// Under TCG, the host's TSC frequency ([`crate::tsc::host_tsc_khz`]), which the guest's
    /// TSC runs at; `None`: unknown, the guest is told a guess and falls back to a jiffies
    /// clock.
    pub tsc_khz: Option<u32>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Uncompressed ELF kernel (booted through PVH).
    pub kernel: PathBuf,
    /// Initramfs with the agent as `/init`.
    pub initramfs: PathBuf,
    /// The root disk: the VM's own layer, then the read-only layers below it.
    pub root_disk: Vec<DiskLayer>,
    /// Extra kernel command-line words.
    pub extra_cmdline: Vec<String>,
    /// The daemon's directory for the VM's sockets and logs.
    pub run_dir: PathBuf,
    /// Where guest RAM lives.
    pub memory: MemoryBacking,
    /// Start paused, waiting for device state (`-incoming defer`).
    pub incoming: bool,
    /// MAC address of the guest NIC (virtio-net on the tap handed over), if any.
    pub nic_mac: Option<String>,
    /// Saved states without a configuration section (see [`VmSpec::devices_state_only`]).
    pub devices_state_only: bool,
    /// The user and group the VMM runs as from its first instruction.
    pub run_as: Option<(u32, u32)>,
    /// Filter QEMU's system calls (`-sandbox on` with every deny option).
    pub seccomp: bool,
}

impl BootConfig {
    /// The QEMU rendering of `spec` with `confinement`'s options.
    pub fn from_spec(
        accel: Accel,
        tsc_khz: Option<u32>,
        spec: VmSpec,
        confinement: &Confinement,
    ) -> BootConfig {
        BootConfig {
            accel,
            tsc_khz,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel,
            initramfs: spec.initramfs,
            root_disk: spec.root_disk,
            extra_cmdline: spec.extra_cmdline,
            run_dir: spec.run_dir,
            memory: spec.memory,
            incoming: spec.incoming,
            nic_mac: spec.nic_mac,
            devices_state_only: spec.devices_state_only,
            run_as: confinement.run_as,
            seccomp: confinement.seccomp,
        }
    }

    /// The agent's socket (the daemon's; QEMU has it as a descriptor).
    pub fn agent_socket(&self) -> PathBuf {
        super::QemuDriver::agent_socket_in(&self.run_dir)
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    /// The guest console's socket.
    pub fn console_socket(&self) -> PathBuf {
        self.run_dir.join("console.sock")
    }

    /// The console log the daemon writes.
    pub fn console_log(&self) -> PathBuf {
        super::QemuDriver::console_log_in(&self.run_dir)
    }

    /// The empty directory the jail's root is mounted on.
    pub fn jail_root(&self) -> PathBuf {
        self.run_dir.join("jail")
    }

    /// What the jail must hold: the kernel, initramfs, disk layers (only the VM's own
    /// writable) and memory file (writable only while baking).
    pub fn binds(&self) -> Vec<Bind> {
        let mut binds = vec![
            Bind::read_only(&self.kernel, KERNEL),
            Bind::read_only(&self.initramfs, INITRAMFS),
        ];
        for (index, layer) in self.root_disk.iter().enumerate() {
            binds.push(Bind {
                source: layer.path.clone(),
                target: disk_path(index),
                writable: index == 0,
            });
        }
        if let MemoryBacking::File { path, shared } = &self.memory {
            binds.push(Bind {
                source: path.clone(),
                target: MEMORY.into(),
                writable: *shared,
            });
        }
        binds
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_owned(),
            "reboot=t".to_owned(),
            "panic=-1".to_owned(),
            "quiet".to_owned(),
            "kiln.root=/dev/vda".to_owned(),
            // Deleted files give their space back on the host at once: the guest's
            // filesystem discards freed blocks, the drive (`discard=unmap`) punches holes.
            "kiln.rootflags=discard".to_owned(),
        ];
        if self.accel == Accel::Tcg {
            // Under TCG, TSC calibration against the emulated PIT can take very long: the
            // kernel is told the rate (see `crate::tsc`).
            match self.tsc_khz {
                Some(khz) => {
                    words.push(format!("tsc_early_khz={khz}"));
                    words.push("tsc=reliable".to_owned());
                }
                None => words.push("tsc_early_khz=2400000".to_owned()),
            }
        }
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// The `-blockdev` nodes of the root disk, bottom layer first; the top one is `root`.
    /// Every qcow2 layer gets its backing node named here (or none), whatever its header
    /// says. Guest flushes are not passed on (`cache.no-flush`): kiln syncs files itself
    /// where durability matters.
    fn blockdevs(&self) -> Vec<String> {
        let cache = serde_json::json!({ "direct": false, "no-flush": true });
        let mut nodes = Vec::new();
        let mut below: Option<String> = None;
        for (index, layer) in self.root_disk.iter().enumerate().rev() {
            let top = index == 0;
            let name = if top {
                "root".to_owned()
            } else {
                format!("layer{index}")
            };
            let file = serde_json::json!({
                "driver": "file",
                "node-name": format!("{name}-file"),
                "filename": disk_path(index),
                "read-only": !top,
                "cache": cache,
                "discard": "unmap",
            });
            let mut format = serde_json::json!({
                "driver": layer.format.qemu_name(),
                "node-name": name,
                "file": format!("{name}-file"),
                "read-only": !top,
                "cache": cache,
                "discard": "unmap",
            });
            if layer.format == DiskFormat::Qcow2 {
                format["backing"] = below.as_ref().map_or(serde_json::Value::Null, |b| {
                    serde_json::Value::from(b.as_str())
                });
            }
            nodes.push(file.to_string());
            nodes.push(format.to_string());
            below = Some(name);
        }
        nodes
    }

    /// QEMU's arguments.
    pub fn args(&self) -> Vec<String> {
        let path = |p: &str| p.to_owned();
        let cpu = match self.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        };
        // Under TCG, a guest told its TSC's rate needs no PIT (the TSC is its clock, the
        // local APIC timer its tick), and QEMU would run the PIT's timer 36 times a second
        // to toggle a masked interrupt line: a third of an idle VMM's CPU time, measured.
        // Under KVM the PIT stays until that is measured on KVM hosts.
        let pit = if self.accel == Accel::Tcg && self.tsc_khz.is_some() {
            "off"
        } else {
            "on"
        };
        let mut machine = format!("microvm,pit={pit},pic=on,rtc=on");
        let mut memory = Vec::new();
        match &self.memory {
            MemoryBacking::File { shared, .. } => {
                machine.push_str(",memory-backend=mem");
                // Restores map the template's file privately and open it read-only: guest
                // writes are copy-on-write, and the VMM holds no writable handle on the file.
                let access = if *shared {
                    "share=on"
                } else {
                    "share=off,readonly=on,rom=off"
                };
                memory.push("-object".to_owned());
                memory.push(format!(
                    "memory-backend-file,id=mem,size={}M,mem-path={MEMORY},{access}",
                    self.memory_mib
                ));
            }
            MemoryBacking::Private => {
                machine.push_str(",memory-backend=mem");
                memory.push("-object".to_owned());
                memory.push(format!(
                    "memory-backend-ram,id=mem,size={}M",
                    self.memory_mib
                ));
            }
            MemoryBacking::Anonymous => {}
        }
        let mut args: Vec<String> = vec![
            "-M".into(),
            machine,
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
            path(KERNEL),
            "-initrd".into(),
            path(INITRAMFS),
            "-append".into(),
            self.cmdline(),
            "-chardev".into(),
            format!("socket,id=console,fd={CONSOLE_FD},server=on,wait=off"),
            "-serial".into(),
            "chardev:console".into(),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!("socket,id=agent,fd={AGENT_FD},server=on,wait=off"),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        ];
        for node in self.blockdevs() {
            args.push("-blockdev".into());
            args.push(node);
        }
        args.extend([
            "-device".into(),
            // A full host disk is reported to the guest (ENOSPC), never a paused VM.
            "virtio-blk-device,drive=root,werror=report,rerror=report".into(),
            "-chardev".into(),
            format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off"),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
        args.extend(memory);
        if let Some(mac) = &self.nic_mac {
            args.push("-netdev".into());
            args.push(format!("tap,id=net0,fd={TAP_FD}"));
            args.push("-device".into());
            args.push(format!("virtio-net-device,netdev=net0,mac={mac}"));
        }
        if self.incoming {
            args.push("-incoming".into());
            args.push("defer".into());
        }
        if self.devices_state_only {
            // `xen-save-devices-state` writes no configuration section; a loader that
            // expects one refuses the stream.
            args.push("-global".into());
            args.push("migration.send-configuration=off".into());
        }
        if self.start_paused() || self.devices_state_only {
            // Device state saved alone says the VM was running: without `-S` a VM that
            // loads it would run at once, not when told.
            args.push("-S".into());
        }
        if self.seccomp {
            // QEMU starts unprivileged, so it never needs set*id: everything is denied.
            args.push("-sandbox".into());
            args.push(
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            );
        }
        args
    }

    /// Whether the guest waits to be told to run (`-S`, then QMP `cont` once started): a
    /// cold boot starts paused so that the console is connected before the guest prints
    /// anything.
    pub fn start_paused(&self) -> bool {
        !self.incoming
    }

    /// The parts of the command line a snapshot's device state depends on: two
    /// configurations with the same signature can restore each other's state. Paths inside
    /// the jail and descriptor numbers are fixed; what differs between the bake and its
    /// restores (shared or private memory, incoming, the disk's layering) is normalised.
    pub fn device_signature(&self) -> String {
        let mut normalised = self.clone();
        normalised.kernel = PathBuf::from("K");
        normalised.initramfs = PathBuf::from("I");
        normalised.root_disk = vec![DiskLayer::raw("D")];
        normalised.run_dir = PathBuf::from("R");
        normalised.incoming = false;
        normalised.devices_state_only = false;
        normalised.run_as = None;
        normalised.seccomp = false;
        if let MemoryBacking::File { .. } = normalised.memory {
            normalised.memory = MemoryBacking::File {
                path: PathBuf::from("M"),
                shared: false,
            };
        }
        normalised.args().join(" ")
    }
}

/// Whether `path` would be visible at the same place inside a jail (under `/usr`).
pub(crate) fn under_usr(path: &Path) -> bool {
    path.starts_with("/usr/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(accel: Accel) -> BootConfig {
        BootConfig {
            accel,
            tsc_khz: Some(2_600_000),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            root_disk: vec![
                DiskLayer::qcow2("/s/disk.qcow2"),
                DiskLayer::qcow2("/t/disk.qcow2"),
                DiskLayer::raw("/c/rootfs.ext4"),
            ],
            extra_cmdline: vec!["KILN_AGENT_LOG=debug".into()],
            run_dir: "/run/kiln/vm1".into(),
            memory: MemoryBacking::File {
                path: "/t/memory".into(),
                shared: false,
            },
            incoming: true,
            nic_mac: None,
            devices_state_only: false,
            run_as: None,
            seccomp: false,
        }
    }

    #[test]
    fn command_line_has_the_devices_and_the_port_name() {
        let args = config(Accel::Tcg).args().join(" ");
        for expected in [
            "-M microvm,pit=off,pic=on,rtc=on,memory-backend=mem",
            "-accel tcg -cpu max -smp 2 -m 512M",
            "-nodefaults",
            "virtserialport,chardev=agent,name=kiln.agent",
            "socket,id=agent,fd=4,server=on,wait=off",
            "socket,id=qmp,fd=3,server=on,wait=off",
            "-serial chardev:console",
            "-kernel /vm/kernel -initrd /vm/initramfs",
            "virtio-blk-device,drive=root,werror=report",
            "mem-path=/vm/memory,share=off,readonly=on,rom=off",
            "-incoming defer",
        ] {
            assert!(args.contains(expected), "missing `{expected}` in {args}");
        }
        let cmdline = config(Accel::Tcg).cmdline();
        assert!(cmdline.contains("kiln.root=/dev/vda"));
        assert!(
            cmdline.contains("tsc_early_khz=2600000 tsc=reliable"),
            "{cmdline}"
        );
        let unknown = BootConfig {
            tsc_khz: None,
            ..config(Accel::Tcg)
        };
        assert!(!unknown.cmdline().contains("tsc=reliable"));
        assert!(unknown.args().join(" ").contains("microvm,pit=on"));
        assert!(cmdline.ends_with("KILN_AGENT_LOG=debug"));
        assert!(!config(Accel::Kvm).cmdline().contains("tsc_early_khz"));
        assert!(!args.contains("-sandbox") && !args.contains("-S"));
        let kvm = config(Accel::Kvm).args().join(" ");
        assert!(kvm.contains("-accel kvm -cpu host") && kvm.contains("microvm,pit=on"));
        // No host path reaches the command line.
        for host in ["/k/", "/s/", "/t/", "/c/", "/run/kiln"] {
            assert!(!args.contains(host), "{host} in {args}");
        }
    }

    #[test]
    fn every_backing_file_is_named_by_kiln() {
        let nodes: Vec<serde_json::Value> = config(Accel::Tcg)
            .blockdevs()
            .iter()
            .map(|n| serde_json::from_str(n).expect("json"))
            .collect();
        let node = |name: &str| {
            nodes
                .iter()
                .find(|n| n["node-name"] == name)
                .unwrap_or_else(|| panic!("no node {name}"))
        };
        assert_eq!(node("root")["driver"], "qcow2");
        assert_eq!(node("root")["backing"], "layer1");
        assert_eq!(node("root")["read-only"], false);
        assert_eq!(node("layer1")["backing"], "layer2");
        assert_eq!(node("layer1")["read-only"], true);
        assert_eq!(node("layer2")["driver"], "raw");
        assert_eq!(node("layer2-file")["filename"], "/vm/disk2");
        assert_eq!(node("layer2-file")["read-only"], true);
        // A lone qcow2 layer gets an explicit "no backing".
        let mut alone = config(Accel::Tcg);
        alone.root_disk = vec![DiskLayer::qcow2("/s/disk.qcow2")];
        let root: serde_json::Value = serde_json::from_str(&alone.blockdevs()[1]).expect("json");
        assert!(root["backing"].is_null() && root.get("backing").is_some());
        // Only the top layer and a bake's memory are writable in the jail.
        let binds = config(Accel::Tcg).binds();
        let writable: Vec<&Path> = binds
            .iter()
            .filter(|b| b.writable)
            .map(|b| b.source.as_path())
            .collect();
        assert_eq!(writable, vec![Path::new("/s/disk.qcow2")]);
    }

    #[test]
    fn confinement_goes_on_the_command_line_but_not_into_the_signature() {
        let mut confined = config(Accel::Tcg);
        confined.seccomp = true;
        confined.run_as = Some((2_000_000_007, 2_000_000_007));
        let args = confined.args().join(" ");
        assert!(args.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        assert!(!args.contains("-run-with"), "QEMU starts unprivileged");
        assert_eq!(
            confined.device_signature(),
            config(Accel::Tcg).device_signature()
        );
        let mut bake = config(Accel::Tcg);
        bake.memory = MemoryBacking::File {
            path: "/b/memory".into(),
            shared: true,
        };
        bake.incoming = false;
        bake.root_disk = vec![DiskLayer::raw("/b/disk.raw")];
        assert!(
            bake.args().join(" ").contains("-S"),
            "a cold boot starts paused"
        );
        assert_eq!(
            bake.device_signature(),
            config(Accel::Tcg).device_signature()
        );
    }
}
