//! The seed documents' scenarios, enforced by the real datapath in a lab of network namespaces
//! and probed with real packets. Each scenario's `expect` file states the full matrix.
//! Privileged: runs as root (CI does). Scenarios run one at a time so probe timeouts are not
//! stretched by a neighbour's load.
#[path = "common/support.rs"]
mod support;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use support::{KillOnDrop, eventually_every};

use npm_agent::cli::args::{LabArgs, ProbeOptions};
use npm_agent::cli::lab::{LabOutcome, execute};
use npm_agent::lab::ProbeProtocol;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn scenario(dir: &str) -> LabOutcome {
    scenario_with(dir, ProbeOptions::default())
}

/// Runs the scenario in `dir` against its `expect` file; panics on any difference.
fn scenario_with(dir: &str, opts: ProbeOptions) -> LabOutcome {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = repo().join(dir);
    let args = LabArgs {
        manifests: Some(dir.clone()),
        steps: None,
        externals: vec![],
        json: false,
        expect: Some(dir.join("expect")),
        prefer_ipv6: opts.prefer_ipv6,
        icmp: opts.icmp,
    };
    let outcome = execute(&args).unwrap_or_else(|e| panic!("lab for {}: {e:#}", dir.display()));
    assert!(
        outcome.problems.is_empty(),
        "unexpected problems: {:#?}",
        outcome.problems
    );
    assert!(!outcome.results.is_empty(), "no probes ran");
    let report: Vec<String> = outcome.mismatches.iter().map(ToString::to_string).collect();
    assert!(
        report.is_empty(),
        "{} of {} probes differ from {}/expect:\n{}\nmatrix:\n{}",
        report.len(),
        outcome.results.len(),
        dir.display(),
        report.join("\n"),
        npm_agent::lab::render_matrix(&outcome.results)
    );
    outcome
}

#[test]
fn azure_npm_walkthrough_and_instance_metadata() {
    scenario("examples/azure-npm");
}

#[test]
fn selector_operators_exists_in_notin_doesnotexist_and_matchlabels_with_expressions() {
    scenario("tests/scenarios/selector-operators");
}

#[test]
fn empty_versus_absent_selectors_from_lists_and_ports() {
    scenario("tests/scenarios/empty-versus-absent");
}

#[test]
fn named_port_resolves_on_each_destination_pod() {
    scenario("tests/scenarios/named-port-per-pod");
}

#[test]
fn terminating_pods_are_enforced_until_they_finish() {
    scenario("tests/scenarios/terminating-pods");
}

#[test]
fn rules_and_policies_add_up_rule_by_rule() {
    scenario("tests/scenarios/rules-add-up");
}

#[test]
fn endport_range_edges_and_block_boundaries() {
    scenario("tests/scenarios/endport-range");
}

#[test]
fn policy_types_given_and_inferred() {
    scenario("tests/scenarios/policy-types");
}

fn icmp_only_without_ports(prefer_ipv6: bool) {
    let outcome = scenario_with(
        "tests/scenarios/icmp-only-without-ports",
        ProbeOptions {
            prefer_ipv6,
            icmp: true,
        },
    );
    let pings: Vec<_> = outcome
        .results
        .iter()
        .filter(|r| r.protocol == ProbeProtocol::Icmp)
        .collect();
    // 6 pods + 2 externals, each pinging all 8.
    assert_eq!(pings.len(), 8 * 8);
    assert!(pings.iter().any(|r| r.allowed) && pings.iter().any(|r| !r.allowed));
}

#[test]
fn icmp_only_through_rules_without_ports_over_ipv4() {
    icmp_only_without_ports(false);
}

#[test]
fn icmp_only_through_rules_without_ports_over_ipv6() {
    icmp_only_without_ports(true);
}

#[test]
fn k8s_blog_access_nginx() {
    scenario("tests/scenarios/k8s-blog-access-nginx");
}

#[test]
fn k8s_blog_default_deny_with_null_pod_selector() {
    scenario("tests/scenarios/k8s-blog-default-deny");
}

#[test]
fn tke_1_namespace_internal_only() {
    scenario("tests/scenarios/tke-1-nsa-internal");
}

