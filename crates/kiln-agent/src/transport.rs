//! Byte streams the agent serves on: a unix socket (tests, development on the host) or a
//! virtio-serial port (QEMU). A vsock listener (Firecracker) fits the same shape.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
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

/// Finds the `/dev/vportNpM` device of the virtio-serial port called `name`.
pub fn find_serial_port(name: &str) -> io::Result<PathBuf> {
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
/// connected, so "connected" is not a readiness state one can simply wait for. The port
/// wakes its waiters when the host connects, which reaches epoll as a readiness edge: the
/// agent waits on that edge and re-checks `POLLHUP`, with a slow re-check as a safety net,
/// and never spins.
#[derive(Debug)]
pub struct SerialPort {
    fd: Arc<AsyncFd<OwnedFd>>,
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
        Ok(SerialPort {
            fd: Arc::new(crate::process::async_fd(fd)?),
        })
    }

    fn host_connected(&self) -> bool {
        let mut fds = [PollFd::new(self.fd.get_ref().as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => !fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
            Err(_) => false,
        }
    }

    /// Waits until a host has the port open.
    pub async fn wait_host(&self) -> io::Result<()> {
        loop {
            if self.host_connected() {
                return Ok(());
            }
            match tokio::time::timeout(Duration::from_secs(1), self.fd.readable()).await {
                Ok(guard) => guard?.clear_ready(),
                Err(_elapsed) => {}
            }
        }
    }

    /// A stream over the port for one session.
    pub fn stream(&self) -> SerialStream {
        SerialStream {
            fd: self.fd.clone(),
        }
    }
}

/// One session's view of a [`SerialPort`]; a read of 0 bytes means the host went away.
#[derive(Debug)]
pub struct SerialStream {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl AsyncRead for SerialStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
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
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
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
