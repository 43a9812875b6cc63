//! The agent's HTTP endpoints (hyper, HTTP/1.1, GET only):
//!
//! - `/metrics`: Prometheus text format 0.0.4, or OpenMetrics 1.0 when the scraper asks for it
//!   (`Accept: application/openmetrics-text`); see [`crate::metrics`].
//! - `/healthz`: 200 while the process serves requests (the agent's loop is a task of the same
//!   runtime).
//! - `/readyz`: 200 only when the programs are attached (the sock_ops link is pinned under the
//!   bpffs), the first reconcile is done and every required source (e.g. Kubernetes, when
//!   configured) has synced; else 503 with the reasons, one a line.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{
    agent::shared::Shared,
    error::{Error, Result},
};

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n",
        ));
    }
    let r = match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            // Reading the pinned maps makes syscalls: keep them off the agent's loop.
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || s.metrics.encode(openmetrics)).await {
                Ok(Ok(text)) => reply(
                    StatusCode::OK,
                    if openmetrics {
                        OPENMETRICS_TEXT
                    } else {
                        PROMETHEUS_TEXT
                    },
                    text,
                ),
                Ok(Err(e)) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("encoding metrics: {e}\n"),
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("encoding metrics: {e}\n"),
                ),
            }
        }
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => {
            let why = shared.not_ready_reasons();
            if why.is_empty() {
                reply(StatusCode::OK, TEXT, "ready\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready:\n{}\n", why.join("\n")),
                )
            }
        }
        "/" => reply(
            StatusCode::OK,
            TEXT,
            "meshaccel agent: /metrics /healthz /readyz\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    };
    Ok(r)
}

/// Binds `addr` and returns the bound address (port 0 picks one) and the server future, which
/// serves until dropped. Records the address in the agent's state file.
pub async fn bind(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Http { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Http { addr, source })?;
    shared.set_http_addr(local);
    info!(addr = %local, "serving /metrics, /healthz and /readyz");
    let serve = async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(
                        TokioIo::new(stream),
                        service_fn(move |req| handle(req, shared.clone())),
                    );
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
            });
        }
    };
    Ok((local, serve))
}
