//! deploy/ as it runs: the DaemonSet's container, executed as the kubelet would execute it.
//!
//! - `the_daemonsets_command_args_and_env_are_what_the_cli_reads` (unprivileged): the
//!   container's command is where the Dockerfile installs the binary, its args parse with the
//!   real CLI parser into `run` from the in-cluster config with the ConfigMap's file, every env
//!   var it sets is one the CLI reads, and the probes, the config file and the pin directory
//!   line up with the ConfigMap and the volume mounts.
//! - `rbac_is_exactly_the_verbs_the_watchers_use` (unprivileged): the real kube client, through
//!   start-up, dropped watches, 410 Gone, expired list pages and periodic re-lists against the
//!   in-test API server; the (group, resource, verb) of every request it sent is exactly what
//!   deploy/clusterrole.yaml grants.
//! - `the_daemonset_pod_runs_in_cluster_with_its_capabilities_and_enforces` (root, as CI runs):
//!   `npm-agent` with exactly the container's command, args and env, the capability set of its
//!   securityContext (everything else dropped from the bounding set, no_new_privs), a read-only
//!   root filesystem, and the in-cluster config: the service account token, CA and namespace at
//!   /var/run/secrets/kubernetes.io/serviceaccount (in a private mount namespace) and
//!   KUBERNETES_SERVICE_HOST/PORT pointing at the in-test API server speaking HTTPS on the lab
//!   node's loopback. It becomes ready on the probes' port, enforces with real packets, sends
//!   the token, repairs kernel-map drift at the periodic resync, keeps enforcement while the
//!   API server is lost, and stops on SIGTERM within the pod's grace period leaving
//!   enforcement in place.
//!
//! What differs from a kubelet, and why: the config volume is a temporary directory (the args'
//! `/etc/npm` is rewritten to it: nothing may be created under the host's /etc); the pins go to
//! a test directory (`--bpffs-dir`, appended) so that no real agent's pins are touched; and
//! `NPM_RESYNC_PERIOD_MINUTES=1` (an env override of the ConfigMap's 15) so that the periodic
//! resync happens within the test.
#[path = "common/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "common/http.rs"]
mod http;
#[path = "common/objects.rs"]
mod objects;
#[path = "common/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use fake_apiserver::{FakeApi, Request, Res};
use http::http_get;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use npm_agent::cli::args::{Cli, Command as Verb};
use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::Protocol;
use npm_agent::source::kube::{KubeHandle, KubeSource, KubeSourceConfig, SourceEvent};
use objects::{api_pod, lab_pod, web_from_client};
use serde_json::{Value, json};
use support::{KillOnDrop, RemoveOnDrop, eventually, log_tail};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The first document of deploy/<file>, typed.
fn manifest<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = repo().join("deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn daemonset() -> DaemonSet {
    manifest("daemonset.yaml")
}

fn container(ds: &DaemonSet) -> Container {
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(pod.containers.len(), 1, "one container");
    pod.containers[0].clone()
}

/// The ConfigMap's `azure-npm.json`.
fn config_json() -> String {
    let cm: ConfigMap = manifest("configmap.yaml");
    cm.data
        .and_then(|d| d.get("azure-npm.json").cloned())
        .expect("azure-npm.json in the ConfigMap")
}

