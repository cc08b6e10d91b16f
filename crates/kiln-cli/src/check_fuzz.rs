//! `kiln check fuzz`: requests generated from the daemon's own OpenAPI document (valid ones,
//! valid ones with one part broken, random JSON, bytes that are not JSON, hostile path
//! segments, queries and keys) against a running daemon; then hostile exec streams from a
//! fake agent against the host's agent client, in this process.
//!
//! The API part fails on any 5xx, any error that is not the API's JSON error with its request
//! id, any response without an `X-Request-Id`, any request left unanswered, a daemon that no
//! longer answers its health check, and anything the fuzz made that is left afterwards. It
//! works with the key it is given (a tenant's key touches only that tenant's sandboxes) and
//! never names what existed before it started, except to read it: it does not destroy what it
//! did not make. The agent part fails on a call that panics, hangs or ends in an error of the
//! wrong kind, or on memory that grows without bound.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures_util::StreamExt;
use kiln_api::types::ErrorBody;
use kiln_engine::error_chain as chain;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::{Method, Url};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use crate::client_cmd::Client;
use crate::stats::Summary;

/// Options of `kiln check fuzz`.
#[derive(Debug, Clone, clap::Args)]
pub struct FuzzOptions {
    /// Requests to send to the API (the quick profile's 500; the full one's 10,000). The
    /// fuzz stops early after 25 findings.
    #[arg(long, default_value_t = 500)]
    pub requests: usize,
    /// Frames of hostile exec streams against the agent client (the quick profile's 50,000;
    /// the full one's 1,000,000; 0 skips this part).
    #[arg(long, default_value_t = 50_000)]
    pub frames: u64,
    /// Seed of the generated requests and streams (printed; random if absent). With
    /// `--workers 1` the same seed generates the same requests in the same order, but for the
    /// ids of the sandboxes the fuzz makes.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Template of the sandboxes the fuzz makes to work on.
    #[arg(long, default_value = "base")]
    pub template: String,
    /// The daemon's process id on this host, to report its memory, open descriptors and
    /// threads before and after.
    #[arg(long)]
    pub daemon_pid: Option<u32>,
    /// Print every request and its status to standard error as it is answered.
    #[arg(long)]
    pub verbose: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Operations the fuzz does not call, and why.
const SKIPPED: [(&str, &str, &str); 3] = [
    ("GET", "/v1/events", "an endless stream"),
    ("GET", "/v1/sandboxes/{id}/exec/ws", "a WebSocket upgrade"),
    (
        "GET",
        "/v1/sandboxes/{id}/ports/{port}/{path}",
        "a proxy: its answers are the guest's",
    ),
];

/// Sandboxes of the fuzz's own alive at once (a create or fork past it first destroys one).
const MOST_SANDBOXES: usize = 3;

/// Findings after which the fuzz stops early: the daemon is broken, and more requests
/// would only wait out their timeouts.
const ENOUGH_FINDINGS: usize = 25;

/// How long one request may take before it counts as unanswered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Bytes of a response read (the rest is dropped with the connection).
const MOST_RESPONSE: usize = 8 << 20;

#[derive(Debug, Clone)]
enum Location {
    Path,
    Query,
}

#[derive(Debug, Clone)]
struct Parameter {
    name: String,
    location: Location,
    schema: Value,
}

#[derive(Debug, Clone)]
enum RequestBody {
    Json(Value),
    Bytes,
}

/// One operation of the document.
#[derive(Debug, Clone)]
struct Operation {
    method: Method,
    path: String,
    parameters: Vec<Parameter>,
    body: Option<RequestBody>,
}

impl Operation {
    fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// The operations of an OpenAPI 3 document, less [`SKIPPED`].
fn operations(document: &Value) -> Result<Vec<Operation>> {
    let paths = document
        .get("paths")
        .and_then(Value::as_object)
        .context("the OpenAPI document has no paths")?;
    let mut out = Vec::new();
    for (path, item) in paths {
        let Some(item) = item.as_object() else {
            continue;
        };
        for (method, operation) in item {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            if SKIPPED
                .iter()
                .any(|(m, p, _)| *m == method.as_str() && p == path)
            {
                continue;
            }
            let parameters = operation
                .get("parameters")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let location = match p.get("in")?.as_str()? {
                        "path" => Location::Path,
                        "query" => Location::Query,
                        _ => return None,
                    };
                    Some(Parameter {
                        name: p.get("name")?.as_str()?.to_owned(),
                        location,
                        schema: p.get("schema").cloned().unwrap_or(Value::Null),
                    })
                })
                .collect();
            let content = operation.pointer("/requestBody/content");
            let body = content.and_then(|content| {
                if let Some(schema) = content.pointer("/application~1json/schema") {
                    Some(RequestBody::Json(schema.clone()))
                } else {
                    content
                        .get("application/octet-stream")
                        .map(|_| RequestBody::Bytes)
                }
            });
            out.push(Operation {
                method,
                path: path.clone(),
                parameters,
                body,
            });
        }
    }
    ensure!(!out.is_empty(), "the OpenAPI document has no operations");
    Ok(out)
}

