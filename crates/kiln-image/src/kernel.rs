//! The guest kernel: Debian's stock `linux-image-amd64`, its vmlinux taken out of the
//! bzImage (QEMU's microvm and Firecracker boot an uncompressed ELF through PVH), plus the
//! few modules a kiln guest needs, and the initramfs whose `/init` is the agent.
//!
//! Debian builds virtio-mmio, virtio-blk/net/console and ext4 as modules, so the agent
//! doubles as the initramfs `/init`: it loads them, mounts the root disk and switches to it.
//! docs/images.md explains why this kernel was chosen over a custom minimal build.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cache::{sha256_file, Cache, Inputs, Origin};
use crate::cpio::CpioWriter;
use crate::elf::has_pvh_entry;
use crate::error::{ImageError, IoContext};
use crate::progress::{human_bytes, step, BuildEvent, Progress};
use crate::tool::run;

/// The Debian meta-package the kernel comes from.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// Modules a kiln guest needs (with their dependencies), in Debian's naming.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "crc32c_generic",
    "ext4",
];

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct KernelArtefact {
    /// Artefact directory.
    pub dir: PathBuf,
    /// Uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// Initramfs with the agent as `/init` and the guest modules.
    pub initramfs: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// Built now or found in the cache.
    pub origin: Origin,
}

/// The exact kernel package the meta-package points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// Package name, e.g. `linux-image-6.1.0-56-amd64`.
    pub name: String,
    /// Its version.
    pub version: String,
    /// SHA-256 of the .deb as listed by the archive.
    pub sha256: String,
}

fn apt_show(package: &str) -> Result<BTreeMap<String, String>, ImageError> {
    let output = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", package]),
        &format!("apt-cache show {package} (run `apt-get update` first if the package is unknown)"),
    )?;
    Ok(parse_control(&String::from_utf8_lossy(&output.stdout)))
}

/// Parses the first stanza of Debian control data.
fn parse_control(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if let Some((key, value)) = line.split_once(':') {
            if !line.starts_with(' ') {
                fields.insert(key.to_owned(), value.trim().to_owned());
            }
        }
    }
    fields
}

