//! Plain TCP forwarding, for what a sandbox serves that is not HTTP (a database, SSH, a game
//! server): a port of the host, from a range the operator sets, whose connections go to a
//! port of the sandbox. Off unless the operator gives the range. A forward is open to anyone
//! who can reach the host's address (TCP carries no token); its owner opens and closes it.
//! Forwards are recorded, so they come back with a restarted daemon, and they go with their
//! sandbox.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{store, Control, ControlError, ForwardRecord, Principal};

/// Most forwards one sandbox may have.
pub const MAX_PER_SANDBOX: usize = 16;

/// Most forwards one tenant's sandboxes may have together.
pub const MAX_PER_TENANT: usize = 64;

/// Most connections one forward carries at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 256;

/// How long connecting to the sandbox (resuming it first, if paused) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A carried connection with no byte either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Where forwards listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// The host's address they listen on.
    pub address: IpAddr,
    /// The ports they may take.
    pub ports: RangeInclusive<u16>,
}

/// The forwards listening now, by sandbox and port.
#[derive(Debug)]
pub(crate) struct Forwards {
    active: Mutex<HashMap<(String, u16), Listening>>,
    /// Connections all forwards may carry at once (each holds two of the daemon's
    /// descriptors): whoever reaches the forwarding address cannot starve the daemon.
    connections: Arc<tokio::sync::Semaphore>,
}

/// A forward's listener task; it and the connections it carries end when this drops.
#[derive(Debug)]
struct Listening {
    host_port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Forwards {
    /// Forwards that carry at most `connections` connections at once in all.
    pub(crate) fn new(connections: usize) -> Forwards {
        Forwards {
            active: Mutex::default(),
            connections: Arc::new(tokio::sync::Semaphore::new(connections)),
        }
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u16), Listening>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The host ports taken now.
    pub(crate) fn host_ports(&self) -> Vec<u16> {
        self.active().values().map(|l| l.host_port).collect()
    }

    /// Whether port `port` of `sandbox` is forwarded now.
    #[cfg(test)]
    fn contains(&self, sandbox: &str, port: u16) -> bool {
        self.active().contains_key(&(sandbox.to_owned(), port))
    }

    /// Serves `listener` as the forward of `sandbox`'s port `port`: each connection goes to
    /// where `target` says the port is now (it resumes a paused sandbox).
    pub(crate) fn start<T, F>(
        &self,
        sandbox: &str,
        port: u16,
        listener: TcpListener,
        host_port: u16,
        target: T,
    ) where
        T: Fn() -> F + Send + Sync + 'static,
        F: std::future::Future<Output = Option<SocketAddr>> + Send + 'static,
    {
        let task = tokio::spawn(serve(
            listener,
            Arc::new(target),
            Arc::clone(&self.connections),
        ));
        self.active()
            .insert((sandbox.to_owned(), port), Listening { host_port, task });
    }

    /// Stops the forward of `sandbox`'s port `port` and the connections it carries.
    pub(crate) fn stop(&self, sandbox: &str, port: u16) -> bool {
        self.active().remove(&(sandbox.to_owned(), port)).is_some()
    }

    /// Stops every forward.
    pub(crate) fn stop_all(&self) {
        self.active().clear();
    }

    /// Stops every forward of `sandbox`.
    pub(crate) fn stop_sandbox(&self, sandbox: &str) {
        self.active().retain(|(id, _), _| id != sandbox);
    }
}

/// Listens on `port` of `address` (address reuse on, so a restarted daemon gets its ports
/// back while old connections linger).
pub(crate) fn listen(address: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let socket = match address {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(address, port))?;
    socket.listen(1024)
}

/// Accepts connections and carries each to the sandbox, at most [`MAX_CONNECTIONS`] at once
/// and within the daemon's total. The connections are this task's: they end with it.
async fn serve<T, F>(listener: TcpListener, target: Arc<T>, total: Arc<tokio::sync::Semaphore>)
where
    T: Fn() -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Option<SocketAddr>> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) if connections.len() < MAX_CONNECTIONS => {
                    // Past the daemon's total: closed at once.
                    let Ok(permit) = Arc::clone(&total).try_acquire_owned() else {
                        continue;
                    };
                    let target = Arc::clone(&target);
                    connections.spawn(async move {
                        carry(client, target).await;
                        drop(permit);
                    });
                }
                // Past the forward's limit: closed at once.
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a forwarded connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Carries `client` to the sandbox and back until both sides have closed, or nothing moved
/// for [`IDLE_TIMEOUT`]. (Finding the sandbox may resume it; the resume runs to its end in a
/// task of its own even if this connection gives up first.)
async fn carry<T, F>(client: TcpStream, target: Arc<T>)
where
    T: Fn() -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Option<SocketAddr>> + Send + 'static,
{
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let address = target().await?;
        TcpStream::connect(address).await.ok()
    })
    .await;
    let Ok(Some(upstream)) = connected else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    pump(client, upstream, IDLE_TIMEOUT).await;
}

