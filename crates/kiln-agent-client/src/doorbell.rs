//! The session's doorbell: wakes a guest that missed the host's bytes.
//!
//! Linux's virtio_console sometimes does not announce bytes that arrived, and the agent then
//! reads a request (or stdin, or the window update it waits for) only once the host sends
//! something more. The doorbell sits between hyper and the agent's transport and watches the
//! HTTP/2 frames go by. Once the host has sent a frame that asks something of the agent (any
//! but a ping, a settings acknowledgement or a goaway) and no byte has come back for
//! `ring_after`, it sends a ping of its own between two frames, and again every `ring_after`
//! while the agent stays silent; the agent's acknowledgements of those pings are taken out of
//! what hyper reads. A call that is open but owed nothing (a quiet process's exec stream, an
//! idle terminal) rings nothing, so its guest sleeps; hyper's keep-alive still finds a dead
//! agent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;

/// The client's connection preface ("PRI * HTTP/2.0...") that precedes its first frame.
const PREFACE: usize = 24;
/// An HTTP/2 frame header: length (3), type, flags, stream (4).
const HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
/// ACK on a ping or settings frame.
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// The payload of the doorbell's pings, which tells their acknowledgements from hyper's.
const BELL: [u8; 8] = *b"kilnbell";
/// Bytes copied per read in each direction.
const CHUNK: usize = 64 * 1024;

/// A ping frame carrying [`BELL`].
fn ring() -> [u8; HEADER + 8] {
    let mut frame = [0u8; HEADER + 8];
    frame[2] = 8;
    frame[3] = PING;
    frame[HEADER..].copy_from_slice(&BELL);
    frame
}

fn payload_len(header: &[u8]) -> usize {
    usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2])
}

/// Whether a frame from the host asks something of the agent that it may answer.
fn asks(header: &[u8; HEADER]) -> bool {
    match header[3] {
        PING | GOAWAY => false,
        SETTINGS => header[4] & ACK == 0,
        _ => true,
    }
}

/// Where a byte stream of HTTP/2 frames is, from the lengths in their headers, holding no more
/// than one header.
#[derive(Debug)]
struct Frames {
    /// Bytes of the preface or of the current frame's payload still to pass.
    skip: usize,
    header: [u8; HEADER],
    /// Bytes of the next header seen so far.
    have: usize,
    /// A header block is open (a HEADERS or CONTINUATION without END_HEADERS): nothing may
    /// come between it and its next CONTINUATION.
    in_header_block: bool,
}

impl Frames {
    /// A stream that starts with the client's preface.
    fn client() -> Frames {
        Frames {
            skip: PREFACE,
            header: [0; HEADER],
            have: 0,
            in_header_block: false,
        }
    }

    /// Passes `bytes`; calls `on_header` with each frame header completed.
    fn feed(&mut self, mut bytes: &[u8], mut on_header: impl FnMut(&[u8; HEADER])) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == HEADER {
                self.have = 0;
                self.skip = payload_len(&self.header);
                if matches!(self.header[3], HEADERS | CONTINUATION) {
                    self.in_header_block = self.header[4] & END_HEADERS == 0;
                }
                on_header(&self.header);
            }
        }
    }

    /// Whether a frame may be put in here.
    fn at_boundary(&self) -> bool {
        self.skip == 0 && self.have == 0 && !self.in_header_block
    }
}

/// Takes the acknowledgements of the doorbell's pings out of the agent's frames, holding no
/// more than one such frame. Bytes that are not HTTP/2 pass as they are (hyper refuses them).
#[derive(Debug, Default)]
struct Unbell {
    /// Bytes of the current frame's payload still to pass.
    skip: usize,
    /// A header being read, or a ping acknowledgement's header and payload.
    held: Vec<u8>,
}

impl Unbell {
    fn is_ack_of_ping(header: &[u8]) -> bool {
        header[3] == PING && header[4] & ACK != 0 && payload_len(header) == BELL.len()
    }

