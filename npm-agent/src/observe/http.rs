//! A minimal HTTP/1.1 server (GET and HEAD, one request per connection) for the probes, the
//! Prometheus scrapes and the debug view, on Azure NPM's ListeningAddress:ListeningPort.
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | 200 while the enforcement loop ticks, else 503 |
//! | `/readyz` | 200 from the first enforcement on (also while the source is lost), else 503 |
//! | `/node-metrics` | this agent's metrics (OpenMetrics text); 404 when EnablePrometheusMetrics is off |
//! | `/cluster-metrics` | cluster gauges (policies, pods, namespaces); 404 likewise |
//! | `/debug/state` | JSON: readiness, source, counts, recent errors, config; 404 when EnableHTTPDebugAPI is off |
//!
//! Deliberately small: no keep-alive, no request bodies, bounded request heads, a time limit
//! per connection and a cap on concurrent connections.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Observer;
use super::metrics::CONTENT_TYPE as OPENMETRICS;

/// Largest accepted request head.
const MAX_HEAD: usize = 16 * 1024;
/// Time limit to read a request and write its answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("listening on {addr} (ListeningAddress / ListeningPort)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl HttpError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Bind { .. } => "http_bind",
        }
    }
}

/// Which optional endpoints are on (Azure NPM's Toggles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub metrics: bool,
    pub debug: bool,
}

/// One answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Binds the listening socket (done before loading the datapath, so a taken port fails fast).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, observer: Arc<Observer>, endpoints: Endpoints) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                tracing::debug!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let observer = Arc::clone(&observer);
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection(stream, &observer, endpoints))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%peer, %error, "HTTP connection"),
                Err(_) => tracing::debug!(%peer, "HTTP connection timed out"),
            }
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    observer: &Observer,
    endpoints: Endpoints,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    let response = loop {
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            break None;
        }
        if head.len() > MAX_HEAD {
            break Some(Response::text(431, "request head too large\n"));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            // Closed before a full head: nothing to answer.
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let (response, head_only) = match response {
        Some(r) => (r, false),
        None => match parse_request_line(&head) {
            Some((method, target)) => {
                let head_only = method == "HEAD";
                if method == "GET" || head_only {
                    (route(observer, endpoints, target), head_only)
                } else {
                    (Response::text(405, "only GET and HEAD\n"), false)
                }
            }
            None => (Response::text(400, "malformed request line\n"), false),
        },
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        reason_phrase(response.status),
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(response.body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// `METHOD TARGET HTTP/1.x` → (method, path without query).
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(head).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some((method, path))
}

/// The answer for `path` (pure: no I/O besides the metrics collectors' reads).
pub fn route(observer: &Observer, endpoints: Endpoints, path: &str) -> Response {
    let probe =
        |a: super::health::ProbeAnswer| Response::text(if a.ok { 200 } else { 503 }, a.body);
    let metrics = |encoded: Result<String, std::fmt::Error>| match encoded {
        Ok(body) => Response {
            status: 200,
            content_type: OPENMETRICS,
            body,
        },
        Err(_) => Response::text(500, "encoding the metrics failed\n"),
    };
    match path {
        "/healthz" => probe(observer.health.liveness()),
        "/readyz" => probe(observer.health.readiness()),
        "/node-metrics" if endpoints.metrics => metrics(observer.metrics.encode_node()),
        "/cluster-metrics" if endpoints.metrics => metrics(observer.metrics.encode_cluster()),
        "/debug/state" if endpoints.debug => {
            let mut state = match serde_json::to_value(observer.health.debug_state()) {
                Ok(v) => v,
                Err(e) => return Response::text(500, format!("{e}\n")),
            };
            if let Some(obj) = state.as_object_mut() {
                obj.insert("config".into(), observer.config().clone());
            }
            match serde_json::to_string_pretty(&state) {
                Ok(body) => Response {
                    status: 200,
                    content_type: "application/json",
                    body: body + "\n",
                },
                Err(e) => Response::text(500, format!("{e}\n")),
            }
        }
        _ => Response::text(404, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::enforcer::ApplyReport;
    use crate::observe::Trigger;
    use crate::state::ClusterSnapshot;

    fn observer() -> Observer {
        Observer::new(
            Duration::from_secs(60),
            serde_json::json!({"ListeningPort": 1}),
        )
    }

    const ALL: Endpoints = Endpoints {
        metrics: true,
        debug: true,
    };

    #[test]
    fn toggles_turn_endpoints_off_and_probes_stay() {
        let o = observer();
        o.tick();
        let off = Endpoints {
            metrics: false,
            debug: false,
        };
        for path in ["/node-metrics", "/cluster-metrics", "/debug/state", "/nope"] {
            assert_eq!(route(&o, off, path).status, 404, "{path}");
        }
        assert_eq!(route(&o, off, "/healthz").status, 200);
        assert_eq!(route(&o, off, "/readyz").status, 503, "nothing applied yet");
        assert_eq!(route(&o, ALL, "/node-metrics").status, 200);
        assert_eq!(route(&o, ALL, "/cluster-metrics").content_type, OPENMETRICS);

        o.applied(
            &ClusterSnapshot::default(),
            &ApplyReport::default(),
            Trigger::Change,
        );
        assert_eq!(route(&o, off, "/readyz").status, 200);
        let debug = route(&o, ALL, "/debug/state");
        assert_eq!(debug.status, 200);
        let v: serde_json::Value = serde_json::from_str(&debug.body).expect("JSON");
        assert_eq!(v["ready"], true);
        assert_eq!(v["source_connected"], true);
        assert_eq!(v["counts"]["map_entries"]["policy"], 0);
        assert_eq!(v["config"]["ListeningPort"], 1);
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line(b"GET /readyz?verbose=1 HTTP/1.1\r\nHost: x"),
            Some(("GET", "/readyz"))
        );
        assert_eq!(parse_request_line(b"GET /x HTTP/2"), None);
        assert_eq!(parse_request_line(b"GET http://x/ HTTP/1.1"), None);
        assert_eq!(parse_request_line(b"garbage"), None);
    }

    /// Over a real socket: status lines, HEAD without a body, bad methods, oversized heads.
    #[test]
    fn serves_over_tcp() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(bind("127.0.0.1:0".parse().expect("addr")))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let o = Arc::new(observer());
        o.tick();
        let server = rt.spawn(serve(listener, o, ALL));
        let exchange = move |request: &[u8]| -> String {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s.write_all(request).expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read");
            out
        };
        let mut oversized = b"GET /healthz HTTP/1.1\r\nX: ".to_vec();
        oversized.resize(MAX_HEAD + 1, b'a');
        let (get, head, post, big) = rt.block_on(async {
            tokio::task::spawn_blocking(move || {
                (
                    exchange(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"),
                    exchange(b"HEAD /node-metrics HTTP/1.1\r\n\r\n"),
                    exchange(b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
                    // Exactly one byte over the limit and no end of head: the server reads
                    // all of it (so closing sends no RST) and refuses.
                    exchange(&oversized),
                )
            })
            .await
            .expect("client")
        });
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(
            get.contains("\r\nContent-Length: ")
                && get.contains("\r\n\r\nok: enforcement loop ticked"),
            "{get}"
        );
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(OPENMETRICS), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(big.starts_with("HTTP/1.1 431 "), "{big}");
        server.abort();
    }
}
