//! The guest's tap, created inside the sandbox's namespace and handed to QEMU as a descriptor
//! (QEMU never needs the privilege to create it).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::iface::{configure, ifreq, ioctl_socket, set_mac, InterfaceConfig};
use crate::netns::NetNs;
use crate::{GATEWAY_ADDRESS, GATEWAY_MAC, PREFIX_LEN, TAP_NAME};

/// Creates the sandbox's tap in `ns` with the gateway's address and MAC (the same in every
/// sandbox: a restored guest's neighbour cache holds them) and returns its descriptor
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
        set_mac(&ioctl_socket()?, TAP_NAME, GATEWAY_MAC)?;
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

    /// What `ip ARGS` prints in `ns`.
    fn ip(ns: &NetNs, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        ns.run_in(move || {
            let out = std::process::Command::new("ip").args(&args).output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .expect("ip")
    }

    #[test]
    fn tap_in_its_namespace_with_the_gateway_address() {
        let ns = NetNs::create(&format!("kiln-tap-test-{}", std::process::id())).expect("netns");
        let tap = create_tap(&ns).expect("tap");
        let addresses = ip(&ns, &["-o", "addr", "show", TAP_NAME]);
        assert!(addresses.contains("172.31.255.1/30"), "{addresses}");
        let link = ip(&ns, &["-o", "link", "show", TAP_NAME]);
        assert!(link.contains("link/ether 02:6b:69:6c:6e:02"), "{link}");
        drop(tap);
        ns.remove().expect("remove");
    }
}
