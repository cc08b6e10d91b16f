//! Lingering close (RFC 9112, section 9.6). A request answered before its body was read (a
//! wrong key, a body over its limit: see [`crate::unread_body`]) ends its connection. A socket
//! closed with bytes still unread makes the kernel send a reset, and a client still sending
//! its body then sees "connection reset" instead of the answer already waiting for it. So the
//! daemon's connections end in two steps: the sending side is shut (the client reads the
//! answer and the end of the stream), then what the client still sends is read and thrown
//! away until it closes too, or [`LINGER`] passes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Longest a closing connection reads what its client still sends.
pub const LINGER: Duration = Duration::from_secs(5);

/// A TCP listener whose connections close with a linger (for [`axum::serve`]).
#[derive(Debug)]
pub struct LingeringListener(TcpListener);

impl LingeringListener {
    pub fn new(listener: TcpListener) -> LingeringListener {
        LingeringListener(listener)
    }
}

impl axum::serve::Listener for LingeringListener {
    type Io = Lingering;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Lingering, SocketAddr) {
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => return (Lingering::new(stream), addr),
                // A connection that failed before it was accepted concerns that client
                // alone; anything else (out of descriptors) passes with time.
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The client's address, for handlers (`ConnectInfo<ClientAddr>`).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, LingeringListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, LingeringListener>) -> ClientAddr {
        ClientAddr(*stream.remote_addr())
    }
}

/// A TCP connection whose shutdown lingers (see the module's documentation).
#[derive(Debug)]
pub struct Lingering {
    stream: TcpStream,
    /// Set once the sending side is shut: until when what arrives is read and dropped.
    until: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Lingering {
    pub fn new(stream: TcpStream) -> Lingering {
        Lingering {
            stream,
            until: None,
        }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.until.is_none() {
            // A peer already gone makes this fail: then there is nothing to linger for.
            if ready!(Pin::new(&mut self.stream).poll_shutdown(cx)).is_err() {
                return Poll::Ready(Ok(()));
            }
            self.until = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 16 << 10];
        loop {
            if self
                .until
                .as_mut()
                .is_some_and(|until| until.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut self.stream).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => {}
                // The client closed (or failed): the connection can go.
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const ANSWER: &[u8] =
        b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

    /// What a client that sends a request with a 32 MiB body and then reads the answer met,
    /// against a server that answers after the first bytes and closes (`linger`: through
    /// [`Lingering`], else by a plain shutdown and close): whether sending the body failed,
    /// and what it read (or its error).
    async fn early_answer(linger: bool) -> (Result<(), String>, Result<Vec<u8>, String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut first = [0u8; 1024];
            if linger {
                let mut io = Lingering::new(stream);
                let _ = io.read(&mut first).await;
                io.write_all(ANSWER).await.expect("answer");
                io.shutdown().await.expect("lingering close");
            } else {
                let mut io = stream;
                let _ = io.read(&mut first).await;
                io.write_all(ANSWER).await.expect("answer");
                let _ = io.shutdown().await;
            }
        });
        let client = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).expect("connect");
            let body = vec![b'x'; 32 << 20];
            let head = format!(
                "PUT /v1/x HTTP/1.1\r\nhost: kiln\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let sent = stream
                .write_all(head.as_bytes())
                .and_then(|()| stream.write_all(&body))
                .map_err(|e| e.to_string());
            let mut answer = Vec::new();
            let read = stream
                .read_to_end(&mut answer)
                .map(|_| answer)
                .map_err(|e| e.to_string());
            (sent, read)
        });
        let met = client.await.expect("client");
        server.await.expect("server");
        met
    }

    #[tokio::test]
    async fn a_client_still_sending_finishes_and_gets_the_early_answer() {
        let (sent, answer) = early_answer(true).await;
        sent.expect("the whole body sent");
        assert_eq!(answer.expect("the answer"), ANSWER);
    }

    #[tokio::test]
    async fn without_the_linger_the_client_fails_to_send() {
        // The control: with a plain close, the client's sending fails, and a client that
        // gives up on the request then (hyper's does) never reads the answer.
        let (sent, _) = early_answer(false).await;
        assert!(sent.is_err(), "the body was sent in full");
    }
}