/// Copies bytes both ways between `a` and `b` until both have ended their side, an error, or
/// `idle` without a byte either way (a write that cannot go on for `idle` ends it too).
async fn pump(mut a: TcpStream, mut b: TcpStream, idle: Duration) {
    use tokio::io::AsyncReadExt;
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let (mut a_buf, mut b_buf) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        let moved = tokio::select! {
            read = a_read.read(&mut a_buf), if a_open => {
                pass(read, &a_buf, &mut b_write, &mut a_open, idle).await
            }
            read = b_read.read(&mut b_buf), if b_open => {
                pass(read, &b_buf, &mut a_write, &mut b_open, idle).await
            }
            () = tokio::time::sleep(idle) => false,
        };
        if !moved {
            return;
        }
    }
}

/// Passes on what one side's `read` gave (from `buf`) to the other side's `write`: its end
/// shuts `write` and clears `open`. False when the connection is done for (a write that
/// failed or could not go on for `idle`).
async fn pass<W: tokio::io::AsyncWrite + Unpin>(
    read: std::io::Result<usize>,
    buf: &[u8],
    write: &mut W,
    open: &mut bool,
    idle: Duration,
) -> bool {
    use tokio::io::AsyncWriteExt;
    match read {
        Ok(0) | Err(_) => {
            *open = false;
            let _ = write.shutdown().await;
            true
        }
        Ok(n) => matches!(
            tokio::time::timeout(idle, write.write_all(&buf[..n])).await,
            Ok(Ok(()))
        ),
    }
}

impl Control {
    /// Forwards a port of the host to port `port` of the caller's sandbox `id`, for what is
    /// not HTTP: every connection to the returned host port (on the operator's forwarding
    /// address) is carried to the sandbox, resumed first if paused and its `auto_resume` is
    /// on. Open to anyone who reaches that address. A port forwarded already keeps its
    /// forward; returns the forward and whether it is new.
    pub async fn open_forward(
        &self,
        who: &Principal,
        id: &str,
        port: u16,
    ) -> Result<(ForwardRecord, bool), ControlError> {
        let config = self.forward_config()?;
        let (sandbox, _) = self.handle(who, id)?;
        Control::port_of(&sandbox, port).map_err(|e| match e {
            // Networking off on this host: a state of the host, as forwarding off is.
            ControlError::Unavailable(message) => ControlError::Conflict(message),
            e => e,
        })?;
        let _one_at_a_time = self.inner.opening_forward.lock().await;
        let existing = self.inner.store.forwards(Some(id))?;
        if let Some(forward) = existing.iter().find(|f| f.port == port) {
            return Ok((forward.clone(), false));
        }
        if existing.len() >= MAX_PER_SANDBOX {
            return Err(ControlError::QuotaExceeded(format!(
                "sandbox `{id}` has {} TCP forwards, the most it may have: close one first",
                MAX_PER_SANDBOX
            )));
        }
        if self.inner.store.count_tenant_forwards(&who.tenant)? >= MAX_PER_TENANT {
            return Err(ControlError::QuotaExceeded(format!(
                "this tenant's sandboxes have {} TCP forwards, the most they may have together: \
                 close one first",
                MAX_PER_TENANT
            )));
        }
        let taken: std::collections::HashSet<u16> = self
            .inner
            .store
            .forwards(None)?
            .iter()
            .map(|f| f.host_port)
            .chain(self.inner.forwards.host_ports())
            .collect();
        let mut chosen = None;
        for host_port in config.ports.clone().filter(|p| !taken.contains(p)) {
            match listen(config.address, host_port) {
                Ok(listener) => {
                    chosen = Some((host_port, listener));
                    break;
                }
                // Taken by another program: the next one.
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => {
                    return Err(ControlError::Internal(format!(
                        "listening on {}:{host_port}: {e}",
                        config.address
                    )))
                }
            }
        }
        let (host_port, listener) = chosen.ok_or_else(|| {
            ControlError::Unavailable(format!(
                "every port of this host's TCP forwarding range ({}-{}) is taken: close a \
                 forward, or ask the operator for a wider range",
                config.ports.start(),
                config.ports.end()
            ))
        })?;
        let record = ForwardRecord {
            sandbox_id: id.to_owned(),
            port,
            host_port,
            created_at_ms: store::now_ms(),
        };
        let gone = || {
            ControlError::Conflict(format!(
                "sandbox `{id}` was destroyed or failed while its forward was opened"
            ))
        };
        if !self.inner.store.insert_forward(&record)? {
            return Err(gone());
        }
        self.start_forward(&record, listener);
        // Its destroy may have come between the check above and the start (and found
        // nothing to stop): then the forward goes now.
        let live = self
            .inner
            .store
            .sandbox(id, None)?
            .is_some_and(|r| r.state != "failed");
        if !live {
            self.inner.forwards.stop(id, port);
            self.inner.store.delete_forward(id, port)?;
            return Err(gone());
        }
        Ok((record, true))
    }