/// What exists while the fuzz runs: what it made (which it may name) and what it found.
#[derive(Debug, Default, Clone)]
struct Known {
    sandboxes: Vec<String>,
    snapshots: Vec<String>,
    keys: Vec<String>,
    templates: Vec<String>,
}

/// Strings a field of that name is often given, to reach past the first validation.
fn hint(field: &str, known: &Known, rng: &mut StdRng) -> Option<String> {
    const COMMANDS: [&str; 6] = [
        "echo fuzz",
        "ls -la /",
        "cat /etc/os-release",
        "id",
        "head -c 100000 /dev/zero | wc -c",
        "printf '\\x00\\xff\\x1b[2J'",
    ];
    const PATHS: [&str; 8] = [
        "/tmp/fuzz",
        "/tmp/fuzz/a/b",
        "/",
        "/etc/passwd",
        "/proc/self/mem",
        "/dev/zero",
        "../../../../etc/shadow",
        "/tmp/../root/.ssh",
    ];
    if !rng.gen_bool(0.6) {
        return None;
    }
    let pick = |list: &[&str], rng: &mut StdRng| list[rng.gen_range(0..list.len())].to_owned();
    match field {
        "template" => Some(if known.templates.is_empty() {
            "base".to_owned()
        } else {
            known.templates[rng.gen_range(0..known.templates.len())].clone()
        }),
        "command" => Some(pick(&COMMANDS, rng)),
        "path" | "from" | "to" | "cwd" => Some(pick(&PATHS, rng)),
        "code" => Some(pick(&["print(1)", "1/0", "import os; os.getpid()"], rng)),
        "user" => Some(pick(
            &["root", "nobody", "0", "65534:65534", "nosuchuser"],
            rng,
        )),
        // Names of things the fuzz would make: never one that exists.
        "name" => Some(format!("fz{}", rng.gen_range(0..1_000_000u32))),
        _ => None,
    }
}

/// Strings meant to break things: traversal, NULs, control bytes, long, not ASCII.
fn hostile_string(rng: &mut StdRng) -> String {
    const LIST: [&str; 14] = [
        "",
        "..",
        "../../../../etc/passwd",
        "/proc/self/mem",
        "\0",
        "%00",
        "%2e%2e%2f",
        "é漢字🙂",
        "-1",
        "null",
        "sb-000000000000",
        "${HOME}$(id)`id`",
        "'; DROP TABLE sandboxes; --",
        "\r\nX-Injected: 1",
    ];
    match rng.gen_range(0..10) {
        0 => "A".repeat(rng.gen_range(1_000..70_000)),
        1 => (0..rng.gen_range(1..40))
            .map(|_| char::from(rng.gen_range(0u8..128)))
            .collect(),
        _ => LIST[rng.gen_range(0..LIST.len())].to_owned(),
    }
}

fn random_json(rng: &mut StdRng, depth: usize) -> Value {
    match rng.gen_range(0..if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.gen::<bool>()),
        2 => json!(edge_integer(rng)),
        3 => json!(rng.gen::<f64>() * 1e12 - 5e11),
        4 => json!(hostile_string(rng)),
        5 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.gen_range(0..4))
                .map(|_| (hostile_string(rng), random_json(rng, depth + 1)))
                .collect(),
        ),
    }
}

fn edge_integer(rng: &mut StdRng) -> i64 {
    const EDGES: [i64; 9] = [0, 1, -1, 2, 32, 33, i64::MAX, i64::MIN, 4_294_967_296];
    if rng.gen_bool(0.5) {
        EDGES[rng.gen_range(0..EDGES.len())]
    } else {
        rng.gen_range(-1_000..100_000)
    }
}

/// The document's schema `schema` refers to, or itself.
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    let mut schema = schema;
    for _ in 0..8 {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => match reference
                .strip_prefix('#')
                .and_then(|pointer| document.pointer(pointer))
            {
                Some(target) => schema = target,
                None => return schema,
            },
            None => return schema,
        }
    }
    schema
}

