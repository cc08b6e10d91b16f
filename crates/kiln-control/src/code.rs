//! Stateful code execution (`run_code`): the code interpreter a template starts before its
//! snapshot (`templates/python/files/kiln-interpreter.py`), reached through the agent as a
//! byte stream to its unix socket. One JSON request per connection, answered by
//! newline-delimited JSON events. The interpreter runs in the guest: everything it sends is
//! parsed into typed events with bounded sizes, and a broken answer is the guest's error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use kiln_agent_client::GuestConnection;
use kiln_engine::Sandbox;
use kiln_proto::messages::ConnectTarget;
use serde::Deserialize;

use crate::{Control, ControlError, Principal};

/// Where the interpreter listens inside the guest.
pub const INTERPRETER_SOCKET: &str = "/run/kiln-interpreter.sock";
/// Largest event the interpreter may send (a figure as PNG fits many times over).
pub const MAX_EVENT: usize = 16 << 20;
/// How long a context operation (create, list, delete, interrupt) may take.
const CONTEXT_CALL: Duration = Duration::from_secs(30);

/// A cell to run.
#[derive(Debug, Clone, Default)]
pub struct CodeRequest {
    /// Python source; the value of its last expression is the result.
    pub code: String,
    /// The context (its own globals) to run in; `default` if absent.
    pub context: Option<String>,
    /// Environment set before the cell runs (on top of the sandbox's).
    pub env: BTreeMap<String, String>,
    /// Interrupt the cell after this many milliseconds.
    pub timeout_ms: Option<u64>,
}

/// Something shown, by MIME type; each representation is kept as the JSON text the
/// interpreter sent (parsed for validity, not expanded: a guest's huge array costs its bytes).
pub type MimeBundle = BTreeMap<String, Box<serde_json::value::RawValue>>;

/// What a running cell produces, in order; `Done` is last.
#[derive(Debug, Clone)]
pub enum CodeEvent {
    /// Text the cell printed.
    Stdout {
        /// The text.
        text: String,
    },
    /// Text the cell wrote to stderr.
    Stderr {
        /// The text.
        text: String,
    },
    /// Something shown during the cell (a figure, `display(x)`), by MIME type.
    Display {
        /// `text/plain` always; `image/png` (base64), `text/html`, ... where offered.
        data: MimeBundle,
    },
    /// The value of the cell's last expression, by MIME type.
    Result {
        /// As in `Display`.
        data: MimeBundle,
    },
    /// The cell raised.
    Error {
        /// Exception class, e.g. `ZeroDivisionError` (`KeyboardInterrupt` when interrupted).
        name: String,
        /// Its message.
        value: String,
        /// The traceback, from the cell's first frame.
        traceback: String,
    },
    /// The cell ended.
    Done {
        /// How many cells its context has run.
        execution_count: u64,
        /// It was interrupted because its timeout passed.
        timed_out: bool,
    },
}

/// The interpreter's answers to context operations.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Reply {
    Context { id: String },
    Contexts { ids: Vec<String> },
    Deleted,
    Interrupted { running: bool },
}

/// One event line as the interpreter sends it. A flat struct rather than a tagged enum:
/// serde buffers a tagged enum's fields, which raw (unexpanded) values cannot go through.
#[derive(Debug, Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    data: Option<MimeBundle>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    traceback: Option<String>,
    #[serde(default)]
    execution_count: Option<u64>,
    #[serde(default)]
    timed_out: Option<bool>,
    #[serde(default)]
    message: Option<String>,
}

impl WireEvent {
    /// The event, the interpreter's `failure`, or what is missing.
    fn into_event(self) -> Result<CodeEvent, ControlError> {
        let missing = |field: &str| {
            ControlError::Guest(format!(
                "the code interpreter sent a `{}` event without `{field}`",
                self.kind
            ))
        };
        Ok(match self.kind.as_str() {
            "stdout" | "stderr" => {
                let text = self.text.clone().ok_or_else(|| missing("text"))?;
                if self.kind == "stdout" {
                    CodeEvent::Stdout { text }
                } else {
                    CodeEvent::Stderr { text }
                }
            }
            "display" | "result" => {
                let data = self.data.ok_or_else(|| missing("data"))?;
                if self.kind == "display" {
                    CodeEvent::Display { data }
                } else {
                    CodeEvent::Result { data }
                }
            }
            "error" => CodeEvent::Error {
                name: self.name.clone().ok_or_else(|| missing("name"))?,
                value: self.value.clone().unwrap_or_default(),
                traceback: self.traceback.clone().unwrap_or_default(),
            },
            "done" => CodeEvent::Done {
                execution_count: self
                    .execution_count
                    .ok_or_else(|| missing("execution_count"))?,
                timed_out: self.timed_out.unwrap_or(false),
            },
            "failure" => return Err(failure(self.message.as_deref().unwrap_or(""))),
            other => {
                return Err(ControlError::Guest(format!(
                    "the code interpreter sent an unknown event `{other}`"
                )))
            }
        })
    }
}

