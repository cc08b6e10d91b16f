//! kiln over the Model Context Protocol: tools that create sandboxes, run code and commands,
//! move files, fork and snapshot.
//!
//! Every tool is one or two calls of the HTTP API, made through an [`ApiBackend`]: inside the
//! daemon (`/mcp`, streamable HTTP) the calls go to the API's own router in-process with the
//! MCP request's key; `kiln mcp` (stdio) sends them to a daemon over HTTP. Either way a tool
//! has exactly the API's authentication, limits and errors. A failed call is a tool result
//! with `isError` and the API's message, so the model can read what to do.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ResourceContents};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use tower::ServiceExt;

use crate::types::{
    ErrorBody, ExecResultBody, ExecutionBody, FileListBody, ForkedBody, SandboxBody, SandboxList,
    SnapshotBody, StartedBody, TemplateList, WrittenBody,
};
use crate::{AppState, Caller};

/// Most of a file `read_file` returns.
pub const MAX_READ_BYTES: usize = 1 << 20;
/// Most output per stream `run_command` returns.
const MAX_COMMAND_OUTPUT: usize = 1 << 20;
/// Largest API response a tool reads (a run's results).
const MAX_REPLY_BYTES: usize = 96 << 20;

/// A call of the HTTP API that a tool makes.
#[derive(Debug)]
pub struct ApiCall {
    /// The method.
    pub method: Method,
    /// Path and query, e.g. `/v1/sandboxes/abc/files?path=%2F`.
    pub uri: String,
    /// The body with its content type.
    pub body: Option<(&'static str, Bytes)>,
    /// The MCP request's `Authorization` header (none over stdio).
    pub authorization: Option<HeaderValue>,
    /// Read at most this many bytes of the response's body.
    pub limit: usize,
}

/// The API's answer.
#[derive(Debug)]
pub struct ApiReply {
    /// Its status.
    pub status: StatusCode,
    /// Its body, at most the call's limit.
    pub body: Bytes,
    /// The body went on past the limit.
    pub truncated: bool,
}

/// Where the tools' API calls go.
pub trait ApiBackend: fmt::Debug + Send + Sync + 'static {
    /// Makes `call`; an error says why the API could not be reached.
    fn call(&self, call: ApiCall) -> BoxFuture<'_, Result<ApiReply, String>>;
}

/// Reads at most `limit` bytes of `body`.
pub async fn read_limited<B>(mut body: B, limit: usize) -> Result<(Bytes, bool), String>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: fmt::Display,
{
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the API's response: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let room = limit - buffer.len();
        if data.len() > room {
            buffer.extend_from_slice(&data[..room]);
            return Ok((buffer.freeze(), true));
        }
        buffer.extend_from_slice(&data);
    }
    Ok((buffer.freeze(), false))
}

/// The API's router, called in-process.
#[derive(Debug, Clone)]
struct InProcess {
    api: Router,
}

impl ApiBackend for InProcess {
    fn call(&self, call: ApiCall) -> BoxFuture<'_, Result<ApiReply, String>> {
        Box::pin(async move {
            let mut request = http::Request::builder().method(call.method).uri(call.uri);
            if let Some(authorization) = call.authorization {
                request = request.header(header::AUTHORIZATION, authorization);
            }
            let body = match call.body {
                Some((content_type, bytes)) => {
                    request = request.header(header::CONTENT_TYPE, content_type);
                    Body::from(bytes)
                }
                None => Body::empty(),
            };
            let request = request.body(body).map_err(|e| e.to_string())?;
            let response = match self.api.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let (parts, body) = response.into_parts();
            let (body, truncated) = read_limited(body, call.limit).await?;
            Ok(ApiReply {
                status: parts.status,
                body,
                truncated,
            })
        })
    }
}

