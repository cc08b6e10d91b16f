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
pub mod linger;
pub mod mcp;
mod metrics;
pub mod request_id;
pub mod types;
mod unread_body;

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
    /// This daemon's OpenAPI document (with its bounds), made once.
    openapi: axum::body::Bytes,
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
            ControlError::InsufficientStorage(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
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

/// Rewrites numbers such as `18.0` as the integers they are. JSON (and JSON Schema's
/// `integer`) does not tell `18.0` from `18`, but serde will not read the first into an
/// integer field; a float field reads either.
fn integral_floats_as_integers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(number) if !number.is_i64() && !number.is_u64() => {
            if let Some(float) = number.as_f64() {
                // Exactly representable: integers up to 2^53 in magnitude.
                if float.fract() == 0.0 && float.abs() <= 9_007_199_254_740_992.0 {
                    *number = serde_json::Number::from(float as i64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        serde_json::Value::Object(fields) => {
            fields.values_mut().for_each(integral_floats_as_integers)
        }
        _ => {}
    }
}

/// Whether `value` holds an integer above `i64::MAX`: the document's integers are `int64`
/// (serde would read up to `u64::MAX` into an unsigned field).
fn has_integer_above_int64(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Number(number) => number.is_u64() && !number.is_i64(),
        serde_json::Value::Array(items) => items.iter().any(has_integer_above_int64),
        serde_json::Value::Object(fields) => fields.values().any(has_integer_above_int64),
        _ => false,
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
        let axum::Json(mut value) =
            axum::Json::<serde_json::Value>::from_request(request, state).await?;
        integral_floats_as_integers(&mut value);
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
        if has_integer_above_int64(&value) {
            return Err(ApiError::invalid(format!(
                "a number in the body is above {}: integers are 64-bit signed",
                i64::MAX
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
        handlers::open_forward,
        handlers::list_forwards,
        handlers::close_forward,
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
    components(schemas(handlers::StateFilter)),
    modifiers(&BearerAuth, &ErrorResponses, &ValueConstraints),
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

/// Documents the error answers every operation can give, by the rules the handlers follow
/// (an answer an operation documents itself keeps its own description):
///
/// * every operation: 500 `internal`;
/// * with an API key: 401 `unauthenticated`;
/// * with parameters: 400 `invalid_request`; with path parameters: 404 `not_found`;
/// * with a JSON body: 400 (malformed, or not an object), 413 `too_large`, 415
///   `unsupported_media_type`, 422 (does not fit the body's type);
/// * on a sandbox's sub-resources (`/v1/sandboxes/{id}/...`, which reach its VM): 409
///   `conflict` (not in a state for it), 422 `guest_error`, 503 `unavailable` (the sandbox does
///   not answer), 504 `timeout`;
/// * what makes a sandbox: 429 `quota_exceeded` and 503 (no capacity); a template's spec: 429
///   (the tenant's quota of templates); a create or change of a
///   sandbox: 409 (networking off, a snapshot of another VMM, a failed sandbox);
/// * what takes disk space (create, fork, pause, snapshot): 507 `insufficient_storage`.
#[derive(Debug)]
struct ErrorResponses;

impl ErrorResponses {
    fn statuses(
        path: &str,
        operation: &utoipa::openapi::path::Operation,
    ) -> Vec<(u16, &'static str)> {
        use utoipa::openapi::path::ParameterIn;
        let mut statuses = vec![(500, "An error of the daemon's own (`internal`)")];
        if operation.security.is_some() {
            statuses.push((401, "No API key, or not a valid one (`unauthenticated`)"));
        }
        let parameters = operation.parameters.as_deref().unwrap_or_default();
        if !parameters.is_empty() {
            statuses.push((400, "A parameter is not valid (`invalid_request`)"));
        }
        if parameters
            .iter()
            .any(|p| p.parameter_in == ParameterIn::Path)
        {
            statuses.push((
                404,
                "It does not exist, or belongs to another tenant (`not_found`)",
            ));
        }
        let json_body = operation
            .request_body
            .as_ref()
            .is_some_and(|body| body.content.contains_key("application/json"));
        if operation.request_body.is_some() {
            statuses.push((400, "The body is not valid (`invalid_request`)"));
            statuses.push((413, "The body is too large (`too_large`)"));
        }
        if json_body {
            statuses.push((
                415,
                "The body was sent without its content type (`unsupported_media_type`)",
            ));
            statuses.push((
                422,
                "The JSON body does not fit its schema (`invalid_request`)",
            ));
        }
        if path.starts_with("/v1/sandboxes/{id}/") {
            statuses.extend([
                (409, "The sandbox is not in a state for this (`conflict`)"),
                (422, "The guest failed the operation (`guest_error`)"),
                (503, "The sandbox does not answer (`unavailable`)"),
                (504, "The operation timed out (`timeout`)"),
            ]);
        }
        if operation.operation_id.as_deref() == Some("create_sandbox")
            || path == "/v1/sandboxes/{id}/fork"
        {
            statuses.extend([
                (
                    429,
                    "The tenant is at one of its quotas: live sandboxes, CPU, memory or disk \
                     (`quota_exceeded`)",
                ),
                (503, "No capacity for another sandbox now (`unavailable`)"),
            ]);
        }
        if operation.operation_id.as_deref() == Some("build_template") {
            statuses.push((
                429,
                "The tenant is at its limit of templates (`quota_exceeded`)",
            ));
        }
        if matches!(
            operation.operation_id.as_deref(),
            Some("create_sandbox" | "update_sandbox")
        ) {
            statuses.push((
                409,
                "Not possible on this host now: a network policy where networking is off, a \
                 snapshot made under another VMM, a failed sandbox (`conflict`)",
            ));
        }
        if matches!(
            operation.operation_id.as_deref(),
            Some("create_sandbox" | "fork_sandbox" | "pause_sandbox" | "create_snapshot")
        ) {
            statuses.push((
                507,
                "The host's disk space for sandboxes (its reserve or budget) does not allow it \
                 (`insufficient_storage`)",
            ));
        }
        statuses
    }
}

impl utoipa::Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                for (status, description) in ErrorResponses::statuses(path, operation) {
                    let response = ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build();
                    operation
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| response.into());
                }
            }
        }
    }
}

/// Constraints utoipa's attributes cannot state on these types, as the handlers and the agent
/// check them: a PATCH changes at least one thing, a template build names exactly one of
/// `spec` and `name`; egress entries are addresses, CIDRs or names; commands are not empty (a shell line has a character, an argv a
/// non-empty program) and hold no NUL; metadata and a sandbox's env are bounded (entries, key
/// and value lengths); env names are not empty and hold no `=`; nothing holds a NUL.
#[derive(Debug)]
struct ValueConstraints;

impl utoipa::Modify for ValueConstraints {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::AdditionalProperties;
        use utoipa::openapi::{ObjectBuilder, RefOr, Schema, Type};
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for (name, min, max) in [
            ("UpdateSandboxBody", 1, None),
            ("BuildTemplateBody", 1, Some(1)),
        ] {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(name) {
                object.min_properties = Some(min);
                object.max_properties = max;
            }
        }
        let no_nul = "^[^\\u0000]*$";
        let matching = |pattern: &str, min: Option<usize>, max: Option<usize>| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(min)
                .max_length(max)
                .pattern(Some(pattern))
                .build()
        };
        // A map's keys and values, and how many entries it may have.
        let map = |map: &mut utoipa::openapi::schema::Object,
                   keys: utoipa::openapi::schema::Object,
                   values: utoipa::openapi::schema::Object,
                   entries: Option<usize>| {
            map.property_names = Some(Box::new(Schema::Object(keys)));
            map.additional_properties = Some(Box::new(AdditionalProperties::RefOr(RefOr::T(
                Schema::Object(values),
            ))));
            map.max_properties = entries;
        };
        let env_name = "^[^=\\u0000]+$";
        for (name, schema) in components.schemas.iter_mut() {
            let RefOr::T(Schema::Object(object)) = schema else {
                continue;
            };
            // Labels of a sandbox (kiln-control checks them).
            if let Some(RefOr::T(Schema::Object(metadata))) = object.properties.get_mut("metadata")
            {
                map(
                    metadata,
                    matching(no_nul, Some(1), Some(kiln_control::MAX_METADATA_KEY_CHARS)),
                    matching(
                        no_nul,
                        Some(0),
                        Some(kiln_control::MAX_METADATA_VALUE_CHARS),
                    ),
                    Some(kiln_control::MAX_METADATA_ENTRIES),
                );
            }
            if let Some(RefOr::T(Schema::Object(env))) = object.properties.get_mut("env") {
                if name == "CreateSandboxBody" {
                    // Kept with the sandbox: bounded like its metadata.
                    map(
                        env,
                        matching(
                            env_name,
                            Some(1),
                            Some(kiln_control::MAX_METADATA_KEY_CHARS),
                        ),
                        matching(
                            no_nul,
                            Some(0),
                            Some(kiln_control::MAX_METADATA_VALUE_CHARS),
                        ),
                        Some(kiln_control::MAX_METADATA_ENTRIES),
                    );
                } else {
                    map(
                        env,
                        matching(env_name, Some(1), None),
                        matching(no_nul, None, None),
                        None,
                    );
                }
            }
            for field in ["cwd", "user"] {
                if let Some(RefOr::T(Schema::Object(value))) = object.properties.get_mut(field) {
                    value.min_length = Some(1);
                    value.pattern = Some(no_nul.into());
                }
            }
        }
        // Egress entries: what `Destination::parse` takes (a property test holds the two).
        if let Some(RefOr::T(Schema::Object(network))) = components.schemas.get_mut("NetworkBody") {
            for field in ["allow_out", "deny_out"] {
                if let Some(RefOr::T(Schema::Array(list))) = network.properties.get_mut(field) {
                    list.items = utoipa::openapi::schema::ArrayItems::RefOrSchema(Box::new(
                        RefOr::T(Schema::Object(matching(
                            kiln_network::policy::ENTRY_PATTERN,
                            Some(1),
                            Some(kiln_network::policy::MAX_ENTRY_LEN),
                        ))),
                    ));
                }
            }
        }
        if let Some(RefOr::T(Schema::OneOf(command))) = components.schemas.get_mut("CommandBody") {
            for variant in &mut command.items {
                match variant {
                    RefOr::T(Schema::Object(line)) => {
                        line.min_length = Some(1);
                        line.pattern = Some(no_nul.into());
                    }
                    RefOr::T(Schema::Array(argv)) => {
                        argv.min_items = Some(1);
                        argv.items = utoipa::openapi::schema::ArrayItems::RefOrSchema(Box::new(
                            RefOr::T(Schema::Object(matching(no_nul, None, None))),
                        ));
                        argv.prefix_items = vec![Schema::Object(matching(no_nul, Some(1), None))];
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The OpenAPI document as JSON, for a daemon with the default settings (the one in
/// docs/openapi.json).
pub fn openapi_json() -> String {
    openapi_json_for(kiln_control::DEFAULT_MAX_TTL)
}

/// The OpenAPI document of a daemon whose longest time to live is `max_ttl`: what that
/// daemon serves at `/v1/openapi.json`, its exact contract.
pub fn openapi_json_for(max_ttl: std::time::Duration) -> String {
    let mut document = ApiDoc::openapi();
    refine(&mut document, max_ttl);
    document
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// What utoipa's attributes cannot say: fields that exclude each other (both may be absent
/// or null, never both given: JSON Schema's `not`, which utoipa's types lack, is added as a
/// raw keyword), and the daemon's own bounds.
fn refine(document: &mut utoipa::openapi::OpenApi, max_ttl: std::time::Duration) {
    use utoipa::openapi::{RefOr, Schema};
    let Some(components) = document.components.as_mut() else {
        return;
    };
    fn object<'a>(
        components: &'a mut utoipa::openapi::Components,
        name: &str,
    ) -> Option<&'a mut utoipa::openapi::schema::Object> {
        match components.schemas.get_mut(name) {
            Some(RefOr::T(Schema::Object(object))) => Some(object),
            _ => None,
        }
    }
    for (schema, [a, b]) in [
        ("CreateSandboxBody", ["template", "snapshot"]),
        ("ProcessStdinBody", ["data", "data_b64"]),
    ] {
        if let Some(object) = object(components, schema) {
            object
                .extensions
                .get_or_insert_with(Default::default)
                .insert(
                    "not".into(),
                    serde_json::json!({
                        "required": [a, b],
                        "properties": {a: {"type": "string"}, b: {"type": "string"}}
                    }),
                );
        }
    }
    let max = usize::try_from(max_ttl.as_secs()).unwrap_or(usize::MAX);
    for schema in ["CreateSandboxBody", "ForkBody", "UpdateSandboxBody"] {
        if let Some(RefOr::T(Schema::Object(ttl))) =
            object(components, schema).and_then(|o| o.properties.get_mut("ttl_secs"))
        {
            ttl.maximum = Some(utoipa::Number::UInt(max));
        }
    }
}

async fn openapi(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        state.openapi,
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
        openapi: openapi_json_for(control.config().max_ttl).into(),
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
        .route(
            "/v1/sandboxes/{id}/forwards",
            post(handlers::open_forward).get(handlers::list_forwards),
        )
        .route(
            "/v1/sandboxes/{id}/forwards/{port}",
            axum::routing::delete(handlers::close_forward),
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
        .layer(axum::middleware::from_fn(
            |request: axum::extract::Request, next: axum::middleware::Next| {
                kiln_control::in_flight::scope(next.run(request))
            },
        ))
        .layer(axum::middleware::from_fn(unread_body::close_if_unread))
        // Outermost: every answer (proxied ports' included) carries its request id.
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn integral_floats_are_read_as_integers() {
        let mut body = json!({"a": 18.0, "b": [2.0, 2.5, -3.0], "c": {"d": 1e300}, "e": "7.0"});
        super::integral_floats_as_integers(&mut body);
        assert_eq!(
            body,
            json!({"a": 18, "b": [2, 2.5, -3], "c": {"d": 1e300}, "e": "7.0"})
        );
        assert!(body["a"].is_u64() && body["b"][2].is_i64());
    }

    #[test]
    fn integers_past_int64_are_found_anywhere() {
        assert!(!super::has_integer_above_int64(
            &json!({"a": i64::MAX, "b": [-1, 2.5]})
        ));
        assert!(super::has_integer_above_int64(
            &json!({"a": {"b": [1, 9_223_372_036_854_775_808_u64]}})
        ));
    }

    #[test]
    fn every_operation_documents_its_errors() {
        let document: serde_json::Value =
            serde_json::from_str(&super::openapi_json()).expect("JSON");
        let mut checked = 0;
        for (path, item) in document["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("operations") {
                let responses = &operation["responses"];
                let has = |status: &str| responses.get(status).is_some();
                let what = format!("{method} {path}");
                assert!(has("500"), "{what}");
                if operation.get("security").is_some() {
                    assert!(has("401"), "{what}");
                }
                if operation["requestBody"]["content"]
                    .get("application/json")
                    .is_some()
                {
                    for status in ["400", "413", "415", "422"] {
                        assert!(has(status), "{what} {status}");
                    }
                }
                if path.contains('{') {
                    assert!(has("404"), "{what}");
                }
                for (status, response) in responses.as_object().expect("responses") {
                    if status.starts_with('4') || status.starts_with('5') {
                        let schema = &response["content"]["application/json"]["schema"]["$ref"];
                        assert_eq!(schema, "#/components/schemas/ErrorBody", "{what} {status}");
                    }
                }
                checked += 1;
            }
        }
        assert!(checked > 40, "{checked} operations");
    }

    /// A daemon's document carries its longest time to live, and says which fields exclude
    /// each other: both given is refused by the schema; one, or null beside one, is not.
    #[test]
    fn the_document_carries_the_daemons_bounds_and_exclusive_fields() {
        let document: serde_json::Value = serde_json::from_str(&super::openapi_json_for(
            std::time::Duration::from_secs(600),
        ))
        .expect("JSON");
        let schemas = &document["components"]["schemas"];
        for schema in ["CreateSandboxBody", "ForkBody", "UpdateSandboxBody"] {
            assert_eq!(
                schemas[schema]["properties"]["ttl_secs"]["maximum"], 600,
                "{schema}"
            );
        }
        for (schema, [a, b]) in [
            ("CreateSandboxBody", ["template", "snapshot"]),
            ("ProcessStdinBody", ["data", "data_b64"]),
        ] {
            let not = &schemas[schema]["not"];
            assert_eq!(not["required"], json!([a, b]), "{schema}");
            for field in [a, b] {
                assert_eq!(not["properties"][field]["type"], "string", "{schema}");
                assert!(
                    schemas[schema]["properties"][field].is_object(),
                    "{schema}.{field} exists"
                );
            }
        }
    }

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
