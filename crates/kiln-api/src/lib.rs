//! kiln's HTTP API under `/v1`: an axum router over [`kiln_control::Control`]. Handlers parse,
//! authenticate, call the control plane and map the result; control-plane errors become HTTP
//! statuses in exactly one place ([`ApiError`]). The OpenAPI document is generated from the
//! handlers and types ([`ApiDoc`]) and served at `/v1/openapi.json`.

mod code;
mod exec;
mod files;
mod handlers;
pub mod ingress;
mod interactive;
pub mod mcp;
mod metrics;
pub mod request_id;
pub mod types;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts};
use axum::http::{request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kiln_control::{Control, ControlError, Principal};
use utoipa::OpenApi;

use types::ErrorBody;

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// Settings of the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest file upload, in bytes.
    pub max_upload_bytes: u64,
    /// The domain sandbox ports are served under (`<port>-<sandbox>.<domain>`).
    pub ingress_domain: String,
    /// The port those URLs name (the daemon's own, or a front end's); `None`: 80.
    pub ingress_port: Option<u16>,
    /// Browser origins (`https://app.example.com:443`) allowed to call `/mcp`; a request
    /// from any other origin is refused (clients that are not browsers send none).
    pub mcp_allowed_origins: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_upload_bytes: 4 << 30,
            ingress_domain: "localhost".into(),
            ingress_port: None,
            mcp_allowed_origins: Vec::new(),
        }
    }
}

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The control plane.
    pub control: Control,
    /// Settings.
    pub config: ApiConfig,
    /// The figures `/metrics` serves.
    metrics: std::sync::Arc<metrics::Metrics>,
}

/// An error response: `{code, message}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// The error code, for streamed errors.
    pub(crate) fn code(&self) -> &'static str {
        self.code
    }

    /// The message.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let (status, code) = match &e {
            ControlError::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ControlError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ControlError::NotFound { .. } | ControlError::Missing(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ControlError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ControlError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ControlError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ControlError::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            ControlError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ControlError::Guest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "guest_error"),
            ControlError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "internal error");
        }
        ApiError::new(status, code, e.to_string())
    }
}

