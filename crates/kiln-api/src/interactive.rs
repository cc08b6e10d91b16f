//! Interactive commands over a WebSocket: stdin, a terminal with resizes, signals; output
//! comes back as the same JSON events as `exec/stream`.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use kiln_agent_client::ClientError;
use kiln_proto::messages::{ExecRequest, PtySize};

use crate::types::{ErrorBody, ExecEventBody, InteractiveInputBody, InteractiveStartBody};
use crate::{ApiError, AppState, Caller, Path};

/// Largest message a client may send.
const MAX_MESSAGE: usize = 1 << 20;

/// Opens an interactive session. The client's first message (text) is an
/// `InteractiveStartBody`; then binary messages are stdin bytes and text messages are
/// `InteractiveInputBody` controls. The server sends `ExecEventBody` events as text and
/// closes after `exit` or `error`. Closing the socket kills a command started here.
#[utoipa::path(get, operation_id = "exec_interactive", path = "/v1/sandboxes/{id}/exec/ws", tag = "exec", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn open(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (sandbox, env) = state.control.agent(&who, &id).await?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::invalid(format!(
            "{}: open this route as a WebSocket",
            rejection.body_text()
        ))
    })?;
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(socket, sandbox, env)))
}

fn event_text(event: &ExecEventBody) -> Message {
    Message::Text(
        serde_json::to_string(event)
            .unwrap_or_else(|_| "{}".into())
            .into(),
    )
}

fn error_event(code: &str, message: impl Into<String>) -> Message {
    event_text(&ExecEventBody::Error {
        code: code.into(),
        message: message.into(),
    })
}

async fn session(
    socket: WebSocket,
    sandbox: std::sync::Arc<kiln_engine::Sandbox>,
    sandbox_env: std::collections::BTreeMap<String, String>,
) {
    let (mut tx, mut rx) = socket.split();
    let start: InteractiveStartBody = match rx.next().await {
        Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
            Ok(start) => start,
            Err(e) => {
                let _ = tx.send(error_event("invalid_request", e.to_string())).await;
                return;
            }
        },
        _ => {
            let _ = tx
                .send(error_event(
                    "invalid_request",
                    "the first message is a JSON start message",
                ))
                .await;
            return;
        }
    };
    let agent = sandbox.agent();
    let started = match (&start.command, &start.attach) {
        (Some(command), None) => {
            let mut request = ExecRequest::new(crate::exec::command(command));
            request.env = sandbox_env;
            request.env.extend(start.env.clone());
            request.cwd = start.cwd.clone();
            request.user = start.user.clone();
            request.timeout_ms = start.timeout_ms;
            request.stdin = true;
            request.pty = start.pty.map(crate::exec::pty_size);
            agent.exec(request).await
        }
        (None, Some(process)) => agent.attach(crate::exec::selector(process)).await,
        _ => {
            let _ = tx
                .send(error_event(
                    "invalid_request",
                    "give exactly one of `command` and `attach`",
                ))
                .await;
            return;
        }
    };
    let mut session = match started {
        Ok(session) => session,
        Err(e) => {
            let e = ApiError::from(e);
            let _ = tx.send(error_event(e.code(), e.message())).await;
            return;
        }
    };
    let input = session.input();
    if tx
        .send(event_text(&ExecEventBody::Start { pid: session.pid() }))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            message = rx.next() => {
                let result = match message {
                    Some(Ok(Message::Binary(bytes))) => forwarded(input.stdin(&bytes).await),
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<InteractiveInputBody>(&text) {
                        Ok(InteractiveInputBody::Stdin { data }) => forwarded(input.stdin(data.as_bytes()).await),
                        Ok(InteractiveInputBody::CloseStdin) => forwarded(input.close_stdin().await),
                        Ok(InteractiveInputBody::Resize { rows, cols }) => forwarded(input.resize(PtySize { rows, cols }).await),
                        Ok(InteractiveInputBody::Signal { signal }) if (1..=64).contains(&signal) => forwarded(input.signal(signal).await),
                        Ok(InteractiveInputBody::Signal { .. }) => Err(ApiError::invalid("signal must be between 1 and 64")),
                        Err(e) => Err(ApiError::invalid(e.to_string())),
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                    // The client went away: dropping the session ends a command started here.
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                };
                if let Err(e) = result {
                    // A bad control message is reported; the session goes on.
                    if tx.send(error_event(e.code(), e.message())).await.is_err() {
                        return;
                    }
                }
            }
            output = session.next() => {
                let Some((event, last)) = crate::exec::output_event(output) else {
                    return;
                };
                if tx.send(event_text(&event)).await.is_err() {
                    return;
                }
                if last {
                    let _ = tx.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    }
}

/// What became of input sent to the process. Input that arrives after the process ended is
/// dropped without a word: its exit is on the way to the client.
fn forwarded(result: Result<(), ClientError>) -> Result<(), ApiError> {
    match result {
        Err(ClientError::InputClosed) => Ok(()),
        other => other.map_err(ApiError::from),
    }
}
