//! The witness's HTTP API: C2SP `tlog-witness` `add-checkpoint` plus knhk's key registration,
//! over mTLS (SPIFFE; the caller's ID must match `allowed`) or, on loopback, plaintext.

use super::{protocol, Refusal, Witness};
use crate::identity::tls::ServerTls;
use crate::model::spiffe::{peer_id, IdMatcher};
use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Router,
};
use std::{future::Future, sync::Arc};
use tokio::net::TcpListener;

/// The caller's SPIFFE ID (`None` over plaintext).
#[derive(Debug, Clone)]
struct Caller(Option<String>);

#[derive(Clone)]
struct App {
    witness: Arc<Witness>,
    registry: prometheus::Registry,
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn refusal(r: Refusal) -> Response {
    match r {
        Refusal::Conflict(size) => (
            StatusCode::CONFLICT,
            [(header::CONTENT_TYPE, protocol::SIZE_CONTENT_TYPE)],
            format!("{size}\n"),
        )
            .into_response(),
        Refusal::Malformed(m) => text(StatusCode::BAD_REQUEST, m + "\n"),
        Refusal::Forbidden(m) => text(StatusCode::FORBIDDEN, m + "\n"),
        Refusal::UnknownOrigin(m) => text(StatusCode::NOT_FOUND, m + "\n"),
        Refusal::Claimed(m) => text(StatusCode::CONFLICT, m + "\n"),
        Refusal::Fork(m) => text(StatusCode::UNPROCESSABLE_ENTITY, format!("fork: {m}\n")),
        Refusal::Unavailable(m) => text(StatusCode::SERVICE_UNAVAILABLE, m + "\n"),
    }
}

async fn add_checkpoint(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let Ok(body) = std::str::from_utf8(&body) else {
        return refusal(Refusal::Malformed("the request is not UTF-8".into()));
    };
    let req = match protocol::AddCheckpoint::parse(body) {
        Ok(r) => r,
        Err(e) => return refusal(Refusal::Malformed(format!("add-checkpoint: {e}"))),
    };
    match app.witness.add_checkpoint(caller.0.as_deref(), &req).await {
        Ok(line) => text(StatusCode::OK, line.encode()),
        Err(r) => refusal(r),
    }
}

async fn log_keys(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let req: protocol::LogKeys = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refusal(Refusal::Malformed(format!("log-keys: {e}"))),
    };
    match app.witness.register(caller.0.as_deref(), req).await {
        Ok(n) => text(StatusCode::OK, format!("{n}\n")),
        Err(r) => refusal(r),
    }
}

async fn witness_key(State(app): State<App>) -> Response {
    text(StatusCode::OK, format!("{}\n", app.witness.verifier_key()))
}

async fn origins(State(app): State<App>) -> Response {
    match serde_json::to_string(&app.witness.origins().await) {
        Ok(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    let mut out = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&app.registry.gather(), &mut out) {
        Ok(()) => text(StatusCode::OK, out),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route(protocol::ADD_CHECKPOINT, post(add_checkpoint))
        .route(protocol::LOG_KEYS, post(log_keys))
        .route(protocol::WITNESS_KEY, get(witness_key))
        .route(protocol::ORIGINS, get(origins))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(protocol::MAX_REQUEST_BYTES))
        .with_state(app)
}

/// Serves `/metrics` and `/healthz` of `registry` in plaintext on `listener` until `stop`
/// (for Prometheus, which cannot present an SVID to the witness's mTLS port).
pub async fn serve_metrics(
    registry: prometheus::Registry,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(registry): State<prometheus::Registry>| async move {
                let mut out = String::new();
                match prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
                    Ok(()) => text(StatusCode::OK, out),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(registry);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!("witness metrics server: {e}");
    }
}

/// How the witness is reached.
pub enum Transport {
    /// Plaintext (loopback, tests and development).
    Plain,
    /// mTLS with the witness's SVID; callers must prove an ID `allowed` matches (any ID of the
    /// accepted trust domains when empty).
    Mtls(ServerTls, Vec<IdMatcher>),
}

/// Serves `witness` on `listener` until `stop` resolves.
pub async fn serve(
    witness: Arc<Witness>,
    registry: prometheus::Registry,
    listener: TcpListener,
    transport: Transport,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let app = router(App { witness, registry });
    match transport {
        Transport::Plain => {
            let app = app.layer(Extension(Caller(None)));
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await;
            if let Err(e) = served {
                tracing::error!("witness server: {e}");
            }
        }
        Transport::Mtls(tls, allowed) => {
            use tokio_stream::StreamExt as _;
            let mut incoming = std::pin::pin!(crate::identity::tls::incoming(listener, tls));
            let mut stop = std::pin::pin!(stop);
            loop {
                let stream = tokio::select! {
                    s = incoming.next() => match s {
                        Some(Ok(s)) => s,
                        Some(Err(e)) => {
                            tracing::info!("witness: a connection failed: {e}");
                            continue;
                        }
                        None => return,
                    },
                    _ = &mut stop => return,
                };
                let id = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| peer_id(leaf.as_ref()).ok());
                let Some(id) = id else {
                    continue; // The handshake's verifier already requires one.
                };
                if !allowed.is_empty() && !allowed.iter().any(|m| m.matches(&id)) {
                    tracing::warn!(caller = %id, "witness: caller not in spiffe.authorized_ids.region_peers; connection closed");
                    continue;
                }
                let app = app.clone().layer(Extension(Caller(Some(id.to_string()))));
                let service = hyper::service::service_fn(move |req| {
                    let mut app = app.clone();
                    async move { tower::Service::call(&mut app, req).await }
                });
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    if let Err(e) = conn.await {
                        tracing::debug!("witness: connection closed: {e}");
                    }
                });
            }
        }
    }
}
