//! kiln's VMM drivers behind one interface ([`driver::Hypervisor`], [`driver::Vm`]): QEMU's
//! `microvm` machine today (cold boot, snapshot, restore, confinement), Firecracker later.

pub mod accel;
pub mod driver;
pub mod qemu;
pub mod qmp;
