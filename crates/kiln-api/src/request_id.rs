//! Request ids: every response carries `X-Request-Id`, every error body its `request_id`, and
//! the daemon's log lines for the request carry it, so a user's failed call can be found in
//! the log. A caller may send its own id (up to 64 of `A-Z a-z 0-9 . _ -`), e.g. to follow a
//! call across its own services; anything else is replaced.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header.
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id taken from a caller.
const MAX_LEN: usize = 64;

tokio::task_local! {
    static CURRENT: String;
}

/// The id of the request being handled on this task, if any.
pub(crate) fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The caller's id if it is a sane one, else a new one.
fn choose(given: Option<&HeaderValue>) -> String {
    let sane = |id: &&str| {
        !id.is_empty()
            && id.len() <= MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    match given.and_then(|v| v.to_str().ok()).filter(sane) {
        Some(id) => id.to_owned(),
        None => format!("req_{:016x}", rand::random::<u64>()),
    }
}

/// Gives the request an id, handles it in a log span carrying it, and answers with it.
pub(crate) async fn assign(request: Request, next: Next) -> Response {
    let id = choose(request.headers().get(&HEADER));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = CURRENT
        .scope(id.clone(), next.run(request))
        .instrument(span.clone())
        .await;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        span.in_scope(|| tracing::info!(status = status.as_u16(), "request failed"));
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_caller_id_is_kept_and_anything_else_replaced() {
        let keep = HeaderValue::from_static("trace-42_a.b");
        assert_eq!(choose(Some(&keep)), "trace-42_a.b");
        for bad in [
            "",
            "has space",
            "new\u{7f}line",
            &"x".repeat(65),
            "semi;colon",
        ] {
            let value = HeaderValue::from_str(bad).ok();
            let chosen = choose(value.as_ref());
            assert!(
                chosen.starts_with("req_") && chosen.len() == 20,
                "{bad:?} -> {chosen}"
            );
        }
        assert_ne!(choose(None), choose(None));
    }
}