/// `/mcp`: the streamable HTTP transport (stateless: any daemon restart or replica serves
/// any request), for callers with an API key, from no browser origin but those allowed.
pub(crate) fn router(api: Router, state: AppState) -> Router<AppState> {
    let backend: Arc<dyn ApiBackend> = Arc::new(InProcess { api });
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        // Requests are authenticated by key, so any host name may reach the daemon; the
        // Origin check keeps web pages from using a browser's network position.
        .disable_allowed_hosts()
        .with_allowed_origins(state.config.mcp_allowed_origins.clone())
        .enforce_origin_validation();
    let service = StreamableHttpService::new(
        move || Ok(KilnMcp::new(backend.clone())),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    Router::new()
        .route_service("/mcp", service)
        .route_layer(axum::middleware::from_fn_with_state(state, require_key))
}

/// Turns away requests without a valid API key before they reach the MCP transport.
async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    match Caller::from_request_parts(&mut parts, &state).await {
        Ok(_) => next.run(Request::from_parts(parts, body)).await,
        Err(e) => {
            let mut response = e.into_response();
            if response.status() == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

/// Characters escaped in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// `/v1/sandboxes/<id><rest>` with the id escaped.
fn sandbox_uri(id: &str, rest: &str) -> String {
    format!("/v1/sandboxes/{}{rest}", utf8_percent_encode(id, SEGMENT))
}

/// `?name=value&…`, escaped.
fn query(pairs: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::for_suffix(String::from("?"), 1);
    for (name, value) in pairs {
        query.append_pair(name, value);
    }
    query.finish()
}

/// Why a tool failed, for the model to read.
type ToolFailure = CallToolResult;

fn failure(message: impl Into<String>) -> ToolFailure {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

fn done(result: Result<CallToolResult, ToolFailure>) -> Result<CallToolResult, ErrorData> {
    Ok(result.unwrap_or_else(|failure| failure))
}

fn text(text: impl Into<String>) -> ContentBlock {
    ContentBlock::text(text.into())
}

/// A successful result with `value` as its structured content.
fn structured(summary: String, value: &impl serde::Serialize) -> CallToolResult {
    let mut result = CallToolResult::success(vec![text(summary)]);
    result.structured_content = serde_json::to_value(value).ok();
    result
}

/// The tools.
#[derive(Debug, Clone)]
pub struct KilnMcp {
    api: Arc<dyn ApiBackend>,
}

/// `create_sandbox`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    /// The template to start from (the daemon's default if absent); `list_templates` names
    /// them. `python` has a code interpreter for `run_code`.
    #[serde(default)]
    pub template: Option<String>,
    /// A snapshot (its id) to start from instead, as `create_snapshot` returned it.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Seconds until the sandbox is destroyed (the daemon's default if absent).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Environment variables for everything run in it.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Labels, to find it by later.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Whether it may reach the internet (the daemon's default if absent).
    #[serde(default)]
    pub internet: Option<bool>,
}

/// A sandbox named by id.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxParams {
    /// The sandbox's id, as `create_sandbox` returned it.
    pub sandbox_id: String,
}

/// `run_code`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCodeParams {
    /// The sandbox's id (made from a template with a code interpreter, such as `python`).
    pub sandbox_id: String,
    /// Python code. Variables and imports persist between runs in the same context; the
    /// value of the last expression is the result, and figures come back as images.
    pub code: String,
    /// The context to run in (`default` if absent).
    #[serde(default)]
    pub context: Option<String>,
    /// Interrupt the run after this many seconds (the context keeps its state).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// `run_command`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommandParams {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// A shell command line, run by `/bin/sh -c`.
    pub command: String,
    /// The working directory (the sandbox's default if absent).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Environment variables for this command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Kill the command after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Start it and return its pid at once instead of waiting (a server, say).
    #[serde(default)]
    pub background: bool,
}

/// `read_file`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileParams {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// An absolute path in the sandbox.
    pub path: String,
}

/// `write_file`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileParams {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// An absolute path in the sandbox; missing directories are made, an existing file is
    /// replaced.
    pub path: String,
    /// The content: text, or base64 if `base64` is set.
    pub content: String,
    /// `content` is base64 (for binary files).
    #[serde(default)]
    pub base64: bool,
}

/// `list_files`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesParams {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// An absolute directory path in the sandbox.
    pub path: String,
    /// How many levels to list (default 1, at most 16).
    #[serde(default)]
    pub depth: Option<u32>,
}

/// `fork_sandbox`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkParams {
    /// The sandbox to fork; it keeps running.
    pub sandbox_id: String,
    /// How many copies, 1 to 32 (default 1).
    #[serde(default)]
    pub count: Option<usize>,
}

