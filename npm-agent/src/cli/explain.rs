//! `npm-agent explain`: allowed or denied, and why, for one new flow: offline on manifests
//! (every pod local, compiled as `compile` does) or asked of a running agent (`--url`, its
//! `/debug/explain`). The evaluation is [`crate::explain`]'s.
use anyhow::Context;

use super::args::ExplainArgs;
use super::status::http_get;
use crate::compiler::{self, IdAllocator};
use crate::explain::{self, Check, Explanation, Query, State, View};
use crate::source::manifests;

/// Exit code for input that cannot be evaluated (unknown pod, bad address, bad protocol).
pub const EXIT_BAD_INPUT: i32 = 2;

/// Returns the exit code: 0 when evaluated (allowed or denied), 2 for bad input.
pub fn run(args: ExplainArgs) -> anyhow::Result<i32> {
    let protocol = match explain::parse_protocol(&args.protocol) {
        Ok(p) => p,
        Err(e) => return Ok(bad_input(&e.to_string())),
    };
    let query = Query {
        from: args.from.clone(),
        to: args.to.clone(),
        protocol,
        port: args.port,
    };
    let answer = match (&args.manifests, &args.url) {
        (Some(dir), _) => {
            let (mut snapshot, _problems) =
                manifests::load_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
            super::compile::all_pods_local(&mut snapshot);
            let compiled = compiler::compile(&snapshot, &mut IdAllocator::default());
            match State::offline(compiled, snapshot).explain(&query) {
                Ok(e) => e,
                Err(e) => return Ok(bad_input(&e.to_string())),
            }
        }
        (None, Some(url)) => {
            let path = format!("/debug/explain?{}", query.to_url_query());
            let (code, body) = http_get(url, &path).map_err(anyhow::Error::msg)?;
            match code {
                200 => serde_json::from_str::<Explanation>(&body)
                    .with_context(|| format!("{url}{path}: not an explanation"))?,
                400 => return Ok(bad_input(body.trim())),
                404 => anyhow::bail!(
                    "{url}{path}: HTTP 404: the agent's debug API is off (EnableHTTPDebugAPI), or it predates explain"
                ),
                other => anyhow::bail!("{url}{path}: HTTP {other}: {}", body.trim()),
            }
        }
        (None, None) => anyhow::bail!("give --manifests DIR or --url URL"),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", render(&answer));
    }
    Ok(0)
}

fn bad_input(message: &str) -> i32 {
    eprintln!("error: {message}");
    EXIT_BAD_INPUT
}

/// The human answer: the verdict, then one line per direction.
pub fn render(e: &Explanation) -> String {
    let port = if e.protocol == crate::lab::ProbeProtocol::Icmp {
        "ICMP".to_owned()
    } else {
        format!("{}/{}", e.port, e.protocol.as_str())
    };
    let view = match (e.view, &e.node) {
        (View::AllPodsLocal, _) => "offline: every pod on one node".to_owned(),
        (View::Node, Some(n)) => format!("node {n}'s maps"),
        (View::Node, None) => "this node's maps".to_owned(),
    };
    let mut out = format!(
        "{}: {} -> {} {port} ({} -> {}; {view})\n",
        e.verdict.as_str(),
        e.from.given,
        e.to.given,
        e.from.ip,
        e.to.ip
    );
    if !e.complete {
        out.push_str(
            "  (incomplete: a side is a pod of another node, whose agent checks it too)\n",
        );
    }
    let side = |dir: &str, c: &Check, ip: &std::net::IpAddr| {
        format!(
            "  {dir} at {}: {}: {}\n",
            c.pod.clone().unwrap_or_else(|| ip.to_string()),
            c.verdict.as_str(),
            c.why
        )
    };
    out.push_str(&side("egress ", &e.egress, &e.from.ip));
    out.push_str(&side("ingress", &e.ingress, &e.to.ip));
    out
}
