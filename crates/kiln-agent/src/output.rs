//! Bounded, replayable output history of one process.
//!
//! The pump task appends stdout/stderr chunks; every attached stream reads them in order from
//! its own cursor. While a stream is attached, the pump waits for it when the history is
//! full, so a slow host slows the process down instead of losing output. Without attached
//! streams (a background process nobody watches) the oldest output is dropped and counted,
//! so the process never blocks on a full pipe.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use kiln_proto::messages::ExitStatus;
use tokio::sync::watch;

/// How much output a process keeps for attaching streams.
pub const HISTORY_BYTES: usize = 1 << 20;

/// One chunk of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// From stdout (or the terminal).
    Stdout(Bytes),
    /// From stderr.
    Stderr(Bytes),
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Stdout(b) | Chunk::Stderr(b) => b.len(),
        }
    }
}

/// How the process ended, as the pump saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// The wait status.
    pub status: ExitStatus,
    /// Whether the agent killed it on timeout.
    pub timed_out: bool,
}

#[derive(Debug)]
struct State {
    chunks: VecDeque<Chunk>,
    /// Sequence number of `chunks[0]`.
    first_seq: u64,
    bytes: usize,
    dropped_bytes: u64,
    cursors: HashMap<u64, u64>,
    next_cursor_id: u64,
    finish: Option<Finish>,
    capacity: usize,
}

impl State {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.chunks.len() as u64
    }

    /// Whether the oldest chunk has been read by every attached cursor.
    fn oldest_consumed(&self) -> bool {
        self.cursors.values().all(|&c| c > self.first_seq)
    }
}

/// The shared history; cheap to clone.
#[derive(Debug, Clone)]
pub struct OutputLog {
    state: Arc<Mutex<State>>,
    produced: watch::Sender<u64>,
    consumed: watch::Sender<u64>,
}

impl Default for OutputLog {
    fn default() -> Self {
        OutputLog::with_capacity(HISTORY_BYTES)
    }
}