/// A value that `schema` accepts (as far as a schema can say: patterns are met only by the
/// hints), for a field named `field`.
fn valid(
    document: &Value,
    schema: &Value,
    field: &str,
    known: &Known,
    rng: &mut StdRng,
    depth: usize,
) -> Value {
    let schema = resolve(document, schema);
    if depth > 6 {
        return Value::Null;
    }
    if let Some(choices) = schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
    {
        let choice = &choices[rng.gen_range(0..choices.len())];
        return valid(document, choice, field, known, rng, depth + 1);
    }
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        let mut merged = Map::new();
        for part in parts {
            if let Value::Object(object) = valid(document, part, field, known, rng, depth + 1) {
                merged.extend(object);
            }
        }
        return Value::Object(merged);
    }
    if let Some(values) = schema
        .get("enum")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
    {
        return values[rng.gen_range(0..values.len())].clone();
    }
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        Some(Value::Array(kinds)) => {
            // A nullable field is given a value far more often than a null.
            let kinds: Vec<&str> = kinds.iter().filter_map(Value::as_str).collect();
            let non_null: Vec<&str> = kinds.iter().copied().filter(|k| *k != "null").collect();
            if non_null.is_empty() || rng.gen_bool(0.1) {
                kinds.first().copied().unwrap_or("null").to_owned()
            } else {
                non_null[rng.gen_range(0..non_null.len())].to_owned()
            }
        }
        _ if schema.get("properties").is_some() => "object".to_owned(),
        _ => return random_json(rng, depth),
    };
    let number = |name: &str| schema.get(name).and_then(Value::as_f64);
    match kind.as_str() {
        "null" => Value::Null,
        "boolean" => json!(rng.gen::<bool>()),
        "integer" | "number" => {
            let low = number("minimum").unwrap_or(0.0).max(-1e6) as i64;
            let high = number("maximum").unwrap_or(1e5).min(1e9) as i64;
            let (low, high) = (low.min(high), high.max(low));
            // Timeouts and sizes small enough that a valid request ends soon.
            let high = if field.contains("timeout") || field.contains("ttl") {
                high.min(low.max(1) + 10_000)
            } else {
                high
            };
            json!(rng.gen_range(low..=high))
        }
        "string" => {
            if let Some(hinted) = hint(field, known, rng) {
                return json!(hinted);
            }
            let low = number("minLength").unwrap_or(0.0) as usize;
            let high = number("maxLength").unwrap_or(24.0).min(64.0) as usize;
            let length = rng.gen_range(low.min(high)..=high.max(low));
            let pattern = schema.get("pattern").and_then(Value::as_str);
            let text: String = if pattern.is_some_and(|p| p.starts_with("^[a-z0-9]")) {
                (0..length.max(1))
                    .map(|_| {
                        char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.gen_range(0..36)])
                    })
                    .collect()
            } else {
                (0..length)
                    .map(|_| char::from(rng.gen_range(b' '..=b'~')))
                    .collect()
            };
            json!(text)
        }
        "array" => {
            let low = number("minItems").unwrap_or(0.0) as usize;
            let items = schema.get("items").cloned().unwrap_or(Value::Null);
            let prefix = schema.get("prefixItems").and_then(Value::as_array);
            let count = rng.gen_range(low..low + 4);
            Value::Array(
                (0..count)
                    .map(|i| {
                        let item = prefix.and_then(|p| p.get(i)).unwrap_or(&items);
                        valid(document, item, field, known, rng, depth + 1)
                    })
                    .collect(),
            )
        }
        "object" => {
            let required: BTreeSet<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let mut object = Map::new();
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                let most = number("maxProperties").map_or(usize::MAX, |m| m as usize);
                for (name, property) in properties {
                    if object.len() < most
                        && (required.contains(name.as_str()) || rng.gen_bool(0.5))
                    {
                        let value = valid(document, property, name, known, rng, depth + 1);
                        object.insert(name.clone(), value);
                    }
                }
                if object.is_empty() && number("minProperties").unwrap_or(0.0) >= 1.0 {
                    if let Some((name, property)) = properties.iter().next() {
                        let value = valid(document, property, name, known, rng, depth + 1);
                        object.insert(name.clone(), value);
                    }
                }
            } else if let Some(values) =
                schema.get("additionalProperties").filter(|v| v.is_object())
            {
                for _ in 0..rng.gen_range(0..3) {
                    let key = format!("k{}", rng.gen_range(0..100));
                    let value = valid(document, values, &key, known, rng, depth + 1);
                    object.insert(key, value);
                }
            }
            Value::Object(object)
        }
        _ => random_json(rng, depth),
    }
}

/// `value` with one part broken: a field of the wrong type or a hostile value, a field
/// removed, a field no schema has, or the whole of it replaced.
fn broken(value: Value, rng: &mut StdRng) -> Value {
    match value {
        Value::Object(mut object) if !object.is_empty() && rng.gen_bool(0.8) => {
            let keys: Vec<String> = object.keys().cloned().collect();
            let key = keys[rng.gen_range(0..keys.len())].clone();
            match rng.gen_range(0..4) {
                0 => {
                    object.remove(&key);
                }
                1 => {
                    object.insert(hostile_string(rng), random_json(rng, 2));
                }
                _ => {
                    let inner = object.remove(&key).unwrap_or(Value::Null);
                    object.insert(key, broken(inner, rng));
                }
            }
            Value::Object(object)
        }
        Value::Array(mut items) if !items.is_empty() && rng.gen_bool(0.7) => {
            let i = rng.gen_range(0..items.len());
            items[i] = broken(items[i].take(), rng);
            Value::Array(items)
        }
        _ => match rng.gen_range(0..3) {
            0 => json!(hostile_string(rng)),
            1 => json!(edge_integer(rng)),
            _ => random_json(rng, 1),
        },
    }
}

