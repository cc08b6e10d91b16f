//! Ingress: HTTP and WebSocket requests to what a sandbox serves, proxied by the daemon to
//! the sandbox's link address (its namespace forwards them to the guest).
//!
//! - By host name: `http://<port>-<sandbox>.<domain>/...` (the domain defaults to
//!   `localhost`, which browsers resolve to loopback). Public sandboxes answer anyone; the
//!   others need their access token, as the `X-Kiln-Access-Token` header or a `kiln_token`
//!   query parameter; a wrong or missing one is a 401 before anything reaches the guest.
//! - By path: `/v1/sandboxes/{id}/ports/{port}/...`, authenticated by API key like the rest
//!   of `/v1`.
//!
//! The daemon's own credentials never reach a guest: `Authorization`, the access token
//! (header and query parameter) and any client-sent `X-Forwarded-For` are removed; the guest
//! sees the client's address in `X-Forwarded-For`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use crate::{ApiError, AppState, Caller};

/// The access token header.
pub const TOKEN_HEADER: &str = "x-kiln-access-token";
/// The access token query parameter.
pub const TOKEN_PARAMETER: &str = "kiln_token";

/// How long the guest may take to accept a connection, and to answer with headers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers never passed to a guest (hop-by-hop ones are handled by the HTTP stacks).
const STRIPPED: [&str; 4] = [
    "authorization",
    TOKEN_HEADER,
    "x-forwarded-for",
    "proxy-authorization",
];

/// `<port>-<sandbox>` of a host name under `domain` (`8000-sb-1234.localhost:7070`).
pub(crate) fn parse_host(host: &str, domain: &str) -> Option<(u16, String)> {
    let host = host.trim();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let host = host.trim_end_matches('.');
    let label = host
        .to_ascii_lowercase()
        .strip_suffix(&format!(".{}", domain.to_ascii_lowercase()))?
        .to_owned();
    if label.contains('.') {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| (port, id.to_owned()))
}

/// Answers requests whose `Host` names a sandbox port; passes everything else on.
pub(crate) async fn by_host(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().host())
        .unwrap_or_default()
        .to_owned();
    let Some((port, id)) = parse_host(&host, &state.config.ingress_domain) else {
        return next.run(request).await;
    };
    let token = request
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query_token(request.uri()));
    let target = match state.control.ingress_by_token(&id, port, token.as_deref()).await {
        Ok(target) => target,
        Err(kiln_control::ControlError::Unauthenticated) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!(
                    "sandbox ports need the sandbox's access token: send it as `{TOKEN_HEADER}` or `?{TOKEN_PARAMETER}=` (GET /v1/sandboxes/{{id}} shows it to its owner)"
                ),
            )
            .into_response()
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let path = without_token(request.uri());
    forward(request, target, path, &id).await
}

/// The path form: `/v1/sandboxes/{id}/ports/{port}` and everything below it.
#[utoipa::path(get, operation_id = "port_by_path", path = "/v1/sandboxes/{id}/ports/{port}/{path}", tag = "sandboxes",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Sandbox id"),
           ("port" = u16, Path, description = "A port the guest listens on"),
           ("path" = String, Path, description = "The path on the guest's server (any method is proxied)")),
    responses((status = 200, description = "What the guest answered (any status)"),
              (status = 401, body = crate::types::ErrorBody),
              (status = 404, body = crate::types::ErrorBody),
              (status = 502, body = crate::types::ErrorBody, description = "Nothing listens on that port of the guest"),
              (status = 503, body = crate::types::ErrorBody, description = "The host runs without sandbox networking"),
              (status = 504, body = crate::types::ErrorBody, description = "The guest did not answer in time")))]
pub(crate) async fn by_path(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(params): Path<Vec<(String, String)>>,
    request: Request,
) -> Response {
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let id = param("id");
    let Ok(port) = param("port").parse::<u16>() else {
        return ApiError::invalid("ports are 1 to 65535").into_response();
    };
    let target = match state.control.ingress_for(&who, &id, port).await {
        Ok(target) => target,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let rest = param("rest");
    let query = without_token(request.uri());
    let query = query.split_once('?').map(|(_, q)| q);
    let path = match query {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    forward(request, target, path, &id).await
}

fn query_token(uri: &Uri) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == TOKEN_PARAMETER)
        .map(|(_, v)| v.into_owned())
}

