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
//! | `/debug/explain?from=&to=&port=&protocol=` | JSON: one new flow's verdict and why, from the maps as last applied (`crate::explain`); 400 for bad input, 503 before the first apply; 404 when EnableHTTPDebugAPI is off |
//!
//! Deliberately small: no keep-alive, no request bodies, bounded request heads. The port is
//! on the host network, so every pod of the cluster can reach it; the kubelet's probes must
//! answer within their 1 s timeout whatever other clients do. So:
//!
//! - **Accept never waits.** Each accepted connection is admitted or closed at once (with a
//!   reset, so no TIME_WAIT is left here), counted in `npm_http_connections_dropped_total`.
//! - **Per source address** at most [`MAX_PER_PEER`] = 8 connections at once (the address as
//!   the socket sees it, IPv4-mapped addresses as IPv4; a Prometheus holds one per job, a
//!   kubelet one per probe). Excess: `reason="peer_limit"`.
//! - **In total** at most [`MAX_CONNECTIONS`] = 512; above that, up to [`FIRST_RESERVE`] = 128
//!   more, each only for a source that holds no connection yet (a kubelet probing,
//!   Prometheus's first scrape). One source holds at most 8; filling the 640 takes at least
//!   80 sources at their limit. Excess: `reason="total_limit"`.
//! - **The request head within [`HEAD_TIMEOUT`] = 1 s of the accept** (the whole head, not per
//!   read: bytes dribbled slowly do not extend it). A probe or a scrape sends its request at
//!   once; an idle or slowloris connection is closed after 1 s (a 408 is offered without
//!   waiting), `reason="head_timeout"`. So a slot is held idle for at most 1 s.
//! - **The answer within [`ANSWER_TIMEOUT`] = 10 s** (producing and writing it: a large metrics
//!   page to a slow reader), `reason="answer_timeout"`.
//! - **Probes never wait behind scrapes.** `/healthz` and `/readyz` are answered on the
//!   connection's task from the health state (one short mutex, never held across I/O). Metrics
//!   and the debug view (which read the datapath's maps and the registries' locks) run on the
//!   blocking pool, at most [`MAX_SLOW_ANSWERS`] = 4 at once; others wait for a turn within
//!   their answer deadline, so a stuck map read or a scrape storm cannot take the runtime's
//!   worker threads.
//!
//! Known limit: hostNetwork pods of this node share the kubelet's source address (the node's),
//! so 8 of their connections held at once can make the kubelet's probe be refused; each is
//! closed within 1 s unless it sends a request, and such a pod can stop the agent in other
//! ways anyway.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::Observer;
use super::metrics::{CONTENT_TYPE as OPENMETRICS, HttpDrop};

/// Largest accepted request head.
const MAX_HEAD: usize = 16 * 1024;
/// Time from the accept to a complete request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Time to produce and write the answer, from the complete head on.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections at once from one source address.
pub const MAX_PER_PEER: usize = 8;
/// Connections at once in total, beyond which only a source's first connection is admitted.
pub const MAX_CONNECTIONS: usize = 512;
/// Room above [`MAX_CONNECTIONS`] for sources that hold no connection yet.
pub const FIRST_RESERVE: usize = 128;
/// Metrics / debug answers produced at once (on the blocking pool).
pub const MAX_SLOW_ANSWERS: usize = 4;

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

/// Open connections, in total and by source address.
#[derive(Debug, Default)]
struct Conns {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// Admission of one connection; releases its place when dropped.
struct Admitted {
    conns: Arc<Mutex<Conns>>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = lock(&self.conns);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.by_peer.remove(&self.peer);
            }
        }
    }
}

fn lock(conns: &Mutex<Conns>) -> std::sync::MutexGuard<'_, Conns> {
    // Plain counters: usable after a panic elsewhere.
    conns.lock().unwrap_or_else(|p| p.into_inner())
}

/// Admits a connection from `peer`, or says why not.
fn admit(conns: &Arc<Mutex<Conns>>, peer: IpAddr) -> Result<Admitted, HttpDrop> {
    let mut c = lock(conns);
    let held = c.by_peer.get(&peer).copied().unwrap_or(0);
    if held >= MAX_PER_PEER {
        return Err(HttpDrop::PeerLimit);
    }
    if c.total >= MAX_CONNECTIONS + FIRST_RESERVE || (c.total >= MAX_CONNECTIONS && held > 0) {
        return Err(HttpDrop::TotalLimit);
    }
    c.total += 1;
    *c.by_peer.entry(peer).or_insert(0) += 1;
    Ok(Admitted {
        conns: Arc::clone(conns),
        peer,
    })
}

