//! What a QEMU process holds, for both shapes kiln starts: a bake (its memory file written
//! through, its own disk) and a restore (the template's memory mapped privately). Neither
//! may hold a shared artefact (kernel, initramfs, the template's memory or disk layers)
//! writable, and each runs in its jail: its own namespaces, its own root, unprivileged.

use std::path::Path;

use kiln_vmm::accel::{resolve, Accel, AccelChoice};
use kiln_vmm::driver::{Confinement, DiskLayer, Hypervisor, MemoryBacking, VmSpec};
use kiln_vmm::qemu::QemuDriver;

fn qemu_img_create(path: &Path, size: u64) {
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .status()
        .expect("qemu-img");
    assert!(status.success());
}

fn ns(pid: &str, kind: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("ns link")
}

#[test]
fn bake_and_restore_shapes_hold_shared_files_read_only_in_their_jails() {
    let images = kiln_testinfra::template_images("base");
    let driver = QemuDriver::new(
        Path::new("qemu-system-x86_64"),
        AccelChoice::Fixed(resolve(AccelChoice::Fixed(Accel::Tcg)).accel),
    )
    .expect("driver");
    let dir = tempfile::tempdir().expect("dir");
    let memory_mib = images.spec.resources.memory_mib;
    let rootfs_size = std::fs::metadata(&images.rootfs.image)
        .expect("rootfs")
        .len();
    let uid = 2_000_065_100;
    for (shape, shared_memory) in [("bake", true), ("restore", false)] {
        let vm_dir = dir.path().join(shape);
        std::fs::create_dir(&vm_dir).expect("dir");
        let disk = vm_dir.join("disk.qcow2");
        qemu_img_create(&disk, rootfs_size);
        let memory = vm_dir.join("memory");
        std::fs::File::create(&memory)
            .and_then(|f| f.set_len(u64::from(memory_mib) << 20))
            .expect("memory file");
        // The VM's own files are its user's; the shared ones stay root's.
        std::os::unix::fs::chown(&disk, Some(uid), Some(uid)).expect("chown");
        if shared_memory {
            std::os::unix::fs::chown(&memory, Some(uid), Some(uid)).expect("chown");
        } else {
            std::fs::set_permissions(&memory, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .expect("chmod");
        }
        let spec = VmSpec {
            vcpus: 1,
            memory_mib,
            kernel: images.kernel.vmlinux.clone(),
            initramfs: images.kernel.initramfs.clone(),
            extra_cmdline: Vec::new(),
            root_disk: vec![
                DiskLayer::qcow2(&disk),
                DiskLayer::raw(&images.rootfs.image),
            ],
            memory: MemoryBacking::File {
                path: memory.clone(),
                shared: shared_memory,
            },
            incoming: !shared_memory,
            nic_mac: None,
            devices_state_only: false,
            run_dir: vm_dir.join("run"),
        };
        let mut vm = driver
            .launch(
                spec,
                Confinement {
                    run_as: Some((uid, uid)),
                    seccomp: true,
                    ..Confinement::default()
                },
            )
            .expect("launch");
        // Once QMP answers, QEMU has opened everything it opens at start.
        vm.wait_started(std::time::Duration::from_secs(30))
            .expect("QEMU starts");
        let pid = vm.pid();
        let mut shared: Vec<&Path> = vec![
            &images.kernel.vmlinux,
            &images.kernel.initramfs,
            &images.rootfs.image,
        ];
        if !shared_memory {
            shared.push(&memory);
        }
        kiln_testinfra::assert_no_writable_shared(pid, shape, &shared);
        let held = kiln_testinfra::held_files(pid);
        let own_disk = kiln_testinfra::file_id(&disk);
        assert!(
            held.iter().any(|f| f.id == own_disk && f.writable),
            "{shape}: its own disk is writable: {held:?}"
        );
        if shared_memory {
            let memory_id = kiln_testinfra::file_id(&memory);
            assert!(
                held.iter().any(|f| f.id == memory_id && f.writable),
                "a bake writes its memory file through: {held:?}"
            );
        }
        // The jail: its own user from the start, no capabilities, PID 1 of its own PID
        // namespace, and its own mount, IPC and UTS namespaces.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                .unwrap_or_default()
        };
        assert_eq!(field("Uid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
        assert_eq!(field("CapEff:"), "0000000000000000");
        assert_eq!(field("NoNewPrivs:"), "1");
        assert_eq!(field("Seccomp:"), "2");
        assert!(field("NSpid:").ends_with("\t1"), "{}", field("NSpid:"));
        for kind in ["mnt", "pid", "ipc", "uts", "net"] {
            assert_ne!(ns(&pid.to_string(), kind), ns("self", kind), "{kind}");
        }
        let root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .expect("its root")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            root.iter().all(|e| [
                "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp",
                "usr", "vm"
            ]
            .contains(&e.as_str())),
            "{shape}: only the jail's entries at its root: {root:?}"
        );
        // Its command line names jail paths only, none of the host's.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains(&dir.path().display().to_string())
                && !cmdline.contains("/var/cache/kiln"),
            "{cmdline}"
        );
        vm.kill().expect("kill");
    }
}