/// Resolves the meta-package to the concrete kernel package.
pub fn resolve_kernel_package() -> Result<KernelPackage, ImageError> {
    let meta = apt_show(KERNEL_META_PACKAGE)?;
    let depends = meta.get("Depends").cloned().unwrap_or_default();
    let name = depends
        .split(',')
        .map(|d| {
            d.trim()
                .split([' ', '('])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| {
            ImageError::Kernel(format!(
                "{KERNEL_META_PACKAGE} depends on no linux-image package: {depends}"
            ))
        })?;
    let package = apt_show(&name)?;
    let field = |key: &str| {
        package
            .get(key)
            .cloned()
            .ok_or_else(|| ImageError::Kernel(format!("{name} has no {key} field")))
    };
    Ok(KernelPackage {
        version: field("Version")?,
        sha256: field("SHA256")?,
        name,
    })
}

/// Builds (or finds in the cache) the kernel and the initramfs for `agent`.
pub fn build_kernel(
    agent: &Path,
    cache: &Cache,
    progress: &dyn Progress,
) -> Result<KernelArtefact, ImageError> {
    let package = step(progress, "kernel", "resolve package", || {
        let package = resolve_kernel_package()?;
        let detail = Some(format!("{} {}", package.name, package.version));
        Ok::<_, ImageError>((package, detail))
    })?;
    let inputs = kernel_inputs(&package, GUEST_MODULES, agent)?;
    let (dir, origin) = cache.get_or_build("kernel", &inputs, |out| {
        build_into(&package, agent, out, progress)
    })?;
    if origin == Origin::Cached {
        progress.event(BuildEvent::Cached {
            artefact: "kernel".into(),
            path: dir.display().to_string(),
        });
    }
    let release = std::fs::read_to_string(dir.join("release"))
        .context(|| "reading the kernel release".into())?;
    Ok(KernelArtefact {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        release: release.trim().to_owned(),
        dir,
        origin,
    })
}

/// The cache inputs of a kernel artefact: the exact package, the module set and the agent
/// (it is the initramfs's `/init`).
pub fn kernel_inputs(
    package: &KernelPackage,
    modules: &[&str],
    agent: &Path,
) -> Result<Inputs, ImageError> {
    let mut inputs = Inputs::new("kernel");
    inputs
        .add("package", package.name.as_str())
        .add("version", package.version.as_str())
        .add("deb-sha256", package.sha256.as_str())
        .add("modules", modules.join(","))
        .add("initramfs-align", INITRAMFS_ALIGN.to_string())
        .add(
            "agent",
            sha256_file(agent).context(|| format!("reading {}", agent.display()))?,
        );
    Ok(inputs)
}

fn build_into(
    package: &KernelPackage,
    agent: &Path,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    let work = out.join("work");
    std::fs::create_dir_all(&work).context(|| format!("creating {}", work.display()))?;
    let deb = step(progress, "kernel", "download", || {
        run(
            Command::new("apt-get")
                .args([
                    "download",
                    "-q",
                    &format!("{}={}", package.name, package.version),
                ])
                .current_dir(&work),
            &format!("apt-get download {}", package.name),
        )?;
        let deb = std::fs::read_dir(&work)
            .context(|| "listing the download".into())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| ImageError::Kernel("apt-get download produced no .deb".into()))?;
        if sha256_file(&deb).context(|| "hashing the .deb".into())? != package.sha256 {
            return Err(ImageError::Kernel(format!(
                "{} does not match the archive's SHA256",
                deb.display()
            )));
        }
        let size = std::fs::metadata(&deb).map(|m| m.len()).unwrap_or(0);
        Ok::<_, ImageError>((deb, Some(human_bytes(size))))
    })?;
    let root = work.join("pkg");
    step(progress, "kernel", "unpack", || {
        run(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
            "dpkg-deb -x",
        )?;
        Ok::<_, ImageError>(((), None))
    })?;
    let release = package.name.trim_start_matches("linux-image-").to_owned();
    let bzimage = root.join(format!("boot/vmlinuz-{release}"));
    step(progress, "kernel", "extract vmlinux", || {
        let image = std::fs::read(&bzimage).context(|| format!("reading {}", bzimage.display()))?;
        let vmlinux = extract_vmlinux(&image)?;
        if !has_pvh_entry(&vmlinux) {
            return Err(ImageError::Kernel(
                "vmlinux has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY)".into(),
            ));
        }
        std::fs::write(out.join("vmlinux"), &vmlinux).context(|| "writing vmlinux".into())?;
        Ok::<_, ImageError>(((), Some(human_bytes(vmlinux.len() as u64))))
    })?;
    let modules_dir = root.join(format!("lib/modules/{release}"));
    let modules = step(progress, "kernel", "collect modules", || {
        // The package does not ship modules.dep; depmod makes it, as on installation.
        run(
            Command::new("depmod").arg("-b").arg(&root).arg(&release),
            "depmod",
        )?;
        let dep = std::fs::read_to_string(modules_dir.join("modules.dep"))
            .context(|| "reading modules.dep".into())?;
        let order = module_load_order(&dep, GUEST_MODULES)?;
        let mut loaded = Vec::new();
        for relative in &order {
            let bytes = decompress_module(&modules_dir.join(relative))?;
            loaded.push((module_file_name(relative), bytes));
        }
        let detail = Some(format!("{} modules", loaded.len()));
        Ok::<_, ImageError>((loaded, detail))
    })?;
    step(progress, "kernel", "write initramfs", || {
        let agent_bytes =
            std::fs::read(agent).context(|| format!("reading {}", agent.display()))?;
        let archive =
            initramfs(&agent_bytes, &modules).context(|| "writing the initramfs".into())?;
        std::fs::write(out.join("initramfs.cpio"), &archive)
            .context(|| "writing the initramfs".into())?;
        Ok::<_, ImageError>(((), Some(human_bytes(archive.len() as u64))))
    })?;
    if let Ok(config) = std::fs::read(root.join(format!("boot/config-{release}"))) {
        std::fs::write(out.join("config"), config)
            .context(|| "writing the kernel config".into())?;
    }
    std::fs::write(out.join("release"), format!("{release}\n"))
        .context(|| "writing release".into())?;
    std::fs::remove_dir_all(&work).context(|| "removing the unpacked package".into())?;
    Ok(())
}