/// Closes with a reset at once (no lingering, no TIME_WAIT on this side).
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Serves until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, observer: Arc<Observer>, endpoints: Endpoints) {
    let conns = Arc::new(Mutex::new(Conns::default()));
    let slow = Arc::new(Semaphore::new(MAX_SLOW_ANSWERS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(error) => {
                // EMFILE and the like: back off a little, never spin.
                tracing::debug!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        let admitted = match admit(&conns, ip) {
            Ok(a) => a,
            Err(why) => {
                observer.metrics.http_dropped(why);
                tracing::debug!(%peer, reason = why.label(), "HTTP connection refused");
                reset(stream);
                continue;
            }
        };
        let observer = Arc::clone(&observer);
        let slow = Arc::clone(&slow);
        tokio::spawn(async move {
            let _admitted = admitted;
            if let Err(error) = connection(stream, &observer, endpoints, &slow).await {
                tracing::debug!(%peer, %error, "HTTP connection");
            }
        });
    }
}

/// Reads until the end of the request head: `Ok(None)` when the peer closed before one,
/// `Ok(Some(Err(answer)))` when the head is refused.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Result<Vec<u8>, Response>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            return Ok(Some(Ok(head)));
        }
        if head.len() > MAX_HEAD {
            return Ok(Some(Err(Response::text(431, "request head too large\n"))));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
}

async fn connection(
    mut stream: TcpStream,
    observer: &Arc<Observer>,
    endpoints: Endpoints,
    slow: &Arc<Semaphore>,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        // Closed before a full head: nothing to answer.
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            observer.metrics.http_dropped(HttpDrop::HeadTimeout);
            // Offered without waiting: a client that does not read gets nothing more.
            let _ = stream.try_write(&encode(
                &Response::text(408, "request head not complete within 1 s\n"),
                false,
            ));
            return Ok(());
        }
    };
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let answer = async {
        let (response, head_only) = match head {
            Err(refused) => (refused, false),
            Ok(head) => match parse_request_line(&head) {
                Some((method, _)) if method != "GET" && method != "HEAD" => {
                    (Response::text(405, "only GET and HEAD\n"), false)
                }
                Some((method, path)) => {
                    let head_only = method == "HEAD";
                    let r = if is_cheap(path.split('?').next().unwrap_or(path)) {
                        route(observer, endpoints, path)
                    } else {
                        slow_route(observer, endpoints, path.to_owned(), slow).await
                    };
                    (r, head_only)
                }
                None => (Response::text(400, "malformed request line\n"), false),
            },
        };
        stream.write_all(&encode(&response, head_only)).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout_at(deadline, answer).await {
        Ok(r) => r,
        Err(_) => {
            observer.metrics.http_dropped(HttpDrop::AnswerTimeout);
            Ok(())
        }
    }
}

/// Answers made from the health state alone: never queued behind the slow ones.
fn is_cheap(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

/// [`route`] on the blocking pool, at most [`MAX_SLOW_ANSWERS`] at once. The permit goes with
/// the blocking job, so a job still running after its connection gave up keeps its turn.
async fn slow_route(
    observer: &Arc<Observer>,
    endpoints: Endpoints,
    path: String,
    slow: &Arc<Semaphore>,
) -> Response {
    let Ok(permit) = Arc::clone(slow).acquire_owned().await else {
        return Response::text(503, "shutting down\n");
    };
    let observer = Arc::clone(observer);
    let job = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        route(&observer, endpoints, &path)
    });
    match job.await {
        Ok(r) => r,
        Err(_) => Response::text(500, "the answer failed\n"),
    }
}

fn encode(response: &Response, head_only: bool) -> Vec<u8> {
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
    out
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// `METHOD TARGET HTTP/1.x` → (method, target without fragment: the path and its query).
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(head).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let path = target.split('#').next().unwrap_or(target);
    Some((method, path))
}

/// The answer for `target` (a path and its query; pure: no I/O besides the metrics
/// collectors' reads).
pub fn route(observer: &Observer, endpoints: Endpoints, target: &str) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
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
        "/debug/explain" if endpoints.debug => explain(observer, query),
        _ => Response::text(404, "not found\n"),
    }
}

