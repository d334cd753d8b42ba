//! Probe results and their rendering as a reachability matrix.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::model::Protocol;

/// What a probe speaks: one of the Kubernetes port protocols, or ICMP echo (ping; it has no
/// port, and its results carry port 0). Serializes as `"TCP"`, `"UDP"`, `"SCTP"`, `"ICMP"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProbeProtocol {
    Tcp,
    Udp,
    Sctp,
    /// ICMP echo request/reply (ICMPv6 over IPv6).
    Icmp,
}

impl ProbeProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeProtocol::Tcp => "TCP",
            ProbeProtocol::Udp => "UDP",
            ProbeProtocol::Sctp => "SCTP",
            ProbeProtocol::Icmp => "ICMP",
        }
    }
}

impl From<Protocol> for ProbeProtocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => ProbeProtocol::Tcp,
            Protocol::Udp => ProbeProtocol::Udp,
            Protocol::Sctp => ProbeProtocol::Sctp,
        }
    }
}

impl PartialEq<Protocol> for ProbeProtocol {
    fn eq(&self, other: &Protocol) -> bool {
        *self == ProbeProtocol::from(*other)
    }
}

impl std::fmt::Display for ProbeProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of one probe. JSON: `{"from","to","port","protocol","allowed"}` (a user
/// contract; `outcome` is not serialized).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    /// "namespace/name" of a pod, or the IP of an external.
    pub from: String,
    pub to: String,
    pub port: u16,
    /// "TCP" | "UDP" | "SCTP" | "ICMP" (port 0).
    pub protocol: ProbeProtocol,
    pub allowed: bool,
    /// Why the probe ended as it did (allowed, timed out, refused, ...).
    #[serde(skip)]
    pub outcome: Outcome,
}

