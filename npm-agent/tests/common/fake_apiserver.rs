//! An in-test Kubernetes API server: a real HTTP/1.1 server on a loopback port that speaks the
//! list/watch protocol for Namespaces, Pods and NetworkPolicies, the way kube-apiserver does:
//!
//! - one global resourceVersion (etcd's revision), bumped by every write; objects carry theirs;
//! - `GET <collection>` lists (`limit` + `continue` pages; the list's `metadata.resourceVersion`);
//!   an expired continue token, or one forced with [`FakeApi::expire_next_lists`], is answered
//!   with HTTP 410 and a `Status` (reason `Expired`);
//! - `GET <collection>?watch=true&resourceVersion=N` streams (chunked, newline-delimited JSON)
//!   every event after N, then new ones as they happen; `BOOKMARK` events when bookmarks were
//!   asked for; an `ERROR` event with a 410 `Status` when N is older than the kept history
//!   ([`FakeApi::compact`]) or when the server expires open watches ([`FakeApi::expire_watches`]);
//!   the stream ends at `timeoutSeconds`;
//! - faults: drop every open watch ([`FakeApi::drop_watches`]), refuse all connections
//!   ([`FakeApi::set_down`]), answer lists slowly ([`FakeApi::set_list_delay`]).
//!
//! It runs on its own thread and runtime (so a test may be synchronous), and stops on drop.
//! [`FakeApi::start_tls_on`] serves HTTPS instead, as kube-apiserver does in a cluster (for the
//! in-cluster config, which is always `https://`); every request's method and `Authorization`
//! header are recorded.
// Shared by several test crates: each uses a part, and `pub` is for them.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A client connection: plain TCP or TLS over it.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}
type Sock = Box<dyn Conn>;

/// The three collections served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Res {
    Namespaces,
    Pods,
    NetworkPolicies,
}

impl Res {
    fn from_path(path: &str) -> Option<Res> {
        match path {
            "/api/v1/namespaces" => Some(Res::Namespaces),
            "/api/v1/pods" => Some(Res::Pods),
            "/apis/networking.k8s.io/v1/networkpolicies" => Some(Res::NetworkPolicies),
            _ => None,
        }
    }
    fn of_kind(kind: &str) -> Res {
        match kind {
            "Namespace" => Res::Namespaces,
            "Pod" => Res::Pods,
            "NetworkPolicy" => Res::NetworkPolicies,
            other => panic!("fake API server: unsupported kind {other}"),
        }
    }
    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Res::Namespaces => ("v1", "NamespaceList"),
            Res::Pods => ("v1", "PodList"),
            Res::NetworkPolicies => ("networking.k8s.io/v1", "NetworkPolicyList"),
        }
    }
    fn kind(self) -> (&'static str, &'static str) {
        match self {
            Res::Namespaces => ("v1", "Namespace"),
            Res::Pods => ("v1", "Pod"),
            Res::NetworkPolicies => ("networking.k8s.io/v1", "NetworkPolicy"),
        }
    }
}

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The `Authorization` header, as sent.
    pub authorization: Option<String>,
    pub res: Option<Res>,
    pub path: String,
    pub query: BTreeMap<String, String>,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
    pub fn is_list(&self) -> bool {
        self.res.is_some() && !self.is_watch()
    }
    pub fn resource_version(&self) -> Option<u64> {
        self.query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
    }
}