/// A body that is not JSON: random bytes, JSON cut short, nesting too deep, or too big.
fn junk(valid: &Value, rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..5) {
        0 => {
            let mut bytes = vec![0u8; rng.gen_range(0..4096)];
            rng.fill(&mut bytes[..]);
            bytes
        }
        1 => {
            let text = valid.to_string().into_bytes();
            let cut = rng.gen_range(0..text.len().max(1));
            text[..cut].to_vec()
        }
        2 => {
            let depth = rng.gen_range(100..20_000);
            let mut text = "[".repeat(depth);
            text.push_str(&"]".repeat(depth));
            text.into_bytes()
        }
        3 => format!(
            "{{\"command\": \"{}\"}}",
            "x".repeat(rng.gen_range(1 << 20..4 << 20))
        )
        .into_bytes(),
        _ => b"{\"a\": 1, \"a\": 2, \"\\ud800\": \"\\udfff\"}".to_vec(),
    }
}

/// One generated request.
#[derive(Debug)]
struct Generated {
    operation: String,
    method: Method,
    url: Url,
    key: KeyChoice,
    body: Option<(Vec<u8>, &'static str)>,
}

#[derive(Debug, Clone, Copy)]
enum KeyChoice {
    Given,
    None,
    Wrong,
}

/// A path segment for parameter `name` of `path`: mostly something the fuzz made, else
/// hostile.
fn segment(path: &str, name: &str, known: &Known, rng: &mut StdRng) -> String {
    let pick = |list: &[String], rng: &mut StdRng| {
        (!list.is_empty() && rng.gen_bool(0.75)).then(|| list[rng.gen_range(0..list.len())].clone())
    };
    let made = match name {
        "id" if path.starts_with("/v1/sandboxes") => pick(&known.sandboxes, rng),
        "id" if path.starts_with("/v1/snapshots") => pick(&known.snapshots, rng),
        "id" if path.starts_with("/v1/keys") => pick(&known.keys, rng),
        "process" | "port" | "context" if rng.gen_bool(0.5) => {
            Some(rng.gen_range(0..70_000u32).to_string())
        }
        _ => None,
    };
    made.unwrap_or_else(|| {
        if rng.gen_bool(0.3) {
            format!("fz{}", rng.gen_range(0..1_000_000u32))
        } else {
            hostile_string(rng).chars().take(300).collect()
        }
    })
}

fn generate(
    document: &Value,
    operations: &[Operation],
    base: &Url,
    known: &Known,
    rng: &mut StdRng,
) -> Generated {
    let operation = &operations[rng.gen_range(0..operations.len())];
    let mut url = base.clone();
    let mut segments = Vec::new();
    for part in operation.path.trim_start_matches('/').split('/') {
        match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            Some(name) => segments.push(segment(&operation.path, name, known, rng)),
            None => segments.push(part.to_owned()),
        }
    }
    if let Ok(mut path) = url.path_segments_mut() {
        path.clear().extend(&segments);
    }
    {
        let mut query = url.query_pairs_mut();
        for parameter in &operation.parameters {
            if matches!(parameter.location, Location::Query) && rng.gen_bool(0.6) {
                let value = if rng.gen_bool(0.7) {
                    valid(document, &parameter.schema, &parameter.name, known, rng, 0)
                } else {
                    broken(Value::Null, rng)
                };
                let text = match value {
                    Value::String(text) => text,
                    other => other.to_string(),
                };
                query.append_pair(&parameter.name, &text);
            }
        }
        if rng.gen_bool(0.05) {
            query.append_pair(&hostile_string(rng), &hostile_string(rng));
        }
    }
    if url.query() == Some("") {
        url.set_query(None);
    }
    let body = match &operation.body {
        Some(RequestBody::Json(schema)) => {
            let good = valid(document, schema, "", known, rng, 0);
            match rng.gen_range(0..100) {
                0..=49 => Some((good.to_string().into_bytes(), "application/json")),
                50..=79 => Some((
                    broken(good, rng).to_string().into_bytes(),
                    "application/json",
                )),
                80..=87 => Some((
                    random_json(rng, 0).to_string().into_bytes(),
                    "application/json",
                )),
                88..=94 => Some((junk(&good, rng), "application/json")),
                95..=97 => Some((good.to_string().into_bytes(), "text/plain")),
                _ => None,
            }
        }
        Some(RequestBody::Bytes) => {
            let size = if rng.gen_bool(0.05) {
                rng.gen_range(1 << 20..3 << 20)
            } else {
                rng.gen_range(0..64 << 10)
            };
            let mut bytes = vec![0u8; size];
            rng.fill(&mut bytes[..]);
            Some((bytes, "application/octet-stream"))
        }
        None if rng.gen_bool(0.1) => Some((
            random_json(rng, 0).to_string().into_bytes(),
            "application/json",
        )),
        None => None,
    };
    let method = if rng.gen_bool(0.05) {
        [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ][rng.gen_range(0..5)]
        .clone()
    } else {
        operation.method.clone()
    };
    let key = match rng.gen_range(0..20) {
        0 => KeyChoice::None,
        1 => KeyChoice::Wrong,
        _ => KeyChoice::Given,
    };
    Generated {
        operation: operation.name(),
        method,
        url,
        key,
        body,
    }
}

