//! Guest RAM as the pages a VMM changed from its memory file.
//!
//! A sandbox restored from a template (or a fork's capture) maps the template's memory file
//! privately: pages the guest never wrote are the file's, pages it wrote are the VMM's own
//! anonymous copies. A fork captures only those copies, read from the stopped parent VMM
//! (`/proc/<pid>/pagemap` says which pages they are, `process_vm_readv` copies them), so its
//! cost follows what the guest changed, not its size. Each child's VMM maps the same memory
//! file and gets the pages written into its private mapping before it loads any state or
//! runs guest code: they become its own copy-on-write pages, and every other page stays
//! shared through the page cache.
//!
//! The file (`ram.delta`): a header (`KILNRAM1`, the number of extents), the extents (guest
//! RAM offset and length, page-aligned, ascending, disjoint, inside RAM), then their bytes
//! in order. Root writes it from the parent's memory; it is checked whole before use.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const MAGIC: &[u8; 8] = b"KILNRAM1";

/// Size of the pages `/proc/<pid>/pagemap` describes.
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096).max(4096)
}

/// One mapping of the memory file in a VMM's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    /// Its first address in the VMM.
    start: u64,
    /// Its length in bytes.
    len: u64,
    /// The file offset (= guest RAM offset) it starts at.
    offset: u64,
}

/// The private mappings of the file with device `dev` and inode `ino` in a `/proc/<pid>/maps`
/// text, by address.
fn mappings_in(maps: &str, dev: u64, ino: u64) -> Vec<Mapping> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let ino = ino.to_string();
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset, device, inode) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            if inode != ino || !perms.ends_with('p') {
                return None;
            }
            let (maj, min) = device.split_once(':')?;
            if u32::from_str_radix(maj, 16).ok()? != major
                || u32::from_str_radix(min, 16).ok()? != minor
            {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            Some(Mapping {
                start,
                len: end.checked_sub(start)?,
                offset: u64::from_str_radix(offset, 16).ok()?,
            })
        })
        .collect()
}

/// The mappings of `file` in process `pid`, by guest RAM offset; refused if two cover the
/// same offset (which copy would be the guest's?).
fn mappings(pid: u32, file: &Path) -> io::Result<Vec<Mapping>> {
    let meta = std::fs::metadata(file)?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut found = mappings_in(&maps, meta.dev(), meta.ino());
    found.sort_by_key(|m| m.offset);
    if found
        .windows(2)
        .any(|w| w[0].offset + w[0].len > w[1].offset)
    {
        return Err(io::Error::other("the VMM maps its memory file twice over"));
    }
    Ok(found)
}

/// Whether process `pid` maps `memory` (its guest RAM is that file's, privately).
pub(crate) fn maps(pid: u32, memory: &Path) -> io::Result<bool> {
    Ok(!mappings(pid, memory)?.is_empty())
}

/// Stops `vm` and saves its device state alone to `state` and the pages it changed in its
/// private mapping of `memory` (a guest of `ram_bytes`) to `delta` (blocking); returns the
/// timings and the bytes of pages written.
pub(crate) fn save_changed(
    vm: &mut dyn kiln_vmm::driver::Vm,
    memory: &Path,
    ram_bytes: u64,
    state: &Path,
    delta: &Path,
) -> Result<(kiln_vmm::driver::PhaseTimings, u64), crate::EngineError> {
    use crate::EngineError;
    let mut timings = vm.save_devices(state)?;
    let phase = std::time::Instant::now();
    let written = capture(vm.pid(), memory, ram_bytes, delta)
        .map_err(|e| EngineError::io("reading the VMM's changed pages", e))?
        .ok_or_else(|| EngineError::Conflict("the VMM no longer maps its memory file".into()))?;
    timings.record("write changed pages", phase);
    Ok((timings, written))
}

/// A run of changed pages: where it is in guest RAM and in the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    offset: u64,
    len: u64,
    address: u64,
}

/// Whether a pagemap entry is a page of the process's own: present and anonymous (a
/// copy-on-write copy of the file's page), or swapped out.
fn changed(entry: u64) -> bool {
    let present = entry >> 63 & 1 == 1;
    let swapped = entry >> 62 & 1 == 1;
    let file_or_shared = entry >> 61 & 1 == 1;
    (present && !file_or_shared) || swapped
}