#[derive(Default)]
struct Collection {
    /// (namespace, name) -> object.
    objects: BTreeMap<(String, String), Value>,
    /// (sequence, resourceVersion, type, object); bookmarks included.
    log: Vec<(u64, u64, &'static str, Value)>,
    /// The highest sequence compacted away: a watch that had not sent it must end with 410.
    compacted_seq: u64,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Orders log entries (bookmarks share their resourceVersion with the last write).
    seq: u64,
    /// Watches from a resourceVersion older than this get 410 Gone.
    oldest: u64,
    coll: BTreeMap<Res, Collection>,
    down: bool,
    list_delay: BTreeMap<Res, Duration>,
    expire_lists: u32,
    /// Bumped to end every open watch; `expire` says whether with a 410 event first.
    watch_epoch: u64,
    expire: bool,
    open_watches: usize,
    requests: Vec<Request>,
}

pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// Bumped on every change: wakes the watch streams.
    bump: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    port: u16,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    /// Listens on 127.0.0.1 (an ephemeral port) of the calling thread's network namespace.
    pub fn start() -> FakeApi {
        Self::start_on(std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
    }

    /// Serves on a listener already bound (e.g. inside a test's network namespace).
    pub fn start_on(listener: std::net::TcpListener) -> FakeApi {
        Self::serve_on(listener, None)
    }

    /// Serves HTTPS on `listener` with the certificate chain and private key in these PEM
    /// files (e.g. made with `openssl`; the certificate must name the address clients use).
    pub fn start_tls_on(
        listener: std::net::TcpListener,
        cert_pem: &Path,
        key_pem: &Path,
    ) -> FakeApi {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
            .expect("read certificate PEM")
            .collect::<Result<_, _>>()
            .expect("parse certificate PEM");
        let key = PrivateKeyDer::from_pem_file(key_pem).expect("read private key PEM");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
        Self::serve_on(
            listener,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
    }

    fn serve_on(
        listener: std::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeApi {
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            oldest: 100,
            ..State::default()
        }));
        let (bump, bump_rx) = watch::channel(0u64);
        let (stop, stop_rx) = watch::channel(false);
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(serve(listener, tls, st, bump_rx, stop_rx));
        });
        FakeApi {
            state,
            bump,
            stop,
            port,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    fn change(&self, f: impl FnOnce(&mut State)) {
        {
            let mut s = self.state.lock().expect("state");
            f(&mut s);
        }
        self.bump.send_modify(|v| *v += 1);
    }

    /// Creates or replaces an object (its `kind` says where); returns its resourceVersion.
    pub fn apply(&self, obj: Value) -> u64 {
        self.write(obj, true)
    }

    /// Like [`FakeApi::apply`], but no watch ever sees the event (a lost event): only a list
    /// finds the new state.
    pub fn apply_silently(&self, obj: Value) -> u64 {
        self.write(obj, false)
    }

    fn write(&self, mut obj: Value, log: bool) -> u64 {
        let res = Res::of_kind(obj["kind"].as_str().expect("kind"));
        let mut rv = 0;
        self.change(|s| {
            s.rv += 1;
            rv = s.rv;
            let name = obj["metadata"]["name"].as_str().expect("name").to_string();
            let ns = match res {
                Res::Namespaces => String::new(),
                _ => obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
            };
            let meta = obj["metadata"].as_object_mut().expect("metadata");
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.insert("uid".into(), json!(format!("uid-{ns}-{name}")));
            if res != Res::Namespaces {
                meta.insert("namespace".into(), json!(ns));
            }
            let c = s.coll.entry(res).or_default();
            let kind = if c.objects.contains_key(&(ns.clone(), name.clone())) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            c.objects.insert((ns, name), obj.clone());
            if !log {
                return;
            }
            s.seq += 1;
            let seq = s.seq;
            s.coll
                .entry(res)
                .or_default()
                .log
                .push((seq, rv, kind, obj));
        });
        rv
    }

    /// Deletes an object; returns the new resourceVersion. Panics when it does not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> u64 {
        let res = Res::of_kind(kind);
        let mut rv = 0;
        self.change(|s| {
            s.rv += 1;
            rv = s.rv;
            let c = s.coll.entry(res).or_default();
            let ns = if res == Res::Namespaces {
                ""
            } else {
                namespace
            };
            let mut obj = c
                .objects
                .remove(&(ns.to_string(), name.to_string()))
                .unwrap_or_else(|| panic!("delete {kind} {namespace}/{name}: not there"));
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            s.seq += 1;
            let seq = s.seq;
            s.coll
                .entry(res)
                .or_default()
                .log
                .push((seq, rv, "DELETED", obj));
        });
        rv
    }

    /// Sends a BOOKMARK at the current resourceVersion on every watch that asked for them.
    pub fn bookmark(&self) -> u64 {
        let mut rv = 0;
        self.change(|s| {
            rv = s.rv;
            for res in [Res::Namespaces, Res::Pods, Res::NetworkPolicies] {
                let (api, kind) = res.kind();
                let bm = json!({"apiVersion": api, "kind": kind,
                    "metadata": {"resourceVersion": rv.to_string()}});
                s.seq += 1;
                let seq = s.seq;
                s.coll
                    .entry(res)
                    .or_default()
                    .log
                    .push((seq, rv, "BOOKMARK", bm));
            }
        });
        rv
    }

    /// Forgets the history: a watch from an older resourceVersion than now gets 410 Gone.
    pub fn compact(&self) {
        self.change(|s| {
            s.oldest = s.rv;
            let oldest = s.oldest;
            for c in s.coll.values_mut() {
                if let Some(last) = c.log.iter().filter(|e| e.1 <= oldest).map(|e| e.0).max() {
                    c.compacted_seq = c.compacted_seq.max(last);
                }
                c.log.retain(|(_, rv, _, _)| *rv > oldest);
            }
        });
    }

    /// Compacts and ends every open watch with an ERROR event (410 Gone): the clients must
    /// re-list.
    pub fn expire_watches(&self) {
        self.compact();
        self.change(|s| {
            s.watch_epoch += 1;
            s.expire = true;
        });
    }

    /// Closes every open watch connection abruptly (no final chunk).
    pub fn drop_watches(&self) {
        self.change(|s| {
            s.watch_epoch += 1;
            s.expire = false;
        });
    }

    /// Down: every new connection is closed at once and open watches are dropped.
    pub fn set_down(&self, down: bool) {
        self.change(|s| {
            s.down = down;
            if down {
                s.watch_epoch += 1;
                s.expire = false;
            }
        });
    }

    /// Every list of `res` waits `delay` before answering.
    pub fn set_list_delay(&self, res: Res, delay: Duration) {
        self.change(|s| {
            s.list_delay.insert(res, delay);
        });
    }

    /// The next `n` list requests get HTTP 410 Gone (an expired continue token).
    pub fn expire_next_lists(&self, n: u32) {
        self.change(|s| s.expire_lists = n);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().expect("state").requests.clone()
    }

    pub fn open_watches(&self) -> usize {
        self.state.lock().expect("state").open_watches
    }

    pub fn resource_version(&self) -> u64 {
        self.state.lock().expect("state").rv
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<Mutex<State>>,
    bump: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = TcpListener::from_std(listener).expect("tokio listener");
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((sock, _)) = r else { continue };
                if state.lock().expect("state").down {
                    drop(sock);
                    continue;
                }
                let (state, bump, stop, tls) = (state.clone(), bump.clone(), stop.clone(), tls.clone());
                conns.spawn(async move {
                    let sock: Sock = match tls {
                        None => Box::new(sock),
                        Some(tls) => match tls.accept(sock).await {
                            Ok(s) => Box::new(s),
                            // A failed handshake is a client that does not trust us: no request.
                            Err(_) => return,
                        },
                    };
                    handle(sock, state, bump, stop).await;
                });
            }
            _ = stop.changed() => break,
        }
    }
    conns.shutdown().await;
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

