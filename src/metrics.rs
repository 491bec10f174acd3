//! Observability: the run's counters and gauges, and a Prometheus text endpoint serving them.
//!
//! One [`Metrics`] is shared by every worker of a process (atomics, no locks on the hot path).
//! Counters are per process; in a cluster, process 0 also holds the run-wide ones (committed
//! objects, epochs in flight, frontier lag, per-label counts), because it lists and commits.
//! [`serve`] answers `GET /metrics` (any path, in fact) with the OpenMetrics text format, which
//! Prometheus scrapes.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of the per-label gauge: `label="Apple Red 1"`.
pub type LabelSet = Vec<(String, String)>;

/// Every metric verger exports, registered under `verger_`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Objects seen by listings (every poll counts again).
    pub listed: Counter,
    /// Objects released into the dataflow (new or changed, not yet committed).
    pub released: Counter,
    /// Objects read from the input store.
    pub fetched: Counter,
    /// Objects embedded.
    pub embedded: Counter,
    /// Objects that got an error record.
    pub failed: Counter,
    /// Objects deleted or replaced between listing and reading (not errors).
    pub vanished: Counter,
    /// Objects (rows and error records) in committed epochs.
    pub committed: Counter,
    /// Epochs committed.
    pub epochs_committed: Counter,
    /// Bytes read from the input store.
    pub bytes_read: Counter,
    /// Bytes written to the output store (Parquet files).
    pub bytes_written: Counter,
    /// Store requests (reads, uploads, commits) under way.
    pub requests_in_flight: Gauge,
    /// Epochs released but not yet committed.
    pub epochs_in_flight: Gauge,
    /// Seconds since the oldest uncommitted epoch got its first object (0 when none).
    pub frontier_lag_seconds: Gauge<f64, AtomicU64>,
    /// Committed objects per second over the last few seconds.
    pub images_per_second: Gauge<f64, AtomicU64>,
    /// Committed rows per label (the latest version of each key), from the incremental count.
    pub label_rows: Family<LabelSet, Gauge>,
    /// When the run proper started (output loaded, lease held): the start of the wall time
    /// that the summary's images/s divide by, so that a progress display shows the same rate.
    pub run_started: std::sync::OnceLock<std::time::Instant>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics at zero, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("verger");
        let m = Self {
            registry: Registry::default(),
            listed: Counter::default(),
            released: Counter::default(),
            fetched: Counter::default(),
            embedded: Counter::default(),
            failed: Counter::default(),
            vanished: Counter::default(),
            committed: Counter::default(),
            epochs_committed: Counter::default(),
            bytes_read: Counter::default(),
            bytes_written: Counter::default(),
            requests_in_flight: Gauge::default(),
            epochs_in_flight: Gauge::default(),
            frontier_lag_seconds: Gauge::default(),
            images_per_second: Gauge::default(),
            label_rows: Family::default(),
            run_started: std::sync::OnceLock::new(),
        };
        let r = &mut registry;
        r.register(
            "objects_listed",
            "Objects seen by listings",
            m.listed.clone(),
        );
        r.register(
            "objects_released",
            "Objects released into the dataflow (new or changed)",
            m.released.clone(),
        );
        r.register("objects_fetched", "Objects read", m.fetched.clone());
        r.register("objects_embedded", "Objects embedded", m.embedded.clone());
        r.register(
            "objects_failed",
            "Objects with an error record",
            m.failed.clone(),
        );
        r.register(
            "objects_vanished",
            "Objects deleted or replaced between listing and reading",
            m.vanished.clone(),
        );
        r.register(
            "objects_committed",
            "Objects (rows and error records) in committed epochs",
            m.committed.clone(),
        );
        r.register(
            "epochs_committed",
            "Epochs committed",
            m.epochs_committed.clone(),
        );
        r.register(
            "read_bytes",
            "Bytes read from the input",
            m.bytes_read.clone(),
        );
        r.register(
            "written_bytes",
            "Bytes written to the output",
            m.bytes_written.clone(),
        );
        r.register(
            "requests_in_flight",
            "Store requests under way",
            m.requests_in_flight.clone(),
        );
        r.register(
            "epochs_in_flight",
            "Epochs released but not committed",
            m.epochs_in_flight.clone(),
        );
        r.register(
            "frontier_lag_seconds",
            "Age of the oldest uncommitted epoch",
            m.frontier_lag_seconds.clone(),
        );
        r.register(
            "images_per_second",
            "Committed objects per second, recent",
            m.images_per_second.clone(),
        );
        r.register(
            "label_rows",
            "Committed rows per label (latest version of each key)",
            m.label_rows.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// Sets the committed-rows gauge of `label` (`None`: a key at the root, exported as "").
    pub fn set_label_rows(&self, label: &str, rows: i64) {
        self.label_rows
            .get_or_create(&vec![("label".to_string(), label.to_string())])
            .set(rows);
    }

    /// Counts a store request while `f` runs.
    pub async fn request<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.requests_in_flight.inc();
        let out = f.await;
        self.requests_in_flight.dec();
        out
    }
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint on {addr}: {source}")]
pub struct ServeError {
    addr: String,
    source: std::io::Error,
}

/// A metrics endpoint running on its own thread.
#[derive(Debug)]
pub struct Endpoint {
    /// Where it listens (the real port when 0 was asked).
    pub addr: SocketAddr,
}

/// Binds `addr` now (so a taken port is an error at start, and port 0 is resolved) and
/// serves [`Metrics::render`] over HTTP/1.1 from a background thread until the process ends.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Endpoint, ServeError> {
    let err = |source| ServeError {
        addr: addr.to_string(),
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(err)?;
    std::thread::Builder::new()
        .name("verger-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((stream, _)) = listener.accept().await {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                            let body = metrics.render();
                            async move {
                                Response::builder()
                                    .header(
                                        "content-type",
                                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    )
                                    .body(Full::new(Bytes::from(body)))
                            }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        })
        .map_err(err)?;
    Ok(Endpoint { addr: bound })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_metric_with_its_value() {
        let m = Metrics::new();
        m.committed.inc_by(7);
        m.set_label_rows("Lemon", 3);
        let text = m.render();
        assert!(text.contains("verger_objects_committed_total 7"), "{text}");
        assert!(
            text.contains("verger_label_rows{label=\"Lemon\"} 3"),
            "{text}"
        );
        assert!(text.contains("verger_frontier_lag_seconds"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn endpoint_answers_over_http() {
        use std::io::{Read, Write};
        let m = Arc::new(Metrics::new());
        m.fetched.inc_by(5);
        let ep = serve("127.0.0.1:0".parse().unwrap(), m).unwrap();
        let mut conn = std::net::TcpStream::connect(ep.addr).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("verger_objects_fetched_total 5"), "{reply}");
    }
}
