//! A small synchronous client of QEMU's machine protocol (QMP).
//!
//! QEMU is less trusted than the daemon (it runs guest-facing device emulation), so replies
//! are read with a line limit and a timeout like any other untrusted input.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest QMP line accepted (kiln's replies are a few KiB at most).
const MAX_LINE: usize = 1 << 20;

/// Asynchronous events kept while waiting for replies (nobody reads them yet): at most this
/// many, and this many bytes; the rest are dropped and counted.
const MAX_EVENTS: usize = 64;
const MAX_EVENT_BYTES: usize = 64 << 10;

/// What can go wrong on QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Socket I/O failed.
    #[error("QMP I/O")]
    Io(#[from] std::io::Error),
    /// QEMU did not answer in time.
    #[error("QMP `{0}` timed out")]
    Timeout(String),
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// The command failed.
    #[error("QMP `{command}` failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// A QMP session. Every read is bounded in bytes and in time (a whole reply must arrive
/// within the session's timeout, however slowly its bytes drip in): QEMU runs guest-facing
/// code, so a compromised one must not be able to hold the daemon's memory or a thread.
#[derive(Debug)]
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    timeout: Duration,
    /// Events received while waiting for replies, oldest first.
    events: Vec<Value>,
    event_bytes: usize,
    /// Events dropped because the buffer was full.
    dropped_events: u64,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            timeout,
            events: Vec::new(),
            event_bytes: 0,
            dropped_events: 0,
        };
        let greeting = qmp.read_message("greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self, waiting_for: &str) -> Result<Value, QmpError> {
        self.read_message_by(waiting_for, Instant::now() + self.timeout)
    }

    /// Reads one line, which must be complete by `deadline` and at most [`MAX_LINE`] long.
    fn read_message_by(&mut self, waiting_for: &str, deadline: Instant) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(waiting_for.to_owned()));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let available = match self.reader.fill_buf() {
                Ok(bytes) => bytes,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Timeout(waiting_for.to_owned()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(QmpError::Io(e)),
            };
            if available.is_empty() {
                return Err(QmpError::Protocol(format!(
                    "QEMU closed QMP while waiting for {waiting_for}"
                )));
            }
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(at) => (at + 1, true),
                None => (available.len(), false),
            };
            if line.len() + take > MAX_LINE {
                return Err(QmpError::Protocol("QMP line too long".into()));
            }
            line.extend_from_slice(&available[..take]);
            self.reader.consume(take);
            if done {
                break;
            }
        }
        serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(format!("bad JSON: {e}")))
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let request = self.request(command, arguments);
        self.writer.write_all(&request)?;
        self.reply(command)
    }

    /// Runs `command` while passing `fd` to QEMU (`getfd`, `add-fd`).
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        let request = self.request(command, arguments);
        let fds = [fd.as_raw_fd()];
        let sent = sendmsg::<UnixAddr>(
            self.writer.as_raw_fd(),
            &[IoSlice::new(&request)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from)?;
        if sent < request.len() {
            self.writer.write_all(&request[sent..])?;
        }
        self.reply(command)
    }

    fn request(&self, command: &str, arguments: Option<Value>) -> Vec<u8> {
        let mut message = json!({ "execute": command });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut bytes = message.to_string().into_bytes();
        bytes.push(b'\n');
        bytes
    }

    fn reply(&mut self, command: &str) -> Result<Value, QmpError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let message = self.read_message_by(command, deadline)?;
            if message.get("event").is_some() {
                self.keep_event(message);
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply {message}")));
        }
    }

    fn keep_event(&mut self, event: Value) {
        let size = event.to_string().len();
        if self.events.len() < MAX_EVENTS && self.event_bytes + size <= MAX_EVENT_BYTES {
            self.event_bytes += size;
            self.events.push(event);
        } else {
            self.dropped_events += 1;
        }
    }

    /// Events dropped because too many arrived unread.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// Polls `query-migrate` until the migration completes, fails or `timeout` passes.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_micros(200);
        loop {
            let status = self.execute("query-migrate", None)?;
            match status.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(status),
                Some("failed") | Some("cancelled") => {
                    return Err(QmpError::Command {
                        command: "migrate".into(),
                        class: "MigrationFailed".into(),
                        desc: status
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason given")
                            .to_owned(),
                    })
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(QmpError::Timeout("migration".into()));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }

    /// Polls `query-status` until the run state is no longer `inmigrate`.
    pub fn wait_incoming(&mut self, timeout: Duration) -> Result<String, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_micros(200);
        loop {
            let status = self.execute("query-status", None)?;
            let state = status
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if state != "inmigrate" {
                return Ok(state);
            }
            if Instant::now() > deadline {
                return Err(QmpError::Timeout("incoming migration".into()));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU that sends `script` lines after reading each request.
    fn fake(replies: Vec<&'static str>) -> (tempfile::TempDir, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().expect("dir");
        let listener = UnixListener::bind(dir.path().join("qmp.sock")).expect("bind");
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            stream
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .expect("greet");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            for reply in replies {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                stream.write_all(reply.as_bytes()).expect("reply");
            }
            // Then stay connected and silent until the client goes away.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        (dir, handle)
    }

    #[test]
    fn replies_events_and_errors() {
        let (dir, server) = fake(vec![
            "{\"return\": {}}\n",
            "{\"event\": \"STOP\", \"data\": {}}\n{\"return\": {\"status\": \"paused\"}}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
        ]);
        let mut qmp =
            Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_secs(5)).expect("connect");
        let status = qmp.execute("query-status", None).expect("status");
        assert_eq!(status["status"], "paused");
        assert_eq!(qmp.events.len(), 1);
        let err = qmp.execute("stop", None).expect_err("error reply");
        assert!(
            matches!(err, QmpError::Command { ref class, .. } if class == "GenericError"),
            "{err}"
        );
        drop(qmp);
        server.join().expect("server");
    }

    #[test]
    fn garbage_and_silence_are_errors() {
        let (dir, _server) = fake(vec!["not json\n"]);
        // The fake answers qmp_capabilities with garbage.
        let result = Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_millis(300));
        assert!(matches!(result, Err(QmpError::Protocol(_))), "{result:?}");
        let (dir, _server) = fake(vec!["{\"return\": {}}\n"]);
        let mut qmp = Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_millis(300))
            .expect("connect");
        assert!(matches!(
            qmp.execute("query-status", None),
            Err(QmpError::Timeout(_)) | Err(QmpError::Protocol(_))
        ));
    }

    /// A hostile QEMU: floods events before its reply, drips a reply byte by byte, sends a
    /// line without end. The session stays bounded in memory and in time.
    #[test]
    fn a_hostile_qemu_cannot_hold_memory_or_time() {
        let dir = tempfile::tempdir().expect("dir");
        let listener = UnixListener::bind(dir.path().join("qmp.sock")).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            stream
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .expect("greet");
            reader.read_line(&mut line).expect("capabilities");
            stream.write_all(b"{\"return\": {}}\n").expect("reply");
            // 1: 5,000 events of 1 KiB each, then the reply.
            reader.read_line(&mut line).expect("request");
            let event = format!(
                "{{\"event\": \"X\", \"data\": {{\"pad\": \"{}\"}}}}\n",
                "p".repeat(1000)
            );
            for _ in 0..5_000 {
                if stream.write_all(event.as_bytes()).is_err() {
                    return;
                }
            }
            stream
                .write_all(b"{\"return\": {\"ok\": 1}}\n")
                .expect("reply");
            // 2: a reply dripped slower than the deadline allows.
            reader.read_line(&mut line).expect("request");
            for byte in b"{\"return\": {}}\n" {
                if stream.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            // 3: a line that never ends.
            reader.read_line(&mut line).expect("request");
            let chunk = vec![b'x'; 64 << 10];
            while stream.write_all(&chunk).is_ok() {}
        });
        let mut qmp =
            Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_secs(2)).expect("connect");
        let reply = qmp
            .execute("flood", None)
            .expect("the reply after the flood");
        assert_eq!(reply["ok"], 1);
        assert!(qmp.events.len() <= MAX_EVENTS && qmp.event_bytes <= MAX_EVENT_BYTES);
        assert!(qmp.dropped_events() >= 5_000 - MAX_EVENTS as u64);
        let started = Instant::now();
        assert!(matches!(
            qmp.execute("drip", None),
            Err(QmpError::Timeout(_))
        ));
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "bounded by the deadline"
        );
        assert!(matches!(
            qmp.execute("endless", None),
            Err(QmpError::Protocol(_)) | Err(QmpError::Timeout(_))
        ));
        drop(qmp);
        let _ = server.join();
    }
}
