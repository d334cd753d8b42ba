//! The CLI as users script it: verbs, exit codes and `--json` field names.
#[path = "common/support.rs"]
mod support;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::output_within;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .to_path_buf()
}

/// Runs the binary with `args`, bounded (the slowest, a lab, takes seconds; `run` must fail
/// fast here, not serve).
fn agent(args: &[&str]) -> (i32, String, String) {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_npm-agent")).args(args),
        Duration::from_secs(120),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn compile_reports_sizes_as_json_and_exits_zero_on_clean_input() {
    let dir = repo().join("examples/azure-npm");
    let (code, out, err) = agent(&[
        "compile",
        "--manifests",
        dir.to_str().expect("utf8"),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0));
    // 4 pods, all local in an offline compile.
    assert_eq!(v["endpoints"], 4);
    assert_eq!(v["identities"], 4);
    assert!(v["policy"].as_u64().is_some_and(|n| n > 0));
    assert!(
        v["cidrs"].as_u64().is_some_and(|n| n >= 2),
        "0.0.0.0/0 and the except prefix"
    );
}

#[test]
fn compile_names_the_file_object_and_reason_of_bad_input_and_exits_one() {
    let dir = std::env::temp_dir().join(format!("npm-cli-test-{}", std::process::id()));
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: shop}\n\
         spec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.1/33}}]}]\n",
    )
    .expect("write");
    let (code, out, _) = agent(&["compile", "--manifests", dir.to_str().expect("utf8")]);
    assert_eq!(code, 1);
    let line = out
        .lines()
        .find(|l| l.starts_with("problem:"))
        .expect("a problem line");
    assert!(line.contains("bad.yaml"), "{line}");
    assert!(line.contains("NetworkPolicy shop/broken"), "{line}");
    assert!(line.contains("is not a CIDR"), "{line}");
}