/// `create_snapshot`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotParams {
    /// The sandbox to snapshot; it keeps running.
    pub sandbox_id: String,
    /// A name unique among your snapshots: 1 to 63 of `a-z`, `0-9`, `-`, `_`.
    pub name: String,
}

impl KilnMcp {
    /// Tools whose API calls go to `api`.
    pub fn new(api: Arc<dyn ApiBackend>) -> KilnMcp {
        KilnMcp { api }
    }

    /// Calls the API; a transport failure or an error status is a tool failure.
    async fn call(
        &self,
        context: &RequestContext<RoleServer>,
        method: Method,
        uri: String,
        body: Option<(&'static str, Bytes)>,
        limit: usize,
    ) -> Result<ApiReply, ToolFailure> {
        let authorization = context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.headers.get(header::AUTHORIZATION).cloned());
        let reply = self
            .api
            .call(ApiCall {
                method,
                uri,
                body,
                authorization,
                limit,
            })
            .await
            .map_err(failure)?;
        if reply.status.is_success() {
            return Ok(reply);
        }
        Err(failure(
            match serde_json::from_slice::<ErrorBody>(&reply.body) {
                Ok(error) if error.code == "unauthenticated" => format!(
                    "{} (unauthenticated, HTTP 401): give `kiln mcp` a key in KILN_API_KEY \
                     (`kiln keys create` makes one)",
                    error.message
                ),
                Ok(error) => format!(
                    "{} ({}, HTTP {})",
                    error.message,
                    error.code,
                    reply.status.as_u16()
                ),
                Err(_) => format!(
                    "HTTP {}: {}",
                    reply.status,
                    String::from_utf8_lossy(&reply.body).trim()
                ),
            },
        ))
    }

    /// Calls the API with a JSON body (or none) and parses its JSON answer.
    async fn json<T: DeserializeOwned>(
        &self,
        context: &RequestContext<RoleServer>,
        method: Method,
        uri: String,
        body: Option<serde_json::Value>,
    ) -> Result<T, ToolFailure> {
        let body = body.map(|value| ("application/json", Bytes::from(value.to_string())));
        let reply = self
            .call(context, method, uri, body, MAX_REPLY_BYTES)
            .await?;
        if reply.truncated {
            return Err(failure(format!(
                "the API's answer is larger than {MAX_REPLY_BYTES} bytes"
            )));
        }
        serde_json::from_slice(&reply.body)
            .map_err(|e| failure(format!("malformed answer from the API: {e}")))
    }
}

