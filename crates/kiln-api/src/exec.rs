//! Running commands: to completion (JSON), streamed (newline-delimited JSON), in the
//! background (listed, attached, signalled).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use kiln_agent_client::{ExecOutput, ExecSession};
use kiln_proto::messages::{Command, ExecRequest, ProcessSelector, PtySize};

use crate::handlers::ndjson;
use crate::types::{
    CommandBody, ErrorBody, ExecBody, ExecEventBody, ExecResultBody, KillAllBody, ProcessBody,
    ProcessStdinBody, SignalBody, StartedBody, TerminalSize,
};
use crate::{ApiError, AppState, Caller, Json, Path};

/// Default and largest output a run returns.
const DEFAULT_OUTPUT: usize = 1 << 20;
const MAX_OUTPUT: usize = 16 << 20;

fn request(
    body: &ExecBody,
    sandbox_env: std::collections::BTreeMap<String, String>,
) -> Result<ExecRequest, ApiError> {
    let command = match &body.command {
        CommandBody::Shell(line) if line.is_empty() => {
            return Err(ApiError::invalid("command is empty"))
        }
        CommandBody::Argv(argv) if argv.is_empty() || argv[0].is_empty() => {
            return Err(ApiError::invalid("command argv is empty"))
        }
        body => command(body),
    };
    check_env(&body.env)?;
    let mut env = sandbox_env;
    env.extend(body.env.clone());
    let mut request = ExecRequest::new(command);
    request.env = env;
    request.cwd = body.cwd.clone();
    request.user = body.user.clone();
    request.timeout_ms = body.timeout_ms;
    request.stdin = body.stdin.is_some() || body.open_stdin;
    request.background = body.background;
    if let Some(tag) = &body.tag {
        if !crate::types::is_tag(tag) {
            return Err(ApiError::invalid(
                "tag must be 1 to 128 characters of A-Z, a-z, 0-9 and . _ : @ + = -",
            ));
        }
    }
    request.tag = body.tag.clone();
    request.pty = body.pty.map(pty_size);
    Ok(request)
}

/// Refuses an environment a process cannot have: an empty name, a name with `=`, a NUL.
pub(crate) fn check_env(env: &std::collections::BTreeMap<String, String>) -> Result<(), ApiError> {
    for (name, value) in env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(ApiError::invalid(format!(
                "invalid environment variable `{}`: names are not empty and hold no `=`, \
                 and nothing holds a NUL",
                name.escape_debug()
            )));
        }
    }
    Ok(())
}

