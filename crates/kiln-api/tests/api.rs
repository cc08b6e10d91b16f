//! The HTTP API in-process (the router driven with `tower::ServiceExt::oneshot`) over a real
//! control plane: real SQLite, real engine, real VMs of the `base` template under QEMU.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use kiln_control::Control;
use serde_json::{json, Value};
use tower::ServiceExt;

/// The tests of this file run one at a time: each runs real VMs, and three at once on a
/// 2-core host under TCG left one of them without its sandbox once.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Api {
    app: Router,
    /// `/metrics` alone, without a key (`kiln serve --metrics-listen`).
    metrics: Router,
    control: Control,
    _data: tempfile::TempDir,
}

async fn api() -> Api {
    api_with(None).await
}

/// A daemon whose tenants may have at most `max_sandboxes` live sandboxes each.
async fn api_with(max_sandboxes: Option<usize>) -> Api {
    api_configured(|config| config.quotas.sandboxes = max_sandboxes).await
}

/// A daemon of the test configuration as `change` leaves it.
async fn api_configured(change: impl FnOnce(&mut kiln_control::ControlConfig)) -> Api {
    let data = tempfile::tempdir().expect("data dir");
    let mut config = common::control_config(data.path());
    change(&mut config);
    let control = Control::open(config).await.expect("control plane");
    let kiln_api::Routers { api: app, metrics } = kiln_api::routers(
        control.clone(),
        kiln_api::ApiConfig {
            max_upload_bytes: 8 << 20,
            ..kiln_api::ApiConfig::default()
        },
    );
    Api {
        app,
        metrics,
        control,
        _data: data,
    }
}

