//! kiln's VMM drivers. Today: QEMU's `microvm` machine, cold boot. The engine issue adds the
//! driver trait, snapshot bake and restore, confinement and Firecracker.

pub mod accel;
pub mod qemu;
pub mod qmp;
