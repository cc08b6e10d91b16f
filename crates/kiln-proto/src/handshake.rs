//! Session handshake: the first bytes of every session, before HTTP/2 starts.
//!
//! ```text
//! host  -> agent   KILN-HELLO <version> <nonce>\n          (repeated until answered)
//! agent -> host    KILN-WELCOME {"protocol":1,"nonce":"..",...}\n
//! host  -> agent   PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n...      (HTTP/2 client preface)
//! ```
//!
//! Both sides read line by line and skip whatever is not a valid line of the expected kind:
//! after a snapshot restore a virtio-serial port may deliver an empty read, stale bytes from
//! the session that was live when the snapshot was taken, or a hello the agent already
//! answered. The nonce ties a welcome to the hello it answers, so stale welcomes are ignored.
//! Lines are bounded by [`MAX_LINE`]; longer ones are discarded without being buffered.

use serde::{Deserialize, Serialize};

/// Longest handshake line either side buffers (without its newline).
pub const MAX_LINE: usize = 1024;

/// Prefix of the host's hello line.
pub const HELLO_PREFIX: &str = "KILN-HELLO ";
/// Prefix of the agent's welcome line.
pub const WELCOME_PREFIX: &str = "KILN-WELCOME ";
/// First line of the HTTP/2 client preface; the agent hands the stream to HTTP/2 at this line.
pub const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

/// Length of a nonce in hex characters.
pub const NONCE_HEX_LEN: usize = 32;

/// The host's opening line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the host speaks.
    pub version: u32,
    /// 128-bit random session nonce, as 32 lowercase hex characters.
    pub nonce: String,
}

impl Hello {
    /// Encodes the hello line. It starts with a newline too, so that it is a line of its own
    /// even right after stale bytes.
    pub fn to_line(&self) -> String {
        format!("\n{HELLO_PREFIX}{} {}\n", self.version, self.nonce)
    }

    /// Parses a line (without newline). The hello may follow garbage on the same line (the
    /// tail of a stale session). Returns `None` for anything that is not a valid hello.
    pub fn parse(line: &[u8]) -> Option<Hello> {
        let at = find_last(line, HELLO_PREFIX.as_bytes())?;
        let text = std::str::from_utf8(&line[at..]).ok()?;
        let rest = text.strip_prefix(HELLO_PREFIX)?;
        let mut parts = rest.split(' ');
        let version = parts.next()?.parse().ok()?;
        let nonce = parts.next()?;
        if parts.next().is_some() || !is_valid_nonce(nonce) {
            return None;
        }
        Some(Hello {
            version,
            nonce: nonce.to_owned(),
        })
    }
}

/// Position of the last occurrence of `needle` in `haystack`.
fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// Whether `nonce` has the shape of a session nonce.
pub fn is_valid_nonce(nonce: &str) -> bool {
    nonce.len() == NONCE_HEX_LEN
        && nonce
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Encodes 16 random bytes as a nonce.
pub fn nonce_from_bytes(bytes: [u8; 16]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The agent's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version the agent speaks.
    pub protocol: u32,
    /// The nonce of the hello this answers.
    pub nonce: String,
    /// The agent's own version (its crate version).
    pub agent_version: String,
    /// Random id chosen when the agent started; the same in every VM restored from one
    /// snapshot, so it identifies the boot the snapshot was taken from.
    pub boot_id: String,
    /// Whether the init call has been applied in this boot.
    pub initialized: bool,
}

impl Welcome {
    /// Encodes the welcome line. It starts with a newline too: the agent may have written
    /// part of an old session's HTTP/2 frames just before it.
    pub fn to_line(&self) -> String {
        // Serializing a struct of strings, integers and bools cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("\n{WELCOME_PREFIX}{json}\n")
    }

    /// Parses a line (without newline); the welcome may follow garbage on the same line.
    /// `None` if it is not a welcome line at all; `Some(Err)` if it claims to be one but is
    /// malformed.
    pub fn parse(line: &[u8]) -> Option<Result<Welcome, WelcomeError>> {
        let at = find_last(line, WELCOME_PREFIX.as_bytes())?;
        let rest = &line[at + WELCOME_PREFIX.len()..];
        Some(
            serde_json::from_slice::<Welcome>(rest)
                .map_err(|e| WelcomeError::Malformed(e.to_string()))
                .and_then(|w| {
                    if is_valid_nonce(&w.nonce) {
                        Ok(w)
                    } else {
                        Err(WelcomeError::Malformed("invalid nonce".into()))
                    }
                }),
        )
    }
}

/// A welcome line that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WelcomeError {
    /// The JSON after the prefix is not a valid welcome.
    #[error("malformed welcome: {0}")]
    Malformed(String),
}

/// Splits a byte stream into bounded lines.
///
/// Memory use is bounded by [`MAX_LINE`] plus the size of the last chunk pushed: a line that
/// grows past the limit is dropped and the rest of it, up to the next newline, is skipped.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    discarding: bool,
}