/// Starts `body` in sandbox `id` and feeds its stdin.
async fn start(
    state: &AppState,
    who: &kiln_control::Principal,
    id: &str,
    body: &ExecBody,
) -> Result<(Arc<kiln_engine::Sandbox>, ExecSession), ApiError> {
    let (sandbox, env) = state.control.agent(who, id).await?;
    let session = sandbox.agent().exec(request(body, env)?).await?;
    let Some(stdin) = &body.stdin else {
        return Ok((sandbox, session));
    };
    if body.background || body.open_stdin {
        // Others may write to this process once they know its pid: the first stdin is
        // written (and acknowledged) before the pid is answered, so it always comes first.
        let pid = ProcessSelector::Pid(session.pid());
        let agent = sandbox.agent();
        agent
            .input(pid, stdin.as_bytes(), !body.open_stdin, None)
            .await?;
    } else {
        // A command that ends without reading its stdin is not an error (as with a pipe in
        // a shell): its output and exit status are the answer.
        let input = session.input();
        let sent = match input.stdin(stdin.as_bytes()).await {
            Ok(()) => input.close_stdin().await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) | Err(kiln_agent_client::ClientError::InputClosed) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((sandbox, session))
}

/// Runs a command to completion and returns its output (or, with `background`, starts it and
/// returns its pid at once).
#[utoipa::path(post, operation_id = "exec_command", path = "/v1/sandboxes/{id}/exec", tag = "exec", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExecBody,
    responses((status = 200, body = ExecResultBody),
              (status = 202, body = StartedBody, description = "Started in the background"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The sandbox failed")))]
pub(crate) async fn run(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<ExecBody>,
) -> Result<Response, ApiError> {
    let limit = body.max_output_bytes.unwrap_or(DEFAULT_OUTPUT);
    if limit > MAX_OUTPUT {
        return Err(ApiError::invalid(format!(
            "max_output_bytes is at most {MAX_OUTPUT}"
        )));
    }
    let started = Instant::now();
    let (_sandbox, session) = start(&state, &who, &id, &body).await?;
    if body.background {
        let started = StartedBody {
            pid: session.pid(),
            tag: body.tag.clone(),
        };
        return Ok((StatusCode::ACCEPTED, Json(started)).into_response());
    }
    let result = session.collect(limit).await?;
    Ok(Json(ExecResultBody {
        exit_code: result.status.code,
        signal: result.status.signal,
        stdout: String::from_utf8_lossy(&result.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&result.stderr).into_owned(),
        truncated: result.truncated,
        timed_out: result.timed_out,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
    .into_response())
}

/// The agent's form of a terminal size (at least one row and one column).
pub(crate) fn pty_size(size: TerminalSize) -> PtySize {
    PtySize {
        rows: size.rows.max(1),
        cols: size.cols.max(1),
    }
}

/// The agent's form of a command.
pub(crate) fn command(body: &CommandBody) -> Command {
    match body {
        CommandBody::Shell(line) => Command::Shell(line.clone()),
        CommandBody::Argv(argv) => Command::Argv(argv.clone()),
    }
}

/// The event for the next piece of a command's output, and whether it is the last one
/// (the exit, or an error); `None` when the output has ended.
pub(crate) fn output_event(
    output: Result<Option<ExecOutput>, kiln_agent_client::ClientError>,
) -> Option<(ExecEventBody, bool)> {
    Some(match output {
        Ok(Some(ExecOutput::Stdout(bytes))) => (data_event(&bytes, true), false),
        Ok(Some(ExecOutput::Stderr(bytes))) => (data_event(&bytes, false), false),
        Ok(Some(ExecOutput::Dropped(bytes))) => (ExecEventBody::Dropped { bytes }, false),
        Ok(Some(ExecOutput::Exited { status, timed_out })) => (
            ExecEventBody::Exit {
                exit_code: status.code,
                signal: status.signal,
                timed_out,
            },
            true,
        ),
        Ok(None) => return None,
        Err(e) => {
            let e = ApiError::from(e);
            let error = ExecEventBody::Error {
                code: e.code().to_owned(),
                message: e.message().to_owned(),
            };
            (error, true)
        }
    })
}

pub(crate) fn data_event(bytes: &[u8], stdout: bool) -> ExecEventBody {
    let (data, data_b64) = match std::str::from_utf8(bytes) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
    if stdout {
        ExecEventBody::Stdout { data, data_b64 }
    } else {
        ExecEventBody::Stderr { data, data_b64 }
    }
}

/// The events of `session` as a newline-delimited JSON body. Dropping the body (the client
/// went away) drops the session, which ends a foreground command.
fn event_stream(sandbox: Arc<kiln_engine::Sandbox>, session: ExecSession) -> Response {
    let first = ExecEventBody::Start { pid: session.pid() };
    let state = (Some(first), Some(session), sandbox);
    let stream = futures_util::stream::unfold(state, |(first, session, sandbox)| async move {
        if let Some(first) = first {
            return Some((
                Ok::<_, std::io::Error>(ndjson(&first)),
                (None, session, sandbox),
            ));
        }
        let mut session = session?;
        let (event, last) = output_event(session.next().await)?;
        let session = (!last).then_some(session);
        Some((Ok(ndjson(&event)), (None, session, sandbox)))
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Runs a command and streams its output as newline-delimited JSON events (`start`,
/// `stdout`, `stderr`, then `exit` or `error`). Closing the connection kills a foreground
/// command.
#[utoipa::path(post, operation_id = "exec_stream", path = "/v1/sandboxes/{id}/exec/stream", tag = "exec",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExecBody,
    responses((status = 200, content_type = "application/x-ndjson", body = ExecEventBody),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn stream(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<ExecBody>,
) -> Result<Response, ApiError> {
    let (sandbox, session) = start(&state, &who, &id, &body).await?;
    Ok(event_stream(sandbox, session))
}

/// Processes started in the sandbox through the API (running, and recently finished).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", tag = "exec",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, body = Vec<ProcessBody>), (status = 404, body = ErrorBody)))]
pub(crate) async fn list_processes(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<ProcessBody>>, ApiError> {
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    let processes = sandbox.agent().processes().await?;
    Ok(Json(
        processes
            .into_iter()
            .map(|p| ProcessBody {
                pid: p.pid,
                tag: p.tag,
                argv: p.argv,
                background: p.background,
                running: p.exit.is_none(),
                exit_code: p.exit.and_then(|e| e.code),
                signal: p.exit.and_then(|e| e.signal),
            })
            .collect(),
    ))
}

/// A process by pid (a number) or else by tag.
pub(crate) fn selector(text: &str) -> ProcessSelector {
    match text.parse() {
        Ok(pid) => ProcessSelector::Pid(pid),
        Err(_) => ProcessSelector::Tag(text.to_owned()),
    }
}

/// Attaches to a process by pid or tag: replays the output it kept (up to 1 MiB), then
/// streams the rest like `exec/stream`.
#[utoipa::path(get, operation_id = "attach_process", path = "/v1/sandboxes/{id}/processes/{process}/stream", tag = "exec",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("process" = String, Path, description = "Pid or tag")),
    responses((status = 200, content_type = "application/x-ndjson", body = ExecEventBody),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn attach(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((id, process)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    let session = sandbox.agent().attach(selector(&process)).await?;
    Ok(event_stream(sandbox, session))
}

/// Sends a signal to a process (its whole process group) by pid or tag.
#[utoipa::path(post, operation_id = "signal_process", path = "/v1/sandboxes/{id}/processes/{process}/signal", tag = "exec",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("process" = String, Path, description = "Pid or tag")),
    request_body = SignalBody,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn signal(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((id, process)): Path<(String, String)>,
    Json(body): Json<SignalBody>,
) -> Result<StatusCode, ApiError> {
    if !(1..=64).contains(&body.signal) {
        return Err(ApiError::invalid("signal must be between 1 and 64"));
    }
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    sandbox
        .agent()
        .signal(selector(&process), body.signal)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Kills every process in the sandbox but its agent: whatever the API started, what those
/// started, and the template's start command (a fork bomb included: the processes of a
/// sandbox live in one cgroup, killed in one step). The sandbox stays usable.
#[utoipa::path(post, operation_id = "kill_all_processes", path = "/v1/sandboxes/{id}/processes/kill", tag = "exec",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, body = KillAllBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The sandbox is paused or failed")))]
pub(crate) async fn kill_all(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<KillAllBody>, ApiError> {
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    let killed = sandbox.agent().kill_all().await?;
    Ok(Json(KillAllBody { killed }))
}

/// Writes to the stdin (or terminal) of a process started with `open_stdin` or `pty`, by pid
/// or tag; with `close`, then closes it.
#[utoipa::path(post, operation_id = "write_process_stdin", path = "/v1/sandboxes/{id}/processes/{process}/stdin", tag = "exec",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("process" = String, Path, description = "Pid or tag")),
    request_body = ProcessStdinBody,
    responses((status = 204),
              (status = 400, body = ErrorBody, description = "Bad input, or its stdin is closed or was not kept open"),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn write_stdin(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((id, process)): Path<(String, String)>,
    Json(body): Json<ProcessStdinBody>,
) -> Result<StatusCode, ApiError> {
    let data = match (body.data, body.data_b64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ApiError::invalid(format!("data_b64 is not base64: {e}")))?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => return Err(ApiError::invalid("give `data` or `data_b64`, not both")),
    };
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    sandbox
        .agent()
        .input(selector(&process), &data, body.close, None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resizes the terminal of a process started with `pty`, by pid or tag.
#[utoipa::path(post, operation_id = "resize_process_terminal", path = "/v1/sandboxes/{id}/processes/{process}/resize", tag = "exec",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("process" = String, Path, description = "Pid or tag")),
    request_body = TerminalSize,
    responses((status = 204),
              (status = 400, body = ErrorBody, description = "Bad input, or it has no terminal"),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn resize(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((id, process)): Path<(String, String)>,
    Json(size): Json<TerminalSize>,
) -> Result<StatusCode, ApiError> {
    let (sandbox, _) = state.control.agent(&who, &id).await?;
    sandbox
        .agent()
        .input(selector(&process), &[], false, Some(pty_size(size)))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
