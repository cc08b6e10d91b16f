//! Glue between frames, HTTP/2 bodies and byte streams, shared by host and agent.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::frame::{Frame, FrameDecoder, FrameError};

/// A streaming body fed by a [`FrameSender`]. Bounded: the sender waits while the peer is slow.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

/// Sends frames into a [`ChannelBody`].
#[derive(Debug, Clone)]
pub struct FrameSender {
    tx: mpsc::Sender<Bytes>,
}

/// The body was dropped: the peer went away or the stream was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stream was closed by the peer")]
pub struct StreamClosed;

impl FrameSender {
    /// Sends one frame, waiting for room.
    pub async fn send(&self, frame: &Frame) -> Result<(), StreamClosed> {
        self.tx.send(frame.encode()).await.map_err(|_| StreamClosed)
    }

    /// Whether the receiving body is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the receiving body is dropped.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A bounded frame channel; `capacity` encoded frames are buffered at most.
pub fn frame_channel(capacity: usize) -> (FrameSender, ChannelBody) {
    let (tx, rx) = mpsc::channel(capacity);
    (FrameSender { tx }, ChannelBody { rx })
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(http_body::Frame::data(bytes))))
    }
}

/// Why reading frames from a body failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The body itself failed (stream reset, connection lost).
    #[error("stream failed: {0}")]
    Body(String),
    /// The bytes are not a valid frame stream.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads frames from an HTTP body.
#[derive(Debug)]
pub struct FrameReader<B> {
    body: B,
    decoder: FrameDecoder,
    done: bool,
}

impl<B> FrameReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// Reads `body`, accepting frames up to `max_payload` bytes.
    pub fn new(body: B, max_payload: usize) -> FrameReader<B> {
        FrameReader {
            body,
            decoder: FrameDecoder::new(max_payload),
            done: false,
        }
    }

    /// The next frame; `Ok(None)` at a clean end of the body.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadFrameError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            if self.done {
                self.decoder.finish()?;
                return Ok(None);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => return Err(ReadFrameError::Body(e.to_string())),
                None => self.done = true,
            }
        }
    }
}

/// A byte stream with some already-read bytes put back in front of it.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Reads `prefix` first, then `inner`.
    pub fn new(prefix: impl Into<Bytes>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix: prefix.into(),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameKind;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn prefixed_reads_prefix_then_inner() {
        let inner: &[u8] = b" world";
        let mut stream = Prefixed::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        stream
            .read_to_string(&mut out)
            .await
            .expect("in-memory read");
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn channel_body_carries_frames_to_reader() {
        let (tx, body) = frame_channel(2);
        let sender = tokio::spawn(async move {
            for i in 0..10u8 {
                tx.send(&Frame::new(FrameKind::Stdout, Bytes::from(vec![i; 3])))
                    .await?;
            }
            Ok::<_, StreamClosed>(())
        });
        let mut reader = FrameReader::new(body, 16);
        for i in 0..10u8 {
            let frame = reader.next().await.expect("valid").expect("a frame");
            assert_eq!(frame.payload, vec![i; 3]);
        }
        assert!(reader.next().await.expect("clean end").is_none());
        sender
            .await
            .expect("no panic")
            .expect("reader kept the body");
    }
}
