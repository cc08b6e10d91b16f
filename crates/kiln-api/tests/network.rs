//! The API with sandbox networking, over a real loopback socket: network policies at create
//! and changed live (PATCH), and ingress to what a guest serves, by host name (with the
//! sandbox's access token, or public) and by path (with an API key), HTTP and WebSocket,
//! without the daemon's credentials ever reaching the guest. Egress ends in a test internet
//! namespace the test makes. Real VMs of the `python` template under QEMU.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use kiln_control::Control;
use serde_json::{json, Value};

struct Daemon {
    _cleanup: kiln_testinfra::internet::ShutdownOnDrop,
    url: String,
    addr: SocketAddr,
    control: Control,
    http: reqwest::Client,
    _data: tempfile::TempDir,
    _internet: kiln_testinfra::internet::TestInternet,
}

async fn daemon() -> Daemon {
    let mut internet = kiln_testinfra::internet::TestInternet::new(0);
    let upstream = internet.start_dns();
    let data = tempfile::tempdir().expect("data dir");
    let mut config = common::control_config(data.path());
    config.engine.network = Some(kiln_network::NetworkConfig {
        dns_upstreams: vec![upstream],
        ..internet.network_config()
    });
    config.default_template = "python".into();
    config.forwards = Some(kiln_control::ForwardConfig {
        address: "127.0.0.1".parse().expect("address"),
        ports: 41000..=41999,
    });
    let control = Control::open(config).await.expect("control plane");
    let cleanup = kiln_testinfra::internet::ShutdownOnDrop(
        control.engine().network().expect("networking").clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("addr");
    let app = kiln_api::router(
        control.clone(),
        kiln_api::ApiConfig {
            ingress_port: Some(addr.port()),
            ..kiln_api::ApiConfig::default()
        },
    );
    tokio::spawn(async move {
        let _ = axum::serve(
            kiln_api::linger::LingeringListener::new(listener),
            app.into_make_service_with_connect_info::<kiln_api::linger::ClientAddr>(),
        )
        .await;
    });
    Daemon {
        _cleanup: cleanup,
        url: format!("http://{addr}"),
        addr,
        control,
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        _data: data,
        _internet: internet,
    }
}

impl Daemon {
    fn key(&self, tenant: &str) -> String {
        let store =
            kiln_control::open_store(&self.control.config().engine.data_dir).expect("store");
        kiln_control::mint_key(&store, tenant, "test", false)
            .expect("key")
            .1
    }

    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("response");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A request by host name for `port` of sandbox `id`, with `headers`.
    async fn by_host(
        &self,
        id: &str,
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let mut request = self.http.get(format!("{}{path}", self.url)).header(
            "host",
            format!("{port}-{id}.localhost:{}", self.addr.port()),
        );
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("response");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    async fn sh(&self, key: &str, id: &str, script: &str) -> String {
        let (status, body) = self
            .api(
                reqwest::Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                key,
                Some(json!({"command": script})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["exit_code"], 0, "{script}: {body}");
        body["stdout"].as_str().unwrap_or_default().to_owned()
    }
}

/// Serves, in the guest, the request's path and headers as JSON on port 8000, and a
/// WebSocket echo on port 8001 (Python's standard library only).
const GUEST_SERVERS: &str = r#"
mkdir -p /srv && cat > /srv/echo.py <<'EOF'
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
EOF
cat > /srv/ws.py <<'EOF'
import base64, hashlib, socket, threading
def handle(c):
    data = b""
    while b"\r\n\r\n" not in data:
        more = c.recv(4096)
        if not more:
            return
        data += more
    key = [l.split(b":", 1)[1].strip() for l in data.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:")][0]
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    while True:
        head = c.recv(2)
        if len(head) < 2:
            return
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        mask = c.recv(4)
        payload = b""
        while len(payload) < length:
            payload += c.recv(length - len(payload))
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if opcode == 8:
            return
        out = b"echo: " + payload
        c.sendall(bytes([0x81, len(out)]) + out)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8001))
s.listen(8)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
EOF
nohup python3 /srv/echo.py >/dev/null 2>&1 &
nohup python3 /srv/ws.py >/dev/null 2>&1 &
echo started
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_ports_through_the_api() {
    let d = daemon().await;
    let alice = d.key("alice");
    let bob = d.key("bob");
    use reqwest::Method;

    // Bad policies are 400s that name the problem.
    let (status, body) = d
        .api(
            Method::POST,
            "/v1/sandboxes",
            &alice,
            Some(json!({"network": {"allow_out": ["not a name!"]}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("network.allow_out")),
        "{body}"
    );
    let (status, body) = d
        .api(
            Method::POST,
            "/v1/sandboxes",
            &alice,
            Some(json!({"network": {"internet": false, "allow_out": ["169.254.169.254"]}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("always denied")),
        "{body}"
    );

    // A sandbox with a policy; GET shows it and the ports' URL and token.
    let (status, sandbox) = d
        .api(
            Method::POST,
            "/v1/sandboxes",
            &alice,
            Some(
                json!({"network": {"internet": false, "allow_out": ["web.test", "*.other.test"]}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{sandbox}");
    let id = sandbox["id"].as_str().expect("id").to_owned();
    assert_eq!(
        sandbox["network"],
        json!({"internet": false, "allow_out": ["web.test", "*.other.test"], "deny_out": []})
    );
    let token = sandbox["ports"]["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    assert_eq!(sandbox["ports"]["public"], false);
    assert_eq!(
        sandbox["ports"]["url"],
        format!("http://{{port}}-{id}.localhost:{}/", d.addr.port())
    );
    // PATCH changes the policy alone; the time to live stays.
    let uri = format!("/v1/sandboxes/{id}");
    let patch = |body: Value| d.api(Method::PATCH, &uri, &alice, Some(body));
    let ttl = sandbox["ttl_secs"].clone();
    let (status, patched) = patch(json!({"network": {"internet": true}})).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["network"]["internet"], true);
    assert_eq!(patched["ttl_secs"], ttl);
    // Limits travel with the policy (and go when a policy without them replaces it); out of
    // range is a 400 that leaves the policy as it was.
    let limited = json!({"internet": true, "bandwidth_mbit": 50, "max_connections": 500});
    let (status, patched) = patch(json!({ "network": limited })).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        (
            &patched["network"]["bandwidth_mbit"],
            &patched["network"]["max_connections"]
        ),
        (&json!(50), &json!(500))
    );
    let (status, body) = patch(json!({"network": {"internet": true, "bandwidth_mbit": 0}})).await;
    assert_eq!(status, 400, "{body}");
    let (_, shown) = d
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), &alice, None)
        .await;
    assert_eq!(shown["network"]["max_connections"], 500, "{shown}");
    let (status, patched) = patch(json!({"network": {"internet": true}})).await;
    assert_eq!(status, 200, "{patched}");
    assert!(
        patched["network"].get("bandwidth_mbit").is_none(),
        "{patched}"
    );
    let (status, body) = patch(json!({})).await;
    assert_eq!(status, 400, "nothing to change: {body}");
    let (status, _) = d
        .api(
            Method::PATCH,
            &format!("/v1/sandboxes/{id}"),
            &bob,
            Some(json!({"network": {"internet": false}})),
        )
        .await;
    assert_eq!(status, 404, "another tenant's sandbox");

    // Ingress: start the guest's servers, wait until they answer.
    assert_eq!(d.sh(&alice, &id, GUEST_SERVERS).await.trim(), "started");
    let mut ready = false;
    for _ in 0..100 {
        if d.by_host(&id, 8000, "/", &[("x-kiln-access-token", &token)])
            .await
            .0
            == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "the guest's server answers through ingress");

    // By host name: the token is required, by header or query; nothing of it (nor the API
    // key, nor a client's forwarded-for) reaches the guest, which sees the client's address.
    let (status, body) = d.by_host(&id, 8000, "/", &[]).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = d
        .by_host(&id, 8000, "/", &[("x-kiln-access-token", "kiln_at_wrong")])
        .await;
    assert_eq!(status, 401);
    let (status, _) = d
        .by_host(
            "sb-000000000000",
            8000,
            "/",
            &[("x-kiln-access-token", &token)],
        )
        .await;
    assert_eq!(status, 401, "another sandbox's token opens nothing");
    let (status, body) = d
        .by_host(
            &id,
            8000,
            &format!("/app?x=1&kiln_token={token}"),
            &[
                ("authorization", &format!("Bearer {alice}")),
                ("x-forwarded-for", "203.0.113.99"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(seen["path"], "/app?x=1");
    let headers = seen["headers"].as_object().expect("headers");
    assert!(!headers.contains_key("authorization"), "{headers:?}");
    assert!(!headers.contains_key("x-kiln-access-token"), "{headers:?}");
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(
        !body.contains(&alice) && !body.contains(&token),
        "no credential reached the guest"
    );

    // The traffic through its link shows in its usage (the host's veth end, read on the host).
    let (status, usage) = d
        .api(
            Method::GET,
            &format!("/v1/sandboxes/{id}/metrics"),
            &alice,
            None,
        )
        .await;
    assert_eq!(status, 200, "{usage}");
    // The guest answered the requests above: a few hundred bytes out, at least.
    assert!(
        usage["network_tx_bytes"].as_u64().is_some_and(|b| b > 200),
        "{usage}"
    );
    assert!(
        usage["network_rx_bytes"].as_u64().is_some_and(|b| b > 200),
        "{usage}"
    );

    // By path, with an API key; only the owner's.
    let (status, seen) = d
        .api(
            Method::GET,
            &format!("/v1/sandboxes/{id}/ports/8000/deep/path?q=2"),
            &alice,
            None,
        )
        .await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["path"], "/deep/path?q=2");
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    let (status, body) = d
        .api(
            Method::GET,
            &format!("/v1/sandboxes/{id}/ports/8000/"),
            &bob,
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains(&id)),
        "not found: the sandbox, for bob: {body}"
    );
    let (status, seen) = d
        .api(
            Method::GET,
            &format!("/v1/sandboxes/{id}/ports/8000/"),
            &alice,
            None,
        )
        .await;
    assert_eq!((status, seen["path"].as_str()), (200, Some("/")), "{seen}");
    let (status, body) = d
        .api(
            Method::GET,
            &format!("/v1/sandboxes/{id}/ports/8999/"),
            &alice,
            None,
        )
        .await;
    assert_eq!(status, 502, "nothing listens there: {body}");

    // WebSocket through the host form.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}/", d.addr)
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "host",
        format!("8001-{id}.localhost:{}", d.addr.port())
            .parse()
            .expect("header"),
    );
    request
        .headers_mut()
        .insert("x-kiln-access-token", token.parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket");
    ws.send(tokio_tungstenite::tungstenite::Message::Text("ping".into()))
        .await
        .expect("send");
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("in time")
        .expect("a message")
        .expect("not an error");
    assert_eq!(reply.into_text().expect("text").as_str(), "echo: ping");

    // Plain TCP forwarding: a host port carried to the guest's port 8000, bytes as they are
    // (here an HTTP request written by hand).
    let forwards = format!("/v1/sandboxes/{id}/forwards");
    let (status, forward) = d
        .api(Method::POST, &forwards, &alice, Some(json!({"port": 8000})))
        .await;
    assert_eq!(status, 201, "{forward}");
    let address: SocketAddr = forward["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("an address: {forward}"));
    assert!(address.ip().is_loopback() && (41000..=41999).contains(&address.port()));
    let raw = raw_request(address, "/raw").await;
    assert!(
        raw.starts_with("HTTP/1.0 200") && raw.contains(r#""path": "/raw""#),
        "{raw}"
    );
    let (status, again) = d
        .api(Method::POST, &forwards, &alice, Some(json!({"port": 8000})))
        .await;
    assert_eq!(
        (status, &again["address"]),
        (200, &forward["address"]),
        "the same forward"
    );
    let (status, listed) = d.api(Method::GET, &forwards, &alice, None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["forwards"], json!([forward]));
    for (key, body, expected) in [
        (&bob, json!({"port": 8000}), 404),
        (&alice, json!({"port": 0}), 400),
    ] {
        let (status, body) = d.api(Method::POST, &forwards, key, Some(body)).await;
        assert_eq!(status, expected, "{body}");
    }
    let closing = format!("{forwards}/8000");
    let (status, _) = d.api(Method::DELETE, &closing, &alice, None).await;
    assert_eq!(status, 204);
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "closed"
    );
    let (status, _) = d.api(Method::DELETE, &closing, &alice, None).await;
    assert_eq!(status, 404);
    // One left open goes with its sandbox (checked after the destroy below; that it comes
    // back with a restarted daemon is kiln-cli's tests/daemon.rs).
    let (status, left_open) = d
        .api(Method::POST, &forwards, &alice, Some(json!({"port": 8000})))
        .await;
    assert_eq!(status, 201, "{left_open}");
    let left_open: SocketAddr = left_open["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("an address");
    assert!(raw_request(left_open, "/again").await.contains("/again"));

    // A public sandbox's ports need no token.
    let (status, public) = d
        .api(
            Method::POST,
            "/v1/sandboxes",
            &alice,
            Some(json!({"ports": {"public": true}})),
        )
        .await;
    assert_eq!(status, 201, "{public}");
    let public_id = public["id"].as_str().expect("id");
    assert_eq!(public["ports"]["public"], true);
    d.sh(&alice, public_id, GUEST_SERVERS).await;
    let mut status = 0;
    for _ in 0..100 {
        status = d.by_host(public_id, 8000, "/", &[]).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status, 200, "public ports answer without a token");

    for id in [id.as_str(), public_id] {
        let (status, _) = d
            .api(Method::DELETE, &format!("/v1/sandboxes/{id}"), &alice, None)
            .await;
        assert_eq!(status, 204);
    }
    let mut listening = true;
    for _ in 0..50 {
        listening = tokio::net::TcpStream::connect(left_open).await.is_ok();
        if !listening {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!listening, "a destroyed sandbox's forward still listens");
    d.control.shutdown().await;
}

/// Sends a hand-written HTTP/1.0 request for `path` through `address` and reads the reply.
async fn raw_request(address: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: raw\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut reply))
        .await
        .expect("in time")
        .expect("read");
    String::from_utf8_lossy(&reply).into_owned()
}