impl OutputLog {
    /// A log that keeps up to `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> OutputLog {
        OutputLog {
            state: Arc::new(Mutex::new(State {
                chunks: VecDeque::new(),
                first_seq: 0,
                bytes: 0,
                dropped_bytes: 0,
                cursors: HashMap::new(),
                next_cursor_id: 0,
                finish: None,
                capacity,
            })),
            produced: watch::channel(0).0,
            consumed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a chunk, waiting while attached readers have not caught up with a full log.
    pub async fn push(&self, chunk: Chunk) {
        let mut consumed = self.consumed.subscribe();
        loop {
            {
                let mut state = self.lock();
                consumed.borrow_and_update();
                while state.bytes + chunk.len() > state.capacity && !state.chunks.is_empty() {
                    if !state.oldest_consumed() {
                        break;
                    }
                    if let Some(old) = state.chunks.pop_front() {
                        state.bytes -= old.len();
                        state.first_seq += 1;
                        state.dropped_bytes += old.len() as u64;
                    }
                }
                if state.bytes + chunk.len() <= state.capacity || state.chunks.is_empty() {
                    state.bytes += chunk.len();
                    state.chunks.push_back(chunk);
                    self.produced.send_modify(|v| *v += 1);
                    return;
                }
            }
            // A reader lags a full log behind: wait for it to read (or to detach).
            if consumed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Marks the output complete.
    pub fn finish(&self, finish: Finish) {
        self.lock().finish = Some(finish);
        self.produced.send_modify(|v| *v += 1);
    }

    /// How the process ended, once it has.
    pub fn finished(&self) -> Option<Finish> {
        self.lock().finish
    }

    /// Waits until the process has ended, without holding back its output as a reader would.
    pub async fn wait_finished(&self) -> Finish {
        let mut produced = self.produced.subscribe();
        loop {
            if let Some(finish) = self.finished() {
                return finish;
            }
            // The log owns the sender, so `changed` cannot report a closed channel.
            let _ = produced.changed().await;
        }
    }

    /// Attaches a reader at the oldest kept chunk.
    pub fn subscribe(&self) -> Subscription {
        let mut state = self.lock();
        let id = state.next_cursor_id;
        state.next_cursor_id += 1;
        let seq = state.first_seq;
        state.cursors.insert(id, seq);
        Subscription {
            log: self.clone(),
            id,
            dropped_before: state.dropped_bytes,
            produced: self.produced.subscribe(),
        }
    }
}

/// What a reader gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A chunk of output.
    Chunk(Chunk),
    /// The process ended and all output was read.
    Finished(Finish),
}

/// A reader's position in an [`OutputLog`]; detaches on drop.
#[derive(Debug)]
pub struct Subscription {
    log: OutputLog,
    id: u64,
    dropped_before: u64,
    produced: watch::Receiver<u64>,
}

impl Subscription {
    /// Bytes dropped from the history before this reader attached.
    pub fn dropped_before(&self) -> u64 {
        self.dropped_before
    }

    /// The next chunk, or the finish once everything was read.
    pub async fn next(&mut self) -> Next {
        loop {
            {
                let mut state = self.log.lock();
                self.produced.borrow_and_update();
                let cursor = state
                    .cursors
                    .get(&self.id)
                    .copied()
                    .unwrap_or(state.first_seq);
                let cursor = cursor.max(state.first_seq);
                if cursor < state.next_seq() {
                    let index = usize::try_from(cursor - state.first_seq).unwrap_or(usize::MAX);
                    if let Some(chunk) = state.chunks.get(index).cloned() {
                        state.cursors.insert(self.id, cursor + 1);
                        drop(state);
                        self.log.consumed.send_modify(|v| *v += 1);
                        return Next::Chunk(chunk);
                    }
                }
                if let Some(finish) = state.finish {
                    return Next::Finished(finish);
                }
            }
            if self.produced.changed().await.is_err() {
                // The log is owned by this subscription too, so the sender cannot be gone.
                continue;
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.log.lock().cursors.remove(&self.id);
        self.log.consumed.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn out(s: &str) -> Chunk {
        Chunk::Stdout(Bytes::copy_from_slice(s.as_bytes()))
    }

    const DONE: Finish = Finish {
        status: ExitStatus {
            code: Some(0),
            signal: None,
        },
        timed_out: false,
    };

    #[tokio::test]
    async fn reader_sees_everything_in_order() {
        let log = OutputLog::with_capacity(8);
        let mut sub = log.subscribe();
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    log.push(out(&format!("{i:03}"))).await;
                }
                log.finish(DONE);
            })
        };
        for i in 0..100 {
            assert_eq!(sub.next().await, Next::Chunk(out(&format!("{i:03}"))));
        }
        assert_eq!(sub.next().await, Next::Finished(DONE));
        writer.await.expect("writer finished");
    }

    #[tokio::test]
    async fn waiting_for_the_finish_does_not_hold_back_output() {
        let log = OutputLog::with_capacity(4);
        let waiter = tokio::spawn({
            let log = log.clone();
            async move { log.wait_finished().await }
        });
        for _ in 0..10 {
            log.push(out("abc")).await;
        }
        assert!(!waiter.is_finished());
        log.finish(DONE);
        assert_eq!(waiter.await.expect("waiter finished"), DONE);
    }

    #[tokio::test]
    async fn unattached_log_drops_oldest_and_counts() {
        let log = OutputLog::with_capacity(6);
        for s in ["aaa", "bbb", "ccc"] {
            log.push(out(s)).await;
        }
        log.finish(DONE);
        let mut sub = log.subscribe();
        assert_eq!(sub.dropped_before(), 3);
        assert_eq!(sub.next().await, Next::Chunk(out("bbb")));
        assert_eq!(sub.next().await, Next::Chunk(out("ccc")));
        assert_eq!(sub.next().await, Next::Finished(DONE));
    }

    #[tokio::test]
    async fn attached_reader_applies_backpressure_until_detached() {
        let log = OutputLog::with_capacity(6);
        let sub = log.subscribe();
        log.push(out("aaa")).await;
        log.push(out("bbb")).await;
        let blocked = {
            let log = log.clone();
            tokio::spawn(async move { log.push(out("ccc")).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !blocked.is_finished(),
            "push must wait for the attached reader"
        );
        drop(sub);
        tokio::time::timeout(Duration::from_secs(5), blocked)
            .await
            .expect("detaching unblocks the writer")
            .expect("no panic");
    }
}
