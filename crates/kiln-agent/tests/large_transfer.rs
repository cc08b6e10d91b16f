//! A 100 MiB file streamed both ways in bounded memory, on both sides. Kept in its own test
//! binary so that this process's peak RSS belongs to this test alone.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};

use kiln_proto::messages::{FileReadRequest, FileWriteStart};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const SIZE: u64 = 100 << 20;
/// Peak RSS allowed for either side: far below the file size.
const MAX_PEAK_BYTES: u64 = 64 << 20;

/// Deterministic pseudo-random bytes, generated on the fly.
fn byte_at(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i >> 7);
    (x >> 32) as u8
}

struct Generator {
    pos: u64,
}

impl AsyncRead for Generator {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(SIZE - self.pos);
        let start = self.pos;
        let bytes: Vec<u8> = (start..start + n).map(byte_at).collect();
        buf.put_slice(&bytes);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Checks every byte against the generator without keeping any.
struct Verifier {
    pos: u64,
    mismatches: u64,
}

impl AsyncWrite for Verifier {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        for &b in data {
            if b != byte_at(self.pos) {
                self.mismatches += 1;
            }
            self.pos += 1;
        }
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Peak resident set (VmHWM) of `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

/// The agent runs as the child of the `unshare` process.
fn agent_pid(unshare_pid: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
            .expect("children");
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("agent child")
}

#[tokio::test]
async fn hundred_mib_both_ways_in_bounded_memory() {
    let (agent, client) = common::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("big.bin").to_string_lossy().into_owned();

    let start = FileWriteStart::new(path.clone());
    let written = client
        .write_file_from(start, &mut Generator { pos: 0 })
        .await
        .expect("upload");
    assert_eq!(written, SIZE);
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), SIZE);

    let mut verifier = Verifier {
        pos: 0,
        mismatches: 0,
    };
    let read = client
        .read_file_to(
            FileReadRequest {
                path,
                offset: 0,
                limit: None,
            },
            &mut verifier,
        )
        .await
        .expect("download");
    assert_eq!((read, verifier.pos, verifier.mismatches), (SIZE, SIZE, 0));

    let agent_peak = peak_rss(agent_pid(agent.pid().expect("running")));
    let host_peak = peak_rss(std::process::id());
    assert!(
        agent_peak < MAX_PEAK_BYTES,
        "agent peak RSS {agent_peak} bytes"
    );
    assert!(
        host_peak < MAX_PEAK_BYTES,
        "client peak RSS {host_peak} bytes"
    );
    eprintln!(
        "peak RSS: agent {} MiB, client {} MiB",
        agent_peak >> 20,
        host_peak >> 20
    );
}
