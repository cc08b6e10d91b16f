//! Running code in the sandbox's code interpreter: to completion (JSON), streamed
//! (newline-delimited JSON), and its contexts.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_control::code::{CodeEvent, CodeRequest, CodeRun};

use crate::handlers::ndjson;
use crate::types::{
    CodeContextBody, CodeContextList, CodeErrorBody, CodeEventBody, CodeOutputBody, ErrorBody,
    ExecutionBody, InterruptedBody, RunCodeBody,
};
use crate::{ApiError, AppState, Caller, Json, Path};

/// Most text kept per stream, and most bytes of results, in a run's JSON outcome.
const MAX_TEXT: usize = 16 << 20;
const MAX_RESULTS: usize = 64 << 20;
/// How long past its own timeout a run may take to report its end.
const GRACE: Duration = Duration::from_secs(30);

fn request(body: RunCodeBody) -> Result<CodeRequest, ApiError> {
    crate::exec::check_env(&body.env)?;
    match body.language.as_deref() {
        None | Some("python") | Some("python3") => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "language `{other}` is not supported: `python` is"
            )))
        }
    }
    if body.context.as_deref().is_some_and(str::is_empty) {
        return Err(ApiError::invalid("context is empty"));
    }
    Ok(CodeRequest {
        code: body.code,
        context: body.context,
        env: body.env,
        timeout_ms: body.timeout_ms.filter(|&ms| ms > 0),
    })
}

/// The next event of `run`, bounded by the run's timeout plus a grace period.
async fn next_event(
    run: &mut CodeRun,
    deadline: Option<Instant>,
) -> Result<Option<CodeEvent>, ApiError> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), run.next())
            .await
            .map_err(|_| {
                ApiError::from(kiln_control::ControlError::Timeout(
                    "the code interpreter did not end the run after its timeout".into(),
                ))
            })?
            .map_err(ApiError::from),
        None => run.next().await.map_err(ApiError::from),
    }
}

fn deadline(request: &CodeRequest) -> Option<Instant> {
    request
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms) + GRACE)
}

fn event_body(event: CodeEvent) -> CodeEventBody {
    match event {
        CodeEvent::Stdout { text } => CodeEventBody::Stdout { text },
        CodeEvent::Stderr { text } => CodeEventBody::Stderr { text },
        CodeEvent::Display { data } => CodeEventBody::Display { data },
        CodeEvent::Result { data } => CodeEventBody::Result { data },
        CodeEvent::Error {
            name,
            value,
            traceback,
        } => CodeEventBody::Error {
            name,
            value,
            traceback,
        },
        CodeEvent::Done {
            execution_count,
            timed_out,
        } => CodeEventBody::Done {
            execution_count,
            timed_out,
        },
    }
}

fn push_text(into: &mut String, text: &str, truncated: &mut bool) {
    let room = MAX_TEXT.saturating_sub(into.len());
    if text.len() <= room {
        into.push_str(text);
    } else {
        let mut cut = room;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        into.push_str(&text[..cut]);
        *truncated = true;
    }
}