/// How a probe ended. Only [`Outcome::Allowed`] counts as allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// The answer came back.
    Allowed,
    /// No answer within the timeout: dropped on the way (what a policy drop looks like).
    #[default]
    Timeout,
    /// TCP RST or ICMP port unreachable: reached a host but nothing served the port.
    Refused,
    /// ICMP host/network unreachable.
    Unreachable,
    /// Source and destination share no address family; nothing was sent.
    NoCommonFamily,
    /// The probe could not be run (socket error, unknown endpoint, ...).
    Error(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Allowed => f.write_str("allowed"),
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::Refused => f.write_str("refused"),
            Outcome::Unreachable => f.write_str("unreachable"),
            Outcome::NoCommonFamily => f.write_str("no common address family"),
            Outcome::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// A table: one row per source, one column per destination:port/protocol, both in the
/// order they first appear in `results` (`Lab::probe_all` yields pods in spec order, then
/// externals). Cells: `.` allowed, `X` denied, `?` the probe could not be run, blank not
/// probed.
pub fn render_matrix(results: &[ProbeResult]) -> String {
    let mut sources: Vec<&str> = Vec::new();
    // Destinations, each with its (port, protocol) columns.
    let mut dests: Vec<(&str, Vec<(u16, ProbeProtocol)>)> = Vec::new();
    for r in results {
        if !sources.contains(&r.from.as_str()) {
            sources.push(&r.from);
        }
        let col = (r.port, r.protocol);
        match dests.iter_mut().find(|(d, _)| *d == r.to) {
            Some((_, cols)) => {
                if !cols.contains(&col) {
                    cols.push(col);
                }
            }
            None => dests.push((&r.to, vec![col])),
        }
    }
    // The first result of each cell (a repeated probe shows its first outcome).
    let mut index: BTreeMap<(&str, &str, u16, ProbeProtocol), &ProbeResult> = BTreeMap::new();
    for r in results {
        index
            .entry((r.from.as_str(), r.to.as_str(), r.port, r.protocol))
            .or_insert(r);
    }
    let cell = |from: &str, to: &str, (port, proto): (u16, ProbeProtocol)| -> char {
        match index.get(&(from, to, port, proto)) {
            None => ' ',
            Some(r) if r.allowed => '.',
            Some(r) => match r.outcome {
                Outcome::Error(_) | Outcome::NoCommonFamily => '?',
                _ => 'X',
            },
        }
    };
    // Column width of one port: wide enough for "65535" / "SCTP". ICMP has no port: "-".
    let col_label = |(port, proto): (u16, ProbeProtocol)| {
        let port = if proto == ProbeProtocol::Icmp {
            "-".to_owned()
        } else {
            port.to_string()
        };
        (port, proto.as_str())
    };
    let col_width = |col| {
        let (p, proto) = col_label(col);
        p.len().max(proto.len())
    };
    let row_head = sources
        .iter()
        .map(|s| s.len())
        .chain(["from \\ to".len()])
        .max()
        .unwrap_or(0);
    // Each destination group is as wide as its ports, or its name if that is longer.
    let group_widths: Vec<usize> = dests
        .iter()
        .map(|(name, cols)| {
            let ports: usize = cols.iter().map(|c| col_width(*c) + 1).sum::<usize>() - 1;
            ports.max(name.len())
        })
        .collect();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "legend: . allowed   X denied   ? not run (error)   blank: not probed"
    );
    // Line 1: destination names; line 2: ports; line 3: protocols.
    let mut names = format!("{:<row_head$}", "");
    let mut ports = format!("{:<row_head$}", "");
    let mut protos = format!("{:<row_head$}", "from \\ to");
    for ((name, cols), width) in dests.iter().zip(&group_widths) {
        let _ = write!(names, " | {name:<width$}");
        let mut p = String::new();
        let mut q = String::new();
        for (i, col) in cols.iter().enumerate() {
            let w = col_width(*col);
            let (port, proto) = col_label(*col);
            if i > 0 {
                p.push(' ');
                q.push(' ');
            }
            let _ = write!(p, "{port:<w$}");
            let _ = write!(q, "{proto:<w$}");
        }
        let _ = write!(ports, " | {p:<width$}");
        let _ = write!(protos, " | {q:<width$}");
    }
    for line in [names, ports, protos] {
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let total: usize = row_head + group_widths.iter().map(|w| w + 3).sum::<usize>();
    let _ = writeln!(out, "{}", "-".repeat(total));
    for src in &sources {
        let mut line = format!("{src:<row_head$}");
        for ((name, cols), width) in dests.iter().zip(&group_widths) {
            let mut g = String::new();
            for (i, col) in cols.iter().enumerate() {
                let w = col_width(*col);
                if i > 0 {
                    g.push(' ');
                }
                let _ = write!(g, "{:<w$}", cell(src, name, *col));
            }
            let _ = write!(line, " | {g:<width$}");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let allowed = results.iter().filter(|r| r.allowed).count();
    let _ = writeln!(
        out,
        "{} probes: {allowed} allowed, {} denied",
        results.len(),
        results.len() - allowed
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(
        from: &str,
        to: &str,
        port: u16,
        protocol: impl Into<ProbeProtocol>,
        allowed: bool,
    ) -> ProbeResult {
        ProbeResult {
            from: from.into(),
            to: to.into(),
            port,
            protocol: protocol.into(),
            allowed,
            outcome: if allowed {
                Outcome::Allowed
            } else {
                Outcome::Timeout
            },
        }
    }

    #[test]
    fn json_contract() {
        let json = serde_json::to_string(&r("a/b", "1.2.3.4", 53, Protocol::Udp, true)).unwrap();
        assert_eq!(
            json,
            r#"{"from":"a/b","to":"1.2.3.4","port":53,"protocol":"UDP","allowed":true}"#
        );
        let json = serde_json::to_string(&Protocol::Sctp).unwrap();
        assert_eq!(json, r#""SCTP""#);
        let json = serde_json::to_string(&r("a/b", "c/d", 0, ProbeProtocol::Icmp, false)).unwrap();
        assert_eq!(
            json,
            r#"{"from":"a/b","to":"c/d","port":0,"protocol":"ICMP","allowed":false}"#
        );
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_eq!(
                serde_json::to_string(&ProbeProtocol::from(p)).unwrap(),
                serde_json::to_string(&p).unwrap(),
                "a probe protocol serializes as the Kubernetes protocol it comes from"
            );
        }
    }

    #[test]
    fn matrix_layout() {
        let results = vec![
            r("x/a", "x/a", 80, Protocol::Tcp, true),
            r("x/a", "x/a", 9000, Protocol::Sctp, true),
            r("x/a", "x/bb", 80, Protocol::Tcp, false),
            r("x/bb", "x/a", 80, Protocol::Tcp, true),
            r("x/bb", "x/a", 0, ProbeProtocol::Icmp, false),
        ];
        let m = render_matrix(&results);
        let expected = "\
legend: . allowed   X denied   ? not run (error)   blank: not probed
          | x/a           | x/bb
          | 80  9000 -    | 80
from \\ to | TCP SCTP ICMP | TCP
--------------------------------
x/a       | .   .         | X
x/bb      | .        X    |
5 probes: 3 allowed, 2 denied
";
        assert_eq!(m, expected, "\n{m}");
    }
}