#[tool_router]
impl KilnMcp {
    #[tool(
        description = "Creates a sandbox: a microVM of its own, from a template (or a snapshot), ready to run \
                      code and commands. Returns its id, which the other tools take. It is destroyed when \
                      its timeout passes or by `destroy_sandbox`.",
        annotations(
            title = "Create a sandbox",
            read_only_hint = false,
            destructive_hint = false
        )
    )]
    async fn create_sandbox(
        &self,
        Parameters(p): Parameters<CreateParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({"env": p.env, "metadata": p.metadata});
        if let Some(template) = p.template {
            body["template"] = json!(template);
        }
        if let Some(snapshot) = p.snapshot {
            body["snapshot"] = json!(snapshot);
        }
        if let Some(ttl) = p.timeout_secs {
            body["ttl_secs"] = json!(ttl);
        }
        if let Some(internet) = p.internet {
            body["network"] = json!({"internet": internet});
        }
        let created = self
            .json::<SandboxBody>(&context, Method::POST, "/v1/sandboxes".into(), Some(body))
            .await;
        done(created.map(|sandbox| {
            let expiry = match sandbox.ttl_secs {
                Some(ttl) => format!("; it is destroyed after {ttl} s"),
                None => String::new(),
            };
            structured(
                format!(
                    "Created sandbox {} from {}{expiry}.",
                    sandbox.id, sandbox.template
                ),
                &sandbox,
            )
        }))
    }

    #[tool(
        description = "Lists your sandboxes: id, template, state and labels.",
        annotations(title = "List sandboxes", read_only_hint = true)
    )]
    async fn list_sandboxes(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let listed = self
            .json::<SandboxList>(&context, Method::GET, "/v1/sandboxes".into(), None)
            .await;
        done(listed.map(|list| {
            let mut summary = format!("{} sandboxes", list.sandboxes.len());
            for sandbox in &list.sandboxes {
                let state = serde_json::to_value(sandbox.state).unwrap_or_default();
                summary.push_str(&format!(
                    "\n{} {} {}",
                    sandbox.id,
                    sandbox.template,
                    state.as_str().unwrap_or("?")
                ));
            }
            structured(summary, &list)
        }))
    }

    #[tool(
        description = "Destroys a sandbox and everything in it (its snapshots are kept).",
        annotations(
            title = "Destroy a sandbox",
            destructive_hint = true,
            idempotent_hint = true
        )
    )]
    async fn destroy_sandbox(
        &self,
        Parameters(p): Parameters<SandboxParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let uri = sandbox_uri(&p.sandbox_id, "");
        let destroyed = self
            .call(&context, Method::DELETE, uri, None, MAX_REPLY_BYTES)
            .await;
        done(destroyed.map(|_| {
            CallToolResult::success(vec![text(format!("Destroyed sandbox {}.", p.sandbox_id))])
        }))
    }

    #[tool(
        description = "Runs Python code in the sandbox's code interpreter, like a notebook cell: state \
                      persists between runs, the last expression's value is the result, figures come back as \
                      images, an exception comes back with its traceback.",
        annotations(title = "Run code", read_only_hint = false, destructive_hint = false)
    )]
    async fn run_code(
        &self,
        Parameters(p): Parameters<RunCodeParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({"code": p.code});
        if let Some(name) = p.context {
            body["context"] = json!(name);
        }
        if let Some(timeout) = p.timeout_secs {
            body["timeout_ms"] = json!(timeout.saturating_mul(1000));
        }
        let uri = sandbox_uri(&p.sandbox_id, "/code");
        let ran = self
            .json::<ExecutionBody>(&context, Method::POST, uri, Some(body))
            .await;
        done(ran.map(|execution| CallToolResult::success(execution_content(execution))))
    }

    #[tool(
        description = "Runs a shell command in the sandbox and returns its exit code, stdout and stderr (each \
                      cut at 1 MiB); with `background`, starts it and returns its pid.",
        annotations(
            title = "Run a command",
            read_only_hint = false,
            destructive_hint = false
        )
    )]
    async fn run_command(
        &self,
        Parameters(p): Parameters<RunCommandParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({
            "command": p.command,
            "env": p.env,
            "background": p.background,
            "max_output_bytes": MAX_COMMAND_OUTPUT,
        });
        if let Some(cwd) = p.cwd {
            body["cwd"] = json!(cwd);
        }
        if let Some(timeout) = p.timeout_secs {
            body["timeout_ms"] = json!(timeout.saturating_mul(1000));
        }
        let uri = sandbox_uri(&p.sandbox_id, "/exec");
        if p.background {
            let started = self
                .json::<StartedBody>(&context, Method::POST, uri, Some(body))
                .await;
            return done(started.map(|started| {
                structured(
                    format!("Started in the background as pid {}.", started.pid),
                    &started,
                )
            }));
        }
        let ran = self
            .json::<ExecResultBody>(&context, Method::POST, uri, Some(body))
            .await;
        done(ran.map(|result| {
            let ended = match (result.exit_code, result.signal) {
                _ if result.timed_out => "killed: the timeout passed".to_owned(),
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => "ended".to_owned(),
            };
            let mut summary = ended;
            for (name, output) in [("stdout", &result.stdout), ("stderr", &result.stderr)] {
                if !output.is_empty() {
                    summary.push_str(&format!("\n{name}:\n{output}"));
                }
            }
            if result.truncated {
                summary.push_str("\n(output cut at 1 MiB per stream)");
            }
            structured(summary, &result)
        }))
    }

    #[tool(
        description = "Reads a file from the sandbox: text as text, anything else as base64 (at most 1 MiB; \
                      a longer file is cut and says so).",
        annotations(title = "Read a file", read_only_hint = true)
    )]
    async fn read_file(
        &self,
        Parameters(p): Parameters<ReadFileParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let uri = sandbox_uri(&p.sandbox_id, "/files/content") + &query(&[("path", &p.path)]);
        let read = self
            .call(&context, Method::GET, uri, None, MAX_READ_BYTES)
            .await;
        done(read.map(|reply| {
            let uri = format!("file://{}", p.path);
            let contents = match std::str::from_utf8(&reply.body) {
                Ok(text) => ResourceContents::TextResourceContents {
                    uri,
                    mime_type: Some("text/plain".into()),
                    text: text.to_owned(),
                    meta: None,
                },
                Err(_) => ResourceContents::BlobResourceContents {
                    uri,
                    mime_type: Some("application/octet-stream".into()),
                    blob: base64::engine::general_purpose::STANDARD.encode(&reply.body),
                    meta: None,
                },
            };
            let mut content = vec![ContentBlock::resource(contents)];
            if reply.truncated {
                content.push(text(format!(
                    "The file is longer than {MAX_READ_BYTES} bytes: this is its start \
                     (read the rest with run_command, e.g. `tail -c +{} {}`).",
                    MAX_READ_BYTES + 1,
                    p.path
                )));
            }
            CallToolResult::success(content)
        }))
    }

    #[tool(
        description = "Writes a file in the sandbox (replacing it; missing directories are made).",
        annotations(
            title = "Write a file",
            read_only_hint = false,
            destructive_hint = true
        )
    )]
    async fn write_file(
        &self,
        Parameters(p): Parameters<WriteFileParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let content = if p.base64 {
            match base64::engine::general_purpose::STANDARD.decode(p.content.trim()) {
                Ok(bytes) => Bytes::from(bytes),
                Err(e) => return done(Err(failure(format!("content is not base64: {e}")))),
            }
        } else {
            Bytes::from(p.content)
        };
        let uri = sandbox_uri(&p.sandbox_id, "/files/content") + &query(&[("path", &p.path)]);
        let body = Some(("application/octet-stream", content));
        let written = self
            .call(&context, Method::PUT, uri, body, MAX_REPLY_BYTES)
            .await
            .and_then(|reply| {
                serde_json::from_slice::<WrittenBody>(&reply.body)
                    .map_err(|e| failure(format!("malformed answer from the API: {e}")))
            });
        done(written.map(|written| {
            structured(
                format!("Wrote {} bytes to {}.", written.bytes, written.path),
                &written,
            )
        }))
    }

    #[tool(
        description = "Lists a directory in the sandbox: each entry's path, kind and size.",
        annotations(title = "List files", read_only_hint = true)
    )]
    async fn list_files(
        &self,
        Parameters(p): Parameters<ListFilesParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let depth = p.depth.unwrap_or(1).to_string();
        let uri =
            sandbox_uri(&p.sandbox_id, "/files") + &query(&[("path", &p.path), ("depth", &depth)]);
        let listed = self
            .json::<FileListBody>(&context, Method::GET, uri, None)
            .await;
        done(listed.map(|list| {
            let mut summary = String::new();
            for entry in &list.entries {
                let suffix = if entry.kind == "dir" { "/" } else { "" };
                summary.push_str(&format!(
                    "{}{suffix}\t{}\t{}\n",
                    entry.path, entry.kind, entry.size
                ));
            }
            if list.truncated {
                summary.push_str("(cut: more entries than a listing returns)\n");
            }
            if list.entries.is_empty() {
                summary.push_str("(empty)\n");
            }
            structured(summary, &list)
        }))
    }

    #[tool(
        description = "Forks a running sandbox: each copy continues from this moment with the same memory, \
                      processes and files, independently. Returns the copies' ids.",
        annotations(
            title = "Fork a sandbox",
            read_only_hint = false,
            destructive_hint = false
        )
    )]
    async fn fork_sandbox(
        &self,
        Parameters(p): Parameters<ForkParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({});
        if let Some(count) = p.count {
            body["count"] = json!(count);
        }
        let uri = sandbox_uri(&p.sandbox_id, "/fork");
        let forked = self
            .json::<ForkedBody>(&context, Method::POST, uri, Some(body))
            .await;
        done(forked.map(|forked| {
            let ids: Vec<&str> = forked.sandboxes.iter().map(|s| s.id.as_str()).collect();
            structured(format!("Forked into {}.", ids.join(", ")), &forked)
        }))
    }

    #[tool(
        description = "Snapshots a running sandbox (memory, processes and disk) under a name; it keeps running. \
                      `create_sandbox` with `snapshot` starts new sandboxes from it, any number of times.",
        annotations(
            title = "Snapshot a sandbox",
            read_only_hint = false,
            destructive_hint = false
        )
    )]
    async fn create_snapshot(
        &self,
        Parameters(p): Parameters<SnapshotParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let uri = sandbox_uri(&p.sandbox_id, "/snapshots");
        let body = json!({"name": p.name});
        let taken = self
            .json::<SnapshotBody>(&context, Method::POST, uri, Some(body))
            .await;
        done(taken.map(|snapshot| {
            structured(
                format!(
                    "Snapshot {} ({}) taken of {}.",
                    snapshot.id, snapshot.name, snapshot.sandbox_id
                ),
                &snapshot,
            )
        }))
    }

    #[tool(
        description = "Lists the templates sandboxes can be made from.",
        annotations(title = "List templates", read_only_hint = true)
    )]
    async fn list_templates(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let listed = self
            .json::<TemplateList>(&context, Method::GET, "/v1/templates".into(), None)
            .await;
        done(listed.map(|list| {
            let mut summary = String::new();
            for template in &list.templates {
                summary.push_str(&format!(
                    "{}: {}\n",
                    template.name,
                    template.description.as_deref().unwrap_or("")
                ));
            }
            structured(summary, &list)
        }))
    }
}

