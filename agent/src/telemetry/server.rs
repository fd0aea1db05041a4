//! The admin HTTP server, on its own thread with a single-threaded runtime.
//!
//! | endpoint | answers |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition of the registry |
//! | `GET /healthz` | `200 ok` while the process serves HTTP |
//! | `GET /readyz` | `200` when every readiness check passes, else `503`; the body lists each check |
//!
//! Against clients that hold connections open (slowloris), it serves at most
//! [`AdminLimits::max_connections`] connections at once, closing any more as soon as they are
//! accepted, and closes a connection that has not sent a complete request head within
//! [`AdminLimits::header_read_timeout`] (also the idle limit between keep-alive requests).

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};
use tokio::sync::oneshot;

/// Connections the admin server serves at once; one more is closed as soon as it is accepted.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;
/// Time a client of the admin server has to send a complete request head, and the longest a
/// keep-alive connection may sit idle between requests; then it is closed.
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Limits of the admin server against clients that hold connections open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time to send a complete request head (and the idle limit between keep-alive requests).
    pub header_read_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            header_read_timeout: ADMIN_HEADER_READ_TIMEOUT,
        }
    }
}

/// A named readiness check: a function that says whether the component is ready and why not.
type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The readiness checks behind `/readyz`. Components register checks as they come up.
#[derive(Default)]
pub struct Readiness {
    checks: Mutex<Vec<(String, Check)>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").finish_non_exhaustive()
    }
}

impl Readiness {
    /// Adds a check named `name`.
    pub fn register(
        &self,
        name: &str,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        if let Ok(mut checks) = self.checks.lock() {
            checks.push((name.to_owned(), Box::new(check)));
        }
    }

    /// Runs every check: its name and whether it passed, in registration order.
    pub fn results(&self) -> Vec<(String, bool)> {
        let Ok(checks) = self.checks.lock() else {
            return Vec::new();
        };
        checks
            .iter()
            .map(|(name, check)| (name.clone(), check().is_ok()))
            .collect()
    }

    /// Runs every check: (all passed, one line per check). No checks means not ready.
    pub fn evaluate(&self) -> (bool, String) {
        let Ok(checks) = self.checks.lock() else {
            return (false, "readiness state is poisoned\n".into());
        };
        if checks.is_empty() {
            return (false, "starting: no component is ready yet\n".into());
        }
        let mut ok = true;
        let mut body = String::new();
        for (name, check) in checks.iter() {
            match check() {
                Ok(()) => body.push_str(&format!("ok   {name}\n")),
                Err(why) => {
                    ok = false;
                    body.push_str(&format!("FAIL {name}: {why}\n"));
                }
            }
        }
        (ok, body)
    }
}

struct AdminState {
    registry: Registry,
    readiness: Arc<Readiness>,
}

/// A running admin server; dropping it shuts the server down.
#[derive(Debug)]
pub struct AdminServer {
    /// The address actually bound (useful with port 0).
    pub local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `addr` and serves on a new thread, with the default [`AdminLimits`]. Fails if the
    /// address cannot be bound.
    pub fn start(
        addr: SocketAddr,
        registry: Registry,
        readiness: Arc<Readiness>,
    ) -> std::io::Result<AdminServer> {
        Self::start_with_limits(addr, registry, readiness, AdminLimits::default())
    }

    /// [`AdminServer::start`] with explicit limits.
    pub fn start_with_limits(
        addr: SocketAddr,
        registry: Registry,
        readiness: Arc<Readiness>,
        limits: AdminLimits,
    ) -> std::io::Result<AdminServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let state = Arc::new(AdminState {
            registry,
            readiness,
        });
        let (tx, rx) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("knhk-admin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("admin server: {e}");
                            return;
                        }
                    };
                    let app = Router::new()
                        .route("/metrics", get(metrics))
                        .route("/healthz", get(|| async { "ok\n" }))
                        .route("/readyz", get(readyz))
                        .with_state(state);
                    serve(listener, app, limits, rx).await;
                });
            })?;
        Ok(AdminServer {
            local_addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            // The server already stopped: nothing to signal.
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            // A panicked server thread has already logged its panic.
            let _ = t.join();
        }
    }
}

/// Accepts connections until `stop`, serving each with `app` within `limits`; then lets the
/// open connections finish their requests (at most 2 s).
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: AdminLimits,
    mut stop: oneshot::Receiver<()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut refused: u64 = 0;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, for example: back off instead of spinning.
                        tracing::warn!("admin server: accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(
                            refused,
                            max_connections = limits.max_connections,
                            "admin server: at its connection limit; closing new connections"
                        );
                    }
                    drop(stream);
                    continue;
                };
                let app = app.clone();
                let service = hyper::service::service_fn(move |req| {
                    let mut app = app.clone();
                    async move { tower::Service::call(&mut app, req).await }
                });
                let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let mut closing = closing_rx.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    tokio::pin!(conn);
                    let result = tokio::select! {
                        r = conn.as_mut() => r,
                        _ = closing.changed() => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!("admin server: connection closed: {e}");
                    }
                });
            }
        }
    }
    // No connection left to tell.
    let _ = closing.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        connections.abort_all();
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let families = state.registry.gather();
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&families, &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [("content-type", prometheus::TEXT_FORMAT)],
            buf,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let (ok, body) = state.readiness.evaluate();
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}
