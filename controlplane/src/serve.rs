//! The query API's HTTP server, bounded against hostile clients: a cap on open
//! connections and on connections per client address (past either, the connection is
//! closed at once and counted), a deadline for each request head (a head trickled a
//! byte at a time is cut off: the deadline does not restart with each byte), a deadline
//! for each request's answer (503), and graceful shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use crate::metrics::Metrics;

/// Bounds of the query API's server, every one a setting.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Connections open at once, at most.
    pub connections_max: usize,
    /// Connections open at once from one client address, at most.
    pub connections_per_address_max: usize,
    /// A request head must arrive whole within this long (and an idle keep-alive
    /// connection is closed after it).
    pub header_timeout_ms: u64,
    /// A request must be answered within this long, or it gets 503.
    pub request_timeout_ms: u64,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            connections_max: 1024,
            connections_per_address_max: 64,
            header_timeout_ms: 10_000,
            request_timeout_ms: 10_000,
        }
    }
}

impl ServeLimits {
    /// Each bound in its range, the error naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (
                "query_connections_max",
                self.connections_max as u64,
                1_000_000,
            ),
            (
                "query_connections_per_address_max",
                self.connections_per_address_max as u64,
                1_000_000,
            ),
            ("query_header_timeout_ms", self.header_timeout_ms, 3_600_000),
            (
                "query_request_timeout_ms",
                self.request_timeout_ms,
                3_600_000,
            ),
        ];
        for (name, v, hi) in checks {
            if !(1..=hi).contains(&v) {
                return Err(format!("{name} must be 1..={hi}, got {v}"));
            }
        }
        Ok(())
    }
}

/// Answers 503 when the handler takes longer than the request deadline.
pub(crate) async fn request_deadline(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => crate::auth::json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the query took longer than query_request_timeout_ms",
        ),
    }
}

/// Open connections per client address (entries exist only while a connection is open,
/// so the map is bounded by `connections_max`).
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

impl PerAddress {
    fn enter(&self, ip: IpAddr, max: usize) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn leave(&self, ip: IpAddr) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true; open connections are given the
/// header deadline to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    let per_address = Arc::new(PerAddress::default());
    let header_timeout = Duration::from_millis(limits.header_timeout_ms);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!(error = %e, "query API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics
                .query_connections_refused
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        if !per_address.enter(peer.ip(), limits.connections_per_address_max) {
            metrics
                .query_connections_refused
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let per_address = per_address.clone();
        let mut conn_stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                let app = app.clone();
                async move {
                    Ok::<_, Infallible>(
                        app.oneshot(req.map(axum::body::Body::new))
                            .await
                            .unwrap_or_else(|e| match e {}),
                    )
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .max_buf_size(64 << 10);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { if let Err(e) = r { tracing::debug!(error = %e, client = %peer, "query API connection ended"); } }
                _ = conn_stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(header_timeout, conn).await;
                }
            }
            per_address.leave(peer.ip());
            drop(slot);
        });
    }
}