    /// With no payload left to pass ([`Unbell::skip`] 0): takes bytes of the next frame's
    /// header (and of a ping acknowledgement's payload) from `input`, appends to `out` what
    /// hyper is to read once it is whole, and sets the payload to pass. Returns the bytes taken.
    fn header(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut taken = 0;
        loop {
            let want = if self.held.len() >= HEADER && Unbell::is_ack_of_ping(&self.held) {
                HEADER + BELL.len()
            } else {
                HEADER
            };
            let n = (want - self.held.len()).min(input.len() - taken);
            self.held.extend_from_slice(&input[taken..taken + n]);
            taken += n;
            if self.held.len() < want {
                return taken;
            }
            if want == HEADER {
                if Unbell::is_ack_of_ping(&self.held) {
                    continue;
                }
                self.skip = payload_len(&self.held);
                out.append(&mut self.held);
            } else if self.held[HEADER..] == BELL {
                self.held.clear();
            } else {
                out.append(&mut self.held);
            }
            return taken;
        }
    }

    /// Appends to `out` what of `input` hyper is to read.
    #[cfg(test)]
    fn filter(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(input.len());
                out.extend_from_slice(&input[..n]);
                self.skip -= n;
                input = &input[n..];
            } else {
                let taken = self.header(input, out);
                input = &input[taken..];
            }
        }
    }
}

/// Puts a doorbell on `transport`: returns the stream for hyper; the doorbell runs until either
/// side closes.
pub(crate) fn install<T>(transport: T, ring_after: Duration) -> DuplexStream
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (hyper_side, ours) = tokio::io::duplex(4 * CHUNK);
    tokio::spawn(async move {
        let (agent_read, agent_write) = tokio::io::split(transport);
        let (hyper_read, hyper_write) = tokio::io::split(ours);
        // Bumped whenever the agent sends anything.
        let heard = AtomicU64::new(0);
        let outcome = tokio::select! {
            r = host_to_agent(hyper_read, agent_write, &heard, ring_after) => r,
            r = agent_to_host(agent_read, hyper_write, &heard) => r,
        };
        if let Err(e) = outcome {
            tracing::debug!(error = %e, "agent session's transport ended");
        }
    });
    hyper_side
}

async fn host_to_agent(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    heard: &AtomicU64,
    ring_after: Duration,
) -> std::io::Result<()> {
    let mut frames = Frames::client();
    let mut buf = vec![0u8; CHUNK];
    // Since when the agent has owed an answer, and how much it had said by then.
    let mut owed: Option<(Instant, u64)> = None;
    let mut ring_due = false;
    loop {
        let deadline = owed.map(|(since, _)| since + ring_after);
        tokio::select! {
            n = from.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return to.shutdown().await;
                }
                let mut asked = false;
                frames.feed(&buf[..n], |header| asked |= asks(header));
                to.write_all(&buf[..n]).await?;
                to.flush().await?;
                if asked {
                    let said = heard.load(Ordering::Acquire);
                    if owed.is_none_or(|(_, then)| then != said) {
                        owed = Some((Instant::now(), said));
                    }
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                match owed {
                    Some((_, then)) if then != heard.load(Ordering::Acquire) => owed = None,
                    Some((_, then)) => {
                        ring_due = true;
                        owed = Some((Instant::now(), then));
                    }
                    None => {}
                }
            }
        }
        if ring_due && frames.at_boundary() {
            to.write_all(&ring()).await?;
            to.flush().await?;
            ring_due = false;
        }
    }
}