/// The root filesystem artefact the (only) bake of template `name` was made from.
fn rootfs_of_bake(api: &Api, name: &str) -> std::path::PathBuf {
    let templates = api.control.config().engine.data_dir.join("templates");
    let found: Vec<std::path::PathBuf> = std::fs::read_dir(&templates)
        .expect("bakes")
        .flatten()
        .filter_map(|entry| kiln_engine::BakedTemplate::open(&entry.path()).ok())
        .filter(|baked| baked.meta.name == name && baked.meta.capture_of.is_none())
        .filter_map(|baked| {
            baked
                .meta
                .inputs
                .iter()
                .find(|(input, _)| input == "rootfs")
                .map(|(_, path)| std::path::PathBuf::from(path))
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    /// Its `X-Request-Id`, which every answer has.
    request_id: String,
    headers: axum::http::HeaderMap,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// An error reply: the status, and a `{code, message}` body.
    fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(body["request_id"], self.request_id.as_str(), "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
}

impl Api {
    async fn call(&self, method: Method, uri: &str, key: Option<&str>, body: Body) -> Reply {
        self.call_as(method, uri, key, Some("application/json"), body)
            .await
    }

    /// A call with `content_type` (or none).
    async fn call_as(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        content_type: Option<&str>,
        body: Body,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let request = request.body(body).expect("request");
        let response = self.app.clone().oneshot(request).await.expect("response");
        let status = response.status();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("an X-Request-Id header")
            .to_owned();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        Reply {
            status,
            body,
            request_id,
            headers,
        }
    }

    async fn json(&self, method: Method, uri: &str, key: &str, body: Value) -> Reply {
        self.call(method, uri, Some(key), Body::from(body.to_string()))
            .await
    }

    async fn get(&self, uri: &str, key: &str) -> Reply {
        self.call(Method::GET, uri, Some(key), Body::empty()).await
    }

    /// Waits (at most 10 s) until `path` exists in sandbox `id`: a command's readiness.
    async fn file_appears(&self, id: &str, path: &str, key: &str) -> bool {
        for _ in 0..200 {
            let uri = format!("/v1/sandboxes/{id}/files/stat?path={path}");
            if self.get(&uri, key).await.status == StatusCode::OK {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    async fn delete(&self, uri: &str, key: &str) -> Reply {
        self.call(Method::DELETE, uri, Some(key), Body::empty())
            .await
    }

    /// Runs `sleep 60` in sandbox `id` and, 2 s into it, `change` (another request); checks
    /// that the change is answered `changed`, and the call it cut `cut_status` with a
    /// message that says `why`.
    async fn cut_by(
        &self,
        (id, key): (&str, &str),
        change: impl std::future::Future<Output = Reply>,
        changed: StatusCode,
        (cut_status, why): (StatusCode, &str),
    ) {
        let exec_uri = format!("/v1/sandboxes/{id}/exec");
        let (cut, change) = tokio::join!(
            self.json(
                Method::POST,
                &exec_uri,
                key,
                json!({ "command": "sleep 60" })
            ),
            async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                change.await
            }
        );
        assert_eq!(
            change.status,
            changed,
            "{:?}",
            String::from_utf8_lossy(&change.body)
        );
        assert_eq!(cut.status, cut_status, "{}", cut.json());
        assert!(
            cut.json()["message"]
                .as_str()
                .is_some_and(|m| m.contains(why)),
            "{}",
            cut.json()
        );
    }

    fn key(&self, tenant: &str, admin: bool) -> String {
        let store =
            kiln_control::open_store(&self.control.config().engine.data_dir).expect("store");
        kiln_control::mint_key(&store, tenant, "test", admin)
            .expect("key")
            .1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_exec_files_tenants_and_bad_input() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let api = api().await;
    let alice = api.key("alice", false);
    let bob = api.key("bob", false);

    // Open routes and the OpenAPI document: the one in the repository (`kiln-api`'s unit
    // test holds that to the code) with this daemon's own bounds.
    let health = api
        .call(Method::GET, "/v1/health", None, Body::empty())
        .await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json()["status"], "ok");
    let openapi = api
        .call(Method::GET, "/v1/openapi.json", None, Body::empty())
        .await;
    assert_eq!(openapi.status, StatusCode::OK);
    let document = openapi.json();
    assert!(document["paths"]["/v1/sandboxes/{id}/exec"].is_object());
    let max_ttl = &document["components"]["schemas"]["CreateSandboxBody"]["properties"]["ttl_secs"]
        ["maximum"];
    assert_eq!(max_ttl, 3600, "this daemon's --max-ttl-secs");
    let mut committed: Value = serde_json::from_str(
        &std::fs::read_to_string(kiln_testinfra::repo_root().join("docs/openapi.json"))
            .expect("docs/openapi.json"),
    )
    .expect("JSON");
    for schema in ["CreateSandboxBody", "ForkBody", "UpdateSandboxBody"] {
        committed["components"]["schemas"][schema]["properties"]["ttl_secs"]["maximum"] =
            3600.into();
    }
    assert!(
        document == committed,
        "the served document is docs/openapi.json with this daemon's bounds"
    );

    // Request ids: made for each request, or the caller's own if it is a sane one.
    assert!(
        health.request_id.starts_with("req_"),
        "{}",
        health.request_id
    );
    assert_ne!(health.request_id, openapi.request_id);
    let traced = Request::builder()
        .uri("/v1/sandboxes/sb-absent")
        .header("authorization", format!("Bearer {alice}"))
        .header("x-request-id", "trace-7.a_b")
        .body(Body::empty())
        .expect("request");
    let traced = api.app.clone().oneshot(traced).await.expect("response");
    assert_eq!(traced.headers()["x-request-id"], "trace-7.a_b");
    let body = traced.into_body().collect().await.expect("body").to_bytes();
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(body["request_id"], "trace-7.a_b", "{body}");

    // Authentication.
    api.call(Method::GET, "/v1/sandboxes", None, Body::empty())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    api.get("/v1/sandboxes", "kiln_not-a-key")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    api.get("/v1/nowhere", &alice)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // Bad create requests are refused before anything starts.
    for (body, status, code) in [
        (
            json!({"template": "no-such"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            json!({"template": "../etc"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"ttl_secs": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"ttl_secs": 999999}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"cpus": 64}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"surprise": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (json!([1, 2]), StatusCode::BAD_REQUEST, "invalid_request"),
    ] {
        api.json(Method::POST, "/v1/sandboxes", &alice, body.clone())
            .await
            .assert_error(status, code);
    }
    api.call(
        Method::POST,
        "/v1/sandboxes",
        Some(&alice),
        Body::from("{not json"),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    // Bodies are JSON objects (serde alone would read `[]` as a create with defaults).
    for body in ["[]", "[null, null]", "42", "\"text\"", "null"] {
        let refused = api
            .call(
                Method::POST,
                "/v1/sandboxes",
                Some(&alice),
                Body::from(body),
            )
            .await;
        refused.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
        let message = refused.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.contains("must be a JSON object"),
            "{body}: {message}"
        );
    }
    let untyped = api
        .call_as(
            Method::POST,
            "/v1/sandboxes",
            Some(&alice),
            None,
            Body::from("{}"),
        )
        .await;
    untyped.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    assert!(
        untyped.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("Content-Type: application/json")),
        "{}",
        untyped.json()
    );
    let huge = format!("{{\"metadata\": {{\"a\": \"{}\"}}}}", "x".repeat(2 << 20));
    api.call(
        Method::POST,
        "/v1/sandboxes",
        Some(&alice),
        Body::from(huge),
    )
    .await
    .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");

    // Create, get, list with filters and pages.
    let created = api
        .json(
            Method::POST,
            "/v1/sandboxes",
            &alice,
            json!({"metadata": {"team": "red"}, "env": {"GREETING": "hello"}, "ttl_secs": 300}),
        )
        .await;
    assert_eq!(
        created.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let sandbox = created.json();
    let id = sandbox["id"].as_str().expect("id").to_owned();
    assert_eq!(sandbox["state"], "running");
    assert_eq!(sandbox["template"], "base");
    assert_eq!(sandbox["ttl_secs"], 300);
    let second = api
        .json(
            Method::POST,
            "/v1/sandboxes",
            &alice,
            json!({"metadata": {"team": "blue"}}),
        )
        .await
        .json();
    let second_id = second["id"].as_str().expect("id").to_owned();
    assert_eq!(
        api.get(&format!("/v1/sandboxes/{id}"), &alice).await.json()["id"],
        id
    );
    let red = api
        .get("/v1/sandboxes?metadata.team=red", &alice)
        .await
        .json();
    assert_eq!(red["sandboxes"].as_array().expect("list").len(), 1);
    let page = api.get("/v1/sandboxes?limit=1", &alice).await.json();
    assert_eq!(page["sandboxes"][0]["id"], id);
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let page = api
        .get(&format!("/v1/sandboxes?limit=1&cursor={cursor}"), &alice)
        .await
        .json();
    assert_eq!(page["sandboxes"][0]["id"], second_id);
    api.get("/v1/sandboxes?cursor=garbage", &alice)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.get("/v1/sandboxes?state=sleeping", &alice)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    // Tenants: bob sees nothing of alice's, and gets 404 (not 403) for everything.
    assert_eq!(
        api.get("/v1/sandboxes", &bob).await.json()["sandboxes"],
        json!([])
    );
    let exec_echo = json!({"command": "echo $GREETING; echo oops >&2; exit 3"});
    for (method, uri, body) in [
        (Method::GET, format!("/v1/sandboxes/{id}"), Value::Null),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/exec"),
            exec_echo.clone(),
        ),
        (
            Method::GET,
            format!("/v1/sandboxes/{id}/files?path=/"),
            Value::Null,
        ),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/keepalive"),
            Value::Null,
        ),
        (Method::DELETE, format!("/v1/sandboxes/{id}"), Value::Null),
    ] {
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        api.call(method, &uri, Some(&bob), body)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
    }

    // Exec to completion: output, exit code, the sandbox's env, stdin, limits, timeouts.
    let run = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            exec_echo,
        )
        .await
        .json();
    assert_eq!(run["stdout"], "hello\n");
    assert_eq!(run["stderr"], "oops\n");
    assert_eq!(run["exit_code"], 3);
    let run = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": ["wc", "-c"], "stdin": "12345"}),
        )
        .await
        .json();
    assert_eq!(run["stdout"].as_str().map(str::trim), Some("5"));
    // A command that ends without reading its stdin: its exit is the answer, not an error
    // about the input it never took.
    let response = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": "exit 7", "stdin": "x".repeat(512 << 10)}),
        )
        .await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.json()["exit_code"], 7);
    let run = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": "head -c 100000 /dev/zero | tr '\\0' a", "max_output_bytes": 1000}),
        )
        .await
        .json();
    assert_eq!(run["truncated"], true);
    assert_eq!(run["stdout"].as_str().map(str::len), Some(1000));
    let run = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": "sleep 30", "timeout_ms": 300}),
        )
        .await
        .json();
    assert_eq!(run["timed_out"], true);
    for bad in [
        json!({"command": ""}),
        json!({"command": []}),
        json!({"command": 7}),
    ] {
        let reply = api
            .json(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                &alice,
                bad,
            )
            .await;
        assert!(reply.status.is_client_error(), "{}", reply.status);
    }
    let missing = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": ["/no/such/binary"]}),
        )
        .await;
    assert!(missing.status.is_client_error(), "{}", missing.status);

    // Streamed exec: newline-delimited events in order.
    let streamed = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec/stream"),
            &alice,
            json!({"command": "echo one; echo two >&2; exit 4"}),
        )
        .await;
    assert_eq!(streamed.status, StatusCode::OK);
    let events: Vec<Value> = String::from_utf8_lossy(&streamed.body)
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event per line"))
        .collect();
    assert_eq!(events.first().expect("start")["type"], "start");
    assert_eq!(events.last().expect("exit")["type"], "exit");
    assert_eq!(events.last().expect("exit")["exit_code"], 4);
    let text = |kind: &str| -> String {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .filter_map(|e| e["data"].as_str())
            .collect()
    };
    assert_eq!(text("stdout"), "one\n");
    assert_eq!(text("stderr"), "two\n");

    // Background commands: started, listed, attached (history replayed), signalled.
    let started = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": "trap 'echo bye; exit 0' TERM; echo ready; touch /tmp/ready; while true; do sleep 0.1; done", "background": true, "tag": "server"}),
        )
        .await;
    assert_eq!(started.status, StatusCode::ACCEPTED);
    let pid = started.json()["pid"].as_u64().expect("pid");
    let processes = api
        .get(&format!("/v1/sandboxes/{id}/processes"), &alice)
        .await
        .json();
    assert!(processes
        .as_array()
        .expect("list")
        .iter()
        .any(|p| p["pid"] == pid && p["running"] == true && p["tag"] == "server"));
    // Signal only once the trap is set.
    assert!(
        api.file_appears(&id, "/tmp/ready", &alice).await,
        "the background command never got ready"
    );
    let signalled = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/processes/server/signal"),
            &alice,
            json!({"signal": 15}),
        )
        .await;
    assert_eq!(signalled.status, StatusCode::NO_CONTENT);
    let attached = api
        .get(
            &format!("/v1/sandboxes/{id}/processes/{pid}/stream"),
            &alice,
        )
        .await;
    let replay = String::from_utf8_lossy(&attached.body);
    assert!(
        replay.contains("ready") && replay.contains("bye") && replay.contains("\"exit_code\":0"),
        "{replay}"
    );
    api.json(
        Method::POST,
        &format!("/v1/sandboxes/{id}/processes/server/signal"),
        &alice,
        json!({"signal": 99}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    // Stdin kept open, written and closed from other requests; a terminal resized.
    let cat = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": ["sh", "-c", "cat; echo done"], "background": true,
                   "stdin": "first ", "open_stdin": true, "tag": "cat"}),
        )
        .await;
    assert_eq!(cat.status, StatusCode::ACCEPTED);
    let stdin_uri = format!("/v1/sandboxes/{id}/processes/cat/stdin");
    let wrote = api
        .json(Method::POST, &stdin_uri, &alice, json!({"data": "second "}))
        .await;
    assert_eq!(wrote.status, StatusCode::NO_CONTENT, "{:?}", wrote.json());
    let wrote = api
        .json(
            Method::POST,
            &stdin_uri,
            &alice,
            json!({"data_b64": "dGhpcmQ=", "close": true}),
        )
        .await;
    assert_eq!(wrote.status, StatusCode::NO_CONTENT);
    let replay = api
        .get(&format!("/v1/sandboxes/{id}/processes/cat/stream"), &alice)
        .await;
    let replay = String::from_utf8_lossy(&replay.body);
    // The output comes in as many frames as the guest's reads made: joined, it is whole.
    let stdout: String = replay
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["type"] == "stdout")
        .filter_map(|event| event["data"].as_str().map(str::to_owned))
        .collect();
    assert!(
        stdout.contains("first second third") && stdout.contains("done"),
        "{replay}"
    );
    api.json(Method::POST, &stdin_uri, &alice, json!({"data": "late"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.json(Method::POST, &stdin_uri, &alice, json!({"data_b64": "%%"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let terminal = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": "stty size; touch /tmp/sized; read line; stty size",
                   "background": true, "pty": {"rows": 24, "cols": 80}}),
        )
        .await;
    let pid = terminal.json()["pid"].as_u64().expect("pid");
    let process = format!("/v1/sandboxes/{id}/processes/{pid}");
    assert!(
        api.file_appears(&id, "/tmp/sized", &alice).await,
        "the terminal command never printed its first size"
    );
    let resized = api
        .json(
            Method::POST,
            &format!("{process}/resize"),
            &alice,
            json!({"rows": 40, "cols": 100}),
        )
        .await;
    assert_eq!(resized.status, StatusCode::NO_CONTENT);
    api.json(
        Method::POST,
        &format!("{process}/stdin"),
        &alice,
        json!({"data": "\n"}),
    )
    .await;
    let replay = api.get(&format!("{process}/stream"), &alice).await;
    let replay = String::from_utf8_lossy(&replay.body);
    assert!(
        replay.contains("24 80") && replay.contains("40 100"),
        "{replay}"
    );
    api.json(
        Method::POST,
        &format!("/v1/sandboxes/{id}/processes/cat/resize"),
        &alice,
        json!({"rows": 1, "cols": 1}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    // Files: upload, download, stat, list, mkdir, rename, remove; bad paths.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let uploaded = api
        .call(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files/content?path=/root/data/blob.bin"),
            Some(&alice),
            Body::from(payload.clone()),
        )
        .await;
    assert_eq!(
        uploaded.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&uploaded.body)
    );
    assert_eq!(uploaded.json()["bytes"], payload.len());
    let downloaded = api
        .get(
            &format!("/v1/sandboxes/{id}/files/content?path=/root/data/blob.bin"),
            &alice,
        )
        .await;
    assert_eq!(downloaded.status, StatusCode::OK);
    assert!(downloaded.body == payload, "downloaded bytes differ");
    let stat = api
        .get(
            &format!("/v1/sandboxes/{id}/files/stat?path=/root/data/blob.bin"),
            &alice,
        )
        .await
        .json();
    assert_eq!(stat["kind"], "file");
    assert_eq!(stat["size"], payload.len());
    assert_eq!(
        api.json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/files/mkdir"),
            &alice,
            json!({"path": "/root/a/b/c"})
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/files/rename"),
            &alice,
            json!({"from": "/root/data/blob.bin", "to": "/root/a/blob.bin"})
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    let listing = api
        .get(
            &format!("/v1/sandboxes/{id}/files?path=/root/a&depth=2"),
            &alice,
        )
        .await
        .json();
    let paths: Vec<&str> = listing["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert!(
        paths.contains(&"/root/a/blob.bin") && paths.contains(&"/root/a/b/c"),
        "{paths:?}"
    );
    // Not-found messages say what was not found, plainly.
    let gone = api
        .get(
            &format!("/v1/sandboxes/{id}/files/content?path=/root/data/blob.bin"),
            &alice,
        )
        .await;
    gone.assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        gone.json()["message"],
        "path `/root/data/blob.bin` does not exist"
    );
    let no_command = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": ["nosuchcmd"]}),
        )
        .await;
    no_command.assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        no_command.json()["message"],
        "command `nosuchcmd` not found"
    );
    let no_process = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/processes/nope/signal"),
            &alice,
            json!({"signal": 15}),
        )
        .await;
    no_process.assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        no_process.json()["message"],
        "process `nope` not found: no process with that tag was started here"
    );
    // A directory where a file is asked for: what the guest holds decides, so a conflict.
    api.get(
        &format!("/v1/sandboxes/{id}/files/content?path=/root/a"),
        &alice,
    )
    .await
    .assert_error(StatusCode::CONFLICT, "conflict");
    // A file that opens but cannot be read is an error status, not a 200 cut short.
    api.get(
        &format!("/v1/sandboxes/{id}/files/content?path=/proc/self/mem"),
        &alice,
    )
    .await
    .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "guest_error");
    // Through symbolic links: a directory is refused before the response starts (not a
    // stream cut after a 200), a file's size is the target's.
    let linked = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            &alice,
            json!({"command": ["sh", "-c",
                "ln -s /root/a /root/dir-link && ln -s /root/a/blob.bin /root/file-link"]}),
        )
        .await;
    assert_eq!(linked.json()["exit_code"], 0, "{:?}", linked.json());
    api.get(
        &format!("/v1/sandboxes/{id}/files/content?path=/root/dir-link"),
        &alice,
    )
    .await
    .assert_error(StatusCode::CONFLICT, "conflict");
    let through_link = api
        .get(
            &format!("/v1/sandboxes/{id}/files/content?path=/root/file-link"),
            &alice,
        )
        .await;
    assert_eq!(through_link.status, StatusCode::OK);
    assert_eq!(
        through_link.headers["x-kiln-file-size"],
        payload.len().to_string().as_str()
    );
    assert!(
        through_link.body == payload,
        "bytes read through a link differ"
    );
    api.get(
        &format!("/v1/sandboxes/{id}/files/stat?path=relative/path"),
        &alice,
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.get(
        &format!("/v1/sandboxes/{id}/files?path=/root&depth=99"),
        &alice,
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let removed = api
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}/files?path=/root/a&recursive=true"),
            Some(&alice),
            Body::empty(),
        )
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    // An upload over the limit writes nothing.
    api.call(
        Method::PUT,
        &format!("/v1/sandboxes/{id}/files/content?path=/root/big.bin"),
        Some(&alice),
        Body::from(vec![0u8; 9 << 20]),
    )
    .await
    .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    api.get(
        &format!("/v1/sandboxes/{id}/files/stat?path=/root/big.bin"),
        &alice,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");

    // Interactive sessions over a WebSocket (a real server on loopback): stdin, a terminal
    // and its resize, bad control messages reported without ending the session.
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let app = api.app.clone();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let connect = |key: String| {
            let url = format!("ws://{address}/v1/sandboxes/{id}/exec/ws");
            async move {
                let mut request = url.into_client_request().expect("request");
                request.headers_mut().insert(
                    "authorization",
                    format!("Bearer {key}").parse().expect("header"),
                );
                tokio_tungstenite::connect_async(request).await
            }
        };
        // Until `exit`: the events' text on stdout, and the exit code.
        async fn collect(
            rx: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
                      + Unpin),
        ) -> (String, Vec<Value>, Option<i64>) {
            let (mut out, mut errors) = (String::new(), Vec::new());
            while let Some(Ok(message)) = rx.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let event: Value = serde_json::from_str(&text).expect("JSON event");
                match event["type"].as_str() {
                    Some("stdout") => out.push_str(event["data"].as_str().unwrap_or_default()),
                    Some("error") => errors.push(event),
                    Some("exit") => return (out, errors, event["exit_code"].as_i64()),
                    _ => {}
                }
            }
            (out, errors, None)
        }
        let (socket, _) = connect(alice.clone()).await.expect("connect");
        let (mut tx, mut rx) = socket.split();
        tx.send(Message::Text(json!({"command": ["cat"]}).to_string()))
            .await
            .expect("start");
        tx.send(Message::Binary(b"hello over ws\n".to_vec()))
            .await
            .expect("stdin");
        tx.send(Message::Text(
            json!({"type": "signal", "signal": 0}).to_string(),
        ))
        .await
        .expect("bad");
        tx.send(Message::Text(json!({"type": "close_stdin"}).to_string()))
            .await
            .expect("eof");
        let (out, errors, code) = collect(&mut rx).await;
        assert_eq!(out, "hello over ws\n");
        assert_eq!(code, Some(0));
        assert_eq!(errors.len(), 1, "the bad signal is reported: {errors:?}");

        let (socket, _) = connect(alice.clone()).await.expect("connect");
        let (mut tx, mut rx) = socket.split();
        let start = json!({"command": "sh", "pty": {"rows": 24, "cols": 80}});
        tx.send(Message::Text(start.to_string()))
            .await
            .expect("start");
        tx.send(Message::Text(
            json!({"type": "resize", "rows": 40, "cols": 100}).to_string(),
        ))
        .await
        .expect("resize");
        tx.send(Message::Text(
            json!({"type": "stdin", "data": "stty size; exit 3\n"}).to_string(),
        ))
        .await
        .expect("stdin");
        let (out, _, code) = collect(&mut rx).await;
        assert!(
            out.contains("40 100"),
            "terminal size after resize: {out:?}"
        );
        assert_eq!(code, Some(3));

        // Another tenant cannot open one.
        match connect(bob.clone()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 404)
            }
            other => panic!("bob got a session: {:?}", other.map(|_| ())),
        }
        server.abort();
    }

    // Templates of one's own: built from a spec in the request with streamed progress, used,
    // invisible to other tenants, deletable; global ones are read-only.
    // Its start command (a web server) runs before the bake's snapshot, as the template's
    // user, with its environment, and is running in every sandbox made from it.
    let spec = r#"name = "mine"
