//! Length-prefixed frames inside streaming HTTP/2 bodies.
//!
//! ```text
//! +----------------+--------+---------------------+
//! | length: u32 BE | kind:u8| payload (length - 1) |
//! +----------------+--------+---------------------+
//! ```
//!
//! `length` counts the kind byte and the payload. The decoder rejects frames whose declared
//! length exceeds its limit before buffering them, so a hostile peer cannot make it allocate
//! more than one maximum-size frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

/// Largest payload a frame may carry by default.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;

/// Size of the frame header (length and kind).
pub const HEADER_LEN: usize = 5;

/// Chunk size used for stdout/stderr/file data.
pub const DATA_CHUNK: usize = 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON control message (see [`crate::messages`]).
    Control = 0,
    /// Bytes the process wrote to stdout (or to its terminal in PTY mode).
    Stdout = 1,
    /// Bytes the process wrote to stderr.
    Stderr = 2,
    /// Bytes for the process's stdin.
    Stdin = 3,
    /// File contents.
    Data = 4,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            0 => FrameKind::Control,
            1 => FrameKind::Stdout,
            2 => FrameKind::Stderr,
            3 => FrameKind::Stdin,
            4 => FrameKind::Data,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload.
    pub payload: Bytes,
}

impl Frame {
    /// A data-carrying frame.
    pub fn new(kind: FrameKind, payload: Bytes) -> Frame {
        Frame { kind, payload }
    }

    /// A control frame carrying `message` as JSON.
    pub fn control<T: Serialize>(message: &T) -> Frame {
        // The protocol's message types are plain data; serializing them cannot fail.
        let json = serde_json::to_vec(message).unwrap_or_default();
        Frame {
            kind: FrameKind::Control,
            payload: Bytes::from(json),
        }
    }

    /// Decodes a control frame's JSON payload.
    pub fn parse_control<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        if self.kind != FrameKind::Control {
            return Err(FrameError::UnexpectedKind(self.kind));
        }
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::BadControl(e.to_string()))
    }

    /// Encodes header and payload into one buffer.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        let len = u32::try_from(self.payload.len() + 1).unwrap_or(u32::MAX);
        out.put_u32(len);
        out.put_u8(self.kind as u8);
        out.extend_from_slice(&self.payload);
        out.freeze()
    }
}

/// Why a frame stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Declared length exceeds the decoder's limit.
    #[error("frame of {declared} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Declared payload length.
        declared: usize,
        /// The decoder's limit.
        limit: usize,
    },
    /// A zero length (no kind byte).
    #[error("empty frame")]
    Empty,
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame of a kind that is not allowed at this point of the stream.
    #[error("unexpected {0:?} frame")]
    UnexpectedKind(FrameKind),
    /// A control frame whose JSON does not decode.
    #[error("malformed control message: {0}")]
    BadControl(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
}

/// Incremental decoder: push bytes as they arrive, pop frames as they complete.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_payload: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(MAX_FRAME_PAYLOAD)
    }
}

impl FrameDecoder {
    /// A decoder that accepts payloads up to `max_payload` bytes.
    pub fn new(max_payload: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            max_payload,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Pops the next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let declared = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let declared = usize::try_from(declared).unwrap_or(usize::MAX);
        if declared == 0 {
            return Err(FrameError::Empty);
        }
        let payload_len = declared - 1;
        if payload_len > self.max_payload {
            return Err(FrameError::TooLarge {
                declared: payload_len,
                limit: self.max_payload,
            });
        }
        let kind = FrameKind::from_byte(self.buf[4]).ok_or(FrameError::UnknownKind(self.buf[4]))?;
        if self.buf.len() < HEADER_LEN + payload_len {
            self.buf.reserve(HEADER_LEN + payload_len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(payload_len).freeze();
        Ok(Some(Frame { kind, payload }))
    }

    /// Call at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated(self.buf.len()))
        }
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{ExecEvent, ExecInput};
    use proptest::prelude::*;

    #[test]
    fn round_trip_across_split_points() {
        let frames = vec![
            Frame::new(FrameKind::Stdout, Bytes::from_static(b"hello")),
            Frame::control(&ExecEvent::Started { pid: 42 }),
            Frame::new(FrameKind::Stderr, Bytes::new()),
            Frame::new(FrameKind::Data, Bytes::from(vec![7u8; 100_000])),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
        for split in [1, 2, 5, 7, 1000, wire.len()] {
            let mut decoder = FrameDecoder::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(split) {
                decoder.push(chunk);
                while let Some(frame) = decoder.next_frame().expect("valid stream") {
                    got.push(frame);
                }
            }
            decoder.finish().expect("no leftover");
            assert_eq!(got, frames);
        }
    }

    #[test]
    fn rejects_oversized_before_buffering() {
        let mut decoder = FrameDecoder::new(16);
        decoder.push(&[0, 0, 1, 0, 1]);
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLarge {
                declared: 255,
                limit: 16
            })
        );
        let mut decoder = FrameDecoder::default();
        decoder.push(&[0xff, 0xff, 0xff, 0xff, 0]);
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn rejects_empty_unknown_and_truncated() {
        let mut decoder = FrameDecoder::default();
        decoder.push(&[0, 0, 0, 0, 0]);
        assert_eq!(decoder.next_frame(), Err(FrameError::Empty));
        let mut decoder = FrameDecoder::default();
        decoder.push(&[0, 0, 0, 1, 99]);
        assert_eq!(decoder.next_frame(), Err(FrameError::UnknownKind(99)));
        let mut decoder = FrameDecoder::default();
        decoder.push(&[0, 0, 0, 3, 1, b'a']);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Err(FrameError::Truncated(6)));
    }

    #[test]
    fn control_of_wrong_kind_is_an_error() {
        let frame = Frame::new(FrameKind::Stdout, Bytes::from_static(b"{}"));
        assert!(matches!(
            frame.parse_control::<ExecEvent>(),
            Err(FrameError::UnexpectedKind(FrameKind::Stdout))
        ));
        let frame = Frame::new(
            FrameKind::Control,
            Bytes::from_static(b"{\"type\":\"nope\"}"),
        );
        assert!(matches!(
            frame.parse_control::<ExecInput>(),
            Err(FrameError::BadControl(_))
        ));
    }

    proptest! {
        /// Hostile byte streams: the decoder never panics, never holds more than one maximum
        /// frame plus the last chunk, and every frame it yields is within the limit.
        #[test]
        fn hostile_streams_are_bounded(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..2048), 0..32)) {
            let limit = 4096;
            let mut decoder = FrameDecoder::new(limit);
            'outer: for chunk in &chunks {
                decoder.push(chunk);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => {
                            prop_assert!(frame.payload.len() <= limit);
                            let _ = frame.parse_control::<ExecEvent>();
                            let _ = frame.parse_control::<ExecInput>();
                        }
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
                prop_assert!(decoder.buffered() <= HEADER_LEN + limit + chunk.len());
            }
        }

        /// Any sequence of valid frames decodes to itself whatever the chunking.
        #[test]
        fn valid_streams_round_trip(
            payloads in proptest::collection::vec(
                (0u8..5, proptest::collection::vec(any::<u8>(), 0..300)), 0..20),
            chunk in 1usize..64) {
            let frames: Vec<Frame> = payloads.into_iter().map(|(k, p)| {
                Frame::new(FrameKind::from_byte(k).expect("kind in range"), Bytes::from(p))
            }).collect();
            let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
            let mut decoder = FrameDecoder::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().expect("valid") { got.push(frame); }
            }
            prop_assert_eq!(got, frames);
        }
    }
}
