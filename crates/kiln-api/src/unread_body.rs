//! A request answered before its body was read to the end (an error found in the headers or
//! the query, a body over its limit, a body sent to a route that takes none) leaves the rest
//! of the body on the connection. hyper then closes the connection after the response, and
//! a client that keeps connections alive would send its next request on a closed one and see
//! it fail. Such a response says `Connection: close`, so the client knows not to.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::CONNECTION;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

/// A request body that notes when it has been read to its end.
struct Tracked {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Answers with `Connection: close` when the request's body was not read to its end.
pub(crate) async fn close_if_unread(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if http_body::Body::is_end_stream(&body) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let body = Body::new(Tracked {
        inner: body,
        ended: ended.clone(),
    });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !ended.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    fn app() -> Router {
        Router::new()
            .route(
                "/read",
                post(|body: String| async move { body.len().to_string() }),
            )
            .route("/ignore", post(|| async { "ignored" }))
            .layer(axum::middleware::from_fn(close_if_unread))
    }

    async fn connection(path: &str, body: &'static str) -> Option<HeaderValue> {
        let request = Request::post(path).body(Body::from(body)).expect("request");
        let response = app().oneshot(request).await.expect("response");
        response.headers().get(CONNECTION).cloned()
    }

    #[tokio::test]
    async fn an_unread_body_closes_the_connection_and_says_so() {
        let connection = connection("/ignore", "some bytes").await;
        assert_eq!(connection, Some(HeaderValue::from_static("close")));
    }

    #[tokio::test]
    async fn a_read_body_or_none_keeps_it() {
        assert_eq!(connection("/read", "some bytes").await, None);
        assert_eq!(connection("/ignore", "").await, None);
    }
}
