//! A small synchronous client of QEMU's machine protocol (QMP).
//!
//! QEMU is less trusted than the daemon (it runs guest-facing device emulation), so replies
//! are read with a line limit and a timeout like any other untrusted input.

use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest QMP line accepted.
const MAX_LINE: u64 = 4 << 20;

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

/// A QMP session.
#[derive(Debug)]
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    timeout: Duration,
    /// Events received while waiting for replies, oldest first.
    events: Vec<Value>,
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
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    QmpError::Timeout(waiting_for.to_owned())
                } else {
                    QmpError::Io(e)
                }
            })?;
        if n == 0 {
            return Err(QmpError::Protocol(format!(
                "QEMU closed QMP while waiting for {waiting_for}"
            )));
        }
        if !line.ends_with(b"\n") {
            return Err(QmpError::Protocol("QMP line too long".into()));
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
            if Instant::now() > deadline {
                return Err(QmpError::Timeout(command.to_owned()));
            }
            let message = self.read_message(command)?;
            if message.get("event").is_some() {
                if self.events.len() < 1024 {
                    self.events.push(message);
                }
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
}