/// Runs Python code in the sandbox's code interpreter and returns what it did: output,
/// rich results (the last expression's value, figures), the error it raised. Variables and
/// imports persist between runs of a context.
#[utoipa::path(post, operation_id = "run_code", path = "/v1/sandboxes/{id}/code", tag = "code",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = RunCodeBody,
    responses((status = 200, body = ExecutionBody),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The sandbox has no code interpreter, or the context is running another cell")))]
pub(crate) async fn run_code(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<RunCodeBody>,
) -> Result<Json<ExecutionBody>, ApiError> {
    let started = Instant::now();
    let request = request(body)?;
    let deadline = deadline(&request);
    let mut run = state.control.run_code(&who, &id, request).await?;
    let mut outcome = ExecutionBody {
        results: Vec::new(),
        stdout: String::new(),
        stderr: String::new(),
        error: None,
        execution_count: 0,
        timed_out: false,
        truncated: false,
        duration_ms: 0.0,
    };
    let mut result_bytes = 0usize;
    let mut too_many = |data: &kiln_control::code::MimeBundle| {
        result_bytes += data.values().map(|v| v.get().len()).sum::<usize>();
        result_bytes > MAX_RESULTS
    };
    while let Some(event) = next_event(&mut run, deadline).await? {
        match event {
            CodeEvent::Stdout { text } => {
                push_text(&mut outcome.stdout, &text, &mut outcome.truncated)
            }
            CodeEvent::Stderr { text } => {
                push_text(&mut outcome.stderr, &text, &mut outcome.truncated)
            }
            CodeEvent::Display { data } | CodeEvent::Result { data } if too_many(&data) => {
                outcome.truncated = true;
            }
            CodeEvent::Display { data } => outcome.results.push(CodeOutputBody {
                data,
                is_main_result: false,
            }),
            CodeEvent::Result { data } => outcome.results.push(CodeOutputBody {
                data,
                is_main_result: true,
            }),
            CodeEvent::Error {
                name,
                value,
                traceback,
            } => {
                outcome.error = Some(CodeErrorBody {
                    name,
                    value,
                    traceback,
                })
            }
            CodeEvent::Done {
                execution_count,
                timed_out,
            } => {
                outcome.execution_count = execution_count;
                outcome.timed_out = timed_out;
            }
        }
    }
    outcome.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(Json(outcome))
}

/// Runs Python code like `/code` and streams what it does as newline-delimited JSON
/// events (`stdout`, `stderr`, `display`, `result`, `error`, then `done`, or `failure` if
/// the stream broke). Closing the connection interrupts the run.
#[utoipa::path(post, operation_id = "run_code_stream", path = "/v1/sandboxes/{id}/code/stream", tag = "code",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = RunCodeBody,
    responses((status = 200, content_type = "application/x-ndjson", body = CodeEventBody),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn run_code_stream(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<RunCodeBody>,
) -> Result<Response, ApiError> {
    let request = request(body)?;
    let deadline = deadline(&request);
    let run = state.control.run_code(&who, &id, request).await?;
    let stream = futures_util::stream::unfold(Some(run), move |run| async move {
        let mut run = run?;
        let (event, go_on) = match next_event(&mut run, deadline).await {
            Ok(Some(event)) => {
                let last = matches!(event, CodeEvent::Done { .. });
                (event_body(event), !last)
            }
            Ok(None) => return None,
            Err(e) => (
                CodeEventBody::Failure {
                    code: e.code().to_owned(),
                    message: e.message().to_owned(),
                },
                false,
            ),
        };
        Some((
            Ok::<_, std::io::Error>(ndjson(&event)),
            go_on.then_some(run),
        ))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Makes a code context: globals of its own, in a process of its own.
#[utoipa::path(post, operation_id = "create_code_context", path = "/v1/sandboxes/{id}/code/contexts", tag = "code",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 201, body = CodeContextBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn create_code_context(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<CodeContextBody>), ApiError> {
    let context = state.control.create_code_context(&who, &id).await?;
    Ok((StatusCode::CREATED, Json(CodeContextBody { id: context })))
}

/// The sandbox's code contexts.
#[utoipa::path(get, operation_id = "list_code_contexts", path = "/v1/sandboxes/{id}/code/contexts", tag = "code",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, body = CodeContextList), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn list_code_contexts(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<CodeContextList>, ApiError> {
    let contexts = state.control.code_contexts(&who, &id).await?;
    Ok(Json(CodeContextList { contexts }))
}

/// Deletes a code context and its state (`default` cannot be deleted).
#[utoipa::path(delete, operation_id = "delete_code_context", path = "/v1/sandboxes/{id}/code/contexts/{context}", tag = "code",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("context" = String, Path, description = "Context id")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_code_context(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((id, context)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state
        .control
        .delete_code_context(&who, &id, &context)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Interrupts the run going on in a context (it ends with a `KeyboardInterrupt` error; the
/// context keeps its state).
#[utoipa::path(post, operation_id = "interrupt_code", path = "/v1/sandboxes/{id}/code/contexts/{context}/interrupt", tag = "code",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("context" = String, Path, description = "Context id")),
    responses((status = 200, body = InterruptedBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn interrupt_code(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((id, context)): Path<(String, String)>,
) -> Result<Json<InterruptedBody>, ApiError> {
    let running = state.control.interrupt_code(&who, &id, &context).await?;
    Ok(Json(InterruptedBody { running }))
}