async fn read_head(sock: &mut Sock) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

async fn respond(sock: &mut Sock, code: u16, body: &Value) {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock.write_all(body.as_bytes()).await;
    let _ = sock.flush().await;
}

async fn handle(
    mut sock: Sock,
    state: Arc<Mutex<State>>,
    bump: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
) {
    let Some(head) = read_head(&mut sock).await else {
        return;
    };
    let mut request_line = head.lines().next().unwrap_or("").split_whitespace();
    let method = request_line.next().unwrap_or("").to_string();
    let target = request_line.next().unwrap_or("/").to_string();
    let authorization = head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_string())
    });
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)),
        None => (target.clone(), BTreeMap::new()),
    };
    let req = Request {
        method,
        authorization,
        res: Res::from_path(&path),
        path,
        query,
    };
    {
        let mut s = state.lock().expect("state");
        // Accepted just before the server went down: it answers nothing.
        if s.down {
            return;
        }
        s.requests.push(req.clone());
    }
    let Some(res) = req.res else {
        respond(&mut sock, 404, &status_json(404, "NotFound", "not served")).await;
        return;
    };
    if req.is_watch() {
        watch_stream(sock, res, &req, state, bump, stop).await;
    } else {
        list(sock, res, &req, state).await;
    }
}

async fn list(mut sock: Sock, res: Res, req: &Request, state: Arc<Mutex<State>>) {
    let delay = state
        .lock()
        .expect("state")
        .list_delay
        .get(&res)
        .copied()
        .unwrap_or_default();
    tokio::time::sleep(delay).await;
    let (code, body) = {
        let mut s = state.lock().expect("state");
        if s.down {
            return;
        }
        let limit: usize = req
            .query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        // continue token: "<rv>:<offset>"
        let cont = req.query.get("continue").and_then(|c| {
            let (rv, off) = c.split_once(':')?;
            Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?))
        });
        let expired = s.expire_lists > 0 || cont.is_some_and(|(rv, _)| rv < s.oldest);
        if expired {
            s.expire_lists = s.expire_lists.saturating_sub(1);
            (
                410,
                status_json(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                ),
            )
        } else {
            let (list_rv, offset) = cont.unwrap_or((s.rv, 0));
            let all: Vec<Value> = s
                .coll
                .get(&res)
                .map(|c| c.objects.values().cloned().collect())
                .unwrap_or_default();
            let page: Vec<Value> = all
                .iter()
                .skip(offset)
                .take(limit)
                .map(|o| {
                    // Items of a list carry no apiVersion/kind, as the real server sends them.
                    let mut o = o.clone();
                    if let Some(m) = o.as_object_mut() {
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                    o
                })
                .collect();
            let next = offset + page.len();
            let mut meta = json!({"resourceVersion": list_rv.to_string()});
            if next < all.len() {
                meta["continue"] = json!(format!("{list_rv}:{next}"));
            }
            let (api, kind) = res.list_kind();
            (
                200,
                json!({"apiVersion": api, "kind": kind, "metadata": meta, "items": page}),
            )
        }
    };
    respond(&mut sock, code, &body).await;
}