/// What one response says is wrong, if anything.
async fn judge(response: reqwest::Response) -> (u16, Option<String>) {
    let status = response.status();
    let header_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut bytes = Vec::new();
    let mut stream = response.bytes_stream();
    let mut read_error = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                bytes.extend_from_slice(&chunk);
                if bytes.len() > MOST_RESPONSE {
                    break;
                }
            }
            Err(e) => {
                read_error = Some(format!("{BROKE_OFF}: {e}"));
                break;
            }
        }
    }
    let code = status.as_u16();
    let Some(header_id) = header_id else {
        return (code, Some("no X-Request-Id header".into()));
    };
    if status.is_server_error() {
        return (code, Some(snippet(&bytes)));
    }
    if status.is_client_error() {
        return match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(error) if error.code.is_empty() || error.message.is_empty() => (
                code,
                Some(format!(
                    "an error without a code or message: {}",
                    snippet(&bytes)
                )),
            ),
            Ok(error) if error.request_id.as_deref() != Some(header_id.as_str()) => (
                code,
                Some(format!(
                    "the error's request_id {:?} is not the header's {header_id}",
                    error.request_id
                )),
            ),
            Ok(_) => (code, None),
            Err(_) => (
                code,
                Some(format!(
                    "an error that is not the API's JSON: {}",
                    snippet(&bytes)
                )),
            ),
        };
    }
    (code, read_error)
}

/// How a finding about a response cut short starts.
const BROKE_OFF: &str = "the response broke off";

/// Whether the sandbox `url` is about (`/v1/sandboxes/{id}/…`) still runs.
async fn still_running(client: &Client, url: &Url) -> bool {
    let mut segments = url.path_segments().into_iter().flatten();
    let (Some("v1"), Some("sandboxes"), Some(id)) =
        (segments.next(), segments.next(), segments.next())
    else {
        return true;
    };
    let request = client
        .request(Method::GET, &format!("/v1/sandboxes/{id}"))
        .timeout(Duration::from_secs(30));
    match client.json::<Value>(request).await {
        Ok(sandbox) => sandbox.get("state").and_then(Value::as_str) == Some("running"),
        Err(_) => false,
    }
}

fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]);
    text.replace('\n', " ")
}

#[derive(Debug, Clone, Serialize)]
struct Finding {
    operation: String,
    method: String,
    url: String,
    status: Option<u16>,
    what: String,
}

#[derive(Debug, Default)]
struct Tally {
    counts: Counts,
    latencies: Vec<Duration>,
    operations: BTreeSet<String>,
    valid_answered_2xx: usize,
}

/// The requests' outcomes, counted as they come and reported as they are.
#[derive(Debug, Default, Serialize)]
struct Counts {
    requests: usize,
    statuses: std::collections::BTreeMap<u16, usize>,
    unanswered: usize,
    /// Generated but not a valid URL (not sent, not counted in `requests`).
    not_sent: usize,
    /// Streams cut because another request paused or destroyed their sandbox meanwhile.
    cut_by_change: usize,
    findings: usize,
    /// The first ten findings.
    first_findings: Vec<Finding>,
}

impl Counts {
    fn found(&mut self, finding: Finding) {
        self.findings += 1;
        if self.first_findings.len() < 10 {
            self.first_findings.push(finding);
        }
    }
}

/// What the API part found.
#[derive(Debug, Serialize)]
struct ApiReport {
    seed: u64,
    operations_called: usize,
    operations_skipped: Vec<String>,
    successes: usize,
    #[serde(flatten)]
    counts: Counts,
    latency: Option<Summary>,
    healthy_after: bool,
    left_after: Vec<String>,
    daemon_before: Option<crate::check_cmd::DaemonSample>,
    daemon_after: Option<crate::check_cmd::DaemonSample>,
    secs: f64,
    passed: bool,
}

#[derive(Debug, Serialize)]
struct FuzzReport {
    api: ApiReport,
    agent: Option<kiln_testinfra::hostile_agent::FrameFuzzReport>,
    passed: bool,
}

/// Ids in the list answered by `path` (`sandboxes`, `snapshots`, `keys` or `templates`).
async fn listed(client: &Client, path: &str, field: &str, key: &str) -> Result<Vec<String>> {
    let response = client
        .send(
            client
                .request(Method::GET, path)
                .timeout(Duration::from_secs(60)),
        )
        .await?;
    let body: Value = response.json().await.context("malformed list")?;
    Ok(body
        .get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| item.get(key)?.as_str().map(str::to_owned))
        .collect())
}