description = "alice's"
packages = ["busybox"]
env = { GREETING = "hello from the spec" }
workdir = "/srv"
user = "nobody"
[base]
suite = "bookworm"
[start]
command = "mkdir -p /tmp/www && printf '%s as %s\n' \"$GREETING\" \"$(id -un)\" > /tmp/www/index.html && exec busybox httpd -f -p 8080 -h /tmp/www"
readiness = { tcp_port = 8080 }
timeout_secs = 60
[resources]
disk_mib = 768
"#;
    let build = api
        .json(Method::POST, "/v1/templates", &alice, json!({"spec": spec}))
        .await;
    assert_eq!(
        build.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&build.body)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&build.body)
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event per line"))
        .collect();
    let last = events.last().expect("events");
    assert_eq!(last["type"], "ready", "{events:?}");
    assert_eq!(last["template"]["global"], false);
    assert!(events
        .iter()
        .any(|e| e["type"] == "step" || e["type"] == "cached"));
    api.json(
        Method::POST,
        "/v1/templates",
        &alice,
        json!({"spec": "name = \"x\""}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let with_run = spec.replace("[base]", "run = [\"id\"]\n[base]");
    api.json(
        Method::POST,
        "/v1/templates",
        &alice,
        json!({"spec": with_run}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.json(
        Method::POST,
        "/v1/templates",
        &alice,
        json!({"spec": spec.replace("\"mine\"", "\"base\"")}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "conflict");
    let mine = api
        .json(
            Method::POST,
            "/v1/sandboxes",
            &alice,
            json!({"template": "mine"}),
        )
        .await
        .json();
    let mine_id = mine["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a sandbox of the tenant's template: {mine}"))
        .to_owned();
    let run = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{mine_id}/exec"),
            &alice,
            json!({"command": "df -m / | awk 'NR==2 {print $2}'"}),
        )
        .await
        .json();
    let mib: u64 = run["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .parse()
        .expect("size");
    assert!(
        (600..=768).contains(&mib),
        "the template's own disk size: {mib} MiB"
    );
    let run = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{mine_id}/exec"),
            &alice,
            json!({"command": "busybox wget -qO- http://127.0.0.1:8080/index.html; id -un; pwd"}),
        )
        .await
        .json();
    assert_eq!(
        run["stdout"], "hello from the spec as nobody\nnobody\n/srv\n",
        "{run}"
    );
    api.get("/v1/templates/mine", &bob)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    api.json(
        Method::POST,
        "/v1/sandboxes",
        &bob,
        json!({"template": "mine"}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    api.call(
        Method::DELETE,
        "/v1/templates/base",
        Some(&alice),
        Body::empty(),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // The root filesystem `mine` was built into, in the image cache.
    let rootfs = rootfs_of_bake(&api, "mine");
    assert!(rootfs.join("rootfs.ext4").is_file(), "{}", rootfs.display());
    let deleted = api
        .call(
            Method::DELETE,
            "/v1/templates/mine",
            Some(&alice),
            Body::empty(),
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    api.get("/v1/templates/mine", &alice)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert!(rootfs.is_dir(), "removed while a sandbox runs on its bake");
    api.call(
        Method::DELETE,
        &format!("/v1/sandboxes/{mine_id}"),
        Some(&alice),
        Body::empty(),
    )
    .await;
    // With its last sandbox, the deleted template's bake and root filesystem are gone.
    assert!(!rootfs.exists(), "{} left in the cache", rootfs.display());

    // Time to live.
    let kept = api
        .json(
            Method::PATCH,
            &format!("/v1/sandboxes/{id}"),
            &alice,
            json!({"ttl_secs": 1200}),
        )
        .await
        .json();
    assert_eq!(kept["ttl_secs"], 1200);
    let alive = api
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/keepalive"),
            Some(&alice),
            Body::empty(),
        )
        .await;
    assert_eq!(alive.status, StatusCode::OK);
    let logs = api
        .get(&format!("/v1/sandboxes/{id}/logs?lines=5"), &alice)
        .await;
    assert_eq!(logs.status, StatusCode::OK);

    // A crashed sandbox: failed with a reason, exec refused with a conflict, still deletable.
    let pid = api
        .control
        .engine()
        .get(&second_id)
        .expect("live")
        .pid()
        .expect("running");
    nix_kill(pid);
    let mut failed = Value::Null;
    for _ in 0..100 {
        failed = api
            .get(&format!("/v1/sandboxes/{second_id}"), &alice)
            .await
            .json();
        if failed["state"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("signal")),
        "{failed}"
    );
    api.json(
        Method::POST,
        &format!("/v1/sandboxes/{second_id}/exec"),
        &alice,
        json!({"command": "true"}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "conflict");

    // Keys: only admins manage them; a revoked key stops working.
    api.json(Method::POST, "/v1/keys", &alice, json!({"name": "x"}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let admin = api.key("alice", true);
    api.json(
        Method::POST,
        "/v1/keys",
        &admin,
        json!({"tenant": "bob", "admin": true}),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let made = api
        .json(Method::POST, "/v1/keys", &admin, json!({"name": "ci"}))
        .await;
    assert_eq!(made.status, StatusCode::CREATED);
    let made = made.json();
    let secret = made["secret"]
        .as_str()
        .expect("secret shown once")
        .to_owned();
    assert_eq!(
        api.get("/v1/sandboxes", &secret).await.status,
        StatusCode::OK
    );
    let listed = api.get("/v1/keys", &admin).await.json();
    assert!(listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .all(|k| k.get("secret").is_none()));
    let revoked = api
        .call(
            Method::DELETE,
            &format!("/v1/keys/{}", made["id"].as_str().expect("id")),
            Some(&admin),
            Body::empty(),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    api.get("/v1/sandboxes", &secret)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    // A key cannot revoke itself: a tenant could be left without an admin key.
    let own = listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["admin"] == true)
        .and_then(|k| k["id"].as_str())
        .expect("the admin key is listed")
        .to_owned();
    api.call(
        Method::DELETE,
        &format!("/v1/keys/{own}"),
        Some(&admin),
        Body::empty(),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "conflict");
    assert_eq!(api.get("/v1/keys", &admin).await.status, StatusCode::OK);

    // A sandbox's usage, measured on the host, for its tenant only.
    let usage = api
        .get(&format!("/v1/sandboxes/{id}/metrics"), &alice)
        .await;
    assert_eq!(usage.status, StatusCode::OK);
    let usage = usage.json();
    assert_eq!(usage["sandbox_id"], id.as_str());
    for figure in [
        "cpu_seconds",
        "memory_bytes",
        "memory_limit_bytes",
        "disk_bytes",
    ] {
        assert!(
            usage[figure].as_f64().is_some_and(|v| v > 0.0),
            "{figure}: {usage}"
        );
    }
    assert!(usage["memory_limit_bytes"].as_f64() >= usage["memory_bytes"].as_f64());
    // This daemon has no sandbox networking (tests/network.rs counts bytes).
    assert!(usage.get("network_tx_bytes").is_none(), "{usage}");
    api.get(&format!("/v1/sandboxes/{id}/metrics"), &bob)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // Metrics: for admin keys, in the Prometheus text format, naming no sandbox.
    api.get("/metrics", &alice)
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    api.call(Method::GET, "/metrics", None, Body::empty())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    let scraped = api.get("/metrics", &admin).await;
    assert_eq!(scraped.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&scraped.body);
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    // `id` runs; `second_id` failed above.
    assert_eq!(
        value("kiln_sandboxes{state=\"running\",template=\"base\"}"),
        1.0
    );
    assert_eq!(
        value("kiln_sandboxes{state=\"failed\",template=\"base\"}"),
        1.0
    );
    assert!(
        value("kiln_http_requests_total{method=\"POST\",route=\"/v1/sandboxes\",status=\"201\"}")
            >= 2.0
    );
    assert!(value("kiln_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/sandboxes/{id}/exec\"}") >= 1.0);
    assert!(value("kiln_api_errors_total{code=\"forbidden\"}") >= 1.0);
    assert!(value("kiln_process_resident_memory_bytes") > 0.0);
    assert!(value("kiln_process_open_fds") > 0.0);
    assert!(value("kiln_data_disk_available_bytes") > 0.0);
    assert!(value("kiln_data_disk_reserve_bytes") > 0.0);
    // The running sandbox's disk, at least.
    assert!(value("kiln_sandbox_disk_used_bytes") > 0.0);
    assert!(value("kiln_sandbox_disk_headroom_bytes") > 0.0);
    assert_eq!(value("kiln_sandbox_disk_budget_bytes"), 0.0);
    value("kiln_prestarted_vmms");
    assert!(value("kiln_template_preparations_total{outcome=\"ready\"}") >= 1.0);
    value("kiln_process_cpu_seconds_total");
    assert!(!text.contains(&id) && !text.contains(&second_id), "{text}");

    // Delete: gone from the API and from the host.
    let netns = format!("/run/netns/kiln-{id}");
    assert!(std::path::Path::new(&netns).exists());
    for sandbox in [&id, &second_id] {
        let deleted = api
            .call(
                Method::DELETE,
                &format!("/v1/sandboxes/{sandbox}"),
                Some(&alice),
                Body::empty(),
            )
            .await;
        assert_eq!(deleted.status, StatusCode::NO_CONTENT);
        api.get(&format!("/v1/sandboxes/{sandbox}"), &alice)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
    }
    assert!(
        !std::path::Path::new(&netns).exists(),
        "network namespace left"
    );
    assert_eq!(
        api.get("/v1/sandboxes", &alice).await.json()["sandboxes"],
        json!([])
    );
    api.control.shutdown().await;
}

fn nix_kill(pid: u32) {
    // SAFETY: kill takes a pid and a signal; the pid is the VMM of a sandbox this test made.
    let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_fork_and_expiry() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let api = api().await;
    let alice = api.key("alice", false);
    let bob = api.key("bob", false);
    let created = api
        .json(
            Method::POST,
            "/v1/sandboxes",
            &alice,
            json!({"template": "base", "auto_resume": false}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.json());
    let sandbox = created.json();
    assert_eq!(sandbox["state"], "running");
    assert_eq!(sandbox["auto_resume"], false);
    assert_eq!(sandbox["on_expiry"], "destroy");
    let id = sandbox["id"].as_str().expect("id").to_owned();
    let exec = |command: &'static str| {
        let (api, alice, id) = (&api, alice.clone(), id.clone());
        async move {
            api.json(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                &alice,
                json!({ "command": command }),
            )
            .await
        }
    };
    assert_eq!(exec("echo kept > /root/kept").await.status, StatusCode::OK);

    let pause_uri = format!("/v1/sandboxes/{id}/pause");
    let pause = || api.json(Method::POST, &pause_uri, &alice, json!({}));
    // A call under way when another request pauses the sandbox is answered with that (409),
    // not with a 503 that says "try again".
    api.cut_by(
        (&id, &alice),
        pause(),
        StatusCode::OK,
        (StatusCode::CONFLICT, "paused while the call ran"),
    )
    .await;
    let resumed = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.json());
    // Paused: listed as such; calls that need it running get 409 while auto_resume is off.
    let paused = pause().await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.json());
    assert_eq!(paused.json()["state"], "paused");
    assert_eq!(
        api.get(&format!("/v1/sandboxes/{id}"), &alice).await.json()["state"],
        "paused"
    );
    let listed = |state: &'static str| {
        let (api, alice) = (&api, alice.clone());
        async move {
            api.get(&format!("/v1/sandboxes?state={state}"), &alice)
                .await
                .json()["sandboxes"]
                .as_array()
                .expect("sandboxes")
                .iter()
                .map(|s| s["id"].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("paused").await, vec![id.clone()]);
    assert!(listed("running").await.is_empty());
    let refused = exec("true").await;
    refused.assert_error(StatusCode::CONFLICT, "conflict");
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("paused"),
        "{}",
        refused.json()
    );
    // Another tenant's and unknown sandboxes are not found.
    api.json(
        Method::POST,
        &format!("/v1/sandboxes/{id}/resume"),
        &bob,
        json!({}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    api.json(
        Method::POST,
        "/v1/sandboxes/sb-000000000000/pause",
        &alice,
        json!({}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");

    // auto_resume on: an exec resumes it; two at once share one resume.
    let patched = api
        .json(
            Method::PATCH,
            &format!("/v1/sandboxes/{id}"),
            &alice,
            json!({"auto_resume": true}),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK);
    assert_eq!(patched.json()["auto_resume"], true);
    let (first, second) = tokio::join!(exec("cat /root/kept"), exec("cat /root/kept"));
    for reply in [first, second] {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
        assert_eq!(reply.json()["stdout"], "kept\n");
    }
    assert_eq!(
        api.get(&format!("/v1/sandboxes/{id}"), &alice).await.json()["state"],
        "running"
    );
    // The explicit resume of a running sandbox changes nothing.
    let again = api
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["state"], "running");

    // Fork (of the parent paused: it is resumed first): two children continuing from the
    // parent (its file), metadata merged, the parent named; a bad count is a 400 and another
    // tenant's sandbox is not found.
    let paused = pause().await;
    assert_eq!(paused.json()["state"], "paused");
    let fork_uri = format!("/v1/sandboxes/{id}/fork");
    for count in [0, 33] {
        api.json(Method::POST, &fork_uri, &alice, json!({ "count": count }))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    api.json(Method::POST, &fork_uri, &bob, json!({}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let forked = api
        .json(
            Method::POST,
            &fork_uri,
            &alice,
            json!({"count": 2, "metadata": {"branch": "b"}}),
        )
        .await;
    assert_eq!(forked.status, StatusCode::CREATED, "{}", forked.json());
    let forked = forked.json();
    assert!(
        forked["bytes_written"].as_u64().unwrap_or(0) > 0,
        "{forked}"
    );
    let children: Vec<String> = forked["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .map(|child| {
            assert_eq!(child["parent_id"], id.as_str(), "{child}");
            assert_eq!(child["metadata"]["branch"], "b", "{child}");
            assert_eq!(child["state"], "running", "{child}");
            child["id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(children.len(), 2);
    assert_eq!(
        api.get(&format!("/v1/sandboxes/{id}"), &alice).await.json()["state"],
        "running",
        "a paused parent is resumed to be forked"
    );
    for child in &children {
        let read = api
            .json(
                Method::POST,
                &format!("/v1/sandboxes/{child}/exec"),
                &alice,
                json!({ "command": "cat /root/kept; hostname" }),
            )
            .await;
        assert_eq!(read.json()["stdout"], format!("kept\n{child}\n"));
        // A call under way when the sandbox is destroyed is answered 404, as the next is.
        let child_uri = format!("/v1/sandboxes/{child}");
        api.cut_by(
            (child, &alice),
            api.delete(&child_uri, &alice),
            StatusCode::NO_CONTENT,
            (StatusCode::NOT_FOUND, "destroyed while the call ran"),
        )
        .await;
    }

    // on_expiry pause: its time to live running out pauses it, with the paused retention.
    let patched = api
        .json(
            Method::PATCH,
            &format!("/v1/sandboxes/{id}"),
            &alice,
            json!({"on_expiry": "pause", "ttl_secs": 1}),
        )
        .await;
    assert_eq!(patched.json()["on_expiry"], "pause");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let body = loop {
        let body = api.get(&format!("/v1/sandboxes/{id}"), &alice).await.json();
        if body["state"] == "paused" || std::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(body["state"], "paused", "{body}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let kept_for = body["expires_at_ms"].as_i64().expect("retention") - now_ms;
    assert!(
        kept_for > 3_000_000,
        "kept for the paused retention (an hour): {body}"
    );

    let deleted = api.delete(&format!("/v1/sandboxes/{id}"), &alice).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert!(api.control.engine().list().is_empty());
    api.control.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_outlive_their_sandbox() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let api = api().await;
    let alice = api.key("alice", false);
    let bob = api.key("bob", false);
    let exec = |id: String, command: String| {
        let (api, alice) = (&api, alice.clone());
        async move {
            let reply = api
                .json(
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/exec"),
                    &alice,
                    json!({ "command": command }),
                )
                .await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.json());
            reply.json()["stdout"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
    };
    let created = api
        .json(
            Method::POST,
            "/v1/sandboxes",
            &alice,
            json!({"template": "base"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let source = created.json()["id"].as_str().expect("id").to_owned();
    exec(
        source.clone(),
        "echo disk > /root/kept && mkdir -p /mnt/ram && mount -t tmpfs ram /mnt/ram && echo ram > /mnt/ram/kept".into(),
    )
    .await;

    // Taken, named; a taken name is a 409, a bad one a 400, another tenant's sandbox 404.
    let uri = format!("/v1/sandboxes/{source}/snapshots");
    let taken = api
        .json(Method::POST, &uri, &alice, json!({"name": "first"}))
        .await;
    assert_eq!(taken.status, StatusCode::CREATED, "{}", taken.json());
    let snapshot = taken.json();
    assert_eq!(snapshot["name"], "first");
    assert_eq!(snapshot["sandbox_id"], source.as_str());
    assert!(
        snapshot["size_bytes"].as_i64().unwrap_or(0) > 0,
        "{snapshot}"
    );
    let snapshot_id = snapshot["id"].as_str().expect("id").to_owned();
    api.json(Method::POST, &uri, &alice, json!({"name": "first"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    api.json(Method::POST, &uri, &alice, json!({"name": "Not a name"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    api.json(Method::POST, &uri, &bob, json!({"name": "mine"}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let listed = api.get("/v1/snapshots", &alice).await.json();
    assert_eq!(
        listed["snapshots"][0]["id"],
        snapshot_id.as_str(),
        "{listed}"
    );
    assert_eq!(
        api.get("/v1/snapshots/first", &alice).await.json()["id"],
        snapshot_id.as_str()
    );
    api.get("/v1/snapshots/first", &bob)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // The source goes; three sandboxes from the snapshot, each whole and independent.
    let gone = api.delete(&format!("/v1/sandboxes/{source}"), &alice).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    api.json(
        Method::POST,
        "/v1/sandboxes",
        &alice,
        json!({"template": "base", "snapshot": "first"}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    let mut made = Vec::new();
    for i in 0..3 {
        let key = if i == 0 {
            snapshot_id.clone()
        } else {
            "first".to_owned()
        };
        let created = api
            .json(
                Method::POST,
                "/v1/sandboxes",
                &alice,
                json!({ "snapshot": key }),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.json());
        let id = created.json()["id"].as_str().expect("id").to_owned();
        assert_eq!(
            exec(id.clone(), "cat /root/kept /mnt/ram/kept; hostname".into()).await,
            format!("disk\nram\n{id}\n")
        );
        exec(id.clone(), format!("echo {i} > /root/mine")).await;
        made.push(id);
    }
    for id in &made {
        let seen = exec(id.clone(), "cat /root/mine".into()).await;
        assert_eq!(
            seen.trim(),
            made.iter().position(|m| m == id).expect("made").to_string()
        );
    }

    // Deleting it while sandboxes stand on it is a 409 naming them; afterwards it goes.
    let refused = api.delete("/v1/snapshots/first", &alice).await;
    refused.assert_error(StatusCode::CONFLICT, "conflict");
    let message = refused.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        made.iter().all(|id| message.contains(id.as_str())),
        "{message}"
    );
    for id in &made {
        let gone = api.delete(&format!("/v1/sandboxes/{id}"), &alice).await;
        assert_eq!(gone.status, StatusCode::NO_CONTENT);
    }
    let deleted = api.delete("/v1/snapshots/first", &alice).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    api.get("/v1/snapshots/first", &alice)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let templates = api.control.config().engine.data_dir.join("templates");
    let left: Vec<String> = std::fs::read_dir(&templates)
        .expect("templates")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("snap-") || name.starts_with("fork-"))
        .collect();
    assert!(left.is_empty(), "snapshot files left: {left:?}");
    api.control.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_is_held_to_its_quota_of_live_sandboxes() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let api = api_with(Some(2)).await;
    let alice = api.key("alice", false);
    let bob = api.key("bob", false);
    let create = |key: String| {
        let api = &api;
        async move {
            api.json(
                Method::POST,
                "/v1/sandboxes",
                &key,
                json!({"ttl_secs": 300}),
            )
            .await
        }
    };

    // Three at once race for two slots: each create holds its slot while it is made, so
    // exactly two are made.
    let (a, b, c) = tokio::join!(
        create(alice.clone()),
        create(alice.clone()),
        create(alice.clone())
    );
    let made: Vec<String> = [&a, &b, &c]
        .iter()
        .filter(|reply| reply.status == StatusCode::CREATED)
        .map(|reply| reply.json()["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        made.len(),
        2,
        "{:?} {:?} {:?}",
        a.status,
        b.status,
        c.status
    );
    for reply in [&a, &b, &c] {
        if reply.status != StatusCode::CREATED {
            reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
        }
    }
    let first = made[0].clone();

    // A third, or a fork, is refused with a message that says what to do.
    let refused = create(alice.clone()).await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    let message = refused.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("at most 2") && message.contains("destroy"),
        "{message}"
    );
    api.json(
        Method::POST,
        &format!("/v1/sandboxes/{first}/fork"),
        &alice,
        json!({"count": 1}),
    )
    .await
    .assert_error(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
    // Refusals leave nothing behind: still two, and another tenant is not affected.
    let listed = api.get("/v1/sandboxes", &alice).await.json();
    assert_eq!(
        listed["sandboxes"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    let other = create(bob.clone()).await;
    assert_eq!(other.status, StatusCode::CREATED, "{:?}", other.json());

    // The refusals are counted, on the operator's metrics address too (no key there).
    let scrape = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .expect("request");
    let scraped = api.metrics.clone().oneshot(scrape).await.expect("response");
    assert_eq!(scraped.status(), StatusCode::OK);
    let text = scraped
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("kiln_api_errors_total{code=\"quota_exceeded\"} 3\n")
            && text.contains("kiln_sandboxes{state=\"running\",template=\"base\"} 3\n"),
        "{text}"
    );

    // A destroyed sandbox frees its slot.
    let deleted = api
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{first}"),
            Some(&alice),
            Body::empty(),
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let again = create(alice.clone()).await;
    assert_eq!(again.status, StatusCode::CREATED, "{:?}", again.json());
    for key in [&alice, &bob] {
        let listed = api.get("/v1/sandboxes", key).await.json();
        for sandbox in listed["sandboxes"].as_array().expect("list") {
            let id = sandbox["id"].as_str().expect("id");
            api.call(
                Method::DELETE,
                &format!("/v1/sandboxes/{id}"),
                Some(key),
                Body::empty(),
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_is_held_to_its_resource_quotas_and_caps() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // `base`: 1 vCPU, 256 MiB (its VMM's limit 512 MiB), a 1024 MiB disk.
    let api = api_configured(|config| {
        config.quotas = kiln_control::TenantQuotas {
            cpus: Some(1.5),
            memory_mib: Some(1000),
            disk_mib: Some(3072),
            templates: Some(1),
            ..kiln_control::TenantQuotas::default()
        };
        config.spec_caps.build_time = std::time::Duration::from_secs(2);
    })
    .await;
    let alice = api.key("alice", false);
    let create = |body: Value| {
        let (api, alice) = (&api, &alice);
        async move { api.json(Method::POST, "/v1/sandboxes", alice, body).await }
    };
    let made = |reply: &Reply| -> String {
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json());
        reply.json()["id"].as_str().expect("id").to_owned()
    };
    let refused = |reply: &Reply, says: &str| {
        reply.assert_error(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded");
        let message = reply.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(says), "{message}");
    };

    let first = made(&create(json!({"ttl_secs": 300, "cpus": 1.0})).await);
    // A second at the template's 1 vCPU passes the 1.5 cores.
    refused(&create(json!({"ttl_secs": 300})).await, "cores");
    // Half a core fits, but not with the VMM's default 512 MiB more memory, nor with a
    // 2100 MiB disk.
    refused(
        &create(json!({"ttl_secs": 300, "cpus": 0.5})).await,
        "MiB of memory",
    );
    refused(
        &create(json!({"ttl_secs": 300, "cpus": 0.5, "memory_mib": 400, "disk_mib": 2100})).await,
        "MiB of disk",
    );
    let second = made(&create(json!({"ttl_secs": 300, "cpus": 0.5, "memory_mib": 400})).await);
    // A fork's children hold what their parent does.
    refused(
        &api.json(
            Method::POST,
            &format!("/v1/sandboxes/{second}/fork"),
            &alice,
            json!({"count": 1}),
        )
        .await,
        "cores",
    );
    // A destroyed sandbox gives its share back.
    let deleted = api.delete(&format!("/v1/sandboxes/{first}"), &alice).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let third = made(&create(json!({"ttl_secs": 300, "cpus": 1.0})).await);

    // Template specs: the operator's caps (400), the quota of templates (429), and the
    // build time (the stream's last event).
    let spec = |name: &str, packages: &str| {
        format!(
            "name = \"{name}\"\npackages = [{packages}]\n[base]\nsuite = \"bookworm\"\n\
             [resources]\nvcpus = 1\nmemory_mib = 256\ndisk_mib = 768\n"
        )
    };
    let too_big = spec("big", "").replace("vcpus = 1", "vcpus = 64");
    let reply = api
        .json(
            Method::POST,
            "/v1/templates",
            &alice,
            json!({"spec": too_big}),
        )
        .await;
    reply.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        reply.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("resources.vcpus") && m.contains("at most 8")),
        "{:?}",
        reply.json()
    );
    let last_event = |reply: &Reply| -> Value {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        let text = String::from_utf8_lossy(&reply.body).into_owned();
        serde_json::from_str(text.lines().last().expect("events")).expect("an event")
    };
    // Installing real packages takes longer than the 2 s this daemon allows a build.
    let slow = api
        .json(
            Method::POST,
            "/v1/templates",
            &alice,
            json!({"spec": spec("slow", "\"python3\"")}),
        )
        .await;
    let last = last_event(&slow);
    assert_eq!(
        (last["type"].as_str(), last["code"].as_str()),
        (Some("error"), Some("quota_exceeded")),
        "{last}"
    );
    assert!(
        last["message"].as_str().is_some_and(|m| m.contains("2 s")),
        "{last}"
    );
    // `slow` is saved, so a second template is past the quota of one; replacing `slow` is
    // not, and once it is deleted there is room again.
    refused(
        &api.json(
            Method::POST,
            "/v1/templates",
            &alice,
            json!({"spec": spec("other", "")}),
        )
        .await,
        "templates of at most 1",
    );
    let replaced = api
        .json(
            Method::POST,
            "/v1/templates",
            &alice,
            json!({"spec": spec("slow", "\"no-such-package-in-debian\"")}),
        )
        .await;
    assert_eq!(last_event(&replaced)["type"], "error");
    let deleted = api.delete("/v1/templates/slow", &alice).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let other = api
        .json(
            Method::POST,
            "/v1/templates",
            &alice,
            json!({"spec": spec("other", "\"no-such-package-in-debian\"")}),
        )
        .await;
    // Saved (the stream started); its build fails, by the package or by the deadline.
    assert_eq!(last_event(&other)["type"], "error");

    for id in [second, third] {
        let deleted = api.delete(&format!("/v1/sandboxes/{id}"), &alice).await;
        assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    }
    api.control.shutdown().await;
}
