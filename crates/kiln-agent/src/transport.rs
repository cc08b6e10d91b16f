//! Byte streams the agent serves on: a unix socket (tests, development on the host) or a
//! virtio-serial port (QEMU). A vsock listener (Firecracker) fits the same shape.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path; every connection is a session.
    Unix(PathBuf),
    /// A virtio-serial port device; one session at a time.
    Serial(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(ListenAddr::Unix(path.into())),
            Some(("serial", path)) if !path.is_empty() => Ok(ListenAddr::Serial(path.into())),
            _ => Err(format!("expected unix:PATH or serial:PATH, got `{s}`")),
        }
    }
}

/// Finds the `/dev/vportNpM` device of the virtio-serial port called `name`, waiting up to
/// 10 s for it: virtio_console creates ports and learns their names from the host
/// asynchronously, after its module has loaded, and devtmpfs adds the node after that.
pub fn find_serial_port(name: &str) -> io::Result<PathBuf> {
    let start = std::time::Instant::now();
    let deadline = start + Duration::from_secs(10);
    loop {
        match find_serial_port_once(name) {
            Ok(path) if path.exists() => {
                tracing::debug!(waited = ?start.elapsed(), "found the agent's port");
                return Ok(path);
            }
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(path) => return Ok(path),
            Err(e) => return Err(e),
        }
    }
}

fn find_serial_port_once(name: &str) -> io::Result<PathBuf> {
    let class = Path::new("/sys/class/virtio-ports");
    for entry in std::fs::read_dir(class)? {
        let entry = entry?;
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio-serial port named {name}"),
    ))
}

/// A virtio-serial port.
///
/// In Linux's virtio_console a read returns 0 and poll reports `POLLHUP` while no host is
/// connected, so "connected" is not a readiness state one can simply wait for. Worse, tokio
/// treats `POLLHUP` as final: once an `AsyncFd` has seen it, it stays "read closed" and "write
/// closed" forever and every readiness future resolves at once, so waiting on such an
/// `AsyncFd` spins (a full CPU while no host is connected, and a read loop that never yields
/// inside a session). Hence:
///
/// * waiting for the host uses a private edge-triggered epoll instance watching the port (the
///   port wakes its waiters when the host connects, which is an edge there), itself registered
///   with tokio; it never reports `POLLHUP`, so it does not poison anything;
/// * each session registers a fresh duplicate of the descriptor with tokio once the host is
///   connected, and ends (EOF) if it ever sees "closed" readiness with nothing to read, so the
///   next session starts with a clean registration.
#[derive(Debug)]
pub struct SerialPort {
    fd: OwnedFd,
    waiter: AsyncFd<OwnedFd>,
}

impl SerialPort {
    /// Opens the port device.
    pub fn open(path: &Path) -> io::Result<SerialPort> {
        let raw = nix::fcntl::open(
            path,
            OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            nix::sys::stat::Mode::empty(),
        )?;
        // SAFETY: `open` returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain epoll_create1; the result is checked before use.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` is a fresh descriptor that nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: both descriptors are open; `event` is valid for the call.
        let rc = unsafe {
            libc::epoll_ctl(
                ep.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &raw mut event,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SerialPort {
            fd,
            waiter: crate::process::async_fd(ep)?,
        })
    }

    fn host_connected(&self) -> bool {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => !fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
            Err(_) => false,
        }
    }

    /// Consumes the edges queued on the private epoll instance.
    fn drain_edges(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        loop {
            // SAFETY: `events` is valid for 4 entries; timeout 0 never blocks.
            let n = unsafe {
                libc::epoll_wait(self.waiter.get_ref().as_raw_fd(), events.as_mut_ptr(), 4, 0)
            };
            if n <= 0 {
                return;
            }
        }
    }

    /// Waits until a host has the port open, without spinning.
    pub async fn wait_host(&self) -> io::Result<()> {
        loop {
            if self.host_connected() {
                return Ok(());
            }
            // Slow re-check as a safety net against a missed edge.
            if let Ok(guard) =
                tokio::time::timeout(Duration::from_secs(1), self.waiter.readable()).await
            {
                let mut guard = guard?;
                self.drain_edges();
                guard.clear_ready();
            }
        }
    }

    /// A stream over the port for one session: a fresh tokio registration of a duplicate of
    /// the port's descriptor. Call after [`SerialPort::wait_host`].
    pub fn stream(&self) -> io::Result<SerialStream> {
        let fd = self.fd.try_clone()?;
        Ok(SerialStream {
            fd: crate::process::async_fd(fd)?,
        })
    }
}

/// One session's view of a [`SerialPort`]; a read of 0 bytes means the host went away.
#[derive(Debug)]
pub struct SerialStream {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncRead for SerialStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // tokio never clears "closed": a read that would block after a hang-up means the
            // host left and came back; end the session so the next one registers afresh.
            let closed = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if closed => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for SerialStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) if closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the host closed the port",
                    )))
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "serial:/dev/vport0p1".parse(),
            Ok(ListenAddr::Serial("/dev/vport0p1".into()))
        );
        assert!("tcp:1".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
    }
}
