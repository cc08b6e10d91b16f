//! Archive builders shared by the image tests: layer tars written header by header, outer
//! archives, OCI image layouts; reading a file's capabilities.
#![allow(dead_code)]

use std::io::Write;

pub use kiln_image::cache::sha256_hex;
use serde_json::json;
use tar::{EntryType, Header};

/// Modification time of every entry the builders write.
pub const MTIME: u64 = 1_600_000_000;

/// A layer tar written header by header, so that tests can use paths (`..`, `/abs`) that the
/// `tar` crate's builder refuses to write.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.raw(EntryType::Directory, path.as_bytes(), b"", mode, 0, b"")
    }

    pub fn file(self, path: &str, mode: u32, data: &str) -> Self {
        self.raw(
            EntryType::Regular,
            path.as_bytes(),
            b"",
            mode,
            0,
            data.as_bytes(),
        )
    }

    pub fn owned_file(self, path: &str, mode: u32, owner: u64, data: &str) -> Self {
        self.raw(
            EntryType::Regular,
            path.as_bytes(),
            b"",
            mode,
            owner,
            data.as_bytes(),
        )
    }

    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.raw(
            EntryType::Symlink,
            path.as_bytes(),
            target.as_bytes(),
            0o777,
            0,
            b"",
        )
    }

    pub fn hard_link(self, path: &str, target: &str) -> Self {
        self.raw(
            EntryType::Link,
            path.as_bytes(),
            target.as_bytes(),
            0o644,
            0,
            b"",
        )
    }

    pub fn fifo(self, path: &str) -> Self {
        self.raw(EntryType::Fifo, path.as_bytes(), b"", 0o644, 0, b"")
    }

    /// Writes a PAX extended header that applies to the next entry.
    /// PAX records with binary values (extended attributes).
    pub fn pax_bytes(mut self, records: &[(&str, &[u8])]) -> Self {
        self.builder
            .append_pax_extensions(records.iter().copied())
            .expect("writing a tar to a Vec cannot fail");
        self
    }

    pub fn pax(mut self, records: &[(&str, &str)]) -> Self {
        self.builder
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
            .expect("writing a tar to a Vec cannot fail");
        self
    }

    /// Writes one entry; names longer than the header field get a GNU long-name record.
    pub fn raw(
        mut self,
        kind: EntryType,
        path: &[u8],
        link: &[u8],
        mode: u32,
        owner: u64,
        data: &[u8],
    ) -> Self {
        if path.len() > 100 {
            self.long_record(EntryType::GNULongName, path);
        }
        if link.len() > 100 {
            self.long_record(EntryType::GNULongLink, link);
        }
        let mut header = Header::new_gnu();
        {
            let gnu = header
                .as_gnu_mut()
                .expect("Header::new_gnu builds a GNU header");
            let n = path.len().min(gnu.name.len());
            gnu.name[..n].copy_from_slice(&path[..n]);
            let n = link.len().min(gnu.linkname.len());
            gnu.linkname[..n].copy_from_slice(&link[..n]);
        }
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(owner);
        header.set_gid(owner);
        header.set_mtime(MTIME);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder
            .append(&header, data)
            .expect("writing a tar to a Vec cannot fail");
        self
    }

    pub fn long_record(&mut self, kind: EntryType, name: &[u8]) {
        let mut header = Header::new_gnu();
        header
            .as_gnu_mut()
            .expect("Header::new_gnu builds a GNU header")
            .name[..13]
            .copy_from_slice(b"././@LongLink");
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(name.len() as u64 + 1);
        header.set_cksum();
        let data = [name, b"\0"].concat();
        self.builder
            .append(&header, data.as_slice())
            .expect("writing a tar to a Vec cannot fail");
    }

    pub fn bytes(self) -> Vec<u8> {
        self.builder
            .into_inner()
            .expect("writing a tar to a Vec cannot fail")
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder
        .write_all(data)
        .expect("compressing into a Vec cannot fail");
    encoder
        .finish()
        .expect("compressing into a Vec cannot fail")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("compressing from a slice cannot fail")
}

/// A tar of plain files, for the outer archive.
pub fn outer_tar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, name, data.as_slice())
            .expect("writing a tar to a Vec cannot fail");
    }
    builder
        .into_inner()
        .expect("writing a tar to a Vec cannot fail")
}

pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// An OCI image layout under construction: blobs by hex digest.
#[derive(Default)]
pub struct OciLayout {
    pub blobs: Vec<(String, Vec<u8>)>,
}

impl OciLayout {
    pub fn add(&mut self, media_type: &str, data: Vec<u8>) -> serde_json::Value {
        let hex_digest = sha256_hex(&data);
        let descriptor = json!({
            "mediaType": media_type,
            "digest": format!("sha256:{hex_digest}"),
            "size": data.len(),
        });
        self.blobs.push((hex_digest, data));
        descriptor
    }

    pub fn add_json(&mut self, media_type: &str, value: &serde_json::Value) -> serde_json::Value {
        self.add(
            media_type,
            serde_json::to_vec(value).expect("a JSON value serialises"),
        )
    }

    pub fn add_manifest(
        &mut self,
        config: &serde_json::Value,
        layers: Vec<(&str, Vec<u8>)>,
    ) -> serde_json::Value {
        let config = self.add_json("application/vnd.oci.image.config.v1+json", config);
        let layers: Vec<_> = layers
            .into_iter()
            .map(|(media_type, data)| self.add(media_type, data))
            .collect();
        self.add_json(
            MANIFEST_MEDIA_TYPE,
            &json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "config": config,
                "layers": layers,
            }),
        )
    }

    /// The layout as a tar; `corrupt` names a blob (hex digest) whose content gets altered.
    pub fn archive(&self, index: &serde_json::Value, corrupt: Option<&str>) -> Vec<u8> {
        let mut files = vec![
            (
                "oci-layout".to_owned(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            (
                "index.json".to_owned(),
                serde_json::to_vec(index).expect("a JSON value serialises"),
            ),
        ];
        for (hex_digest, data) in &self.blobs {
            let mut data = data.clone();
            if corrupt == Some(hex_digest.as_str()) {
                data[0] ^= 0xff;
            }
            files.push((format!("blobs/sha256/{hex_digest}"), data));
        }
        outer_tar(&files)
    }
}

/// The `security.capability` attribute of `path`, if it has one.
pub fn file_capability(path: &std::path::Path) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    let mut value = [0u8; 64];
    // SAFETY: both names are NUL-terminated and the buffer's pointer and length describe
    // live memory for the call's length.
    let len = unsafe {
        nix::libc::getxattr(
            path.as_ptr(),
            c"security.capability".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    usize::try_from(len).ok().map(|len| value[..len].to_vec())
}