#[test]
fn tke_2_namespace_deny_all() {
    scenario("tests/scenarios/tke-2-nsa-deny-all");
}

#[test]
fn tke_3_labelled_namespace_on_6379() {
    scenario("tests/scenarios/tke-3-nsb-6379");
}

#[test]
fn tke_4_egress_whitelist_with_stateful_replies() {
    scenario("tests/scenarios/tke-4-egress-cidr");
}

#[test]
fn egress_through_cluster_ips_is_judged_against_the_backend_after_the_dnat() {
    let outcome = scenario("tests/scenarios/service-clusterip");
    let to_services = outcome
        .results
        .iter()
        .filter(|r| r.to.starts_with("svc:"))
        .count();
    // 4 pods × (kube-dns 53/UDP, 53/TCP, db 80, other 80).
    assert_eq!(to_services, 16, "every pod probes every Service port");
}

#[test]
fn tke_5_ingress_from_cidr_only() {
    scenario("tests/scenarios/tke-5-ingress-cidr");
}

/// Deletes the namespaces whose names start with the prefix, on drop: what a lab process
/// killed before its own cleanup (a failing test) left behind.
struct RemoveNetnsOnDrop(Option<String>);

impl Drop for RemoveNetnsOnDrop {
    fn drop(&mut self) {
        let Some(prefix) = &self.0 else { return };
        for name in npm_agent::netns::list() {
            if name.starts_with(prefix.as_str()) {
                let _ = npm_agent::netns::delete_by_name(&name);
            }
        }
    }
}

#[test]
fn interrupted_lab_removes_everything_it_made() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Declared before the child's guard so it drops after it: the lab is killed, then its
    // leftovers go.
    let mut leftovers = RemoveNetnsOnDrop(None);
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_npm-agent"))
            .args(["lab", "--manifests"])
            .arg(repo().join("examples/azure-npm"))
            .args(["--external", "169.254.169.254=80/TCP"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn lab"),
    );
    let pid = child.0.id();
    let prefix = format!("npmlab-{pid}-");
    leftovers.0 = Some(prefix.clone());
    // Interrupt once the lab's namespaces exist (bounded wait), as a user pressing Ctrl-C.
    let saw_lab = eventually_every(Duration::from_secs(20), Duration::from_millis(20), || {
        npm_agent::netns::list()
            .iter()
            .any(|n| n.starts_with(&prefix))
    });
    // Signal only the process this test started, by its pid.
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) takes no pointers; `pid` is our own child, not yet reaped.
    let rc = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(
        rc,
        0,
        "SIGINT to the lab (pid {pid}): {}",
        std::io::Error::last_os_error()
    );
    let wait_for = Duration::from_secs(60);
    let mut status = None;
    let exited = eventually_every(wait_for, Duration::from_millis(50), || {
        status = child.0.try_wait().expect("wait lab");
        status.is_some()
    });
    assert!(
        exited,
        "the lab (pid {pid}) did not exit within {wait_for:?} of SIGINT"
    );
    let status = status.expect("exited");
    let left: Vec<String> = npm_agent::netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(saw_lab, "the lab never built (status {status})");
    assert!(left.is_empty(), "left behind after SIGINT: {left:?}");
}

#[test]
fn steps_policy_lifecycle_while_the_cluster_changes() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let args = LabArgs {
        manifests: None,
        steps: Some(repo().join("tests/steps/policy-lifecycle")),
        externals: vec![],
        json: false,
        expect: None,
        prefer_ipv6: false,
        icmp: false,
    };
    let outcomes =
        npm_agent::cli::lab::execute_steps(&args).unwrap_or_else(|e| panic!("steps: {e:#}"));
    assert_eq!(outcomes.len(), 7);
    for o in &outcomes {
        assert!(o.checked, "step {} has an expectation", o.step);
        assert!(o.problems.is_empty(), "step {}: {:?}", o.step, o.problems);
        assert!(!o.results.is_empty(), "step {} probed nothing", o.step);
        let report: Vec<String> = o.mismatches.iter().map(ToString::to_string).collect();
        assert!(
            report.is_empty(),
            "step {}:\n{}\n{}",
            o.step,
            report.join("\n"),
            npm_agent::lab::render_matrix(&o.results)
        );
    }
    // Step 7 adds x/d and deletes y/c: the probed set follows the cluster.
    let last = &outcomes[6];
    assert!(last.results.iter().any(|r| r.from == "x/d"));
    assert!(
        !last
            .results
            .iter()
            .any(|r| r.from == "y/c" || r.to == "y/c")
    );
}