/// A `failure` answer of the interpreter.
#[derive(Debug, Deserialize)]
struct FailureLine {
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

/// Newline-delimited JSON from the guest, each line bounded.
struct Lines {
    connection: GuestConnection,
    pending: BytesMut,
    /// How much of `pending` is known to hold no newline (each byte is searched once).
    scanned: usize,
}

impl Lines {
    /// The next line, without its newline; `None` once the guest closed.
    async fn next_line(&mut self) -> Result<Option<BytesMut>, ControlError> {
        loop {
            let fresh = &self.pending[self.scanned..];
            if let Some(at) = fresh.iter().position(|&b| b == b'\n') {
                let end = self.scanned + at;
                let mut line = self.pending.split_to(end + 1);
                line.truncate(end);
                self.scanned = 0;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            self.scanned = self.pending.len();
            if self.pending.len() > MAX_EVENT {
                return Err(ControlError::Guest(format!(
                    "the code interpreter sent an event over {} MiB",
                    MAX_EVENT >> 20
                )));
            }
            match self.connection.read().await? {
                Some(bytes) => self.pending.extend_from_slice(&bytes),
                None if self.pending.has_remaining() => {
                    return Err(ControlError::Guest(
                        "the code interpreter closed in the middle of an event".into(),
                    ))
                }
                None => return Ok(None),
            }
        }
    }

    /// The next line as a `T`, or the interpreter's `failure` as an error.
    async fn next<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, ControlError> {
        let Some(line) = self.next_line().await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<T>(&line) {
            Ok(value) => Ok(Some(value)),
            Err(e) => match serde_json::from_slice::<FailureLine>(&line) {
                Ok(failed) if failed.kind == "failure" => Err(failure(&failed.message)),
                _ => Err(ControlError::Guest(format!(
                    "the code interpreter sent a bad event: {e}"
                ))),
            },
        }
    }
}

/// A running cell: its events, as they come. Dropping it before `Done` closes the
/// connection, which interrupts the cell.
pub struct CodeRun {
    lines: Lines,
    done: bool,
    _sandbox: Arc<Sandbox>,
}

impl std::fmt::Debug for CodeRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeRun").field("done", &self.done).finish()
    }
}

impl CodeRun {
    /// The next event; `None` after `Done`.
    pub async fn next(&mut self) -> Result<Option<CodeEvent>, ControlError> {
        if self.done {
            return Ok(None);
        }
        let event = match self
            .lines
            .next::<WireEvent>()
            .await
            .and_then(|wire| wire.map(WireEvent::into_event).transpose())
        {
            Ok(Some(event)) => event,
            Ok(None) => {
                self.done = true;
                return Err(ControlError::Guest(
                    "the code interpreter ended the cell without finishing it".into(),
                ));
            }
            Err(e) => {
                self.done = true;
                return Err(e);
            }
        };
        self.done = matches!(event, CodeEvent::Done { .. });
        Ok(Some(event))
    }
}

/// The error for an interpreter's `failure` answer: its exception class says whose fault.
fn failure(message: &str) -> ControlError {
    let (class, text) = message.split_once(": ").unwrap_or(("", message));
    let text = text.to_owned();
    match class {
        "LookupError" => ControlError::NotFound {
            what: "code context",
            id: text
                .trim_start_matches("no context ")
                .trim_matches('\'')
                .to_owned(),
        },
        "RuntimeError" => ControlError::Conflict(text),
        "ValueError" => ControlError::Invalid(text),
        _ => ControlError::Guest(format!("the code interpreter failed: {message}")),
    }
}

/// Connects to the interpreter and sends `request`, within [`CONTEXT_CALL`]: a guest that
/// does not accept or read cannot hold the caller.
async fn open(sandbox: &Sandbox, request: &serde_json::Value) -> Result<Lines, ControlError> {
    tokio::time::timeout(CONTEXT_CALL, open_unbounded(sandbox, request))
        .await
        .map_err(|_| {
            ControlError::Timeout("the code interpreter did not take the request in 30 s".into())
        })?
}

async fn open_unbounded(
    sandbox: &Sandbox,
    request: &serde_json::Value,
) -> Result<Lines, ControlError> {
    let connection = sandbox
        .agent()
        .connect_to(ConnectTarget::Unix(INTERPRETER_SOCKET.into()))
        .await
        .map_err(|e| match e.agent_kind() {
            Some(kiln_proto::messages::ErrorKind::NotFound) => ControlError::Conflict(
                "this sandbox has no code interpreter: its template does not start one \
                 (the `python` template does)"
                    .into(),
            ),
            _ => ControlError::from(e),
        })?;
    let mut line = serde_json::to_vec(request)
        .map_err(|e| ControlError::Internal(format!("encoding a code request: {e}")))?;
    line.push(b'\n');
    // The write side stays open: the interpreter reads a closed one as the caller leaving.
    connection.write(&line).await?;
    Ok(Lines {
        connection,
        pending: BytesMut::new(),
        scanned: 0,
    })
}

