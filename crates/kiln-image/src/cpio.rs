//! A minimal writer for the `newc` cpio format the kernel unpacks as an initramfs.
//!
//! Hand-written rather than a dependency: the format is a fixed 110-byte ASCII header per
//! entry, and the maintained crates for it are thin; this keeps the initramfs byte-for-byte
//! reproducible (fixed mtimes, owners and inode numbers).

use std::io::{self, Write};

/// File type bits of `mode`.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;

/// Writes a newc archive.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            written: 0,
            next_inode: 1,
        }
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.write_raw(&[0u8; 4][..4 - rem])?;
        }
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let inode = self.next_inode;
        self.next_inode += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR && mode & S_IFREG != S_IFREG {
            2
        } else {
            1
        };
        let fields = [
            inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed for reproducibility
            u32::try_from(data.len()).map_err(|_| io::Error::other("cpio entry over 4 GiB"))?,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).map_err(|_| io::Error::other("name too long"))?,
            0, // check
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write_raw(header.as_bytes())?;
        self.write_raw(name.as_bytes())?;
        self.write_raw(&[0])?;
        self.pad()?;
        self.write_raw(data)?;
        self.pad()
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, (0, 0), &[])
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    /// A symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive unpacks with GNU cpio to exactly what was written.
    #[test]
    fn gnu_cpio_reads_it_back() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("cpio not installed; skipping the cross-check");
            return;
        }
        let mut writer = CpioWriter::new(Vec::new());
        writer.dir("dir", 0o755).expect("dir");
        writer.file("dir/file", 0o640, b"hello").expect("file");
        writer.file("odd", 0o644, b"abc").expect("file");
        writer.symlink("link", "dir/file").expect("link");
        let archive = writer.finish().expect("finish");
        assert_eq!(archive.len() % 4, 0);
        let listing = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child.stdin.take().expect("stdin").write_all(&archive)?;
                child.wait_with_output()
            })
            .expect("cpio runs");
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(
            text.contains("dir/file") && text.contains("link -> dir/file"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("-rw-r-----") && l.contains("dir/file")),
            "{text}"
        );
    }
}