/// The initramfs is padded with zeros to a multiple of this. QEMU loads an initrd at the top
/// of guest memory, its start rounded down to 4 KiB, and the microvm firmware keeps its own
/// tables in the bytes left above the initrd's end: with a few hundred bytes left there the
/// guest booted without its ACPI tables, so without its virtio devices (no disk, no agent
/// port), while 3.5 KiB and more booted every time. A 4 KiB multiple leaves the most. The
/// kernel skips zeros after the archive's trailer.
pub const INITRAMFS_ALIGN: usize = 4096;

/// The initramfs: the agent as `/init`, the modules under `/kiln/modules` and their load
/// order in `/kiln/modules.list`, padded to [`INITRAMFS_ALIGN`].
pub fn initramfs(agent: &[u8], modules: &[(String, Vec<u8>)]) -> std::io::Result<Vec<u8>> {
    let mut cpio = CpioWriter::new(Vec::new());
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "sysroot",
        "kiln",
        "kiln/modules",
    ] {
        cpio.dir(dir, 0o755)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.char_device("dev/null", 0o666, 1, 3)?;
    cpio.file("init", 0o755, agent)?;
    let mut list = String::new();
    for (name, bytes) in modules {
        cpio.file(&format!("kiln/modules/{name}"), 0o644, bytes)?;
        list.push_str(&format!("/kiln/modules/{name}\n"));
    }
    cpio.file("kiln/modules.list", 0o644, list.as_bytes())?;
    let mut archive = cpio.finish()?;
    archive.resize(archive.len().next_multiple_of(INITRAMFS_ALIGN), 0);
    Ok(archive)
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn module_file_name(path: &str) -> String {
    format!("{}.ko", module_name(path))
}

/// Orders the modules `wanted` (and everything they depend on) so that dependencies come
/// first, from the contents of `modules.dep`.
pub fn module_load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>, ImageError> {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        by_name.insert(module_name(module), module.to_owned());
        deps.insert(
            module.to_owned(),
            rest.split_whitespace().map(str::to_owned).collect(),
        );
    }
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        module: &str,
        deps: &BTreeMap<String, Vec<String>>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(module.to_owned()) {
            return;
        }
        for dep in deps.get(module).into_iter().flatten() {
            visit(dep, deps, seen, order);
        }
        order.push(module.to_owned());
    }
    for name in wanted {
        let module = by_name.get(&name.replace('-', "_")).ok_or_else(|| {
            ImageError::Kernel(format!(
                "module {name} is not in modules.dep (built in, or missing?)"
            ))
        })?;
        visit(module, &deps, &mut seen, &mut order);
    }
    Ok(order)
}

/// Reads a module, decompressing `.ko.xz` / `.ko.zst` (the kernel may not decompress them).
fn decompress_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else {
        return std::fs::read(path).context(|| format!("reading {name}"));
    };
    let output = run(
        Command::new(tool).args(["-d", "-c"]).arg(path),
        &format!("decompressing {name}"),
    )?;
    Ok(output.stdout)
}

/// Finds the compressed kernel inside a bzImage and decompresses it (the approach of the
/// kernel's `scripts/extract-vmlinux`): try each compression magic at each offset until the
/// result is an ELF file.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, ImageError> {
    const FORMATS: [(&[u8], &str); 3] = [
        (&[0xFD, b'7', b'z', b'X', b'Z', 0x00], "xz"),
        (&[0x28, 0xB5, 0x2F, 0xFD], "zstd"),
        (&[0x1F, 0x8B, 0x08], "gzip"),
    ];
    for (magic, tool) in FORMATS {
        let mut from = 0;
        while let Some(pos) = find(&bzimage[from..], magic).map(|p| p + from) {
            if let Some(elf) = decompress_lenient(tool, &bzimage[pos..]) {
                if elf.starts_with(b"\x7fELF") {
                    return Ok(elf);
                }
            }
            from = pos + 1;
        }
    }
    Err(ImageError::Kernel(
        "no compressed ELF kernel found in the bzImage".into(),
    ))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decompresses a stream followed by trailing data: the tools complain about the trailer,
