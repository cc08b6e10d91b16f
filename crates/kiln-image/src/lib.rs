//! Guest images: the kernel, root filesystems built from template specs or OCI image
//! archives, and the content-addressed cache they live in.

pub mod cache;
pub mod cpio;
pub mod elf;
pub mod error;
pub mod kernel;
pub mod mmdebstrap;
pub mod oci;
pub mod progress;
pub mod rootfs;
pub mod spec;
pub mod template;
pub mod tool;

pub use error::ImageError;

/// `PATH` for the tools the builder runs.
pub const BUILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
