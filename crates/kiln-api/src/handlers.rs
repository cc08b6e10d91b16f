//! Handlers of sandboxes, templates, keys and the daemon itself.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_control::{CreateSandbox, SandboxFilter};

use crate::types::{
    BuildEventBody, BuildTemplateBody, CreateKeyBody, CreateSandboxBody, CreateSnapshotBody,
    ErrorBody, ForkBody, ForkedBody, ForwardBody, ForwardListBody, HealthBody, KeyBody, KeyList,
    NetworkBody, OpenForwardBody, SandboxBody, SandboxList, SandboxMetricsBody, SnapshotBody,
    SnapshotList, TemplateBody, TemplateList, UpdateSandboxBody,
};
use crate::{ApiError, AppState, Caller, Json, Path, Query};

/// The daemon answers.
#[utoipa::path(get, path = "/v1/health", tag = "system",
    responses((status = 200, body = HealthBody)))]
pub(crate) async fn health(State(state): State<AppState>) -> Json<HealthBody> {
    Json(HealthBody {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        accel: state.control.engine().accel().accel.qemu_name().into(),
    })
}

/// Templates the caller can create sandboxes from.
#[utoipa::path(get, path = "/v1/templates", tag = "templates", security(("api_key" = [])),
    responses((status = 200, body = TemplateList), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_templates(
    State(state): State<AppState>,
    Caller(who): Caller,
) -> Json<TemplateList> {
    Json(TemplateList {
        templates: state
            .control
            .list_templates(&who)
            .into_iter()
            .map(Into::into)
            .collect(),
    })
}

/// One template.
#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates", security(("api_key" = [])),
    params(("name" = String, Path, description = "Template name", min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9_-]*$")),
    responses((status = 200, body = TemplateBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_template(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
) -> Result<Json<TemplateBody>, ApiError> {
    Ok(Json(state.control.get_template(&who, &name)?.into()))
}

/// Forwards build events into a channel.
struct ChannelProgress(tokio::sync::mpsc::UnboundedSender<BuildEventBody>);

impl kiln_image::progress::Progress for ChannelProgress {
    fn event(&self, event: kiln_image::progress::BuildEvent) {
        use kiln_image::progress::BuildEvent;
        let body = match event {
            BuildEvent::Step { artefact, name } => BuildEventBody::Step { artefact, name },
            BuildEvent::StepDone {
                artefact,
                name,
                elapsed,
                detail,
            } => BuildEventBody::StepDone {
                artefact,
                name,
                elapsed_ms: elapsed.as_secs_f64() * 1000.0,
                detail,
            },
            BuildEvent::Cached { artefact, .. } => BuildEventBody::Cached { artefact },
        };
        let _ = self.0.send(body);
    }
}

/// Builds and bakes a template and streams its progress as newline-delimited JSON (`step`,
/// `step_done`, `cached`, then `ready` or `error`). With `spec`, the spec is checked and
/// stored as one of the caller's templates first (a bad spec is a 400 before any stream);
/// with `name`, an existing template is made ready. A build from nothing takes minutes;
/// closing the connection does not stop it.
#[utoipa::path(post, path = "/v1/templates", tag = "templates", security(("api_key" = [])),
    request_body = BuildTemplateBody,
    responses((status = 200, content_type = "application/x-ndjson", body = BuildEventBody),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "A global template has this name")))]
pub(crate) async fn build_template(
    State(state): State<AppState>,
    Caller(who): Caller,
    Json(body): Json<BuildTemplateBody>,
) -> Result<Response, ApiError> {
    let name = match (&body.spec, &body.name) {
        (Some(spec), None) => state.control.save_template(&who, spec)?,
        (None, Some(name)) => {
            state.control.get_template(&who, name)?;
            name.clone()
        }
        _ => return Err(ApiError::invalid("give exactly one of `spec` and `name`")),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let progress: std::sync::Arc<dyn kiln_image::progress::Progress> =
        std::sync::Arc::new(ChannelProgress(tx.clone()));
    let control = state.control.clone();
    tokio::spawn(async move {
        let last = match control.build_template(&who, &name, Some(progress)).await {
            Ok(info) => BuildEventBody::Ready {
                template: info.into(),
            },
            Err(e) => {
                let e = ApiError::from(e);
                BuildEventBody::Error {
                    code: e.code().into(),
                    message: e.message().into(),
                }
            }
        };
        let _ = tx.send(last);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        Some((Ok::<_, std::io::Error>(ndjson(&event)), rx))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Deletes one of the caller's own templates (global ones are read-only; sandboxes made
/// from it keep running).
#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates", security(("api_key" = [])),
    params(("name" = String, Path, description = "Template name", min_length = 1, max_length = 63, pattern = "^[a-z0-9][a-z0-9_-]*$")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_template(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.control.delete_template(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates a sandbox by restoring its template's snapshot. The first create of a template
/// that is not ready builds and bakes it first (a minute or more).
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", security(("api_key" = [])),
    request_body = CreateSandboxBody,
    responses((status = 201, body = SandboxBody), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody, description = "No such template"),
              (status = 503, body = ErrorBody)))]
pub(crate) async fn create_sandbox(
    State(state): State<AppState>,
    Caller(who): Caller,
    Json(body): Json<CreateSandboxBody>,
) -> Result<(StatusCode, Json<SandboxBody>), ApiError> {
    let network = egress_policy(body.network.as_ref())?;
    let record = state
        .control
        .create_sandbox(
            &who,
            CreateSandbox {
                template: body.template,
                ttl: body.ttl_secs.map(Duration::from_secs),
                metadata: body.metadata,
                env: body.env,
                cpus: body.cpus,
                memory_mib: body.memory_mib,
                disk_mib: body.disk_mib,
                network,
                public_ports: body.ports.is_some_and(|p| p.public),
                auto_resume: body.auto_resume,
                on_expiry: body.on_expiry.map(Into::into),
                snapshot: body.snapshot,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(sandbox_body(&state, record))))
}

/// A state to list sandboxes by (`?state=`).
#[derive(Debug, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StateFilter {
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Failed.
    Failed,
}

impl StateFilter {
    fn as_str(self) -> &'static str {
        match self {
            StateFilter::Running => "running",
            StateFilter::Paused => "paused",
            StateFilter::Failed => "failed",
        }
    }
}

/// Lists the caller's sandboxes, oldest first. Filters: `state=running|paused|failed`,
/// `metadata.<key>=<value>` (repeatable); paging: `limit` (default 100, at most 500) and
/// `cursor` from the previous page.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", security(("api_key" = [])),
    params(
        ("state" = Option<StateFilter>, Query, description = "Only sandboxes in this state"),
        ("limit" = Option<usize>, Query, description = "Page size (default 100)", minimum = 1, maximum = 500),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page", pattern = "^[0-9]{1,15}\\..*$"),
    ),
    responses((status = 200, body = SandboxList), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_sandboxes(
    State(state): State<AppState>,
    Caller(who): Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<SandboxList>, ApiError> {
    let mut filter = SandboxFilter::default();
    let mut limit = 100;
    let mut cursor = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "state" => {
                let wanted = [
                    StateFilter::Running,
                    StateFilter::Paused,
                    StateFilter::Failed,
                ]
                .into_iter()
                .find(|state| state.as_str() == value)
                .ok_or_else(|| ApiError::invalid("state is `running`, `paused` or `failed`"))?;
                filter.state = Some(wanted.as_str().to_owned());
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=500).contains(limit))
                    .ok_or_else(|| ApiError::invalid("limit is a number from 1 to 500"))?;
            }
            "cursor" => cursor = Some(value.into_owned()),
            other => match other.strip_prefix("metadata.") {
                Some(name) if !name.is_empty() => {
                    filter.metadata.insert(name.to_owned(), value.into_owned());
                }
                _ => {
                    return Err(ApiError::invalid(format!(
                        "unknown query parameter `{other}` (state, limit, cursor, metadata.<key>)"
                    )))
                }
            },
        }
    }
    let (page, next_cursor) =
        state
            .control
            .list_sandboxes(&who, &filter, cursor.as_deref(), limit)?;
    Ok(Json(SandboxList {
        sandboxes: page.into_iter().map(|r| sandbox_body(&state, r)).collect(),
        next_cursor,
    }))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, body = SandboxBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_sandbox(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxBody>, ApiError> {
    Ok(Json(sandbox_body(
        &state,
        state.control.get_sandbox(&who, &id)?,
    )))
}

/// A sandbox as the API shows it: a transition under way, its port URLs filled in.
fn sandbox_body(state: &AppState, record: kiln_control::SandboxRecord) -> SandboxBody {
    let live = state
        .control
        .engine()
        .get(&record.id)
        .ok()
        .map(|s| s.state());
    SandboxBody::from(record)
        .with_live_state(live.as_ref())
        .with_port_urls(&state.config.ingress_domain, state.config.ingress_port)
}

/// The egress policy a request body describes, if any (400 naming a bad entry).
fn egress_policy(
    body: Option<&NetworkBody>,
) -> Result<Option<kiln_network::policy::EgressPolicy>, ApiError> {
    body.map(NetworkBody::parse)
        .transpose()
        .map_err(ApiError::invalid)
}

/// Changes a sandbox: its time to live (counted from now), its egress policy (replaced
/// atomically), or both. Fields not given stay as they are.
#[utoipa::path(patch, path = "/v1/sandboxes/{id}", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = UpdateSandboxBody,
    responses((status = 200, body = SandboxBody), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The sandbox failed, or a network change was asked of a paused sandbox")))]
pub(crate) async fn update_sandbox(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<UpdateSandboxBody>,
) -> Result<Json<SandboxBody>, ApiError> {
    let network = egress_policy(body.network.as_ref())?;
    let update = kiln_control::SandboxUpdate {
        ttl: body.ttl_secs.map(Duration::from_secs),
        network,
        auto_resume: body.auto_resume,
        on_expiry: body.on_expiry.map(Into::into),
    };
    let record = state.control.update_sandbox(&who, &id, update).await?;
    Ok(Json(sandbox_body(&state, record)))
}

/// Pauses a sandbox to disk: its memory and device state are written and flushed with its
/// disk to stable storage, and its VM process ends (its RAM is given back). Files, processes
/// and network identity come back on resume, also after a daemon restart. A paused sandbox
/// is kept for the server's paused retention, then destroyed. Pausing a paused sandbox does
/// nothing; during a resume the pause waits for it.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, body = SandboxBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The sandbox failed")))]
pub(crate) async fn pause_sandbox(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxBody>, ApiError> {
    let record = state.control.pause_sandbox(&who, &id).await?;
    Ok(Json(sandbox_body(&state, record)))
}

/// Forks a sandbox into `count` children (1 to 32): the parent stops briefly while its state
/// is captured, then runs on; each child continues from that moment with the parent's
/// processes, memory and files, its own id, hostname, reseeded kernel RNG, clock and access
/// token, and the parent's guest address in its own network namespace. User-space random
/// generators (Python's `random`, OpenSSL's) are cloned as they are. Children inherit
/// template, env, metadata (merged with the request's), limits, network policy, port and
/// pause settings. All or nothing: if not every child can be made, none is (503 saying why).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ForkBody,
    responses((status = 201, body = ForkedBody), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The sandbox failed"),
              (status = 503, body = ErrorBody, description = "Not every child could be made")))]
pub(crate) async fn fork_sandbox(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<ForkBody>,
) -> Result<(StatusCode, Json<ForkedBody>), ApiError> {
    let request = kiln_control::ForkSandbox {
        count: body.count.unwrap_or(1),
        ttl: body.ttl_secs.map(Duration::from_secs),
        metadata: body.metadata,
    };
    let (records, report) = state.control.fork_sandbox(&who, &id, request).await?;
    Ok((
        StatusCode::CREATED,
        Json(ForkedBody {
            sandboxes: records
                .into_iter()
                .map(|r| sandbox_body(&state, r))
                .collect(),
            parent_paused_ms: report.parent_paused_ms,
            bytes_written: report.bytes_written,
        }),
    ))
}

/// Resumes a paused sandbox: same id, files, processes and network identity; its clock is
/// set and its time to live counts again. Resuming a running sandbox does nothing;
/// concurrent resumes share one.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, body = SandboxBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The sandbox failed, or was paused under another VMM version")))]
pub(crate) async fn resume_sandbox(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxBody>, ApiError> {
    let record = state.control.resume_sandbox(&who, &id).await?;
    Ok(Json(sandbox_body(&state, record)))
}

/// Snapshots a sandbox: its memory, device state and disk, flushed to stable storage and kept
/// (also across daemon restarts) until deleted. The sandbox stops briefly and runs on.
/// `POST /v1/sandboxes` with `"snapshot"` makes sandboxes from it.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshots", tag = "snapshots", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = CreateSnapshotBody,
    responses((status = 201, body = SnapshotBody), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The name is taken, or the sandbox failed")))]
pub(crate) async fn create_snapshot(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<CreateSnapshotBody>,
) -> Result<(StatusCode, Json<SnapshotBody>), ApiError> {
    let record = state.control.create_snapshot(&who, &id, &body.name).await?;
    Ok((StatusCode::CREATED, Json(record.into())))
}

/// The caller's snapshots, oldest first.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots", security(("api_key" = [])),
    responses((status = 200, body = SnapshotList)))]
pub(crate) async fn list_snapshots(
    State(state): State<AppState>,
    Caller(who): Caller,
) -> Result<Json<SnapshotList>, ApiError> {
    Ok(Json(SnapshotList {
        snapshots: state
            .control
            .list_snapshots(&who)?
            .into_iter()
            .map(Into::into)
            .collect(),
    }))
}

/// One snapshot, by id or name.
#[utoipa::path(get, path = "/v1/snapshots/{id}", tag = "snapshots", security(("api_key" = [])),
    params(("id" = String, Path, description = "Snapshot id or name")),
    responses((status = 200, body = SnapshotBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_snapshot(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<SnapshotBody>, ApiError> {
    Ok(Json(state.control.get_snapshot(&who, &id)?.into()))
}

/// Deletes a snapshot; 409, listing them, while sandboxes made from it still run or are
/// paused.
#[utoipa::path(delete, path = "/v1/snapshots/{id}", tag = "snapshots", security(("api_key" = [])),
    params(("id" = String, Path, description = "Snapshot id or name")),
    responses((status = 204), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "Sandboxes depend on it")))]
pub(crate) async fn delete_snapshot(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.control.delete_snapshot(&who, &id)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Destroys a sandbox: its VM, disk and everything else it had.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_sandbox(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.control.delete_sandbox(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Restarts a sandbox's time to live with its current length.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/keepalive", tag = "sandboxes",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, body = SandboxBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn keepalive(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxBody>, ApiError> {
    Ok(Json(sandbox_body(
        &state,
        state.control.keepalive(&who, &id)?,
    )))
}

/// Query of the console log.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct LogQuery {
    #[serde(default = "default_lines")]
    lines: usize,
}

fn default_lines() -> usize {
    200
}

fn forward_body(state: &AppState, forward: kiln_control::ForwardRecord) -> ForwardBody {
    ForwardBody {
        port: forward.port,
        address: state
            .control
            .forward_address(&forward)
            .map_or_else(String::new, |a| a.to_string()),
        created_at_ms: forward.created_at_ms,
    }
}

/// Forwards a port of the host to a port of the sandbox, for what is not HTTP (a database,
/// SSH): every connection to the answer's `address` is carried to the sandbox's port (a
/// paused sandbox is resumed first unless its `auto_resume` is off). Open to anyone who
/// reaches that address: TCP carries no token. A port forwarded already answers its forward
/// (200). Off unless the operator gives a port range (`kiln serve --tcp-forward-ports`): 409.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/forwards", tag = "sandboxes",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = OpenForwardBody,
    responses((status = 201, body = ForwardBody), (status = 200, body = ForwardBody),
              (status = 409, body = ErrorBody, description = "Forwarding is off on this host, networking is off, or the sandbox failed"),
              (status = 429, body = ErrorBody, description = "The sandbox, or its tenant, has the most forwards it may have (`quota_exceeded`)"),
              (status = 503, body = ErrorBody, description = "Every port of the range is taken")))]
pub(crate) async fn open_forward(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Json(body): Json<OpenForwardBody>,
) -> Result<(StatusCode, Json<ForwardBody>), ApiError> {
    if body.port == 0 {
        return Err(ApiError::invalid("port is 1 to 65535"));
    }
    let (forward, created) = state.control.open_forward(&who, &id, body.port).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(forward_body(&state, forward))))
}