/// Everything that exists for the fuzz's key, by kind; keys only for an admin key.
async fn inventory(client: &Client) -> Result<Known> {
    Ok(Known {
        sandboxes: listed(client, "/v1/sandboxes?limit=500", "sandboxes", "id").await?,
        snapshots: listed(client, "/v1/snapshots", "snapshots", "id").await?,
        keys: listed(client, "/v1/keys", "keys", "id")
            .await
            .unwrap_or_default(),
        templates: listed(client, "/v1/templates", "templates", "name").await?,
    })
}

/// What exists now and did not before.
fn made_since(before: &Known, now: &Known) -> Known {
    let new = |before: &[String], now: &[String]| {
        now.iter()
            .filter(|id| !before.contains(id))
            .cloned()
            .collect()
    };
    Known {
        sandboxes: new(&before.sandboxes, &now.sandboxes),
        snapshots: new(&before.snapshots, &now.snapshots),
        keys: new(&before.keys, &now.keys),
        templates: new(&before.templates, &now.templates),
    }
}

/// Destroys what the fuzz made; returns what could not be destroyed.
async fn clean_up(client: &Client, made: &Known) -> Vec<String> {
    let mut left = Vec::new();
    let kinds = [
        ("sandboxes", &made.sandboxes),
        ("snapshots", &made.snapshots),
        ("keys", &made.keys),
        ("templates", &made.templates),
    ];
    for (kind, ids) in kinds {
        for id in ids {
            let request = client
                .request(Method::DELETE, &format!("/v1/{kind}/{id}"))
                .timeout(Duration::from_secs(120));
            if let Err(e) = client.send(request).await {
                if !format!("{e:#}").contains("not found") {
                    left.push(format!("{kind}/{id}: {e:#}"));
                }
            }
        }
    }
    left
}

/// Runs the API fuzz, then the agent fuzz; prints the report; returns whether both passed.
pub async fn fuzz(client: &Client, options: &FuzzOptions) -> Result<bool> {
    ensure!(options.workers > 0, "--workers must be at least 1");
    let seed = options.seed.unwrap_or_else(rand::random);
    let api = api_fuzz(client, options, seed).await?;
    let agent = if options.frames > 0 {
        eprintln!(
            "fuzz: {} frames of hostile exec streams against the agent client ...",
            options.frames
        );
        Some(
            kiln_testinfra::hostile_agent::fuzz_exec_streams(options.frames, seed)
                .await
                .context("starting the fake agent")?,
        )
    } else {
        None
    };
    let passed = api.passed && agent.as_ref().is_none_or(|a| a.passed());
    let report = FuzzReport { api, agent, passed };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(passed)
}

async fn api_fuzz(client: &Client, options: &FuzzOptions, seed: u64) -> Result<ApiReport> {
    if let Some(pid) = options.daemon_pid {
        ensure!(
            crate::check_cmd::sample(pid, Instant::now()).is_some(),
            "no process {pid} to sample: --daemon-pid takes the daemon's pid on this host"
        );
    }
    let document: Value = client
        .json(client.request(Method::GET, "/v1/openapi.json"))
        .await
        .context("reading the daemon's OpenAPI document")?;
    let operations = Arc::new(operations(&document)?);
    let document = Arc::new(document);
    let before = inventory(client)
        .await
        .context("listing what exists before the fuzz")?;
    let base = Url::parse(client.url()).context("the daemon's URL")?;
    eprintln!(
        "fuzz: {} requests over {} operations of the OpenAPI document, seed {seed} ...",
        options.requests,
        operations.len()
    );
    let started = Instant::now();
    let daemon_before = options
        .daemon_pid
        .and_then(|pid| crate::check_cmd::sample(pid, started));
    // The sandboxes the fuzz works on; the templates it may name are all that exist.
    let known = Arc::new(Mutex::new(Known {
        templates: before.templates.clone(),
        ..Known::default()
    }));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let bare = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("an HTTP client")?;
    let mut workers = Vec::new();
    for worker in 0..options.workers {
        let (client, document, operations, known, tally, next, bare, base, before) = (
            client.clone(),
            document.clone(),
            operations.clone(),
            known.clone(),
            tally.clone(),
            next.clone(),
            bare.clone(),
            base.clone(),
            before.clone(),
        );
        let (template, total, verbose) =
            (options.template.clone(), options.requests, options.verbose);
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(worker as u64));
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total || tally.lock().await.counts.findings >= ENOUGH_FINDINGS {
                    break;
                }
                if n % 20 == 0 {
                    if let Err(e) = tend(&client, &before, &known, &template).await {
                        tally.lock().await.counts.found(Finding {
                            operation: "keeping the fuzz's sandboxes".into(),
                            method: String::new(),
                            url: String::new(),
                            status: None,
                            what: format!("{e:#}"),
                        });
                    }
                }
                let snapshot = known.lock().await.clone();
                let request = generate(&document, &operations, &base, &snapshot, &mut rng);
                send(&bare, &client, request, &tally, verbose).await;
            }
        }));
    }
    for worker in workers {
        worker.await.context("a fuzz worker panicked")?;
    }
    let secs = started.elapsed().as_secs_f64();
    // The daemon must still answer, and everything the fuzz made must go.
    let healthy_after = client
        .send(
            client
                .request(Method::GET, "/v1/health")
                .timeout(Duration::from_secs(30)),
        )
        .await
        .is_ok();
    let now = inventory(client)
        .await
        .context("listing what exists after the fuzz")?;
    let mut left_after = clean_up(client, &made_since(&before, &now)).await;
    let after = inventory(client).await?;
    let still = made_since(&before, &after);
    for (kind, ids) in [
        ("sandbox", &still.sandboxes),
        ("snapshot", &still.snapshots),
        ("key", &still.keys),
        ("template", &still.templates),
    ] {
        left_after.extend(ids.iter().map(|id| format!("{kind} {id}")));
    }
    let daemon_after = options
        .daemon_pid
        .and_then(|pid| crate::check_cmd::sample(pid, started));
    let tally = std::mem::take(&mut *tally.lock().await);
    let passed = tally.counts.findings == 0
        && tally.counts.unanswered == 0
        && healthy_after
        && left_after.is_empty();
    Ok(ApiReport {
        seed,
        operations_called: tally.operations.len(),
        operations_skipped: SKIPPED
            .iter()
            .map(|(m, p, why)| format!("{m} {p} ({why})"))
            .collect(),
        successes: tally.valid_answered_2xx,
        counts: tally.counts,
        latency: (!tally.latencies.is_empty()).then(|| Summary::of(&tally.latencies)),
        healthy_after,
        left_after,
        daemon_before,
        daemon_after,
        secs,
        passed,
    })
}