#[tool_handler(
    name = "kiln",
    instructions = "Sandboxes are microVMs for running untrusted code. Create one with \
                    create_sandbox (template `python` for run_code), use its id with the \
                    other tools, and destroy it when done."
)]
impl ServerHandler for KilnMcp {}

/// What a run showed, as MCP content: printed text, results (images as images), the error.
fn execution_content(execution: ExecutionBody) -> Vec<ContentBlock> {
    let mut content = Vec::new();
    if !execution.stdout.is_empty() {
        content.push(text(format!("stdout:\n{}", execution.stdout)));
    }
    if !execution.stderr.is_empty() {
        content.push(text(format!("stderr:\n{}", execution.stderr)));
    }
    for output in &execution.results {
        let value = |mime: &str| {
            output
                .data
                .get(mime)
                .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        };
        let mut shown = false;
        for mime in ["image/png", "image/jpeg"] {
            if let Some(image) = value(mime) {
                content.push(ContentBlock::image(image, mime));
                shown = true;
            }
        }
        if !shown {
            if let Some(plain) = value("text/plain") {
                let label = if output.is_main_result {
                    "result"
                } else {
                    "display"
                };
                content.push(text(format!("{label}: {plain}")));
            }
        }
    }
    if let Some(error) = &execution.error {
        content.push(text(format!(
            "error: {}: {}\n{}",
            error.name, error.value, error.traceback
        )));
    }
    if execution.timed_out {
        content.push(text("The run was interrupted: its timeout passed."));
    }
    if execution.truncated {
        content.push(text("Output past the limits was dropped."));
    }
    if content.is_empty() {
        content.push(text(format!(
            "Ran (execution {}); no output.",
            execution.execution_count
        )));
    }
    content
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_leave_their_path_segment() {
        assert_eq!(sandbox_uri("sb-1", "/exec"), "/v1/sandboxes/sb-1/exec");
        assert_eq!(
            sandbox_uri("../../keys", ""),
            "/v1/sandboxes/..%2F..%2Fkeys"
        );
        assert_eq!(
            sandbox_uri("a?b#c d", "/files"),
            "/v1/sandboxes/a%3Fb%23c%20d/files"
        );
        assert_eq!(query(&[("path", "/a b&c")]), "?path=%2Fa+b%26c");
    }

    #[tokio::test]
    async fn bodies_are_read_to_the_limit_only() {
        let body = Body::from(vec![7u8; 100]);
        let (bytes, truncated) = read_limited(body, 10).await.expect("read");
        assert_eq!((bytes.len(), truncated), (10, true));
        let body = Body::from(vec![7u8; 10]);
        let (bytes, truncated) = read_limited(body, 10).await.expect("read");
        assert_eq!((bytes.len(), truncated), (10, false));
    }
}