#[test]
fn compile_fails_a_policy_over_the_entry_budget_closed_and_keeps_the_others() {
    let dir = std::env::temp_dir().join(format!("npm-cli-budget-{}", std::process::id()));
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());
    std::fs::create_dir_all(&dir).expect("mkdir");
    // Three pods in each of two namespaces, each its own identity (no IPs: compile gives
    // placeholders). "huge" lets every pod of every namespace reach a's web pods on 100
    // ports: 3 × 6 × 100 = 1800 entries; "normal" lets b's pods reach each other on one
    // port: 3 × 3 = 9.
    let mut yaml = String::new();
    for (ns, app) in [("a", "web"), ("b", "db")] {
        yaml += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{kubernetes.io/metadata.name: {ns}}}}}\n---\n"
        );
        for i in 0..3 {
            yaml += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {app}{i}, namespace: {ns}, labels: {{app: {app}, i: \"{i}\"}}}}\n\
                 spec: {{containers: [{{name: c, image: x}}]}}\n---\n"
            );
        }
    }
    let ports: Vec<String> = (0..100)
        .map(|i| format!("{{port: {}}}", 1000 + i))
        .collect();
    yaml += &format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: huge, namespace: a}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{from: [{{namespaceSelector: {{}}}}], ports: [{}]}}]\n---\n",
        ports.join(", ")
    );
    yaml += "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: normal, namespace: b}\n\
             spec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}], ports: [{port: 5432}]}]\n";
    std::fs::write(dir.join("cluster.yaml"), yaml).expect("write");
    let d = dir.to_str().expect("utf8");

    // Within the default budget: both compile.
    let (code, out, err) = agent(&["compile", "--manifests", d, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["max_policy_entries"], 65536);
    assert_eq!(v["policy"], 1809);
    assert_eq!(v["policy_entries"]["a/huge"]["entries"], 1800);

    // Budget 1000: huge is reported and fails closed; normal keeps its entries.
    let (code, out, err) = agent(&[
        "compile",
        "--manifests",
        d,
        "--json",
        "--max-policy-entries",
        "1000",
    ]);
    assert_eq!(code, 1, "a problem was reported: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let problems: Vec<&str> = v["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = problems[0];
    assert!(
        p.contains("NetworkPolicy a/huge")
            && p.contains("1800")
            && p.contains("1000")
            && p.contains("fails closed"),
        "{p}"
    );
    assert_eq!(v["max_policy_entries"], 1000);
    assert_eq!(
        v["policy_entries"]["a/huge"],
        serde_json::json!({"entries": 1800, "fails_closed": "over_budget"})
    );
    assert_eq!(
        v["policy_entries"]["b/normal"],
        serde_json::json!({"entries": 9, "fails_closed": null})
    );
    assert_eq!(v["policy"], 9, "only normal's entries are in POLICY");
    assert_eq!(
        v["endpoints"], 6,
        "huge's pods keep their (isolated) endpoints"
    );

    // A budget of 0 is refused, naming the flag.
    let (code, _, err) = agent(&["compile", "--manifests", d, "--max-policy-entries", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-policy-entries"), "{err}");
}

#[test]
fn lab_needs_manifests_or_steps_and_rejects_bad_externals() {
    let (code, _, err) = agent(&["lab"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--manifests"), "{err}");
    let (code, _, err) = agent(&["lab", "--manifests", ".", "--external", "10.0.0.1=80/ICMP"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown protocol"), "{err}");
}

#[test]
fn lab_json_is_a_list_of_from_to_port_protocol_allowed() {
    let dir = repo().join("tests/scenarios/k8s-blog-access-nginx");
    let (code, out, err) = agent(&["lab", "--manifests", dir.to_str().expect("utf8"), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let rows = v.as_array().expect("a list");
    assert_eq!(rows.len(), 9, "3 pods x 3 pods x 1 port");
    for r in rows {
        let keys: Vec<&str> = r
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 5, "{r}");
        for k in ["from", "to", "port", "protocol", "allowed"] {
            assert!(keys.contains(&k), "{k} missing in {r}");
        }
        assert_eq!(r["protocol"], "TCP");
    }
    let bar_to_nginx = rows
        .iter()
        .find(|r| r["from"] == "default/bar" && r["to"] == "default/nginx")
        .expect("row");
    assert_eq!(bar_to_nginx["allowed"], false);
    let foo_to_nginx = rows
        .iter()
        .find(|r| r["from"] == "default/foo" && r["to"] == "default/nginx")
        .expect("row");
    assert_eq!(foo_to_nginx["allowed"], true);
}

#[test]
fn lab_icmp_adds_icmp_rows_with_port_0() {
    let dir = repo().join("tests/scenarios/k8s-blog-access-nginx");
    let (code, out, err) = agent(&[
        "lab",
        "--manifests",
        dir.to_str().expect("utf8"),
        "--json",
        "--icmp",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let rows = v.as_array().expect("a list");
    assert_eq!(rows.len(), 18, "3 pods x 3 pods x (1 port + 1 ping)");
    let pings: Vec<&serde_json::Value> = rows.iter().filter(|r| r["protocol"] == "ICMP").collect();
    assert_eq!(pings.len(), 9);
    assert!(pings.iter().all(|r| r["port"] == 0), "{pings:?}");
    // nginx accepts foo through a rule without ports: pings pass from foo, not from bar.
    let ping = |from: &str| {
        pings
            .iter()
            .find(|r| r["from"] == from && r["to"] == "default/nginx")
            .expect("row")["allowed"]
            .clone()
    };
    assert_eq!(ping("default/foo"), true);
    assert_eq!(ping("default/bar"), false);
}

#[test]
fn run_takes_kubeconfig_or_manifests_and_names_a_bad_kubeconfig() {
    let (code, _, err) = agent(&["run", "--manifests", ".", "--kubeconfig", "/x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    // Fails before loading anything: no BPF, no maps pinned.
    let missing = format!("/nonexistent-npm-{}/kubeconfig", std::process::id());
    let (code, _, err) = agent(&[
        "run",
        "--kubeconfig",
        &missing,
        "--bpffs-dir",
        "/nonexistent",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Kubernetes API") && err.contains(&missing),
        "{err}"
    );
}

#[test]
fn explain_gives_the_verdict_the_rule_and_the_isolating_policies_and_exits_zero() {
    let dir = repo().join("examples/azure-npm");
    let dir = dir.to_str().expect("utf8");
    let explain = |to: &str, port: &str, json: bool| {
        let mut args = vec![
            "explain",
            "--manifests",
            dir,
            "--from",
            "default/busybox",
            "--to",
            to,
            "--port",
            port,
        ];
        if json {
            args.push("--json");
        }
        agent(&args)
    };
    let (code, out, err) = explain("default/src-ip-internal", "8080", true);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["verdict"], "allowed");
    assert_eq!(v["view"], "all_pods_local");
    assert_eq!(v["complete"], true);
    assert_eq!(v["protocol"], "TCP");
    assert_eq!(v["port"], 8080);
    assert_eq!(v["from"]["pod"], "default/busybox");
    assert!(
        v["from"]["ip"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.244."))
    );
    let ingress = &v["ingress"];
    assert_eq!(ingress["verdict"], "allowed");
    assert_eq!(ingress["pod"], "default/src-ip-internal");
    assert_eq!(ingress["rule"]["policy"], "default/allow-src-ip");
    assert_eq!(ingress["rule"]["direction"], "ingress");
    assert_eq!(ingress["rule"]["index"], 0);
    assert_eq!(ingress["peer"]["via"], "identity");
    assert_eq!(
        ingress["peer"]["matched"][0]["peer"],
        "podSelector {app=busybox}"
    );
    let isolating: Vec<&str> = ingress["isolated_by"]
        .as_array()
        .expect("isolated_by")
        .iter()
        .filter_map(|p| p["policy"].as_str())
        .collect();
    assert_eq!(
        isolating,
        vec!["default/allow-src-ip", "default/deny-all-inbound"]
    );
    assert_eq!(v["egress"]["verdict"], "allowed");
    assert_eq!(v["egress"]["peer"]["via"], "cidr_class");

    // Human output: the verdict first, then one line per direction.
    let (code, out, err) = explain("default/src-ip-internal", "8081", false);
    assert_eq!(code, 0, "denied is an answer: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("denied: default/busybox -> default/src-ip-internal 8081/TCP"),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ingress at default/src-ip-internal: denied")),
        "{out}"
    );
    assert!(
        lines.iter().any(|l| l.contains("default/deny-all-inbound")),
        "{out}"
    );
}

#[test]
fn explain_exits_two_naming_an_unknown_pod_or_a_bad_address() {
    let dir = repo().join("examples/azure-npm");
    let dir = dir.to_str().expect("utf8");
    for (from, to, proto, want) in [
        (
            "default/nope",
            "default/busybox",
            "TCP",
            "--from default/nope: no such pod",
        ),
        (
            "default/busybox",
            "10.1.2.300",
            "TCP",
            "--to \"10.1.2.300\": expected NAMESPACE/POD or an IP address",
        ),
        (
            "default/busybox",
            "default/other",
            "GRE",
            "protocol \"GRE\"",
        ),
    ] {
        let (code, out, err) = agent(&[
            "explain",
            "--manifests",
            dir,
            "--from",
            from,
            "--to",
            to,
            "--port",
            "80",
            "--protocol",
            proto,
        ]);
        assert_eq!(code, 2, "{from} -> {to}: {out}{err}");
        assert!(err.contains(want), "{from} -> {to}: {err}");
        assert!(out.is_empty(), "{out}");
    }
}