/// The sandbox's plain TCP forwards.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/forwards", tag = "sandboxes",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, body = ForwardListBody)))]
pub(crate) async fn list_forwards(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<ForwardListBody>, ApiError> {
    let forwards = state.control.list_forwards(&who, &id)?;
    Ok(Json(ForwardListBody {
        forwards: forwards
            .into_iter()
            .map(|f| forward_body(&state, f))
            .collect(),
    }))
}

/// Closes a plain TCP forward and the connections it carries.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/forwards/{port}", tag = "sandboxes",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("port" = u16, Path, description = "The sandbox's port", minimum = 1, maximum = 65535)),
    responses((status = 204)))]
pub(crate) async fn close_forward(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((id, port)): Path<(String, u16)>,
) -> Result<StatusCode, ApiError> {
    state.control.close_forward(&who, &id, port).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What the sandbox uses now (CPU time, memory, disk, network bytes), measured on the host;
/// a paused sandbox is not resumed.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/metrics", tag = "sandboxes",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, body = SandboxMetricsBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_sandbox_metrics(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxMetricsBody>, ApiError> {
    let measure = {
        let state = state.clone();
        move || state.control.sandbox_usage(&who, &id)
    };
    // Reads of cgroup, sysfs and file metadata: off the async threads.
    let (record, usage) = tokio::task::spawn_blocking(measure)
        .await
        .map_err(|e| ApiError::from(kiln_control::ControlError::Internal(e.to_string())))??;
    let body = sandbox_body(&state, record);
    Ok(Json(SandboxMetricsBody {
        sandbox_id: body.id,
        state: body.state,
        cpu_seconds: usage.cpu_seconds,
        memory_bytes: usage.memory_bytes,
        memory_limit_bytes: usage.memory_limit_bytes,
        disk_bytes: usage.disk_bytes,
        network_rx_bytes: usage.network.map(|n| n.rx_bytes),
        network_tx_bytes: usage.network.map(|n| n.tx_bytes),
        measured_at_ms: kiln_control::store::now_ms(),
    }))
}