async fn agent_to_host(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    heard: &AtomicU64,
) -> std::io::Result<()> {
    let mut unbell = Unbell::default();
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(HEADER + BELL.len());
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        heard.fetch_add(1, Ordering::Release);
        let mut input = &buf[..n];
        while !input.is_empty() {
            if unbell.skip > 0 {
                // Payload goes on straight from the read buffer.
                let n = unbell.skip.min(input.len());
                to.write_all(&input[..n]).await?;
                unbell.skip -= n;
                input = &input[n..];
            } else {
                let taken = unbell.header(input, &mut out);
                input = &input[taken..];
                if !out.is_empty() {
                    to.write_all(&out).await?;
                    out.clear();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    /// Random frames: data, headers, pings and acknowledgements (some of the doorbell's),
    /// settings, and frames of unknown types.
    fn frames() -> impl Strategy<Value = Vec<(u8, u8, Vec<u8>)>> {
        let bell = Just((PING, ACK, BELL.to_vec()));
        let other = (
            prop_oneof![
                Just(0u8),
                Just(HEADERS),
                Just(SETTINGS),
                Just(PING),
                Just(0x8),
                Just(0xfe)
            ],
            prop_oneof![Just(0u8), Just(ACK), Just(END_HEADERS), any::<u8>()],
            proptest::collection::vec(any::<u8>(), 0..40),
        );
        let ping = (
            Just(PING),
            Just(ACK),
            proptest::collection::vec(any::<u8>(), 8..=8),
        );
        proptest::collection::vec(prop_oneof![bell, other, ping], 0..30)
    }

    /// Hands `input` to `take` in pieces of the lengths in `cuts` (over and over).
    fn in_pieces(input: &[u8], cuts: &[usize], mut take: impl FnMut(&[u8])) {
        let mut rest = input;
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                return;
            }
            let n = (*cut).min(rest.len());
            take(&rest[..n]);
            rest = &rest[n..];
        }
    }

    proptest! {
        #[test]
        fn the_agent_stream_loses_exactly_the_bells_acknowledgements(
            frames in frames(),
            cuts in proptest::collection::vec(1usize..50, 1..200),
        ) {
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for (kind, flags, payload) in &frames {
                let f = frame(*kind, *flags, payload);
                input.extend_from_slice(&f);
                let bell = *kind == PING && flags & ACK != 0 && payload[..] == BELL;
                if !bell {
                    expected.extend_from_slice(&f);
                }
            }
            let mut unbell = Unbell::default();
            let mut out = Vec::new();
            in_pieces(&input, &cuts, |piece| unbell.filter(piece, &mut out));
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn frames_are_found_however_the_stream_is_cut(
            frames in frames(),
            cuts in proptest::collection::vec(1usize..50, 1..200),
        ) {
            let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            for (kind, flags, payload) in &frames {
                input.extend_from_slice(&frame(*kind, *flags, payload));
            }
            let mut seen = Vec::new();
            let mut framer = Frames::client();
            in_pieces(&input, &cuts, |piece| {
                framer.feed(piece, |h| seen.push((h[3], h[4], payload_len(h))));
            });
            let want: Vec<_> = frames.iter().map(|(k, f, p)| (*k, *f, p.len())).collect();
            prop_assert_eq!(seen, want);
            prop_assert_eq!(framer.skip + framer.have, 0);
        }
    }

    #[test]
    fn nothing_is_put_inside_a_header_block_or_a_frame() {
        let mut framer = Frames::client();
        assert!(!framer.at_boundary(), "before the preface");
        framer.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", |_| {});
        assert!(framer.at_boundary());
        let headers = frame(HEADERS, 0, b"abc");
        framer.feed(&headers[..5], |_| {});
        assert!(!framer.at_boundary(), "inside a header");
        framer.feed(&headers[5..10], |_| {});
        assert!(!framer.at_boundary(), "inside a payload");
        framer.feed(&headers[10..], |_| {});
        assert!(!framer.at_boundary(), "a header block without END_HEADERS");
        framer.feed(&frame(CONTINUATION, END_HEADERS, b"d"), |_| {});
        assert!(framer.at_boundary());
    }

    #[test]
    fn what_asks_for_an_answer() {
        let header = |kind, flags| {
            let mut h = [0u8; HEADER];
            h[3] = kind;
            h[4] = flags;
            h
        };
        assert!(asks(&header(0, 0)), "data");
        assert!(asks(&header(HEADERS, END_HEADERS)));
        assert!(asks(&header(0x3, 0)), "a reset");
        assert!(asks(&header(0x8, 0)), "a window update");
        assert!(asks(&header(SETTINGS, 0)));
        assert!(!asks(&header(SETTINGS, ACK)));
        assert!(!asks(&header(PING, 0)));
        assert!(!asks(&header(PING, ACK)));
        assert!(!asks(&header(GOAWAY, 0)));
    }
}
