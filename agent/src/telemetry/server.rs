//! The admin HTTP server, on its own thread with a single-threaded runtime.
//!
//! | endpoint | answers |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition of the registry |
//! | `GET /healthz` | `200 ok` while the process serves HTTP |
//! | `GET /readyz` | `200` when every readiness check passes, else `503`; the body lists each check |

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
};
use tokio::sync::oneshot;

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
    /// Binds `addr` and serves on a new thread. Fails if the address cannot be bound.
    pub fn start(
        addr: SocketAddr,
        registry: Registry,
        readiness: Arc<Readiness>,
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
                    let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = rx.await;
                    });
                    if let Err(e) = serve.await {
                        tracing::error!("admin server stopped: {e}");
                    }
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
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