/// The path and query of `uri` without the access token parameter.
fn without_token(uri: &Uri) -> String {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.to_owned();
    };
    let kept: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k != TOKEN_PARAMETER)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        return path.to_owned();
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    format!("{path}?{query}")
}

fn bad_gateway(status: StatusCode, message: String) -> Response {
    let code = if status == StatusCode::GATEWAY_TIMEOUT {
        "timeout"
    } else {
        "bad_gateway"
    };
    ApiError::new(status, code, message).into_response()
}

/// Sends `request` to `target` as `path`, streaming both ways; upgrades (WebSocket) are
/// joined end to end.
pub async fn forward(mut request: Request, target: SocketAddr, path: String, id: &str) -> Response {
    let client: Option<IpAddr> = request
        .extensions()
        .get::<ConnectInfo<crate::linger::ClientAddr>>()
        .map(|ConnectInfo(crate::linger::ClientAddr(addr))| addr.ip());
    let stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return bad_gateway(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "nothing answers on port {} of sandbox `{id}`: {e}",
                        target.port()
                    ),
                )
            }
            Err(_) => {
                return bad_gateway(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "port {} of sandbox `{id}` did not accept in time",
                        target.port()
                    ),
                )
            }
        };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(e) => return bad_gateway(StatusCode::BAD_GATEWAY, format!("sandbox `{id}`: {e}")),
        };
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let client_upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>();
    let (mut parts, body) = request.into_parts();
    parts.uri = match path.parse() {
        Ok(uri) => uri,
        Err(_) => return ApiError::invalid("not a valid path").into_response(),
    };
    for name in STRIPPED {
        parts.headers.remove(name);
    }
    if let Some(client) = client {
        if let Ok(value) = HeaderValue::from_str(&client.to_string()) {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-for"), value);
        }
    }
    parts.extensions = Default::default();
    let outgoing = hyper::Request::from_parts(parts, body);
    let response = match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(outgoing)).await
    {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            return bad_gateway(
                StatusCode::BAD_GATEWAY,
                format!("sandbox `{id}` port {}: {e}", target.port()),
            )
        }
        Err(_) => {
            return bad_gateway(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "sandbox `{id}` port {} did not answer in time",
                    target.port()
                ),
            )
        }
    };
    let (mut parts, body) = response.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let mut guest_response = hyper::Response::from_parts(parts.clone(), ());
            let guest_upgrade = hyper::upgrade::on(&mut guest_response);
            tokio::spawn(async move {
                if let (Ok(client), Ok(guest)) = (client_upgrade.await, guest_upgrade.await) {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(guest),
                    )
                    .await;
                }
            });
            parts.extensions = Default::default();
            return Response::from_parts(parts, Body::empty());
        }
    }
    parts.extensions = Default::default();
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_name_a_port_of_a_sandbox() {
        assert_eq!(
            parse_host("8000-sb-1a2b3c.localhost:7070", "localhost"),
            Some((8000, "sb-1a2b3c".into()))
        );
        assert_eq!(
            parse_host("80-sb-x.Sandboxes.Example.com", "sandboxes.example.com"),
            Some((80, "sb-x".into()))
        );
        for bad in [
            "localhost:7070",
            "127.0.0.1:7070",
            "sb-1.localhost",
            "0-sb-1.localhost",
            "70000-sb-1.localhost",
            "8000-sb-1.other.localhost",
            "8000-.localhost",
            "8000-sb/1.localhost",
        ] {
            assert_eq!(parse_host(bad, "localhost"), None, "{bad}");
        }
    }

    #[test]
    fn the_token_never_travels_on() {
        let uri: Uri = "/app?a=1&kiln_token=secret&b=2".parse().expect("uri");
        assert_eq!(query_token(&uri).as_deref(), Some("secret"));
        assert_eq!(without_token(&uri), "/app?a=1&b=2");
        let only: Uri = "/x?kiln_token=s".parse().expect("uri");
        assert_eq!(without_token(&only), "/x");
    }
}