    /// The TCP forwards of the caller's sandbox `id`, by port.
    pub fn list_forwards(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<Vec<ForwardRecord>, ControlError> {
        self.get_sandbox(who, id)?;
        Ok(self.inner.store.forwards(Some(id))?)
    }

    /// Closes the TCP forward of port `port` of the caller's sandbox `id`, and the
    /// connections it carries.
    pub async fn close_forward(
        &self,
        who: &Principal,
        id: &str,
        port: u16,
    ) -> Result<(), ControlError> {
        self.get_sandbox(who, id)?;
        // Not between an open's record and its listener.
        let _one_at_a_time = self.inner.opening_forward.lock().await;
        if !self.inner.store.delete_forward(id, port)? {
            return Err(ControlError::NotFound {
                what: "forward",
                id: format!("{id}:{port}"),
            });
        }
        self.inner.forwards.stop(id, port);
        Ok(())
    }

    /// Where a forward listens, as its users connect to it.
    pub fn forward_address(&self, forward: &ForwardRecord) -> Option<std::net::SocketAddr> {
        let config = self.inner.config.forwards.as_ref()?;
        Some(std::net::SocketAddr::new(config.address, forward.host_port))
    }

    fn forward_config(&self) -> Result<&ForwardConfig, ControlError> {
        self.inner.config.forwards.as_ref().ok_or_else(|| {
            ControlError::Conflict(
                "plain TCP forwarding is off on this host (the operator turns it on with \
                 `kiln serve --tcp-forward-ports`); HTTP ports are reachable by their URLs"
                    .into(),
            )
        })
    }

    /// Serves `listener` as `forward`; connections find the sandbox as they come.
    fn start_forward(&self, forward: &ForwardRecord, listener: tokio::net::TcpListener) {
        // The forward must not keep the control plane alive.
        let weak = Arc::downgrade(&self.inner);
        let (id, port) = (forward.sandbox_id.clone(), forward.port);
        self.inner
            .forwards
            .start(&id.clone(), port, listener, forward.host_port, move || {
                let (weak, id) = (weak.clone(), id.clone());
                async move {
                    let control = Control {
                        inner: weak.upgrade()?,
                    };
                    control
                        .forward_target(&id, port)
                        .await
                        .inspect_err(|e| tracing::debug!(sandbox = %id, port, error = %e, "a forwarded connection found no sandbox"))
                        .ok()
                }
            });
    }

    /// Where a forwarded connection goes: port `port` of sandbox `id`, resumed if paused
    /// (unless its `auto_resume` is off).
    async fn forward_target(
        &self,
        id: &str,
        port: u16,
    ) -> Result<std::net::SocketAddr, ControlError> {
        let record = self
            .inner
            .store
            .sandbox(id, None)?
            .ok_or_else(|| ControlError::NotFound {
                what: "sandbox",
                id: id.to_owned(),
            })?;
        let (sandbox, _) = self.live(&Control::owner_of(&record), id).await?;
        Control::port_of(&sandbox, port)
    }

    /// The forwards recorded before a restart, listening again on their ports; one whose
    /// sandbox is gone, or whose port cannot be had, is dropped (and said in the log).
    pub(crate) fn restore_forwards(&self) -> Result<(), ControlError> {
        for forward in self.inner.store.forwards(None)? {
            let live = self
                .inner
                .store
                .sandbox(&forward.sandbox_id, None)?
                .is_some_and(|record| record.state != "failed");
            let listened = match &self.inner.config.forwards {
                Some(config) if !config.ports.contains(&forward.host_port) => {
                    Err("its port is outside the forwarding range now".to_owned())
                }
                Some(config) if live => listen(config.address, forward.host_port).map_err(|e| {
                    format!("listening on {}:{}: {e}", config.address, forward.host_port)
                }),
                Some(_) => Err("its sandbox is gone".to_owned()),
                None => Err("TCP forwarding is now off".to_owned()),
            };
            match listened {
                Ok(listener) => self.start_forward(&forward, listener),
                Err(why) => {
                    tracing::warn!(sandbox = %forward.sandbox_id, port = forward.port, host_port = forward.host_port, "dropping a TCP forward: {why}");
                    self.inner
                        .store
                        .delete_forward(&forward.sandbox_id, forward.port)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server standing in for the sandbox's port.
    async fn echo_server() -> SocketAddr {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = echo.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn connections_are_carried_until_the_forward_stops() {
        let echo_address = echo_server().await;
        let forwards = Forwards::new(16);
        let listener = listen("127.0.0.1".parse().expect("ip"), 0).expect("listen");
        let forwarded = listener.local_addr().expect("address");
        forwards.start("sb-1", 7, listener, forwarded.port(), move || async move {
            Some(echo_address)
        });
        assert!(forwards.contains("sb-1", 7));
        assert_eq!(forwards.host_ports(), vec![forwarded.port()]);

        let mut client = TcpStream::connect(forwarded).await.expect("connect");
        client.write_all(b"ping").await.expect("write");
        let mut reply = [0u8; 4];
        client.read_exact(&mut reply).await.expect("read");
        assert_eq!(&reply, b"ping");

        // Stopped: the open connection ends and no new one is taken.
        forwards.stop_sandbox("sb-1");
        assert!(!forwards.contains("sb-1", 7));
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("the connection ends");
        assert!(ended.is_ok_and(|n| n == 0) || rest.is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(forwarded).await.is_err(),
            "still listening"
        );
    }

    #[tokio::test]
    async fn a_sandbox_that_cannot_be_reached_closes_the_connection() {
        let forwards = Forwards::new(16);
        let listener = listen("127.0.0.1".parse().expect("ip"), 0).expect("listen");
        let forwarded = listener.local_addr().expect("address");
        forwards.start("sb-2", 7, listener, forwarded.port(), || async { None });
        let mut client = TcpStream::connect(forwarded).await.expect("connect");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("closed");
        assert!(read.is_ok() && rest.is_empty());
        assert!(forwards.stop("sb-2", 7));
        assert!(!forwards.stop("sb-2", 7));
    }

    #[tokio::test]
    async fn the_daemons_total_and_idleness_bound_the_connections() {
        let echo_address = echo_server().await;
        // A total of one: a second connection is closed at once while the first is held.
        let forwards = Forwards::new(1);
        let listener = listen("127.0.0.1".parse().expect("ip"), 0).expect("listen");
        let forwarded = listener.local_addr().expect("address");
        forwards.start("sb-3", 7, listener, forwarded.port(), move || async move {
            Some(echo_address)
        });
        let mut first = TcpStream::connect(forwarded).await.expect("connect");
        first.write_all(b"a").await.expect("write");
        let mut one = [0u8; 1];
        first.read_exact(&mut one).await.expect("echoed");
        let mut second = TcpStream::connect(forwarded)
            .await
            .expect("accepted by the kernel");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest))
            .await
            .expect("closed at once");
        assert!(read.is_ok() && rest.is_empty());

        // Idle: a carried connection with nothing moving is closed.
        let (a_listener, b_listener) = (
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        );
        let (a_address, b_address) = (
            a_listener.local_addr().expect("a"),
            b_listener.local_addr().expect("b"),
        );
        let (mut a_outer, mut b_outer) = (
            TcpStream::connect(a_address).await.expect("a"),
            TcpStream::connect(b_address).await.expect("b"),
        );
        let (a_inner, b_inner) = (
            a_listener.accept().await.expect("a").0,
            b_listener.accept().await.expect("b").0,
        );
        let pumping = tokio::spawn(pump(a_inner, b_inner, Duration::from_millis(300)));
        a_outer.write_all(b"x").await.expect("write");
        b_outer.read_exact(&mut one).await.expect("carried");
        tokio::time::timeout(Duration::from_secs(5), pumping)
            .await
            .expect("ended when idle")
            .expect("task");
        let mut rest = Vec::new();
        assert!(a_outer.read_to_end(&mut rest).await.is_ok_and(|n| n == 0));
    }
}