/// The runs of changed pages of `mapping`, from the process's pagemap.
fn changed_runs(pagemap: &File, mapping: Mapping, page: u64) -> io::Result<Vec<Run>> {
    let pages = mapping.len / page;
    let mut runs: Vec<Run> = Vec::new();
    let mut entries = vec![0u8; 8 * 8192];
    let mut done = 0;
    while done < pages {
        let batch = (pages - done).min(8192);
        let bytes = &mut entries[..(batch * 8) as usize];
        pagemap.read_exact_at(bytes, (mapping.start / page + done) * 8)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]));
            if !changed(entry) {
                continue;
            }
            let at = (done + i as u64) * page;
            match runs.last_mut() {
                Some(run) if run.offset + run.len == mapping.offset + at => run.len += page,
                _ => runs.push(Run {
                    offset: mapping.offset + at,
                    len: page,
                    address: mapping.start + at,
                }),
            }
        }
        done += batch;
    }
    Ok(runs)
}

/// Writes the pages process `pid` (stopped) changed in its private mapping of `memory` to a
/// new file at `out`; returns the bytes of pages written, or `None` if the process does not
/// map `memory` (its RAM is not that file's: capture it whole instead).
pub(crate) fn capture(
    pid: u32,
    memory: &Path,
    ram_bytes: u64,
    out: &Path,
) -> io::Result<Option<u64>> {
    let found = mappings(pid, memory)?;
    if found.is_empty() {
        return Ok(None);
    }
    let page = page_size();
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let mut runs = Vec::new();
    for mapping in found {
        if mapping
            .offset
            .checked_add(mapping.len)
            .is_none_or(|end| end > ram_bytes)
        {
            return Err(io::Error::other(format!(
                "the VMM maps its memory file beyond the guest's {ram_bytes} bytes"
            )));
        }
        runs.extend(changed_runs(&pagemap, mapping, page)?);
    }
    let mut writer = BufWriter::with_capacity(
        1 << 20,
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(out)?,
    );
    writer.write_all(MAGIC)?;
    writer.write_all(&(runs.len() as u64).to_le_bytes())?;
    for run in &runs {
        writer.write_all(&run.offset.to_le_bytes())?;
        writer.write_all(&run.len.to_le_bytes())?;
    }
    let mut buffer = vec![0u8; 4 << 20];
    let mut written = 0;
    for run in &runs {
        let mut done = 0;
        while done < run.len {
            let chunk = (run.len - done).min(buffer.len() as u64) as usize;
            read_remote(pid, &mut buffer[..chunk], run.address + done)?;
            writer.write_all(&buffer[..chunk])?;
            done += chunk as u64;
        }
        written += run.len;
    }
    writer
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(Some(written))
}

/// Copies `into.len()` bytes at `address` in process `pid` (`process_vm_readv`).
fn read_remote(pid: u32, into: &mut [u8], address: u64) -> io::Result<()> {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    in_pieces(into.len(), address, |done, remote| {
        let local = &mut [io::IoSliceMut::new(&mut into[done..])];
        nix::sys::uio::process_vm_readv(pid, local, &[remote])
    })
}

/// Copies `bytes` to `address` in process `pid` (`process_vm_writev`: a write into a private
/// mapping makes the process's own copy of the page).
fn write_remote(pid: u32, bytes: &[u8], address: u64) -> io::Result<()> {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    in_pieces(bytes.len(), address, |done, remote| {
        nix::sys::uio::process_vm_writev(pid, &[io::IoSlice::new(&bytes[done..])], &[remote])
    })
}

/// Runs `copy` (of the bytes from `done` on, to or from `remote`) until `len` bytes at
/// `address` are copied: the calls copy what they can and say how much.
fn in_pieces(
    len: usize,
    address: u64,
    mut copy: impl FnMut(usize, nix::sys::uio::RemoteIoVec) -> nix::Result<usize>,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let remote = nix::sys::uio::RemoteIoVec {
            base: (address + done as u64) as usize,
            len: len - done,
        };
        match copy(done, remote)? {
            0 => return Err(io::Error::other(format!("no memory at {address:#x}"))),
            n => done += n,
        }
    }
    Ok(())
}