/// Most console lines one call returns.
const MAX_LOG_LINES: usize = 10_000;

/// The last lines of the sandbox's guest console (kernel and agent messages).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", tag = "sandboxes",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("lines" = Option<usize>, Query, description = "How many (default 200, at most 10000)", minimum = 0, maximum = 10000)),
    responses((status = 200, content_type = "text/plain", body = String),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn console_log(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<String, ApiError> {
    if query.lines > MAX_LOG_LINES {
        return Err(ApiError::invalid(format!(
            "lines is at most {MAX_LOG_LINES}"
        )));
    }
    Ok(state.control.console_log(&who, &id, query.lines)?)
}

/// Lifecycle events of the caller's sandboxes from now on, as newline-delimited JSON:
/// `{"type": "created" | "forked" | "paused" | "resumed" | "failed" | "destroyed", "id": ...,
/// ...}`, one per change; a subscriber that falls far behind gets `{"type": "lagged",
/// "missed": N}` and should re-list.
#[utoipa::path(get, path = "/v1/events", tag = "sandboxes", security(("api_key" = [])),
    responses((status = 200, content_type = "application/x-ndjson", body = String)))]
pub(crate) async fn events(State(state): State<AppState>, Caller(who): Caller) -> Response {
    let receiver = state.control.events(&who);
    let stream = futures_util::stream::unfold(receiver, move |mut receiver| async move {
        match receiver.recv().await {
            Ok(event) => Some((Ok::<_, std::io::Error>(ndjson(&event)), receiver)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                let line = serde_json::json!({"type": "lagged", "missed": missed});
                Some((Ok(ndjson(&line)), receiver))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    // The stream ends when the daemon stops, so that it does not hold the shutdown up.
    let mut closing = state.control.closing();
    let stop = async move {
        let _ = closing.wait_for(|closing| *closing).await;
    };
    let stream = futures_util::StreamExt::take_until(stream, stop);
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

pub(crate) fn ndjson<T: serde::Serialize>(value: &T) -> bytes::Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    line.into()
}

/// Makes an API key (admin keys only). The secret is in this response only.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", security(("api_key" = [])),
    request_body = CreateKeyBody,
    responses((status = 201, body = KeyBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn create_key(
    State(state): State<AppState>,
    Caller(who): Caller,
    Json(body): Json<CreateKeyBody>,
) -> Result<(StatusCode, Json<KeyBody>), ApiError> {
    let tenant = body.tenant.unwrap_or_else(|| who.tenant.clone());
    let (record, secret) = state
        .control
        .create_key(&who, &tenant, &body.name, body.admin)?;
    let mut key = KeyBody::from(record);
    key.secret = Some(secret);
    Ok((StatusCode::CREATED, Json(key)))
}

/// The caller's tenant's API keys (admin keys only).
#[utoipa::path(get, path = "/v1/keys", tag = "keys", security(("api_key" = [])),
    responses((status = 200, body = KeyList), (status = 403, body = ErrorBody)))]
pub(crate) async fn list_keys(
    State(state): State<AppState>,
    Caller(who): Caller,
) -> Result<Json<KeyList>, ApiError> {
    Ok(Json(KeyList {
        keys: state
            .control
            .list_keys(&who)?
            .into_iter()
            .map(Into::into)
            .collect(),
    }))
}

/// Revokes an API key of the caller's tenant (admin keys only).
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", security(("api_key" = [])),
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The key of this request")))]
pub(crate) async fn revoke_key(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.control.revoke_key(&who, &id)?;
    Ok(StatusCode::NO_CONTENT)
}
