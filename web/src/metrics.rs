//! The `/metrics` listener: serves whatever text the caller's `render` closure produces, in
//! the OpenMetrics text format that `prometheus-client` encodes.
//!
//! Knows nothing about what the metrics are; must never block the runtime (render is
//! expected to be cheap: it only reads atomics and formats text).

use std::future::Future;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// Produces the exposition text on every scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Content type of the OpenMetrics text exposition format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The router: `GET /metrics` returns `render()`; every other path is 404.
pub fn router(render: Render) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let render = Arc::clone(&render);
            async move { ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], render()).into_response() }
        }),
    )
}

/// Serves [`router`] on `listener` until `shutdown` completes, then finishes in-flight
/// scrapes and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(render))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{to_bytes, Body};
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    /// Sends `GET path` to the router and compares status and body with `expected`.
    async fn check(path: &str, expected: (StatusCode, &str)) {
        let render: Render = Arc::new(|| "cdp_up 1\n# EOF\n".to_owned());
        let response = router(render)
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        if status == StatusCode::OK {
            assert_eq!(response.headers()[CONTENT_TYPE], OPENMETRICS_CONTENT_TYPE);
        }
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        assert_eq!((status, std::str::from_utf8(&body).unwrap()), expected);
    }

    #[tokio::test]
    async fn serves_metrics_and_nothing_else() {
        check("/metrics", (StatusCode::OK, "cdp_up 1\n# EOF\n")).await;
        check("/", (StatusCode::NOT_FOUND, "")).await;
        check("/metrics/x", (StatusCode::NOT_FOUND, "")).await;
    }

    #[tokio::test]
    async fn serve_stops_on_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(|| "x 1\n".to_owned()),
            async move {
                let _ = stopped.await;
            },
        ));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("x 1\n"), "{response}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