async fn call(sandbox: &Sandbox, request: serde_json::Value) -> Result<Reply, ControlError> {
    let answer = tokio::time::timeout(CONTEXT_CALL, async {
        let mut lines = open(sandbox, &request).await?;
        lines.next::<Reply>().await
    })
    .await
    .map_err(|_| ControlError::Timeout("the code interpreter did not answer in 30 s".into()))??;
    match answer {
        Some(reply) => Ok(reply),
        None => Err(ControlError::Guest(
            "the code interpreter closed without answering".into(),
        )),
    }
}

fn unexpected(reply: Reply) -> ControlError {
    ControlError::Guest(format!("the code interpreter answered {reply:?}"))
}

impl Control {
    /// Starts a cell in sandbox `id`'s interpreter (resuming a paused sandbox first).
    pub async fn run_code(
        &self,
        who: &Principal,
        id: &str,
        request: CodeRequest,
    ) -> Result<CodeRun, ControlError> {
        if request.code.len() > MAX_EVENT {
            return Err(ControlError::TooLarge(format!(
                "code is at most {} MiB",
                MAX_EVENT >> 20
            )));
        }
        let (sandbox, mut env) = self.agent(who, id).await?;
        env.extend(request.env);
        let wire = serde_json::json!({
            "op": "run",
            "code": request.code,
            "context": request.context.unwrap_or_else(|| "default".into()),
            "env": env,
            "timeout_ms": request.timeout_ms,
        });
        let lines = open(&sandbox, &wire).await?;
        Ok(CodeRun {
            lines,
            done: false,
            _sandbox: sandbox,
        })
    }

    /// Makes a new code context (globals of its own) in sandbox `id`; returns its id.
    pub async fn create_code_context(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<String, ControlError> {
        let (sandbox, _) = self.agent(who, id).await?;
        match call(&sandbox, serde_json::json!({"op": "create_context"})).await? {
            Reply::Context { id } => Ok(id),
            other => Err(unexpected(other)),
        }
    }

    /// The code contexts of sandbox `id` (`default` among them).
    pub async fn code_contexts(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<Vec<String>, ControlError> {
        let (sandbox, _) = self.agent(who, id).await?;
        match call(&sandbox, serde_json::json!({"op": "list_contexts"})).await? {
            Reply::Contexts { ids } => Ok(ids),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a code context (its globals and worker process).
    pub async fn delete_code_context(
        &self,
        who: &Principal,
        id: &str,
        context: &str,
    ) -> Result<(), ControlError> {
        let (sandbox, _) = self.agent(who, id).await?;
        let request = serde_json::json!({"op": "delete_context", "context": context});
        match call(&sandbox, request).await? {
            Reply::Deleted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Interrupts the cell running in a context (KeyboardInterrupt; its state is kept);
    /// returns whether one was running.
    pub async fn interrupt_code(
        &self,
        who: &Principal,
        id: &str,
        context: &str,
    ) -> Result<bool, ControlError> {
        let (sandbox, _) = self.agent(who, id).await?;
        let request = serde_json::json!({"op": "interrupt", "context": context});
        match call(&sandbox, request).await? {
            Reply::Interrupted { running } => Ok(running),
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_by_exception_class() {
        assert!(matches!(
            failure("LookupError: no context 'abc'"),
            ControlError::NotFound { what: "code context", ref id } if id == "abc"
        ));
        assert!(matches!(
            failure("RuntimeError: this context is running another cell"),
            ControlError::Conflict(_)
        ));
        assert!(matches!(
            failure("ValueError: unknown op 'x'"),
            ControlError::Invalid(_)
        ));
        assert!(matches!(failure("garbage"), ControlError::Guest(_)));
    }

    fn parse(line: &str) -> Result<CodeEvent, ControlError> {
        serde_json::from_str::<WireEvent>(line)
            .map_err(|e| ControlError::Guest(e.to_string()))?
            .into_event()
    }

    #[test]
    fn events_parse_strictly() {
        let event =
            parse(r#"{"type":"result","data":{"text/plain":"42","application/json":{"a":1}}}"#)
                .expect("a result");
        assert!(matches!(event, CodeEvent::Result { ref data } if data.len() == 2));
        if let CodeEvent::Result { data } = event {
            assert_eq!(data["application/json"].get(), r#"{"a":1}"#, "kept as sent");
        }
        assert!(matches!(
            parse(r#"{"type":"done"}"#),
            Err(ControlError::Guest(_))
        ));
        assert!(matches!(
            parse(r#"{"type":"surprise"}"#),
            Err(ControlError::Guest(_))
        ));
        assert!(matches!(
            parse(r#"{"type":"stdout","text":7}"#),
            Err(ControlError::Guest(_))
        ));
        assert!(matches!(
            parse(r#"{"type":"failure","message":"LookupError: no context 'x'"}"#),
            Err(ControlError::NotFound { .. })
        ));
        assert!(matches!(
            parse(r#"{"type":"done","execution_count":3}"#),
            Ok(CodeEvent::Done {
                execution_count: 3,
                timed_out: false
            })
        ));
    }
}