async fn write_chunk(sock: &mut Sock, line: &str) -> bool {
    let data = format!("{line}\n");
    let framed = format!("{:x}\r\n{data}\r\n", data.len());
    sock.write_all(framed.as_bytes()).await.is_ok() && sock.flush().await.is_ok()
}

async fn watch_stream(
    mut sock: Sock,
    res: Res,
    req: &Request,
    state: Arc<Mutex<State>>,
    mut bump: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = Duration::from_secs(
        req.query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800),
    );
    let deadline = tokio::time::Instant::now() + timeout;
    // The first event sent is the first write after `from`; then it goes by sequence.
    let (from, mut after_seq, epoch, gone) = {
        let mut s = state.lock().expect("state");
        let from = req.resource_version().unwrap_or(s.rv);
        s.open_watches += 1;
        (from, None::<u64>, s.watch_epoch, from < s.oldest)
    };
    struct Open(Arc<Mutex<State>>);
    impl Drop for Open {
        fn drop(&mut self) {
            if let Ok(mut s) = self.0.lock() {
                s.open_watches -= 1;
            }
        }
    }
    let _open = Open(state.clone());
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if sock.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let gone_event = || {
        json!({"type": "ERROR", "object": status_json(410, "Expired",
            "too old resource version")})
        .to_string()
    };
    if gone {
        let _ = write_chunk(&mut sock, &gone_event()).await;
        let _ = sock.write_all(b"0\r\n\r\n").await;
        return;
    }
    loop {
        bump.borrow_and_update();
        let (events, ended) = {
            let s = state.lock().expect("state");
            // Events this watch had not sent yet were compacted away: it is too old (410).
            let behind = match after_seq {
                Some(a) => s.coll.get(&res).is_some_and(|c| c.compacted_seq > a),
                None => from < s.oldest,
            };
            let ended = if s.down {
                Some(false)
            } else if behind {
                Some(true)
            } else {
                (s.watch_epoch != epoch).then_some(s.expire)
            };
            let events: Vec<String> = s
                .coll
                .get(&res)
                .map(|c| {
                    c.log
                        .iter()
                        .filter(|(seq, rv, _, _)| match after_seq {
                            Some(a) => *seq > a,
                            None => *rv > from,
                        })
                        .filter(|(_, _, t, _)| bookmarks || *t != "BOOKMARK")
                        .map(|(_, _, t, o)| json!({"type": t, "object": o}).to_string())
                        .collect()
                })
                .unwrap_or_default();
            after_seq = Some(s.seq);
            (events, ended)
        };
        match ended {
            Some(true) => {
                let _ = write_chunk(&mut sock, &gone_event()).await;
                let _ = sock.write_all(b"0\r\n\r\n").await;
                return;
            }
            // Dropped: close without the final chunk, as a broken connection would.
            Some(false) => return,
            None => {}
        }
        for e in events {
            if !write_chunk(&mut sock, &e).await {
                return;
            }
        }
        tokio::select! {
            r = bump.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
            _ = tokio::time::sleep_until(deadline) => {
                let _ = sock.write_all(b"0\r\n\r\n").await;
                return;
            }
        }
    }
}