impl From<kiln_agent_client::ClientError> for ApiError {
    fn from(e: kiln_agent_client::ClientError) -> Self {
        ControlError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_owned(),
            message: self.message,
            request_id: request_id::current(),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        response
            .extensions_mut()
            .insert(metrics::ErrorCode(self.code));
        response
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection;
        let status = rejection.status();
        match rejection {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                status,
                "unsupported_media_type",
                "the body must be JSON, sent with the header `Content-Type: application/json`"
                    .to_owned(),
            ),
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(status, "too_large", rejection.body_text())
            }
            _ => ApiError::new(status, "invalid_request", rejection.body_text()),
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::invalid(rejection.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::PathRejection) -> Self {
        ApiError::invalid(rejection.body_text())
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s, for JSON objects only (serde would also
/// read a struct from an array: `[]` must not create a sandbox).
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) =
            axum::Json::<serde_json::Value>::from_request(request, state).await?;
        if !value.is_object() {
            let kind = match value {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Object(_) => "an object",
            };
            return Err(ApiError::invalid(format!(
                "the body must be a JSON object, not {kind}"
            )));
        }
        T::deserialize(value).map(Json).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!("Failed to deserialize the JSON body into the target type: {e}"),
            )
        })
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query` whose rejections are [`ApiError`]s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// `axum::extract::Path` whose rejections are [`ApiError`]s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// The authenticated caller (`Authorization: Bearer <key>`).
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let secret = header.strip_prefix("Bearer ").unwrap_or_default().trim();
        if secret.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send an API key as `Authorization: Bearer <key>` (`kiln keys create` makes one)",
            ));
        }
        Ok(Caller(state.control.authenticate(secret)?))
    }
}

/// The OpenAPI document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "kiln",
        description = "Sandboxes in microVMs: create from templates, run commands, move files.",
        license(name = "Apache-2.0")
    ),
    paths(
        handlers::health,
        handlers::list_templates,
        handlers::get_template,
        handlers::build_template,
        handlers::delete_template,
        handlers::create_sandbox,
        handlers::list_sandboxes,
        handlers::get_sandbox,
        handlers::update_sandbox,
        handlers::delete_sandbox,
        handlers::keepalive,
        handlers::pause_sandbox,
        handlers::fork_sandbox,
        handlers::create_snapshot,
        handlers::list_snapshots,
        handlers::get_snapshot,
        handlers::delete_snapshot,
        handlers::resume_sandbox,
        handlers::console_log,
        handlers::get_sandbox_metrics,
        handlers::events,
        exec::run,
        exec::stream,
        interactive::open,
        exec::list_processes,
        exec::kill_all,
        exec::attach,
        exec::signal,
        exec::write_stdin,
        exec::resize,
        code::run_code,
        code::run_code_stream,
        code::create_code_context,
        code::list_code_contexts,
        code::delete_code_context,
        code::interrupt_code,
        files::read,
        files::write,
        files::list,
        files::stat,
        files::mkdir,
        files::remove,
        files::rename,
        ingress::by_path,
        handlers::create_key,
        handlers::list_keys,
        handlers::revoke_key,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "sandboxes", description = "Create, list, inspect and destroy sandboxes"),
        (name = "snapshots", description = "A sandbox's state kept, to make sandboxes from"),
        (name = "exec", description = "Run commands in a sandbox"),
        (name = "code", description = "Run code in a sandbox's code interpreter, with state kept between runs"),
        (name = "files", description = "Files in a sandbox"),
        (name = "templates", description = "What sandboxes are made from"),
        (name = "keys", description = "API keys (admin keys only)"),
        (name = "system", description = "The daemon itself"),
    )
)]
pub struct ApiDoc;

#[derive(Debug)]
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from `kiln keys create`"))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as JSON.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

async fn openapi() -> impl IntoResponse {
    // Made once: the document is the same for the life of the process.
    static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(openapi_json);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; GET /v1/openapi.json lists them",
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; GET /v1/openapi.json lists them",
    )
}

/// The API's router.
pub fn router(control: Control, config: ApiConfig) -> Router {
    routers(control, config).api
}

/// The API's router and, sharing its figures, a router that serves only `GET /metrics`
/// without a key (for a listen address of the operator's own: `kiln serve --metrics-listen`).
#[derive(Debug)]
pub struct Routers {
    /// The API (its `/metrics` takes an admin key).
    pub api: Router,
    /// `/metrics` alone, open.
    pub metrics: Router,
}

/// See [`Routers`].
pub fn routers(control: Control, config: ApiConfig) -> Routers {
    let state = AppState {
        control,
        config,
        metrics: Default::default(),
    };
    let metrics = Router::new()
        .route("/metrics", get(metrics::scrape_open))
        .fallback(not_found)
        .with_state(state.clone());
    Routers {
        api: api_router(state),
        metrics,
    }
}

fn api_router(state: AppState) -> Router {
    let uploads = Router::new()
        .route(
            "/v1/sandboxes/{id}/files/content",
            get(files::read).put(files::write),
        )
        .route(
            "/v1/sandboxes/{id}/ports/{port}",
            axum::routing::any(ingress::by_path),
        )
        .route(
            "/v1/sandboxes/{id}/ports/{port}/",
            axum::routing::any(ingress::by_path),
        )
        .route(
            "/v1/sandboxes/{id}/ports/{port}/{*rest}",
            axum::routing::any(ingress::by_path),
        )
        .layer(DefaultBodyLimit::disable());
    let api = Router::new()
        .route("/v1/health", get(handlers::health))
        .route("/metrics", get(metrics::scrape))
        .route("/v1/openapi.json", get(openapi))
        .route(
            "/v1/templates",
            get(handlers::list_templates).post(handlers::build_template),
        )
        .route(
            "/v1/templates/{name}",
            get(handlers::get_template).delete(handlers::delete_template),
        )
        .route(
            "/v1/sandboxes",
            get(handlers::list_sandboxes).post(handlers::create_sandbox),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(handlers::get_sandbox)
                .patch(handlers::update_sandbox)
                .delete(handlers::delete_sandbox),
        )
        .route("/v1/sandboxes/{id}/keepalive", post(handlers::keepalive))
        .route("/v1/sandboxes/{id}/pause", post(handlers::pause_sandbox))
        .route("/v1/sandboxes/{id}/fork", post(handlers::fork_sandbox))
        .route(
            "/v1/sandboxes/{id}/snapshots",
            post(handlers::create_snapshot),
        )
        .route("/v1/snapshots", get(handlers::list_snapshots))
        .route(
            "/v1/snapshots/{id}",
            get(handlers::get_snapshot).delete(handlers::delete_snapshot),
        )
        .route("/v1/sandboxes/{id}/resume", post(handlers::resume_sandbox))
        .route("/v1/sandboxes/{id}/logs", get(handlers::console_log))
        .route(
            "/v1/sandboxes/{id}/metrics",
            get(handlers::get_sandbox_metrics),
        )
        .route("/v1/events", get(handlers::events))
        .route("/v1/sandboxes/{id}/exec", post(exec::run))
        .route("/v1/sandboxes/{id}/exec/stream", post(exec::stream))
        .route("/v1/sandboxes/{id}/exec/ws", get(interactive::open))
        .route("/v1/sandboxes/{id}/processes", get(exec::list_processes))
        .route("/v1/sandboxes/{id}/processes/kill", post(exec::kill_all))
        .route(
            "/v1/sandboxes/{id}/processes/{process}/stream",
            get(exec::attach),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{process}/signal",
            post(exec::signal),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{process}/stdin",
            post(exec::write_stdin),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{process}/resize",
            post(exec::resize),
        )
        .route("/v1/sandboxes/{id}/code", post(code::run_code))
        .route(
            "/v1/sandboxes/{id}/code/stream",
            post(code::run_code_stream),
        )
        .route(
            "/v1/sandboxes/{id}/code/contexts",
            post(code::create_code_context).get(code::list_code_contexts),
        )
        .route(
            "/v1/sandboxes/{id}/code/contexts/{context}",
            axum::routing::delete(code::delete_code_context),
        )
        .route(
            "/v1/sandboxes/{id}/code/contexts/{context}/interrupt",
            post(code::interrupt_code),
        )
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::list).delete(files::remove),
        )
        .route("/v1/sandboxes/{id}/files/stat", get(files::stat))
        .route("/v1/sandboxes/{id}/files/mkdir", post(files::mkdir))
        .route("/v1/sandboxes/{id}/files/rename", post(files::rename))
        .route(
            "/v1/keys",
            get(handlers::list_keys).post(handlers::create_key),
        )
        .route("/v1/keys/{id}", axum::routing::delete(handlers::revoke_key))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .merge(uploads)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // MCP's tools call the routes above in-process.
    let mcp = mcp::router(api.clone().with_state(state.clone()), state.clone());
    api.merge(mcp)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::observe,
        ))
        // Requests for a sandbox's port by host name are proxied before any route.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ingress::by_host,
        ))
        // Outermost: every answer (proxied ports' included) carries its request id.
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    /// The document in the repository (which the SDKs' coverage test reads) is the one the
    /// code makes; `KILN_UPDATE_OPENAPI=1 cargo test -p kiln-api --lib` rewrites it.
    #[test]
    fn committed_openapi_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let made = super::openapi_json();
        if std::env::var_os("KILN_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &made).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(&path).expect("docs/openapi.json");
        let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).expect("JSON");
        assert!(
            parse(&made) == parse(&committed),
            "the API changed: run `KILN_UPDATE_OPENAPI=1 cargo test -p kiln-api --lib` and \
             commit docs/openapi.json"
        );
    }
}