/// (apiGroup, resource, verb) granted by deploy/clusterrole.yaml.
fn granted() -> BTreeSet<(String, String, String)> {
    let role: ClusterRole = manifest("clusterrole.yaml");
    let mut out = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        for g in rule.api_groups.as_deref().unwrap_or_default() {
            for r in rule.resources.as_deref().unwrap_or_default() {
                for v in &rule.verbs {
                    out.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    out
}

/// The RBAC (apiGroup, resource, verb) a request needs. Anything but a GET of one of the three
/// cluster-wide collections fails the test: it would need a grant the ClusterRole lacks.
fn needs(r: &Request) -> (String, String, String) {
    let (group, resource) = match r.res {
        Some(Res::Namespaces) => ("", "namespaces"),
        Some(Res::Pods) => ("", "pods"),
        Some(Res::NetworkPolicies) => ("networking.k8s.io", "networkpolicies"),
        None => panic!(
            "the agent sent {} {}, which is none of the watched collections",
            r.method, r.path
        ),
    };
    assert_eq!(r.method, "GET", "{} {}", r.method, r.path);
    let verb = if r.is_watch() { "watch" } else { "list" };
    (group.into(), resource.into(), verb.into())
}

#[test]
fn the_daemonsets_command_args_and_env_are_what_the_cli_reads() {
    let ds = daemonset();
    let c = container(&ds);
    let command = c.command.clone().unwrap_or_default();
    assert_eq!(command, ["/usr/local/bin/npm-agent"]);
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("COPY --from=build /out/npm-agent /usr/local/bin/npm-agent"),
        "the Dockerfile installs the binary where the DaemonSet runs it"
    );

    // The real parser, as main() runs it.
    let args = c.args.clone().unwrap_or_default();
    let cli = Cli::try_parse_from(std::iter::once("npm-agent".to_string()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("the DaemonSet's args {args:?} do not parse: {e}"));
    let Verb::Run(run) = cli.command else {
        panic!("the DaemonSet must run `run`, not {args:?}");
    };
    assert!(run.manifests.is_none(), "the Kubernetes API is the source");
    assert!(
        run.kubeconfig.is_none(),
        "no --kubeconfig: the in-cluster service account"
    );
    assert!(!run.once, "runs until stopped");

    // --config names the ConfigMap's key inside the ConfigMap's mount.
    let config = run.config.clone().expect("--config");
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let volumes = pod.volumes.clone().unwrap_or_default();
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let config_mount = mounts
        .iter()
        .find(|m| config.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("{} is in no volume mount", config.display()));
    let volume = volumes
        .iter()
        .find(|v| v.name == config_mount.name)
        .expect("the mount's volume");
    let cm: ConfigMap = manifest("configmap.yaml");
    assert_eq!(
        volume.config_map.as_ref().map(|v| v.name.as_str()),
        cm.metadata.name.as_deref()
    );
    let key = config
        .strip_prefix(&config_mount.mount_path)
        .expect("under the mount");
    assert!(
        cm.data
            .as_ref()
            .is_some_and(|d| d.contains_key(&key.to_string_lossy().into_owned())),
        "the ConfigMap has no key {}",
        key.display()
    );
    // The pins go into the host's bpffs mount.
    let bpffs_mount = mounts
        .iter()
        .find(|m| run.bpffs_dir.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("{} is in no volume mount", run.bpffs_dir.display()));
    let bpffs = volumes
        .iter()
        .find(|v| v.name == bpffs_mount.name)
        .and_then(|v| v.host_path.as_ref())
        .expect("the pin directory's volume is a hostPath");
    assert_eq!(bpffs.path, "/sys/fs/bpf");
    assert_eq!(
        bpffs_mount.mount_propagation.as_deref(),
        Some("HostToContainer")
    );

    // Every env var the container sets is one the CLI reads (an unread one would be a typo).
    let reads: BTreeSet<String> = Cli::command()
        .get_arguments()
        .chain(
            Cli::command()
                .find_subcommand("run")
                .expect("run")
                .get_arguments(),
        )
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    // ... and the NPM_* overrides of the config file that `run` asks the environment for.
    let asked = std::cell::RefCell::new(BTreeSet::new());
    npm_agent::config::Overrides::from_env(|k| {
        asked.borrow_mut().insert(k.to_string());
        None
    })
    .expect("empty environment");
    let reads: BTreeSet<String> = reads.into_iter().chain(asked.into_inner()).collect();
    assert!(reads.contains("NPM_RESYNC_PERIOD_MINUTES"), "{reads:?}");
    let env = c.env.clone().unwrap_or_default();
    assert!(!env.is_empty());
    for e in &env {
        assert!(
            reads.contains(&e.name),
            "the DaemonSet sets {}, which npm-agent run does not read (reads: {reads:?})",
            e.name
        );
    }
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let arg = Cli::command()
        .find_subcommand("run")
        .expect("run")
        .get_arguments()
        .find(|a| a.get_env().is_some_and(|e| e == "NODE_NAME"))
        .map(|a| a.get_id().to_string());
    assert_eq!(
        arg.as_deref(),
        Some("node_name"),
        "NODE_NAME is --node-name"
    );
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );

    // The probes ask the port the config file listens on.
    let settings: Value = serde_json::from_str(&config_json()).expect("config JSON");
    let port = settings["ListeningPort"].as_i64().expect("ListeningPort") as i32;
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.port, IntOrString::Int(port));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_is_exactly_the_verbs_the_watchers_use() {
    let api = FakeApi::start();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}));
    for i in 0..5 {
        api.apply(api_pod(
            &format!("p{i}"),
            "x",
            &format!("10.9.0.{}", i + 1),
            "n",
        ));
    }
    api.apply(web_from_client());
    let kubeconfig = std::env::temp_dir().join(format!("npm-dsrbac-{}.yaml", std::process::id()));
    let _kc = RemoveOnDrop(kubeconfig.clone());
    api.write_kubeconfig(&kubeconfig);
    let mut config = KubeSourceConfig {
        relist_every: Some(Duration::from_millis(1500)),
        state_tick: Duration::from_millis(50),
        ..KubeSourceConfig::default()
    };
    // Pages of two (continue tokens), and fast retries.
    config.watch.page_size = Some(2);
    config.watch.backoff_min = Duration::from_millis(50);
    config.watch.backoff_max = Duration::from_millis(200);
    let mut handle = KubeSource::connect(Some(&kubeconfig), config)
        .await
        .expect("client")
        .spawn();
    assert!(drain(&mut handle, 5000).await, "never synced");
    // Every path the watchers have: events, a dropped watch, 410 Gone after compaction, an
    // expired list page, and the periodic re-list.
    api.apply(api_pod("p9", "y", "10.9.0.9", "n"));
    api.drop_watches();
    drain(&mut handle, 500).await;
    api.apply(api_pod("p8", "y", "10.9.0.8", "n"));
    api.compact();
    api.expire_watches();
    drain(&mut handle, 500).await;
    api.expire_next_lists(1);
    drain(&mut handle, 2500).await;

    let requests = api.requests();
    let used: BTreeSet<_> = requests.iter().map(needs).collect();
    assert_eq!(
        used,
        granted(),
        "the ClusterRole must grant exactly what the client asked for ({} requests)",
        requests.len()
    );
    // Every path above was taken (else the test proves less than it says).
    assert!(
        requests.iter().any(|r| r.query.contains_key("continue")),
        "no paged list"
    );
    let pod_lists = requests
        .iter()
        .filter(|r| r.res == Some(Res::Pods) && r.is_list())
        .count();
    assert!(pod_lists >= 3, "re-lists: {pod_lists}");
}

