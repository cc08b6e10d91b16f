//! Interface configuration through the classic socket ioctls (address, netmask, MTU, up,
//! default route). Used by the guest agent and by the host for the tap; small enough that a
//! netlink stack is not worth carrying into the static guest binary.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A socket for interface ioctls in the calling thread's network namespace.
pub fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` for `name`; rejects names the kernel would refuse.
pub fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0', ' ']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name `{name}`"),
        ));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(sock: &OwnedFd, request: libc::Ioctl, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: every caller passes a pointer to the structure `request` expects, valid for
    // the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg) };
    if rc < 0 {
        // The raw OS error is kept: callers match on it (EEXIST, ENODEV).
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the interface's Ethernet address (while it is down).
pub fn set_mac(sock: &OwnedFd, name: &str, mac: [u8; 6]) -> io::Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: writes the hwaddr member of the union, which SIOCSIFHWADDR reads.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
    }
    ioctl(sock, libc::SIOCSIFHWADDR, (&raw mut req).cast())
}

/// Sets the interface up.
pub fn link_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    set_link(sock, name, true)
}

/// Sets the interface up or down.
pub fn set_link(sock: &OwnedFd, name: &str, up: bool) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, (&raw mut req).cast())?;
    let flag = libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        match up {
            true => req.ifr_ifru.ifru_flags |= flag,
            false => req.ifr_ifru.ifru_flags &= !flag,
        }
    }
    ioctl(sock, libc::SIOCSIFFLAGS, (&raw mut req).cast())
}

/// IPv4 settings of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// Interface name.
    pub name: String,
    /// Address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// MTU, if not the default.
    pub mtu: Option<u32>,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

/// Brings up `lo` and configures the interface (address, netmask, MTU, up, default route),
/// in the calling thread's network namespace.
pub fn configure(config: &InterfaceConfig) -> io::Result<()> {
    if config.prefix_len > 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "prefix length must be at most 32",
        ));
    }
    let sock = ioctl_socket()?;
    link_up(&sock, "lo")?;
    let name = config.name.as_str();
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(config.address);
    ioctl(&sock, libc::SIOCSIFADDR, (&raw mut req).cast())?;
    let mask = if config.prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(config.prefix_len))
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    ioctl(&sock, libc::SIOCSIFNETMASK, (&raw mut req).cast())?;
    if let Some(mtu) = config.mtu {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_mtu = i32::try_from(mtu)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mtu out of range"))?;
        ioctl(&sock, libc::SIOCSIFMTU, (&raw mut req).cast())?;
    }
    link_up(&sock, name)?;
    if let Some(gateway) = config.gateway {
        // SAFETY: rtentry is plain data; all-zero is a valid value.
        let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr(gateway);
        route.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
        match ioctl(&sock, libc::SIOCADDRT, (&raw mut route).cast()) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            other => other?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("averyveryverylongname").is_err());
        assert!(ifreq("a/b").is_err());
    }
}