/// so the exit status is ignored and the output judged by its content.
fn decompress_lenient(tool: &str, data: &[u8]) -> Option<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(["-d", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        // The tool stops reading at the end of its stream; a broken pipe after that is fine.
        let _ = stdin.write_all(&data);
    });
    let mut out = Vec::new();
    child.stdout.take()?.read_to_end(&mut out).ok()?;
    let _ = child.wait();
    let _ = writer.join();
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initramfs_is_padded_to_whole_pages() {
        for agent_len in [0, 1, 4095, 4096, 100_000] {
            let agent = vec![0x7f; agent_len];
            let modules = [("m.ko".to_owned(), vec![1; 3])];
            let archive = initramfs(&agent, &modules).expect("archive");
            assert_eq!(
                archive.len() % INITRAMFS_ALIGN,
                0,
                "agent of {agent_len} bytes"
            );
            let trailer = archive
                .windows(10)
                .rposition(|w| w == b"TRAILER!!!")
                .expect("trailer");
            assert!(archive[trailer + 10..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let dep = "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n\
                   kernel/lib/crc16.ko.xz:\n\
                   kernel/fs/mbcache.ko.xz:\n\
                   kernel/fs/jbd2/jbd2.ko.xz:\n\
                   kernel/drivers/virtio/virtio-mmio.ko.xz:\n";
        let order = module_load_order(dep, &["virtio_mmio", "ext4"]).expect("resolvable");
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio-mmio.ko.xz",
                "kernel/lib/crc16.ko.xz",
                "kernel/fs/mbcache.ko.xz",
                "kernel/fs/jbd2/jbd2.ko.xz",
                "kernel/fs/ext4/ext4.ko.xz"
            ]
        );
        assert_eq!(
            module_file_name("kernel/drivers/virtio/virtio-mmio.ko.xz"),
            "virtio_mmio.ko"
        );
        assert!(module_load_order(dep, &["nope"]).is_err());
    }

    #[test]
    fn every_input_changes_the_kernel_key() {
        let dir = tempfile::tempdir().expect("dir");
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"v1").expect("write");
        let package = KernelPackage {
            name: "linux-image-6.1.0-1-amd64".into(),
            version: "6.1.1-1".into(),
            sha256: "aa".into(),
        };
        let key = |p: &KernelPackage| {
            kernel_inputs(p, GUEST_MODULES, &agent)
                .expect("inputs")
                .key()
        };
        let original = key(&package);
        assert!(
            kernel_inputs(&package, GUEST_MODULES, &agent)
                .expect("inputs")
                .entries()
                .contains(&("builder".into(), crate::cache::BUILDER_VERSION.into())),
            "builder version"
        );
        let fewer_modules = &GUEST_MODULES[1..];
        assert_ne!(
            original,
            kernel_inputs(&package, fewer_modules, &agent)
                .expect("inputs")
                .key(),
            "module set"
        );
        assert_ne!(
            original,
            key(&KernelPackage {
                version: "6.1.1-2".into(),
                ..package.clone()
            })
        );
        assert_ne!(
            original,
            key(&KernelPackage {
                sha256: "bb".into(),
                ..package.clone()
            })
        );
        assert_ne!(
            original,
            key(&KernelPackage {
                name: "linux-image-6.1.0-2-amd64".into(),
                ..package.clone()
            })
        );
        std::fs::write(&agent, b"v2").expect("write");
        assert_ne!(
            original,
            key(&package),
            "the agent is part of the initramfs"
        );
    }

    #[test]
    fn control_fields_parse() {
        let fields = parse_control("Package: linux-image-amd64\nVersion: 6.1.1\nDepends: linux-image-6.1.0-1-amd64 (= 6.1.1)\nDescription: x\n more\n\nPackage: other\n");
        assert_eq!(fields.get("Version").map(String::as_str), Some("6.1.1"));
        assert_eq!(fields.len(), 4);
    }

    #[test]
    fn extracts_a_compressed_elf_after_a_header() {
        let elf = b"\x7fELF\x02 pretend kernel".repeat(100);
        let Ok(out) = Command::new("sh")
            .arg("-c")
            .arg("xz -c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().expect("stdin").write_all(&elf)?;
                c.wait_with_output()
            })
        else {
            return;
        };
        let mut bz = b"MZ setup code ...".to_vec();
        bz.extend_from_slice(&out.stdout);
        bz.extend_from_slice(b"trailing data");
        assert_eq!(extract_vmlinux(&bz).expect("found"), elf);
    }
}