/// Keeps the fuzz's own sandboxes between one and [`MOST_SANDBOXES`]: learns the ones its
/// requests made (by create or fork), destroys those past the limit, makes one when none is
/// left.
async fn tend(client: &Client, before: &Known, known: &Mutex<Known>, template: &str) -> Result<()> {
    let now = inventory(client).await?;
    let mut made = made_since(before, &now);
    while made.sandboxes.len() > MOST_SANDBOXES {
        let extra = made.sandboxes.remove(0);
        // Gone meanwhile (destroyed by a fuzzed request, or its time to live ran out).
        if let Err(e) = crate::check_cmd::delete(client, &extra).await {
            if !format!("{e:#}").contains("not found") {
                return Err(e);
            }
        }
    }
    if made.sandboxes.is_empty() {
        made.sandboxes
            .push(crate::check_cmd::create(client, template).await?);
    }
    made.templates = now.templates;
    *known.lock().await = made;
    Ok(())
}

async fn send(
    bare: &reqwest::Client,
    client: &Client,
    request: Generated,
    tally: &Mutex<Tally>,
    verbose: bool,
) {
    let mut builder = bare.request(request.method.clone(), request.url.clone());
    builder = match request.key {
        KeyChoice::Given => match client.key() {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        },
        KeyChoice::None => builder,
        KeyChoice::Wrong => builder.bearer_auth("kiln_not_a_key"),
    };
    let body_len = request.body.as_ref().map_or(0, |(bytes, _)| bytes.len());
    if let Some((bytes, content_type)) = request.body {
        builder = builder.header("content-type", content_type).body(bytes);
    }
    let started = Instant::now();
    let outcome = match builder.send().await {
        Ok(response) => {
            let (status, finding) = judge(response).await;
            // A stream of a sandbox that another request paused or destroyed meanwhile
            // breaks off, as it should.
            if finding.as_deref().is_some_and(|f| f.starts_with(BROKE_OFF))
                && !still_running(client, &request.url).await
            {
                let counts = &mut tally.lock().await.counts;
                counts.requests += 1;
                counts.cut_by_change += 1;
                return;
            }
            (Some(status), finding)
        }
        Err(e) if e.is_builder() => {
            tally.lock().await.counts.not_sent += 1;
            return;
        }
        // A body the daemon refuses before reading it all (a wrong key, over its limit) is
        // read and dropped while its connection closes (`kiln_api::linger`), so even a body
        // larger than the sockets' buffers gets its answer: an error here is a finding.
        Err(e) => (None, Some(format!("no answer: {}", chain(&e)))),
    };
    if verbose {
        eprintln!(
            "{} {} ({body_len} bytes, key {:?}) -> {}",
            request.method,
            request.url,
            request.key,
            outcome.0.map_or("no answer".to_owned(), |s| s.to_string())
        );
    }
    let mut tally = tally.lock().await;
    tally.counts.requests += 1;
    tally.latencies.push(started.elapsed());
    tally.operations.insert(request.operation.clone());
    match outcome.0 {
        Some(status) => {
            *tally.counts.statuses.entry(status).or_default() += 1;
            if (200..300).contains(&status) {
                tally.valid_answered_2xx += 1;
            }
        }
        None => tally.counts.unanswered += 1,
    }
    if let Some(what) = outcome.1 {
        tally.counts.found(Finding {
            operation: request.operation,
            method: request.method.to_string(),
            url: request.url.to_string(),
            status: outcome.0,
            what,
        });
    }
}

