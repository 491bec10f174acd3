//! A fault-injecting HTTP/1.1 reverse proxy for S3 tests, on 127.0.0.1 (free port), in front of
//! one upstream such as the `SeaweedFs::endpoint()` of `seaweed.rs`.
//!
//! Each request, independently, with probability
//! - `slowdown`: gets `503 Service Unavailable` with an S3 `SlowDown` error body, and is not
//!   forwarded;
//! - `reset`: gets no response at all: the client connection is aborted with a TCP RST
//!   (`SO_LINGER` 0), as a flaky network or a crashing load balancer does;
//! - otherwise: is forwarded unchanged (method, path and query, headers including `Host` and
//!   the signature headers, streamed body) and the upstream response is returned unchanged.
//!   An unreachable upstream gives `502 Bad Gateway`.
//!
//! Because `Host` is passed through as the client sent it (the proxy's address), SigV4
//! signatures computed by the client for the proxy endpoint still verify at SeaweedFS.
//!
//! The proxy runs on its own Tokio runtime in a background thread, so synchronous tests can
//! use it; dropping the [`FaultProxy`] stops it and closes its connections.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};

/// The body of the injected `503` answers.
pub const SLOW_DOWN_XML: &str =
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

type Body = BoxBody<Bytes, hyper::Error>;

/// A running fault-injecting proxy. See the module documentation.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// State shared by the proxy's tasks and the test thread.
struct Shared {
    /// `http` + `host:port` of the upstream.
    scheme: hyper::http::uri::Scheme,
    authority: hyper::http::uri::Authority,
    slowdown: f64,
    reset: f64,
    rng: Mutex<StdRng>,
    slowdowns: AtomicU64,
    resets: AtomicU64,
    forwarded: AtomicU64,
    client: Client<HttpConnector, Incoming>,
    /// GETs whose path contains this string are answered `500 InternalError`, this many times.
    failing_gets: Mutex<Option<(String, u64)>>,
    /// Requests whose query string contains this are answered `403 AccessDenied`, always.
    denied_query: Mutex<Option<String>>,
    /// PUTs whose path contains this string: the first `.1` are forwarded as usual, the next
    /// `.2` are forwarded but their answer is lost (the connection reset).
    lost_puts: Mutex<Option<(String, u64, u64)>>,
    /// PUTs whose path contains this string are answered `503 SlowDown`, this many times.
    slow_puts: Mutex<Option<(String, u64)>>,
    /// Method, path and `User-Agent` of every request received, in order.
    seen: Mutex<Vec<Seen>>,
}

/// One request the proxy received: which client sent what.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `GET`, `PUT`, `POST`...
    pub method: String,
    /// The path (bucket and key for path-style requests), without the query.
    pub path: String,
    /// The `User-Agent` header, empty if none.
    pub agent: String,
}

/// What happens to one request.
enum Fate {
    SlowDown,
    Reset,
    Forward,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (e.g. `http://127.0.0.1:8333`) that answers `SlowDown` with
    /// probability `slowdown`, resets the connection with probability `reset`, and forwards
    /// otherwise. `seed` fixes the sequence of decisions (their order across concurrent
    /// requests still depends on scheduling).
    pub fn start(upstream: &str, slowdown: f64, reset: f64, seed: u64) -> FaultProxy {
        assert!(
            (0.0..=1.0).contains(&slowdown)
                && (0.0..=1.0).contains(&reset)
                && slowdown + reset <= 1.0,
            "fault probabilities must be in [0, 1] and sum to at most 1: slowdown {slowdown}, reset {reset}"
        );
        let uri: Uri = upstream
            .parse()
            .unwrap_or_else(|e| panic!("bad upstream URL {upstream:?}: {e}"));
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            panic!("upstream URL {upstream:?} needs a scheme and a host");
        };
        assert_eq!(
            scheme.as_str(),
            "http",
            "only http:// upstreams are supported"
        );

        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("bind fault proxy on 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("non-blocking fault proxy listener");
        let addr = listener.local_addr().expect("fault proxy address");

        let shared = Arc::new(Shared {
            scheme,
            authority,
            slowdown,
            reset,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            slowdowns: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            client: Client::builder(TokioExecutor::new()).build_http(),
            failing_gets: Mutex::new(None),
            lost_puts: Mutex::new(None),
            slow_puts: Mutex::new(None),
            denied_query: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("fault proxy runtime");
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn({
                let shared = shared.clone();
                move || runtime.block_on(accept_loop(listener, shared, stopped))
            })
            .expect("start fault proxy thread");
        FaultProxy {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// From now on, the next `times` GET requests whose path contains `path_part` are answered
    /// `500 InternalError` (not forwarded).
    pub fn fail_gets(&self, path_part: &str, times: u64) {
        *self.shared.failing_gets.lock().unwrap() = Some((path_part.to_string(), times));
    }

    /// From now on, of the PUT requests whose path contains `path_part`, the first `skip` go
    /// through, and the next `times` reach the store but their answer never comes back: the
    /// connection is reset once the store has answered. A write that landed although its
    /// request failed, as a timeout after the write looks to the client.
    pub fn lose_put_answers(&self, path_part: &str, skip: u64, times: u64) {
        *self.shared.lost_puts.lock().unwrap() = Some((path_part.to_string(), skip, times));
    }

    /// From now on, the next `times` PUT requests whose path contains `path_part` are
    /// answered `503 SlowDown` (not forwarded), as S3 does under load.
    pub fn slow_down_puts(&self, path_part: &str, times: u64) {
        *self.shared.slow_puts.lock().unwrap() = Some((path_part.to_string(), times));
    }

    /// From now on, every request whose query string contains `query_part` (`uploads`: the
    /// listing of open multipart uploads) is answered `403 AccessDenied`, as a bucket policy
    /// that does not allow it would.
    pub fn deny_queries(&self, query_part: &str) {
        *self.shared.denied_query.lock().unwrap() = Some(query_part.to_string());
    }

    /// Every request received so far (injected faults included), in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The proxy's URL, `http://127.0.0.1:PORT`, to use as the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests answered with an injected `503 SlowDown`.
    pub fn slowdowns(&self) -> u64 {
        self.shared.slowdowns.load(Ordering::Relaxed)
    }

    /// Requests whose connection was reset instead of answered.
    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::Relaxed)
    }

    /// Requests passed on to the upstream.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until `stopped` fires; the runtime, dropped after this returns, then
/// cancels every connection task.
async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = TcpListener::from_std(listener).expect("register fault proxy listener");
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_connection(stream, shared.clone()));
                }
            }
        }
    }
}

