//! The upstream Kubernetes network policy e2e suite, ported as lab cases (tests/conformance):
//! the x/y/z × a/b/c cluster serving 80 and 81 on TCP, UDP and SCTP, one case per upstream
//! test, each with its full expected matrix (486 probes), enforced by the real datapath and
//! probed with real packets. All cases share one lab: each case is a step that applies its
//! policies and deletes the previous case's. Privileged (root), as CI runs.
use std::path::{Path, PathBuf};

use npm_agent::cli::lab::run_steps;
use npm_agent::cli::steps::{Delete, Step};
use npm_agent::expect::Expectation;
use npm_agent::source::manifests::Loader;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .join("tests/conformance")
}

fn load(source: &str, text: &str) -> Loader {
    let mut l = Loader::default();
    l.add_text(source, text);
    l
}

#[test]
fn upstream_netpol_cases_with_real_packets() {
    let root = dir();
    let pods = std::fs::read_to_string(root.join("pods.yaml")).expect("pods.yaml");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root.join("cases"))
        .expect("cases dir")
        .map(|e| e.expect("entry").path())
        .collect();
    cases.sort();
    assert_eq!(
        cases.len(),
        32,
        "tests/conformance/cases holds the 32 ported upstream cases (README.md says 32): {cases:?}"
    );

    let (cluster, problems) = load("pods.yaml", &pods).finish_raw();
    assert!(problems.is_empty(), "{problems:?}");
    let mut steps = vec![Step {
        name: "cluster (no policy)".into(),
        apply: cluster,
        delete: vec![],
        expect: Some(Expectation::parse("allow * -> * *").expect("parses")),
        problems: vec![],
    }];
    let mut previous: Vec<Delete> = vec![];
    for case in &cases {
        let policy_path = case.join("policy.yaml");
        let text = std::fs::read_to_string(&policy_path).expect("policy.yaml");
        let (apply, problems) = load(&policy_path.display().to_string(), &text).finish_raw();
        let expect =
            Expectation::parse(&std::fs::read_to_string(case.join("expect")).expect("expect"))
                .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let this: Vec<Delete> = apply
            .policies
            .keys()
            .cloned()
            .map(Delete::NetworkPolicy)
            .collect();
        // Delete what the previous case made and this one does not replace.
        let delete = previous
            .iter()
            .filter(|d| !this.contains(d))
            .cloned()
            .collect();
        steps.push(Step {
            name: case
                .file_name()
                .expect("name")
                .to_string_lossy()
                .to_string(),
            apply,
            delete,
            expect: Some(expect),
            problems,
        });
        previous = this;
    }

    let outcomes =
        run_steps(&steps, &[], Default::default()).unwrap_or_else(|e| panic!("lab: {e:#}"));
    let mut failures = Vec::new();
    for o in &outcomes {
        assert_eq!(
            o.results.len(),
            9 * 9 * 6,
            "{}: every pod x every pod x 6 ports",
            o.step
        );
        if !o.problems.is_empty() {
            failures.push(format!("{}: problems {:?}", o.step, o.problems));
        }
        if !o.mismatches.is_empty() {
            let lines: Vec<String> = o
                .mismatches
                .iter()
                .take(12)
                .map(ToString::to_string)
                .collect();
            failures.push(format!(
                "{}: {} of {} probes differ:\n  {}",
                o.step,
                o.mismatches.len(),
                o.results.len(),
                lines.join("\n  ")
            ));
        }
    }
    let denied: usize = outcomes
        .iter()
        .map(|o| o.results.iter().filter(|r| !r.allowed).count())
        .sum();
    assert!(
        denied > 1000,
        "the suite must actually deny traffic ({denied} denials)"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases fail:\n{}",
        failures.len(),
        outcomes.len(),
        failures.join("\n")
    );
}