/// `/debug/explain`: evaluated on the state the loop published last.
fn explain(observer: &Observer, query: &str) -> Response {
    let Some(state) = observer.explain() else {
        return Response::text(503, "nothing compiled yet\n");
    };
    match crate::explain::Query::parse_url_query(query).and_then(|q| state.explain(&q)) {
        Ok(answer) => match serde_json::to_string_pretty(&answer) {
            Ok(body) => Response {
                status: 200,
                content_type: "application/json",
                body: body + "\n",
            },
            Err(e) => Response::text(500, format!("{e}\n")),
        },
        Err(e) => Response::text(400, format!("{e}\n")),
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
    fn explain_answers_from_the_published_state_only_with_the_debug_api() {
        use crate::compiler::{IdAllocator, Incremental};
        let mut snap = crate::synth::synthetic_cluster(4, 1, 1, 4);
        snap.node_name = Some("n1".into());
        let inc = Incremental::new(&snap, IdAllocator::default());
        let (a, b) = {
            let mut pods = snap.pods.keys();
            (
                pods.next().expect("pod").to_string(),
                pods.next().expect("pod").to_string(),
            )
        };
        let target = format!("/debug/explain?from={a}&to={b}&port=80");
        let off = Endpoints {
            metrics: true,
            debug: false,
        };
        let o = observer().with_explain(true);
        assert_eq!(route(&o, off, &target).status, 404);
        assert_eq!(route(&o, ALL, &target).status, 503, "nothing published yet");
        o.publish_explain(Some(&ApplyReport::default()), || {
            crate::explain::State::of_node(&inc)
        });
        let r = route(&o, ALL, &target);
        assert_eq!(r.status, 200, "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(v["view"], "node");
        assert_eq!(v["node"], "n1");
        assert_eq!(v["from"]["pod"], a.as_str());
        assert!(v["verdict"] == "allowed" || v["verdict"] == "denied");
        let r = route(&o, ALL, "/debug/explain?from=x/nope&to=1.2.3.4&port=80");
        assert_eq!(r.status, 400);
        assert!(r.body.contains("x/nope: no such pod"), "{}", r.body);
        assert_eq!(route(&o, ALL, "/debug/explain?to=1.2.3.4").status, 400);
        // Off unless asked for: nothing is published.
        let quiet = observer();
        quiet.publish_explain(Some(&ApplyReport::default()), || {
            unreachable!("copied with explain off")
        });
        assert!(quiet.explain().is_none());
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line(b"GET /readyz?verbose=1#top HTTP/1.1\r\nHost: x"),
            Some(("GET", "/readyz?verbose=1"))
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

    #[test]
    fn admission_caps_each_source_and_keeps_room_for_new_sources() {
        let conns = Arc::new(Mutex::new(Conns::default()));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let mut held: Vec<Admitted> = (0..MAX_PER_PEER)
            .map(|_| admit(&conns, a).expect("under the per-source cap"))
            .collect();
        assert_eq!(admit(&conns, a).err(), Some(HttpDrop::PeerLimit));
        held.pop();
        held.push(admit(&conns, a).expect("a place was given back"));
        // Fill the total with other sources at their cap.
        let mut n = 1u32;
        while lock(&conns).total < MAX_CONNECTIONS {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + n / 8));
            held.push(admit(&conns, ip).expect("below the total"));
            n += 1;
        }
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = admit(&conns, b).expect("a source's first connection uses the reserve");
        assert_eq!(
            admit(&conns, b).err(),
            Some(HttpDrop::TotalLimit),
            "not its second"
        );
        held.push(first);
        for i in 1..FIRST_RESERVE {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0c00_0000 + i as u32));
            held.push(admit(&conns, ip).expect("reserve"));
        }
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        assert_eq!(admit(&conns, c).err(), Some(HttpDrop::TotalLimit));
        drop(held);
        let c0 = lock(&conns);
        assert_eq!((c0.total, c0.by_peer.len()), (0, 0), "all given back");
    }

    /// A datapath whose counters take `0` to read (a stuck map read, a huge node).
    struct SlowCounters(Duration);
    impl crate::datapath::CounterReader for SlowCounters {
        fn read(
            &self,
        ) -> Result<Vec<crate::datapath::PacketCount>, crate::datapath::DatapathError> {
            std::thread::sleep(self.0);
            Ok(vec![])
        }
    }

    /// Keeps `count` connections from `source` to `addr` open until `until`, reconnecting
    /// those the server closes; `dribble`: each sends one byte of a request head every
    /// 100 ms (slowloris), else they send nothing. Returns how many connects succeeded.
    async fn hold(
        source: std::net::Ipv4Addr,
        addr: SocketAddr,
        count: usize,
        dribble: bool,
        until: std::time::Instant,
    ) -> usize {
        const REQUEST: &[u8] =
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaa\r\n\r\n";
        let mut conns: Vec<Option<(TcpStream, usize)>> = (0..count).map(|_| None).collect();
        let mut connects = 0;
        while std::time::Instant::now() < until {
            for slot in &mut conns {
                if let Some((stream, sent)) = slot {
                    let mut buf = [0u8; 512];
                    let open = matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
                    let open = open
                        && (!dribble
                            || (*sent < REQUEST.len() - 1
                                && stream.try_write(&REQUEST[*sent..*sent + 1]).is_ok()));
                    if open {
                        *sent += usize::from(dribble);
                        continue;
                    }
                    *slot = None;
                }
                let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
                    continue;
                };
                if socket.bind(SocketAddr::new(source.into(), 0)).is_err() {
                    continue;
                }
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_millis(200), socket.connect(addr)).await
                {
                    connects += 1;
                    *slot = Some((s, 0));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        connects
    }

    /// One GET over a fresh connection from 127.0.0.1: (status line, time taken).
    fn timed_get(addr: SocketAddr, path: &str) -> (String, Duration) {
        let start = std::time::Instant::now();
        let answer = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        let status = match answer {
            Ok(text) => text.lines().next().unwrap_or_default().to_owned(),
            Err(e) => format!("error: {e}"),
        };
        (status, start.elapsed())
    }

    /// Issue 22: 200 idle connections from one source (127.0.0.2), 20 slowloris ones from
    /// another (127.0.0.3), and six scrapers (127.0.0.4) whose every scrape takes 1.5 s, all
    /// on a 2-worker runtime: `/healthz` and `/readyz` from 127.0.0.1 still answer 200 within
    /// 1 s, every time, for longer than the head deadline (so the attackers reconnect).
    #[test]
    fn probes_answer_within_a_second_while_other_clients_hold_connections() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(bind("127.0.0.1:0".parse().expect("addr")))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let o = Arc::new(observer());
        o.tick();
        o.applied(
            &ClusterSnapshot::default(),
            &ApplyReport::default(),
            Trigger::Change,
        );
        o.metrics
            .set_counter_reader(Box::new(SlowCounters(Duration::from_millis(1500))));
        let server = rt.spawn(serve(listener, Arc::clone(&o), ALL));

        let until = std::time::Instant::now() + Duration::from_secs(5);
        let idle = rt.spawn(hold([127, 0, 0, 2].into(), addr, 200, false, until));
        let slowloris = rt.spawn(hold([127, 0, 0, 3].into(), addr, 20, true, until));
        let scrapes: Vec<_> = (0..6)
            .map(|_| {
                rt.spawn(async move {
                    let mut ok = 0;
                    while std::time::Instant::now() < until {
                        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
                            break;
                        };
                        if socket
                            .bind(SocketAddr::new([127, 0, 0, 4].into(), 0))
                            .is_err()
                        {
                            break;
                        }
                        let Ok(mut s) = socket.connect(addr).await else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        let mut out = Vec::new();
                        let got = tokio::time::timeout(Duration::from_secs(12), async {
                            s.write_all(b"GET /node-metrics HTTP/1.1\r\n\r\n").await?;
                            s.read_to_end(&mut out).await
                        })
                        .await;
                        if matches!(got, Ok(Ok(_))) && out.starts_with(b"HTTP/1.1 200 ") {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();

        // Let the attackers take their places, then probe for 3.5 s (past the 1 s head
        // deadline, so closed connections have been reopened meanwhile).
        std::thread::sleep(Duration::from_millis(700));
        let mut slowest = Duration::ZERO;
        for round in 0..14 {
            for path in ["/healthz", "/readyz"] {
                let (status, took) = timed_get(addr, path);
                assert_eq!(status, "HTTP/1.1 200 OK", "{path}, round {round}");
                assert!(
                    took < Duration::from_secs(1),
                    "{path} took {took:?} in round {round}"
                );
                slowest = slowest.max(took);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let (idle, slowloris, scraped) = rt.block_on(async {
            let mut scraped = 0;
            for s in scrapes {
                scraped += s.await.expect("scraper");
            }
            (
                idle.await.expect("idle"),
                slowloris.await.expect("slowloris"),
                scraped,
            )
        });
        let node = o.metrics.encode_node().expect("encode");
        let dropped = |reason: &str| {
            node.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "npm_http_connections_dropped_total{{reason=\"{reason}\"}} "
                    ))
                })
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        server.abort();
        rt.shutdown_timeout(Duration::from_secs(5));
        eprintln!(
            "slowest probe {slowest:?}; connects: idle {idle}, slowloris {slowloris}; \
             scrapes answered {scraped}; dropped: peer_limit {}, head_timeout {}",
            dropped("peer_limit"),
            dropped("head_timeout")
        );
        assert!(idle >= 200 && slowloris >= 20, "the attackers connected");
        assert!(
            dropped("peer_limit") >= 100.0,
            "the excess of one source is refused"
        );
        assert!(
            dropped("head_timeout") >= 8.0,
            "idle and slowloris connections are closed"
        );
        assert!(scraped >= 4, "slow scrapes are still answered: {scraped}");
    }
}
