//! The guest's tap, created inside the sandbox's namespace and handed to QEMU as a descriptor
//! (QEMU never needs the privilege to create it).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::iface::{configure, ifreq, InterfaceConfig};
use crate::netns::NetNs;
use crate::{GATEWAY_ADDRESS, PREFIX_LEN, TAP_NAME};

/// Creates the sandbox's tap in `ns` with the gateway address and returns its descriptor
/// (multi-queue off, `IFF_VNET_HDR` on, as QEMU's virtio-net expects with `vnet_hdr=on`).
pub fn create_tap(ns: &NetNs) -> io::Result<OwnedFd> {
    ns.run_in(|| {
        // SAFETY: plain open(2) of the tun device; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let tap = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(TAP_NAME)?;
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads an ifreq, valid for the call.
        let rc = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        configure(&InterfaceConfig {
            name: TAP_NAME.into(),
            address: GATEWAY_ADDRESS,
            prefix_len: PREFIX_LEN,
            mtu: None,
            gateway: None,
        })?;
        Ok(tap)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_in_its_namespace_with_the_gateway_address() {
        let ns = NetNs::create(&format!("kiln-tap-test-{}", std::process::id())).expect("netns");
        let tap = create_tap(&ns).expect("tap");
        let addresses = ns
            .run_in(|| {
                let out = std::process::Command::new("ip")
                    .args(["-4", "-o", "addr", "show", TAP_NAME])
                    .output()?;
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .expect("ip");
        assert!(addresses.contains("172.31.255.1/30"), "{addresses}");
        drop(tap);
        ns.remove().expect("remove");
    }
}
