//! What the escape check watches with: a capture on the host's end of a sandbox's link, a
//! recorder in the decoy namespace, and a fake service on every host address. Each notes
//! what reaches it, for the check to read before and after every probe.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_net::netns::NetNs;
use serde_json::Value;

/// The index of the host interface that has `address`.
pub(crate) fn interface_with(address: Ipv4Addr) -> Result<u32> {
    let output = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .context("ip addr")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let needle = format!("inet {address}/");
    let name = text
        .lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split_whitespace().nth(1))
        .with_context(|| format!("no host interface has {address}"))?;
    Ok(nix::net::if_::if_nametoindex(name)?)
}

/// A packet socket on the host's end of one sandbox's link, to see the IPv4 sources of what
/// leaves its namespace while a probe runs.
pub(crate) struct Capture {
    fd: std::os::fd::OwnedFd,
    index: u32,
}

/// What a capture saw.
pub(crate) struct Captured {
    pub(crate) sources: Vec<Ipv4Addr>,
    /// Packets its socket's queue had no room for: with any, what left is not all known.
    pub(crate) dropped: u32,
}

impl Capture {
    /// Captures what arrives on the host from interface `index` from now on.
    pub(crate) fn open(index: u32) -> Result<Capture> {
        Capture::with_queue(index, 8 << 20)
    }

    /// [`Capture::open`] with a queue of `bytes` (the kernel doubles it, within its limits).
    fn with_queue(index: u32, bytes: usize) -> Result<Capture> {
        use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockProtocol, SockType};
        use std::os::fd::AsRawFd;
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .context("a packet socket")?;
        // Forced (as root): `net.core.rmem_max` (often 208 KiB) would cap it otherwise.
        socket::setsockopt(&fd, sockopt::RcvBufForce, &bytes)
            .context("sizing the capture's queue (needs CAP_NET_ADMIN)")?;
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set make it name one interface.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        address.sll_ifindex = i32::try_from(index).context("interface index")?;
        // SAFETY: binds our own socket to an address of the size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(address).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(std::io::Error::last_os_error())
                .context(format!("binding a packet socket to interface {index}"));
        }
        Ok(Capture { fd, index })
    }

    /// Sources of the IPv4 packets that arrived on the host from its interface (not those
    /// the host sent into it) since it was opened, and how many its queue dropped.
    pub(crate) fn take(&self) -> Captured {
        use nix::sys::socket::{recvfrom, LinkAddr};
        use std::os::fd::AsRawFd;
        /// `PACKET_OUTGOING`: a packet the host sent.
        const OUTGOING: u8 = 4;
        let mut sources = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((n, Some(from))) = recvfrom::<LinkAddr>(self.fd.as_raw_fd(), &mut buf) {
            // Packets of other interfaces queued before the socket was bound are left out.
            if from.ifindex() == self.index as usize
                && u16::from_be(from.protocol()) == 0x0800
                && from.pkttype() != OUTGOING
                && n >= 20
            {
                sources.push(Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]));
            }
        }
        let mut stats = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: reads the socket's counters into a struct of the size given.
        let read = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                std::ptr::addr_of_mut!(stats).cast(),
                &mut len,
            )
        };
        Captured {
            sources,
            // Unreadable counters count as a loss: the capture cannot vouch for itself.
            dropped: if read == 0 { stats.tp_drops } else { u32::MAX },
        }
    }
}

/// Frames the host's end of a sandbox's tap has received.
pub(crate) fn tap_received(namespace: &str) -> u64 {
    let output = std::process::Command::new("ip")
        .args(["-n", namespace, "-s", "-j", "link", "show", "dev", "tap0"])
        .output();
    output
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| v[0]["stats64"]["rx"]["packets"].as_u64())
        .unwrap_or_default()
}

/// A TCP and UDP listener in the decoy namespace noting each arrival's source and first
/// bytes.
pub(crate) struct Recorder {
    arrivals: Arc<Mutex<Vec<(Ipv4Addr, String)>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    pub(crate) fn start(ns: &NetNs, addr: SocketAddr) -> Result<Recorder> {
        let (tcp, udp) = ns
            .run_in(move || {
                let tcp = TcpListener::bind(addr)?;
                tcp.set_nonblocking(true)?;
                let udp = UdpSocket::bind(addr)?;
                udp.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok((tcp, udp))
            })
            .context("the recorder")?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (arrivals.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::SeqCst) {
                if let Ok((n, SocketAddr::V4(peer))) = udp.recv_from(&mut buf) {
                    let token = String::from_utf8_lossy(&buf[..n]).into_owned();
                    a.lock().expect("recorder").push((*peer.ip(), token));
                }
                while let Ok((stream, SocketAddr::V4(peer))) = tcp.accept() {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut token = Vec::new();
                    let _ = stream.take(256).read_to_end(&mut token);
                    let token = String::from_utf8_lossy(&token).into_owned();
                    a.lock().expect("recorder").push((*peer.ip(), token));
                }
            }
        });
        Ok(Recorder { arrivals, stop })
    }

    pub(crate) fn arrivals(&self) -> Vec<(Ipv4Addr, String)> {
        self.arrivals.lock().expect("recorder").clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A fake service of the host listening on every host address (a port the system picks),
/// counting connections.
pub(crate) struct HostDecoy {
    pub(crate) port: u16,
    count: Arc<Mutex<usize>>,
    stop: Arc<AtomicBool>,
}

impl HostDecoy {
    pub(crate) fn start() -> Result<HostDecoy> {
        let listener = TcpListener::bind(("0.0.0.0", 0)).context("the host decoy")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let count = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        *c.lock().expect("decoy") += 1;
                        let _ = stream.write_all(b"kiln host decoy\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(HostDecoy { port, count, stop })
    }

    pub(crate) fn count(&self) -> usize {
        *self.count.lock().expect("decoy")
    }
}

impl Drop for HostDecoy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a capture of the loopback interface of a namespace of its own sees while 2,000
    /// datagrams are sent through it, with a queue of `bytes`.
    fn capture_loopback(bytes: usize) -> Captured {
        let ns = NetNs::create(&format!("kiln-capture-{}-{bytes}", std::process::id()))
            .expect("a namespace (run as root)");
        let up = ns
            .command("ip")
            .and_then(|mut ip| ip.args(["link", "set", "lo", "up"]).status())
            .expect("ip");
        assert!(up.success());
        let captured = ns.run_in(move || {
            let lo = nix::net::if_::if_nametoindex("lo")?;
            let capture = Capture::with_queue(lo, bytes).map_err(std::io::Error::other)?;
            let udp = UdpSocket::bind("127.0.0.1:0")?;
            let sink = UdpSocket::bind("127.0.0.1:0")?;
            for _ in 0..2000 {
                udp.send_to(&[0u8; 1000], sink.local_addr()?)?;
            }
            Ok(capture.take())
        });
        ns.remove().expect("remove the namespace");
        captured.expect("capture")
    }

    #[test]
    fn a_capture_says_what_its_queue_dropped() {
        // Its usual queue holds them all: every source seen, none dropped.
        let all = capture_loopback(8 << 20);
        assert_eq!(all.dropped, 0);
        assert_eq!(all.sources.len(), 2000);
        assert!(all.sources.iter().all(|s| *s == Ipv4Addr::LOCALHOST));
        // A queue of a few packets drops most: the count says so, and the check's judgement
        // treats any drop as a capture that cannot vouch for what left.
        let few = capture_loopback(4096);
        assert!(few.dropped > 1000, "{} dropped", few.dropped);
        assert!(few.sources.len() < 1000, "{} seen", few.sources.len());
    }
}