#[test]
fn ipv6_ipblock_with_except_over_ipv6() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = repo().join("tests/scenarios/ipv6-ipblock-except");
    let args = LabArgs {
        manifests: Some(dir.clone()),
        steps: None,
        externals: vec![],
        json: false,
        expect: Some(dir.join("expect")),
        prefer_ipv6: true,
        icmp: false,
    };
    let outcome = execute(&args).unwrap_or_else(|e| panic!("lab: {e:#}"));
    assert!(outcome.problems.is_empty(), "{:?}", outcome.problems);
    let report: Vec<String> = outcome.mismatches.iter().map(ToString::to_string).collect();
    assert!(
        report.is_empty(),
        "{}\n{}",
        report.join("\n"),
        npm_agent::lab::render_matrix(&outcome.results)
    );
    // Every probe went over IPv6: the external is IPv6-only and every pod is dual-stack, and a
    // denied probe to the external proves the v6 except matched.
    assert!(
        outcome
            .results
            .iter()
            .any(|r| r.from == "default/a" && r.to == "2001:db8::10" && !r.allowed)
    );
}

fn node_and_host_network(prefer_ipv6: bool) {
    let outcome = scenario_with(
        "tests/scenarios/node-and-host-network",
        ProbeOptions {
            prefer_ipv6,
            icmp: true,
        },
    );
    // The hostNetwork pod took part as a source and as a destination (the expect file says
    // what each probe must give; this checks the probes exist).
    let probed = |from: &str, to: &str, proto: ProbeProtocol| {
        outcome
            .results
            .iter()
            .any(|r| r.from == from && r.to == to && r.protocol == proto)
    };
    let node = "kube-system/node-agent";
    for proto in [ProbeProtocol::Tcp, ProbeProtocol::Icmp] {
        assert!(probed(node, "default/db", proto), "node -> db {proto}");
    }
    for proto in [ProbeProtocol::Tcp, ProbeProtocol::Udp, ProbeProtocol::Icmp] {
        assert!(probed("default/web", node, proto), "web -> node {proto}");
    }
}

#[test]
fn node_traffic_always_passes_and_host_network_pods_are_not_selected_over_ipv4() {
    node_and_host_network(false);
}

#[test]
fn node_traffic_always_passes_and_host_network_pods_are_not_selected_over_ipv6() {
    node_and_host_network(true);
}

#[test]
fn steps_namespace_deleted_with_its_pods_and_policies() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let args = LabArgs {
        manifests: None,
        steps: Some(repo().join("tests/steps/namespace-deletion")),
        externals: vec![],
        json: false,
        expect: None,
        prefer_ipv6: false,
        icmp: false,
    };
    let outcomes =
        npm_agent::cli::lab::execute_steps(&args).unwrap_or_else(|e| panic!("steps: {e:#}"));
    assert_eq!(outcomes.len(), 3);
    for o in &outcomes {
        assert!(
            o.checked && o.problems.is_empty(),
            "step {}: {:?}",
            o.step,
            o.problems
        );
        let report: Vec<String> = o.mismatches.iter().map(ToString::to_string).collect();
        assert!(
            report.is_empty(),
            "step {}:\n{}\n{}",
            o.step,
            report.join("\n"),
            npm_agent::lab::render_matrix(&o.results)
        );
    }
    let touches_x = |o: &npm_agent::cli::lab::StepOutcome| {
        o.results
            .iter()
            .any(|r| r.from.starts_with("x/") || r.to.starts_with("x/"))
    };
    assert!(touches_x(&outcomes[0]));
    assert!(
        !touches_x(&outcomes[1]),
        "x's pods went with their namespace"
    );
    assert!(touches_x(&outcomes[2]));
}