fn print_report(report: &FuzzReport) {
    let api = &report.api;
    let counts = &api.counts;
    println!(
        "fuzz: API, {} requests over {} operations in {:.0} s (seed {})",
        counts.requests, api.operations_called, api.secs, api.seed
    );
    let statuses: Vec<String> = counts
        .statuses
        .iter()
        .map(|(status, count)| format!("{status}: {count}"))
        .collect();
    println!("  statuses        {}", statuses.join(", "));
    if let Some(latency) = &api.latency {
        println!(
            "  latency         p50 {:.1} ms, p99 {:.1} ms",
            latency.p50_ms, latency.p99_ms
        );
    }
    println!("  not called      {}", api.operations_skipped.join("; "));
    println!("  unanswered      {}", counts.unanswered);
    println!(
        "  cut short       {} streams of a sandbox paused or destroyed meanwhile",
        counts.cut_by_change
    );
    println!("  not sent        {} (not valid URLs)", counts.not_sent);
    println!("  findings        {}", counts.findings);
    for finding in &counts.first_findings {
        println!(
            "    {} {} -> {}: {}",
            finding.method,
            finding.url.chars().take(160).collect::<String>(),
            finding.status.map_or("-".to_owned(), |s| s.to_string()),
            finding.what
        );
    }
    println!("  healthy after   {}", api.healthy_after);
    println!("  left after      {}", api.left_after.len());
    for left in &api.left_after {
        println!("    {left}");
    }
    if let (Some(before), Some(after)) = (api.daemon_before, api.daemon_after) {
        println!(
            "  daemon          rss {:.1} -> {:.1} MiB, fds {} -> {}, threads {} -> {}",
            before.rss_mib,
            after.rss_mib,
            before.open_fds,
            after.open_fds,
            before.threads,
            after.threads
        );
    }
    if let Some(agent) = &report.agent {
        println!(
            "fuzz: agent client, {} frames in {} exec streams in {:.1} s (seed {})",
            agent.frames, agent.streams, agent.secs, agent.seed
        );
        println!(
            "  answered {}, refused {}, wrong {}; memory grew {} KiB (bound {} KiB)",
            agent.answered,
            agent.refused,
            agent.wrong,
            agent.rss_grown_kib,
            kiln_testinfra::hostile_agent::FrameFuzzReport::RSS_BOUND_KIB
        );
        for wrong in &agent.first_wrong {
            println!("    {wrong}");
        }
    }
    println!(
        "result: {}",
        if report.passed { "passed" } else { "FAILED" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> Value {
        serde_json::from_str(include_str!("../../../docs/openapi.json")).expect("document")
    }

    #[test]
    fn every_operation_but_the_skipped_ones_is_found() {
        let document = document();
        let found = operations(&document).expect("operations");
        let names: BTreeSet<String> = found.iter().map(Operation::name).collect();
        assert!(names.contains("POST /v1/sandboxes/{id}/exec"));
        assert!(names.contains("PUT /v1/sandboxes/{id}/files/content"));
        assert!(!names.contains("GET /v1/events"));
        let put = found
            .iter()
            .find(|o| o.name() == "PUT /v1/sandboxes/{id}/files/content")
            .expect("upload");
        assert!(matches!(put.body, Some(RequestBody::Bytes)));
    }

    #[test]
    fn valid_bodies_meet_their_schema_where_it_is_plain() {
        let document = document();
        let mut rng = StdRng::seed_from_u64(7);
        let known = Known::default();
        let schema = json!({"$ref": "#/components/schemas/ExecBody"});
        for _ in 0..200 {
            let body = valid(&document, &schema, "", &known, &mut rng, 0);
            let command = body.get("command").expect("command is required");
            assert!(command.is_string() || command.as_array().is_some_and(|a| !a.is_empty()));
        }
        let schema = json!({"$ref": "#/components/schemas/ForkBody"});
        for _ in 0..200 {
            let body = valid(&document, &schema, "", &known, &mut rng, 0);
            if let Some(count) = body.get("count").and_then(Value::as_i64) {
                assert!((1..=32).contains(&count), "{count}");
            }
        }
    }

    #[test]
    fn names_never_name_what_exists() {
        let document = document();
        let mut rng = StdRng::seed_from_u64(3);
        let known = Known {
            templates: vec!["base".into()],
            ..Known::default()
        };
        let schema = json!({"$ref": "#/components/schemas/BuildTemplateBody"});
        for _ in 0..200 {
            let body = valid(&document, &schema, "", &known, &mut rng, 0);
            assert_ne!(body.get("name").and_then(Value::as_str), Some("base"));
        }
    }

    #[test]
    fn the_same_seed_makes_the_same_requests() {
        let document = document();
        let found = operations(&document).expect("operations");
        let base = Url::parse("http://127.0.0.1:7070").expect("url");
        let known = Known::default();
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50)
                .map(|_| {
                    generate(&document, &found, &base, &known, &mut rng)
                        .url
                        .to_string()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }
}