/// Serves one client connection with hyper until it ends or a request chose to reset it.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    // A second handle on the same socket stays with the service: setting SO_LINGER 0 through
    // it makes the final close of the connection an RST.
    let Ok((stream, twin)) = split_handle(stream) else {
        return;
    };
    let twin = Arc::new(twin);
    let abort = Arc::new(Notify::new());
    let service = service_fn({
        let abort = abort.clone();
        move |req| handle(req, shared.clone(), twin.clone(), abort.clone())
    });
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        // Dropping the connection (with the pending request) closes both handles: RST.
        _ = abort.notified() => {}
    }
}

fn split_handle(stream: TcpStream) -> std::io::Result<(TcpStream, TcpStream)> {
    let stream = stream.into_std()?;
    let twin = stream.try_clone()?;
    Ok((TcpStream::from_std(stream)?, TcpStream::from_std(twin)?))
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    twin: Arc<TcpStream>,
    abort: Arc<Notify>,
) -> Result<Response<Body>, Infallible> {
    shared
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Seen {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            agent: req
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        });
    let denied = shared
        .denied_query
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let (Some(part), Some(query)) = (denied, req.uri().query()) {
        if query.contains(part.as_str()) {
            return Ok(error(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                "Access Denied",
            ));
        }
    }
    if req.method() == hyper::Method::GET {
        let mut failing = shared
            .failing_gets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((part, left)) = failing.as_mut() {
            if *left > 0 && req.uri().path().contains(part.as_str()) {
                *left -= 1;
                return Ok(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "injected by the test",
                ));
            }
        }
    }
    if req.method() == hyper::Method::PUT {
        let mut slow = shared.slow_puts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((part, left)) = slow.as_mut() {
            if *left > 0 && req.uri().path().contains(part.as_str()) {
                *left -= 1;
                shared.slowdowns.fetch_add(1, Ordering::Relaxed);
                return Ok(slow_down());
            }
        }
    }
    if req.method() == hyper::Method::PUT && shared.loses_answer_to(req.uri().path()) {
        let _ = shared.forward(req).await;
        shared.resets.fetch_add(1, Ordering::Relaxed);
        let _ = twin.set_zero_linger();
        abort.notify_one();
        return std::future::pending().await;
    }
    match shared.decide() {
        Fate::SlowDown => {
            shared.slowdowns.fetch_add(1, Ordering::Relaxed);
            Ok(slow_down())
        }
        Fate::Reset => {
            shared.resets.fetch_add(1, Ordering::Relaxed);
            let _ = twin.set_zero_linger();
            abort.notify_one();
            std::future::pending().await
        }
        Fate::Forward => {
            shared.forwarded.fetch_add(1, Ordering::Relaxed);
            Ok(shared.forward(req).await)
        }
    }
}

impl Shared {
    /// Whether the answer to a PUT of `path` is to be lost (see `lose_put_answers`).
    fn loses_answer_to(&self, path: &str) -> bool {
        let mut lost = self.lost_puts.lock().unwrap_or_else(|e| e.into_inner());
        let Some((part, skip, times)) = lost.as_mut() else {
            return false;
        };
        if !path.contains(part.as_str()) {
            return false;
        }
        if *skip > 0 {
            *skip -= 1;
            return false;
        }
        if *times > 0 {
            *times -= 1;
            return true;
        }
        false
    }

    fn decide(&self) -> Fate {
        let draw: f64 = self.rng.lock().unwrap_or_else(|e| e.into_inner()).random();
        if draw < self.slowdown {
            Fate::SlowDown
        } else if draw < self.slowdown + self.reset {
            Fate::Reset
        } else {
            Fate::Forward
        }
    }

    async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        parts.uri = match Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
        {
            Ok(uri) => uri,
            Err(e) => return error(StatusCode::BAD_REQUEST, "InvalidURI", &e.to_string()),
        };
        parts.version = Version::HTTP_11;
        // `Host` stays as the client sent it: it is part of the SigV4 signature.
        strip_hop_by_hop(&mut parts.headers);
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => error(StatusCode::BAD_GATEWAY, "BadGateway", &format!("{e:?}")),
        }
    }
}

/// Removes the headers that describe one hop rather than the message (RFC 9110 7.6.1);
/// hyper sets framing and connection management itself on each side.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

fn slow_down() -> Response<Body> {
    xml_response(StatusCode::SERVICE_UNAVAILABLE, SLOW_DOWN_XML.to_owned())
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    xml_response(
        status,
        format!("<Error><Code>{code}</Code><Message>{message}</Message></Error>"),
    )
}

fn xml_response(status: StatusCode, xml: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(xml)).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    response
}