/// A delta read and checked: its extents and their bytes.
#[derive(Debug)]
pub(crate) struct Delta {
    extents: Vec<(u64, u64)>,
    bytes: Vec<u8>,
}

impl Delta {
    /// Parses a delta's file contents for a guest of `ram_bytes`: every extent page-aligned,
    /// ascending, disjoint and inside RAM, and exactly their bytes after the header.
    pub(crate) fn parse(mut bytes: Vec<u8>, ram_bytes: u64) -> Result<Delta, String> {
        let page = page_size();
        let word = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
        };
        if bytes.get(..8) != Some(MAGIC.as_slice()) {
            return Err("not a RAM delta".into());
        }
        let count = word(8).ok_or("truncated header")?;
        if count > ram_bytes / page {
            return Err(format!("{count} extents in a guest of {ram_bytes} bytes"));
        }
        let header = 16 + 16 * count as usize;
        let mut extents = Vec::with_capacity(count as usize);
        let mut end = 0u64;
        let mut total = 0u64;
        for i in 0..count as usize {
            let offset = word(16 + 16 * i).ok_or("truncated extents")?;
            let len = word(24 + 16 * i).ok_or("truncated extents")?;
            let last = offset.checked_add(len).ok_or("extent overflows")?;
            if len == 0 || offset % page != 0 || len % page != 0 || offset < end || last > ram_bytes
            {
                return Err(format!("bad extent {offset}+{len}"));
            }
            end = last;
            total += len;
            extents.push((offset, len));
        }
        if bytes.len() as u64 != header as u64 + total {
            return Err(format!(
                "{} bytes of pages for extents of {total}",
                bytes.len().saturating_sub(header)
            ));
        }
        bytes.drain(..header);
        Ok(Delta { extents, bytes })
    }

    /// Writes its pages into process `pid`'s private mapping of `memory` (a VMM that has not
    /// run guest code nor loaded any state yet; the mapping is writable, as QEMU maps RAM).
    pub(crate) fn inject(&self, pid: u32, memory: &Path) -> io::Result<()> {
        let found = mappings(pid, memory)?;
        let mut at = 0usize;
        for &(offset, len) in &self.extents {
            let mut done = 0;
            while done < len {
                let ram = offset + done;
                let mapping = found
                    .iter()
                    .find(|m| m.offset <= ram && ram < m.offset + m.len)
                    .ok_or_else(|| {
                        io::Error::other(format!(
                            "the VMM does not map guest RAM at {ram:#x} from its memory file"
                        ))
                    })?;
                let chunk = (len - done).min(mapping.offset + mapping.len - ram);
                let bytes = &self.bytes[at..at + chunk as usize];
                write_remote(pid, bytes, mapping.start + (ram - mapping.offset))?;
                at += chunk as usize;
                done += chunk;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_of_the_file_are_found_by_device_and_inode() {
        let dev = libc::makedev(0xfe, 0x01);
        let maps = "\
55d0c0000000-55d0c0100000 r--p 00000000 fe:01 12 /usr/bin/qemu-system-x86_64
7f0000000000-7f0008000000 rw-p 00000000 fe:01 99 /m (deleted)
7f0008000000-7f0010000000 rw-p 08000000 fe:01 99 /m (deleted)
7f0010000000-7f0010001000 rw-s 00000000 fe:01 99 /m
7f0020000000-7f0020001000 rw-p 00000000 fe:02 99 /other-device
";
        assert_eq!(
            mappings_in(maps, dev, 99),
            vec![
                Mapping {
                    start: 0x7f00_0000_0000,
                    len: 0x800_0000,
                    offset: 0
                },
                Mapping {
                    start: 0x7f00_0800_0000,
                    len: 0x800_0000,
                    offset: 0x800_0000
                },
            ],
            "private mappings only, of that device"
        );
    }

    #[test]
    fn changed_pages_are_anonymous_or_swapped() {
        let present = 1u64 << 63;
        let swapped = 1u64 << 62;
        let file = 1u64 << 61;
        assert!(changed(present));
        assert!(changed(swapped));
        assert!(!changed(present | file), "the file's own page");
        assert!(!changed(0), "never touched: the file's page");
    }

    fn delta_bytes(extents: &[(u64, u64)], data: usize) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend((extents.len() as u64).to_le_bytes());
        for (offset, len) in extents {
            bytes.extend(offset.to_le_bytes());
            bytes.extend(len.to_le_bytes());
        }
        bytes.extend(std::iter::repeat_n(7u8, data));
        bytes
    }

    #[test]
    fn a_delta_is_checked_whole() {
        let page = page_size();
        let ram = 16 * page;
        let good = delta_bytes(&[(0, page), (4 * page, 2 * page)], 3 * page as usize);
        let delta = Delta::parse(good, ram).expect("good");
        assert_eq!(delta.bytes.len() as u64, 3 * page);
        for (bytes, why) in [
            (b"KILNRAM0".to_vec(), "magic"),
            (delta_bytes(&[(0, page)], page as usize - 1), "short data"),
            (delta_bytes(&[(0, page)], page as usize + 1), "long data"),
            (delta_bytes(&[(1, page)], page as usize), "unaligned"),
            (delta_bytes(&[(0, 0)], 0), "empty extent"),
            (
                delta_bytes(&[(page, page), (0, page)], 2 * page as usize),
                "descending",
            ),
            (
                delta_bytes(&[(0, 2 * page), (page, page)], 3 * page as usize),
                "overlapping",
            ),
            (delta_bytes(&[(ram, page)], page as usize), "beyond RAM"),
            (
                delta_bytes(&[(u64::MAX - page + 1, page)], page as usize),
                "overflow",
            ),
        ] {
            assert!(Delta::parse(bytes, ram).is_err(), "{why}");
        }
        let mut huge = MAGIC.to_vec();
        huge.extend(u64::MAX.to_le_bytes());
        assert!(Delta::parse(huge, ram).is_err(), "a count beyond RAM");
    }

    /// A real process: a private mapping of a file, some pages written; the capture holds
    /// exactly those, and injecting them into a fresh mapping of the file reproduces them.
    #[test]
    fn changed_pages_are_captured_and_injected() {
        let page = page_size() as usize;
        let size = 16 * page;
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("memory");
        let original: Vec<u8> = (0..size).map(|i| (i / page) as u8).collect();
        std::fs::write(&file, &original).expect("write");
        let source = File::open(&file).expect("open");
        let map = || {
            // SAFETY: a new private mapping of a whole file this test owns.
            let at = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    std::os::fd::AsRawFd::as_raw_fd(&source),
                    0,
                )
            };
            assert_ne!(at, libc::MAP_FAILED);
            at.cast::<u8>()
        };
        let pid = std::process::id();
        let out = dir.path().join("ram.delta");
        let parent = map();
        // SAFETY: reads and writes inside the mapping made above, then its removal.
        let written = unsafe {
            let _ = std::ptr::read_volatile(parent.add(2 * page)); // read: stays the file's
            std::ptr::write_bytes(parent.add(3 * page), 0xaa, 2 * page);
            std::ptr::write_bytes(parent.add(9 * page), 0, page);
            let written = capture(pid, &file, size as u64, &out);
            libc::munmap(parent.cast(), size);
            written
        };
        assert_eq!(
            written.expect("capture"),
            Some(3 * page as u64),
            "the written pages only"
        );
        let delta = Delta::parse(std::fs::read(&out).expect("read"), size as u64).expect("parse");
        assert_eq!(
            delta.extents,
            [
                (3 * page as u64, 2 * page as u64),
                (9 * page as u64, page as u64)
            ]
        );
        let child = map();
        delta.inject(pid, &file).expect("inject");
        // SAFETY: reads inside the mapping made above, then its removal.
        let seen = unsafe {
            let seen = std::slice::from_raw_parts(child, size).to_vec();
            libc::munmap(child.cast(), size);
            seen
        };
        let mut expected = original.clone();
        expected[3 * page..5 * page].fill(0xaa);
        expected[9 * page..10 * page].fill(0);
        assert_eq!(seen, expected, "the child sees the parent's pages");
        assert_eq!(
            std::fs::read(&file).expect("read"),
            original,
            "the file is untouched"
        );
        let other = dir.path().join("other");
        std::fs::write(&other, b"x").expect("write");
        assert_eq!(
            capture(pid, &other, size as u64, &dir.path().join("other.delta")).expect("capture"),
            None,
            "a file the process does not map"
        );
    }
}