impl LineBuffer {
    /// An empty buffer.
    pub fn new() -> LineBuffer {
        LineBuffer::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Pops the next complete line (newline and a trailing `\r` removed). Over-long lines are
    /// skipped. Returns `None` when no complete line is buffered.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        loop {
            match self.buf.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                    line.pop();
                    if std::mem::take(&mut self.discarding) || line.len() > MAX_LINE + 1 {
                        continue;
                    }
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if line.len() > MAX_LINE {
                        continue;
                    }
                    return Some(line);
                }
                None => {
                    if self.buf.len() > MAX_LINE + 1 {
                        self.buf.clear();
                        self.discarding = true;
                    }
                    return None;
                }
            }
        }
    }

    /// Bytes buffered after the last popped line. Used to hand the rest of the stream to the
    /// next protocol layer.
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Number of bytes currently buffered.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn welcome() -> Welcome {
        Welcome {
            protocol: 1,
            nonce: "0123456789abcdef0123456789abcdef".into(),
            agent_version: "0.1.0".into(),
            boot_id: "b".into(),
            initialized: false,
        }
    }

    #[test]
    fn hello_round_trips() {
        let hello = Hello {
            version: 7,
            nonce: nonce_from_bytes([0xab; 16]),
        };
        let line = hello.to_line();
        assert!(line.starts_with('\n') && line.ends_with('\n'));
        assert_eq!(Hello::parse(line.trim().as_bytes()), Some(hello.clone()));
        // After stale binary bytes on the same line, as after a restore.
        let mut dirty = b"\x00\x00\x08\x07\x00garbage".to_vec();
        dirty.extend_from_slice(line.trim().as_bytes());
        assert_eq!(Hello::parse(&dirty), Some(hello));
    }

    #[test]
    fn hello_rejects_bad_nonces_and_extra_fields() {
        assert_eq!(Hello::parse(b"KILN-HELLO 1 abc"), None);
        assert_eq!(
            Hello::parse(b"KILN-HELLO 1 0123456789ABCDEF0123456789abcdef"),
            None
        );
        assert_eq!(
            Hello::parse(b"KILN-HELLO 1 0123456789abcdef0123456789abcdef x"),
            None
        );
        assert_eq!(
            Hello::parse(b"KILN-HELLO x 0123456789abcdef0123456789abcdef"),
            None
        );
        assert_eq!(
            Hello::parse(b"HELLO 1 0123456789abcdef0123456789abcdef"),
            None
        );
    }

    #[test]
    fn welcome_round_trips_and_reports_malformed() {
        let line = welcome().to_line();
        let parsed = Welcome::parse(line.trim().as_bytes());
        assert_eq!(parsed, Some(Ok(welcome())));
        let mut dirty = b"\x00\x00\x08\x07GOAWAY".to_vec();
        dirty.extend_from_slice(line.trim().as_bytes());
        assert_eq!(Welcome::parse(&dirty), Some(Ok(welcome())));
        assert!(matches!(Welcome::parse(b"KILN-WELCOME {"), Some(Err(_))));
        assert_eq!(Welcome::parse(b"something else"), None);
        let mut bad = welcome();
        bad.nonce = "zz".into();
        assert!(matches!(
            Welcome::parse(bad.to_line().trim_end().as_bytes()),
            Some(Err(_))
        ));
    }

    #[test]
    fn line_buffer_splits_and_keeps_rest() {
        let mut lines = LineBuffer::new();
        lines.push(b"\nfirst\r\nsec");
        assert_eq!(lines.next_line(), Some(vec![]));
        assert_eq!(lines.next_line(), Some(b"first".to_vec()));
        assert_eq!(lines.next_line(), None);
        lines.push(b"ond\nPRI * HTTP/2.0\r\n\r\nSM");
        assert_eq!(lines.next_line(), Some(b"second".to_vec()));
        assert_eq!(lines.next_line(), Some(H2_PREFACE_LINE.to_vec()));
        assert_eq!(lines.take_rest(), b"\r\nSM".to_vec());
    }

    #[test]
    fn line_buffer_drops_overlong_lines_without_growing() {
        let mut lines = LineBuffer::new();
        for _ in 0..100 {
            lines.push(&[b'x'; 1000]);
            assert_eq!(lines.next_line(), None);
            assert!(lines.buffered() <= MAX_LINE + 1000);
        }
        lines.push(b"tail of the long line\nok\n");
        assert_eq!(lines.next_line(), Some(b"ok".to_vec()));
    }

    proptest! {
        /// Arbitrary bytes, split arbitrarily, never panic, never yield a line longer than
        /// the limit, and never make the buffer grow past limit plus one chunk.
        #[test]
        fn line_buffer_is_bounded(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..3000), 0..20)) {
            let mut lines = LineBuffer::new();
            for chunk in &chunks {
                lines.push(chunk);
                while let Some(line) = lines.next_line() {
                    prop_assert!(line.len() <= MAX_LINE);
                    let _ = Hello::parse(&line);
                    let _ = Welcome::parse(&line);
                }
                prop_assert!(lines.buffered() <= MAX_LINE + 1 + chunk.len());
            }
        }

        /// A valid hello survives arbitrary garbage before it, as after a restore.
        #[test]
        fn hello_found_after_garbage(garbage in proptest::collection::vec(any::<u8>(), 0..5000),
                                     nonce in proptest::array::uniform16(any::<u8>())) {
            let hello = Hello { version: 1, nonce: nonce_from_bytes(nonce) };
            let mut lines = LineBuffer::new();
            lines.push(&garbage);
            lines.push(b"\n");
            lines.push(hello.to_line().as_bytes());
            let mut found = None;
            while let Some(line) = lines.next_line() {
                if let Some(h) = Hello::parse(&line) { found = Some(h); }
            }
            prop_assert_eq!(found, Some(hello));
        }
    }
}