/// Receives the source's events for `ms`; whether `Synced` was among them.
async fn drain(handle: &mut KubeHandle, ms: u64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    let mut synced = false;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, handle.events.recv()).await {
        synced |= matches!(ev, SourceEvent::Synced);
    }
    synced
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA and a server certificate for 127.0.0.1 signed by it (openssl), in `dir`.
fn make_certs(dir: &Path) {
    let p = |f: &str| dir.join(f);
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=npm-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
            ])
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.crt")),
    );
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=kube-apiserver",
                "-keyout",
            ])
            .arg(p("server.key"))
            .arg("-out")
            .arg(p("server.csr")),
    );
    std::fs::write(
        p("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "1", "-in"])
            .arg(p("server.csr"))
            .arg("-CA")
            .arg(p("ca.crt"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-CAcreateserial")
            .arg("-extfile")
            .arg(p("server.ext"))
            .arg("-out")
            .arg(p("server.crt")),
    );
}

/// Entries of a pinned map: their keys as bpftool prints them.
fn map_keys(pinned: &Path) -> Vec<Vec<String>> {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pinned),
    );
    let v: Value = serde_json::from_str(&out).expect("bpftool json");
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    e["key"]
                        .as_array()
                        .expect("key bytes")
                        .iter()
                        .map(|b| b.as_str().expect("byte").to_string())
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The kubelet's part: the service account files, a private mount namespace in which they
/// are at the in-cluster path, a read-only root, then exactly the container's capabilities.
const POD_SANDBOX: &str = r#"set -e
sa="$1"; caps="$2"; shift 2
mount -t tmpfs -o size=1m,mode=0755 tmpfs /run
mkdir -p /run/secrets/kubernetes.io/serviceaccount
cp "$sa/token" "$sa/ca.crt" "$sa/namespace" /run/secrets/kubernetes.io/serviceaccount/
mount -o remount,bind,ro /
exec setpriv --no-new-privs --inh-caps -all --bounding-set "-all$caps" -- "$@"
"#;

#[test]
fn the_daemonset_pod_runs_in_cluster_with_its_capabilities_and_enforces() {
    let ds = daemonset();
    let c = container(&ds);
    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("npm-dsrun-{pid}"));
    let _work = RemoveOnDrop(work.clone());
    let (sa, etc_npm, home) = (work.join("sa"), work.join("etc-npm"), work.join("home"));
    for d in [&sa, &etc_npm, &home] {
        std::fs::create_dir_all(d).expect("temp dir");
    }
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-dsrun-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let agent_log = work.with_extension("log");
    let _log = RemoveOnDrop(agent_log.clone());

    // The service account volume and the ConfigMap volume.
    make_certs(&work);
    let token = format!("npm-test-token-{pid}");
    std::fs::write(sa.join("token"), &token).expect("token");
    std::fs::copy(work.join("ca.crt"), sa.join("ca.crt")).expect("ca.crt");
    std::fs::write(sa.join("namespace"), "kube-system").expect("namespace");
    std::fs::write(etc_npm.join("azure-npm.json"), config_json()).expect("config");

    let lab = Lab::build(LabSpec {
        pods: vec![
            lab_pod("web", "web", "10.248.0.2"),
            lab_pod("client", "client", "10.248.0.3"),
            lab_pod("intruder", "intruder", "10.248.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node().name().to_string();
    let listener = lab
        .node()
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind in node netns");
    let api = FakeApi::start_tls_on(listener, &work.join("server.crt"), &work.join("server.key"));
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}}));
    for (name, app, ip) in [
        ("web", "web", "10.248.0.2"),
        ("client", "client", "10.248.0.3"),
        ("intruder", "intruder", "10.248.0.4"),
    ] {
        api.apply(api_pod(name, app, ip, "node-1"));
    }
    api.apply(api_pod("elsewhere", "client", "10.248.9.9", "node-2"));
    api.apply(web_from_client());

    // The container: command + args (the config volume's path mapped), env (the downward API
    // resolved as the kubelet would for a pod on node-1), capabilities.
    let sc = c.security_context.clone().expect("securityContext");
    let caps = sc.capabilities.clone().expect("capabilities");
    assert_eq!(caps.drop.clone().unwrap_or_default(), ["ALL"]);
    let caps: String = caps
        .add
        .unwrap_or_default()
        .iter()
        .map(|c| format!(",+{}", c.to_ascii_lowercase()))
        .collect();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    assert_eq!(argv, ["/usr/local/bin/npm-agent"]);
    argv[0] = env!("CARGO_BIN_EXE_npm-agent").to_string();
    for a in c.args.clone().unwrap_or_default() {
        argv.push(match a.strip_prefix("/etc/npm/") {
            Some(rest) => etc_npm.join(rest).to_string_lossy().into_owned(),
            None => a,
        });
    }
    argv.push("--bpffs-dir".into());
    argv.push(bpffs.to_string_lossy().into_owned());
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{node}"))
        .args(["--", "unshare", "--mount", "--propagation", "private", "--"])
        .args(["sh", "-c", POD_SANDBOX, "pod-sandbox"])
        .arg(&sa)
        .arg(&caps)
        .args(&argv)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", &home)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", api.port().to_string())
        .env("NPM_RESYNC_PERIOD_MINUTES", "1");
    for e in c.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().map(|f| f.field_path.as_str());
                assert_eq!(field, Some("spec.nodeName"), "env {} from {from:?}", e.name);
                "node-1".to_string()
            }
            other => panic!("env {}: {other:?}", e.name),
        };
        cmd.env(&e.name, value);
    }
    let started = Instant::now();
    let mut agent = KillOnDrop(
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&agent_log).expect("log file"))
            .spawn()
            .expect("spawn the pod"),
    );

    // Ready on the probes' port, from the in-cluster config over HTTPS with the token.
    let port = match c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()) {
        Some(g) => match g.port {
            IntOrString::Int(p) => p as u16,
            ref other => panic!("readiness port {other:?}"),
        },
        None => panic!("no readiness probe"),
    };
    let get = |path: &str| http_get(lab.node(), port, path);
    assert!(
        eventually(60, || get("/readyz").is_ok_and(|(code, _)| code == 200)),
        "never ready: {:?}\n{}",
        get("/readyz"),
        log_tail(&agent_log)
    );
    eprintln!("ready {:?} after start", started.elapsed());
    let (code, body) = get("/healthz").expect("/healthz");
    assert_eq!(code, 200, "{body}");
    let requests = api.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {token}").as_str()),
            "{} {} without the service account token",
            r.method,
            r.path
        );
    }
    let used: BTreeSet<_> = requests.iter().map(needs).collect();
    assert!(
        used.is_subset(&granted()),
        "requests beyond the ClusterRole: {:?}",
        used.difference(&granted()).collect::<Vec<_>>()
    );

    // Enforcing this node's pods with peers from the whole cluster.
    let allowed = |from: &str| lab.probe(from, "default/web", 80, Protocol::Tcp).allowed;
    assert!(
        eventually(20, || !allowed("default/intruder")),
        "policy never enforced:\n{}",
        log_tail(&agent_log)
    );
    assert!(allowed("default/client"));
    let endpoints = bpffs
        .join(format!("v{}", npm_common::ABI_VERSION))
        .join(npm_common::maps::MAP_ENDPOINTS);
    assert_eq!(map_keys(&endpoints).len(), 3, "the three pods of node-1");
    let (_, metrics) = get("/cluster-metrics").expect("/cluster-metrics");
    assert!(metrics.contains("npm_num_pods 4\n"), "{metrics}");
    let (_, state) = get("/debug/state").expect("/debug/state");
    let state: Value = serde_json::from_str(&state).expect("debug JSON");
    assert_eq!(
        state["config"]["effective"]["resync_period_minutes"], 1,
        "{state}"
    );
    assert_eq!(state["source_connected"], true, "{state}");

    // Drift: someone empties the endpoint map behind the agent's back. The web pod is open
    // until the periodic resync (1 minute here) re-reads the maps and repairs them.
    for key in map_keys(&endpoints) {
        run_ok(
            Command::new("bpftool")
                .args(["map", "delete", "pinned"])
                .arg(&endpoints)
                .arg("key")
                .args(&key),
        );
    }
    assert!(map_keys(&endpoints).is_empty());
    let drifted = Instant::now();
    assert!(allowed("default/intruder"), "the drift opens the pod");
    assert!(
        eventually(90, || map_keys(&endpoints).len() == 3),
        "the periodic resync never repaired the endpoint map:\n{}",
        log_tail(&agent_log)
    );
    eprintln!("drift repaired {:?} after it was made", drifted.elapsed());
    assert!(!allowed("default/intruder"), "repaired maps enforce again");
    assert!(allowed("default/client"));

    // The API server is lost: nothing is opened or closed, and readiness says so.
    api.set_down(true);
    assert!(
        eventually(30, || get("/readyz").is_ok_and(
            |(code, body)| code == 200 && body.contains("disconnected")
        )),
        "/readyz never reported the lost API server: {:?}",
        get("/readyz")
    );
    assert!(!allowed("default/intruder"));
    assert!(allowed("default/client"));
    api.set_down(false);

    // SIGTERM (what the kubelet sends): the agent exits within the pod's grace period and the
    // enforcement stays.
    let grace = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.termination_grace_period_seconds)
        .expect("terminationGracePeriodSeconds");
    run_ok(Command::new("kill").args(["-TERM", &agent.0.id().to_string()]));
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = agent.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(grace as u64),
            "still running {grace} s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        log_tail(&agent_log)
    );
    eprintln!("exited {:?} after SIGTERM", stopped.elapsed());
    assert!(!allowed("default/intruder"), "enforcement removed at exit");
    assert!(allowed("default/client"));
}
