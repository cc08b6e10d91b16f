//! Just enough ELF64 parsing to check what kiln boots and installs.

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

struct Elf<'a> {
    bytes: &'a [u8],
}

impl<'a> Elf<'a> {
    fn parse(bytes: &'a [u8]) -> Option<Elf<'a>> {
        (bytes.get(..5) == Some(b"\x7fELF\x02")).then_some(Elf { bytes })
    }

    fn u16_at(&self, o: usize) -> Option<u16> {
        self.bytes
            .get(o..o.checked_add(2)?)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32_at(&self, o: usize) -> Option<u32> {
        self.bytes
            .get(o..o.checked_add(4)?)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }

    fn u64_at(&self, o: usize) -> Option<u64> {
        self.bytes
            .get(o..o.checked_add(8)?)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }

    /// (type, file offset, file size) of each program header.
    fn program_headers(&self) -> Vec<(u32, usize, usize)> {
        let (Some(phoff), Some(phentsize), Some(phnum)) =
            (self.u64_at(0x20), self.u16_at(0x36), self.u16_at(0x38))
        else {
            return Vec::new();
        };
        (0..usize::from(phnum))
            .filter_map(|i| {
                let ph = usize::try_from(phoff)
                    .ok()?
                    .checked_add(i.checked_mul(usize::from(phentsize))?)?;
                let kind = self.u32_at(ph)?;
                let offset = usize::try_from(self.u64_at(ph.checked_add(8)?)?).ok()?;
                let size = usize::try_from(self.u64_at(ph.checked_add(32)?)?).ok()?;
                Some((kind, offset, size))
            })
            .collect()
    }
}

/// Whether an ELF64 file carries the Xen PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`), which
/// QEMU's microvm and Firecracker need to boot a vmlinux directly.
pub fn has_pvh_entry(bytes: &[u8]) -> bool {
    let Some(elf) = Elf::parse(bytes) else {
        return false;
    };
    for (kind, offset, size) in elf.program_headers() {
        if kind != PT_NOTE {
            continue;
        }
        let (mut at, end) = (offset, offset.saturating_add(size));
        while at.saturating_add(12) <= end {
            let (Some(namesz), Some(descsz), Some(note)) =
                (elf.u32_at(at), elf.u32_at(at + 4), elf.u32_at(at + 8))
            else {
                break;
            };
            let name_at = at + 12;
            let name = bytes
                .get(name_at..name_at.saturating_add(namesz as usize))
                .unwrap_or_default();
            if note == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
                return true;
            }
            at = name_at + (namesz as usize).div_ceil(4) * 4 + (descsz as usize).div_ceil(4) * 4;
        }
    }
    false
}

/// Whether an ELF64 executable is statically linked (has no program interpreter).
pub fn is_static_executable(bytes: &[u8]) -> bool {
    Elf::parse(bytes).is_some_and(|elf| {
        elf.program_headers()
            .iter()
            .all(|(kind, _, _)| *kind != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(!has_pvh_entry(b"not an elf"));
        assert!(!has_pvh_entry(b"\x7fELF\x02\x01\x01"));
        let mut fake = vec![0u8; 256];
        fake[..5].copy_from_slice(b"\x7fELF\x02");
        assert!(!has_pvh_entry(&fake));
        assert!(!is_static_executable(b"#!/bin/sh"));
    }

    #[test]
    fn host_binaries_are_dynamic() {
        let sh = std::fs::read("/bin/sh").expect("a shell");
        assert!(
            !is_static_executable(&sh),
            "/bin/sh on Debian is dynamically linked"
        );
        assert!(!has_pvh_entry(&sh));
    }
}
