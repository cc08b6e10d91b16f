//! The agent's side of the session handshake (see [`kiln_proto::handshake`]).

use std::io;

use kiln_proto::handshake::{Hello, LineBuffer, Welcome, H2_PREFACE_LINE};
use kiln_proto::stream::Prefixed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Who the agent says it is in its welcome.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Random id of this boot.
    pub boot_id: String,
    /// Whether the init call was applied.
    pub initialized: bool,
}

/// Waits for a hello, answers it, and returns the stream positioned at the HTTP/2 preface.
/// Bytes that are not a hello (stale data after a restore, garbage) are skipped; repeated
/// hellos with the nonce already answered are ignored, a new nonce gets a new welcome.
/// `Ok(None)` if the stream ends first.
pub async fn accept<S>(mut io: S, identity: &Identity) -> io::Result<Option<Prefixed<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut lines = LineBuffer::new();
    let mut answered: Option<String> = None;
    let mut buf = [0u8; 4096];
    loop {
        while let Some(line) = lines.next_line() {
            if let Some(hello) = Hello::parse(&line) {
                if answered.as_deref() == Some(hello.nonce.as_str()) {
                    continue;
                }
                let welcome = Welcome {
                    protocol: kiln_proto::PROTOCOL_VERSION,
                    nonce: hello.nonce.clone(),
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                    boot_id: identity.boot_id.clone(),
                    initialized: identity.initialized,
                };
                io.write_all(welcome.to_line().as_bytes()).await?;
                io.flush().await?;
                tracing::debug!(host_version = hello.version, "session hello answered");
                answered = Some(hello.nonce);
            } else if line == H2_PREFACE_LINE && answered.is_some() {
                let mut prefix = H2_PREFACE_LINE.to_vec();
                prefix.extend_from_slice(b"\r\n");
                prefix.extend_from_slice(&lines.take_rest());
                return Ok(Some(Prefixed::new(prefix, io)));
            }
        }
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        lines.push(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::handshake::nonce_from_bytes;

    fn identity() -> Identity {
        Identity {
            boot_id: "boot".into(),
            initialized: true,
        }
    }

    #[tokio::test]
    async fn skips_garbage_and_duplicate_hellos() {
        let (mut host, agent) = tokio::io::duplex(1 << 16);
        let hello = Hello {
            version: 1,
            nonce: nonce_from_bytes([1; 16]),
        };
        let task = tokio::spawn(async move { accept(agent, &identity()).await });
        host.write_all(b"\0\xff garbage\n\n").await.expect("write");
        host.write_all(hello.to_line().as_bytes())
            .await
            .expect("write");
        host.write_all(hello.to_line().as_bytes())
            .await
            .expect("write");
        host.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest")
            .await
            .expect("write");
        let mut stream = task
            .await
            .expect("no panic")
            .expect("io ok")
            .expect("a session");
        let mut preface = [0u8; 28];
        stream.read_exact(&mut preface).await.expect("preface kept");
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest");
        let mut lines = LineBuffer::new();
        let mut buf = vec![0u8; 4096];
        let n = host.read(&mut buf).await.expect("welcome");
        lines.push(&buf[..n]);
        let mut welcomes = Vec::new();
        while let Some(line) = lines.next_line() {
            if let Some(welcome) = Welcome::parse(&line) {
                welcomes.push(welcome.expect("valid"));
            }
        }
        assert_eq!(
            welcomes.len(),
            1,
            "a duplicate hello must not be answered twice"
        );
        assert_eq!(welcomes[0].nonce, hello.nonce);
    }

    #[tokio::test]
    async fn ends_quietly_at_eof() {
        let (host, agent) = tokio::io::duplex(64);
        drop(host);
        assert!(accept(agent, &identity())
            .await
            .expect("no io error")
            .is_none());
    }
}
