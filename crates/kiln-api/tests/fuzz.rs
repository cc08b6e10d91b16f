//! Property-based fuzzing of the API: random methods, routes (real and mangled ids, hostile
//! path segments), query strings and bodies (random JSON, mutated valid bodies, raw bytes)
//! against a real control plane with a live sandbox. No request may get a 5xx, every error
//! must be a JSON `{code, message}`, and the daemon must keep answering.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use kiln_control::Control;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use tower::ServiceExt;

const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/templates"),
    ("GET", "/v1/templates/{name}"),
    ("POST", "/v1/templates"),
    ("DELETE", "/v1/templates/{name}"),
    ("GET", "/v1/sandboxes"),
    ("POST", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes/{id}"),
    ("PATCH", "/v1/sandboxes/{id}"),
    ("DELETE", "/v1/sandboxes/{id}"),
    ("POST", "/v1/sandboxes/{id}/keepalive"),
    ("GET", "/v1/sandboxes/{id}/logs"),
    ("POST", "/v1/sandboxes/{id}/exec"),
    ("POST", "/v1/sandboxes/{id}/exec/stream"),
    ("GET", "/v1/sandboxes/{id}/exec/ws"),
    ("GET", "/v1/sandboxes/{id}/processes"),
    ("GET", "/v1/sandboxes/{id}/processes/{process}/stream"),
    ("POST", "/v1/sandboxes/{id}/processes/{process}/signal"),
    ("GET", "/v1/sandboxes/{id}/files"),
    ("DELETE", "/v1/sandboxes/{id}/files"),
    ("GET", "/v1/sandboxes/{id}/files/content"),
    ("PUT", "/v1/sandboxes/{id}/files/content"),
    ("GET", "/v1/sandboxes/{id}/files/stat"),
    ("POST", "/v1/sandboxes/{id}/files/mkdir"),
    ("POST", "/v1/sandboxes/{id}/files/rename"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("DELETE", "/v1/keys/{id}"),
];

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::PATCH),
        Just(Method::DELETE),
    ]
}

/// A path segment: mostly hostile.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_owned()),
        Just("%2e%2e%2f%2e%2e".to_owned()),
        Just("%00".to_owned()),
        Just("base".to_owned()),
        Just("sb-000000000000".to_owned()),
        "[a-zA-Z0-9_.~-]{0,40}",
        "[0-9]{1,12}",
        "(%[0-9a-fA-F]{2}){1,8}",
    ]
}

fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("path".to_owned()),
        Just("depth".to_owned()),
        Just("recursive".to_owned()),
        Just("limit".to_owned()),
        Just("cursor".to_owned()),
        Just("state".to_owned()),
        Just("lines".to_owned()),
        Just("metadata.team".to_owned()),
        "[a-z.]{1,10}",
    ];
    let value = prop_oneof![
        Just("/".to_owned()),
        Just("/etc/passwd".to_owned()),
        Just("/root/../../etc".to_owned()),
        Just("/proc/self/mem".to_owned()),
        Just("-1".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("true".to_owned()),
        "[ -~]{0,30}",
    ];
    proptest::collection::vec((key, value), 0..4).prop_map(|pairs| {
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            serializer.append_pair(&k, &v);
        }
        serializer.finish()
    })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "[ -~]{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("command".to_owned()),
                    Just("template".to_owned()),
                    Just("ttl_secs".to_owned()),
                    Just("metadata".to_owned()),
                    Just("path".to_owned()),
                    Just("signal".to_owned()),
                    Just("timeout_ms".to_owned()),
                    "[a-z_]{1,10}",
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Valid bodies with one field replaced by a random value.
fn mutated_body() -> impl Strategy<Value = Value> {
    let bases = vec![
        json!({"command": "echo fuzz", "timeout_ms": 2000}),
        json!({"command": ["true"], "max_output_bytes": 10}),
        json!({"template": "base", "ttl_secs": 60}),
        json!({"path": "/tmp/fuzz"}),
        json!({"from": "/tmp/a", "to": "/tmp/b"}),
        json!({"signal": 15}),
        json!({"ttl_secs": 60}),
        json!({"name": "k", "admin": false}),
    ];
    (
        proptest::sample::select(bases),
        "[a-z_]{1,12}",
        json_value(),
    )
        .prop_map(|(mut base, field, value)| {
            if let Some(object) = base.as_object_mut() {
                let key = object.keys().next().cloned().unwrap_or(field);
                object.insert(key, value);
            }
            base
        })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        mutated_body().prop_map(|v| v.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

#[test]
fn random_requests_never_get_a_server_error() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let data = tempfile::tempdir().expect("data dir");
    let (app, control, key, id) = runtime.block_on(async {
        let config = common::control_config(data.path());
        let control = Control::open(config).await.expect("control plane");
        let store = kiln_control::open_store(data.path()).expect("store");
        let (_, key) = kiln_control::mint_key(&store, "fuzz", "fuzz", true).expect("key");
        let app = kiln_api::router(
            control.clone(),
            kiln_api::ApiConfig {
                max_upload_bytes: 1 << 20,
                ..kiln_api::ApiConfig::default()
            },
        );
        let sandbox = control
            .create_sandbox(
                &control.authenticate(&key).expect("principal"),
                kiln_control::CreateSandbox::default(),
            )
            .await
            .expect("a sandbox to aim at");
        (app, control, key, sandbox.id)
    });

    let cases: u32 = std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::option::weighted(0.1, method()),
        proptest::sample::select(ROUTES),
        proptest::bool::weighted(0.8),
        segment(),
        segment(),
        query(),
        body(),
        proptest::bool::weighted(0.9),
    );
    let tally = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let result = runner.run(
        &strategy,
        |(
            other_method,
            (route_method, route),
            real_id,
            segment_a,
            segment_b,
            query,
            body,
            authenticated,
        )| {
            let method = other_method
                .unwrap_or_else(|| Method::from_bytes(route_method.as_bytes()).expect("method"));
            // Keep the sandbox under fire alive: deleting it would leave only 404s to test.
            if real_id && method == Method::DELETE && route == "/v1/sandboxes/{id}" {
                return Ok(());
            }
            let sandbox = if real_id {
                id.clone()
            } else {
                segment_a.clone()
            };
            let path = route
                .replace("{id}", &sandbox)
                .replace("{name}", &segment_a)
                .replace("{process}", &segment_b);
            let uri = if query.is_empty() {
                path
            } else {
                format!("{path}?{query}")
            };
            let Ok(mut request) = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header("content-type", "application/json")
                .body(Body::from(body))
            else {
                // Not a valid URI: nothing to send.
                return Ok(());
            };
            if authenticated {
                request.headers_mut().insert(
                    "authorization",
                    format!("Bearer {key}").parse().expect("header"),
                );
            }
            let (status, bytes) = runtime.block_on(async {
                let response =
                    tokio::time::timeout(Duration::from_secs(60), app.clone().oneshot(request))
                        .await
                        .expect("the API answers in time")
                        .expect("infallible");
                let status = response.status();
                let bytes =
                    tokio::time::timeout(Duration::from_secs(60), response.into_body().collect())
                        .await
                        .map(|r| r.map(|b| b.to_bytes().to_vec()).unwrap_or_default())
                        .unwrap_or_default();
                (status, bytes)
            });
            *tally
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(status.as_u16())
                .or_default() += 1;
            if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
                return Err(TestCaseError::fail(format!(
                    "{method} {uri} -> {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )));
            }
            if status.is_client_error() || status.is_server_error() {
                let error: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    TestCaseError::fail(format!(
                        "{method} {uri} -> {status} without a JSON error ({e}): {}",
                        String::from_utf8_lossy(&bytes)
                    ))
                })?;
                if !(error["code"].is_string() && error["message"].is_string()) {
                    return Err(TestCaseError::fail(format!(
                        "{method} {uri} -> {status}: {error}"
                    )));
                }
            }
            Ok(())
        },
    );
    eprintln!(
        "statuses: {:?}",
        tally.lock().unwrap_or_else(|p| p.into_inner())
    );
    // Whatever happened, the daemon still answers.
    runtime.block_on(async {
        let health = app
            .clone()
            .oneshot(
                Request::builder()
                    .uri("/v1/health")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(health.status(), StatusCode::OK);
        control.shutdown().await;
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
