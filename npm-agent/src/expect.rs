//! Expected reachability, written as a short ordered rule list (the lab's `--expect FILE`).
//!
//! ```text
//! # comments and blank lines are ignored
//! external 169.254.169.254=80/TCP      # hosts outside the node (same syntax as --external)
//! allow * -> * *                       # the last matching line decides
//! deny  * -> default/src-ip-internal *
//! allow default/busybox -> default/src-ip-internal 8080/TCP
//! ```
//! `from`/`to` are `*`, `ns/*`, `ns/pod` or an external's IP (`to` also `svc:ns/name`, a
//! Service's ClusterIP, whose port is the Service port); the port is `*`, `PORT/PROTO`
//! or `*/PROTO`, where PROTO is TCP, UDP, SCTP or ICMP (ICMP echo probes, `lab --icmp`, have
//! no port: write `*/ICMP`). Every probe must be decided by some line.
use std::fmt;

use crate::cli::args::{ExternalArg, parse_external, parse_protocol};
use crate::lab::ProbeProtocol;

#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ExpectError {
    pub line: usize,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pat {
    Any,
    Namespace(String),
    Exact(String),
}

impl Pat {
    fn parse(s: &str) -> Pat {
        if s == "*" {
            Pat::Any
        } else if let Some(ns) = s.strip_suffix("/*") {
            Pat::Namespace(ns.to_string())
        } else {
            Pat::Exact(s.to_string())
        }
    }
    fn matches(&self, v: &str) -> bool {
        match self {
            Pat::Any => true,
            Pat::Namespace(ns) => v.split_once('/').is_some_and(|(n, _)| n == ns),
            Pat::Exact(e) => e == v,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Line {
    allow: bool,
    from: Pat,
    to: Pat,
    port: Option<u16>,
    proto: Option<ProbeProtocol>,
}

/// A parsed expectation file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expectation {
    pub externals: Vec<ExternalArg>,
    lines: Vec<Line>,
}

/// One probe whose outcome differs from the expectation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: ProbeProtocol,
    /// None: no line decides this probe.
    pub expected: Option<bool>,
    pub got: bool,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = |b: bool| if b { "allowed" } else { "denied" };
        let port = if self.protocol == ProbeProtocol::Icmp {
            "*".to_string()
        } else {
            self.port.to_string()
        };
        match self.expected {
            Some(e) => write!(
                f,
                "{} -> {} {port}/{}: expected {}, got {}",
                self.from,
                self.to,
                self.protocol,
                word(e),
                word(self.got)
            ),
            None => write!(
                f,
                "{} -> {} {port}/{}: no expectation line covers it (got {})",
                self.from,
                self.to,
                self.protocol,
                word(self.got)
            ),
        }
    }
}

impl Expectation {
    pub fn parse(text: &str) -> Result<Self, ExpectError> {
        let mut out = Expectation::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| ExpectError { line, message };
            let s = raw.split('#').next().unwrap_or("").trim();
            if s.is_empty() {
                continue;
            }
            let words: Vec<&str> = s.split_whitespace().collect();
            match words.as_slice() {
                ["external", spec] => out.externals.push(parse_external(spec).map_err(err)?),
                [verdict @ ("allow" | "deny"), from, "->", to, port] => {
                    let (port, proto) = if *port == "*" {
                        (None, None)
                    } else {
                        let (p, proto) = port.split_once('/').ok_or_else(|| {
                            err(format!("port {port:?}: expected PORT/PROTO, */PROTO or *"))
                        })?;
                        let proto = parse_probe_protocol(proto).map_err(err)?;
                        let p = if p == "*" {
                            None
                        } else if proto == ProbeProtocol::Icmp {
                            return Err(err(format!(
                                "port {port:?}: ICMP has no port, write */ICMP"
                            )));
                        } else {
                            Some(
                                p.parse::<u16>()
                                    .map_err(|_| err(format!("bad port {p:?}")))?,
                            )
                        };
                        (p, Some(proto))
                    };
                    out.lines.push(Line {
                        allow: *verdict == "allow",
                        from: Pat::parse(from),
                        to: Pat::parse(to),
                        port,
                        proto,
                    });
                }
                _ => {
                    return Err(err(format!(
                        "expected `external SPEC` or `allow|deny FROM -> TO PORT/PROTO`, got {s:?}"
                    )));
                }
            }
        }
        Ok(out)
    }

    /// The expected outcome of one probe (the last matching line), if any line matches.
    pub fn expected(
        &self,
        from: &str,
        to: &str,
        port: u16,
        proto: impl Into<ProbeProtocol>,
    ) -> Option<bool> {
        let proto = proto.into();
        self.lines
            .iter()
            .rev()
            .find(|l| {
                l.from.matches(from)
                    && l.to.matches(to)
                    && l.port.is_none_or(|p| p == port)
                    && l.proto.is_none_or(|p| p == proto)
            })
            .map(|l| l.allow)
    }

    /// Every probe whose outcome differs from (or is not covered by) the expectation.
    pub fn check<'a>(
        &self,
        probes: impl IntoIterator<Item = (&'a str, &'a str, u16, ProbeProtocol, bool)>,
    ) -> Vec<Mismatch> {
        probes
            .into_iter()
            .filter_map(|(from, to, port, protocol, got)| {
                let expected = self.expected(from, to, port, protocol);
                (expected != Some(got)).then(|| Mismatch {
                    from: from.to_string(),
                    to: to.to_string(),
                    port,
                    protocol,
                    expected,
                    got,
                })
            })
            .collect()
    }
}

/// TCP, UDP, SCTP (as for `--external`) or ICMP.
fn parse_probe_protocol(s: &str) -> Result<ProbeProtocol, String> {
    if s.eq_ignore_ascii_case("ICMP") {
        return Ok(ProbeProtocol::Icmp);
    }
    parse_protocol(s)
        .map(ProbeProtocol::from)
        .map_err(|_| format!("unknown protocol {s:?} (expected TCP, UDP, SCTP or ICMP)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    const TEXT: &str = "
        external 169.254.169.254=80/TCP
        allow * -> * *          # open by default
        deny * -> default/db *
        allow default/app -> default/db 5432/TCP
        deny default/* -> 169.254.169.254 */TCP
    ";

    #[test]
    fn last_matching_line_decides() {
        let e = Expectation::parse(TEXT).expect("parses");
        assert_eq!(e.externals.len(), 1);
        assert_eq!(
            e.expected("default/app", "default/db", 5432, Protocol::Tcp),
            Some(true)
        );
        assert_eq!(
            e.expected("default/app", "default/db", 5433, Protocol::Tcp),
            Some(false)
        );
        assert_eq!(
            e.expected("default/web", "default/db", 5432, Protocol::Tcp),
            Some(false)
        );
        assert_eq!(
            e.expected("default/web", "169.254.169.254", 80, Protocol::Tcp),
            Some(false)
        );
        assert_eq!(
            e.expected("other/web", "169.254.169.254", 80, Protocol::Tcp),
            Some(true)
        );
        assert_eq!(
            e.expected("default/web", "169.254.169.254", 80, Protocol::Udp),
            Some(true)
        );
    }

    #[test]
    fn uncovered_and_wrong_probes_are_reported() {
        let e = Expectation::parse("deny * -> x/* *").expect("parses");
        let m = e.check([
            ("a/b", "x/y", 80, ProbeProtocol::Tcp, true),
            ("a/b", "z/y", 80, ProbeProtocol::Tcp, true),
        ]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].expected, Some(false));
        assert_eq!(m[1].expected, None);
    }

    #[test]
    fn bad_lines_name_the_line() {
        let err = Expectation::parse("allow * -> *").unwrap_err();
        assert_eq!(err.line, 1);
        let err = Expectation::parse("\nallow * -> * 80/ICMP").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.message.contains("ICMP"));
        let err = Expectation::parse("allow * -> * */GRE").unwrap_err();
        assert!(err.message.contains("ICMP"), "{}", err.message);
    }

    #[test]
    fn icmp_lines() {
        let e = Expectation::parse(
            "allow * -> * *\ndeny * -> x/db */ICMP\nallow x/app -> x/db */icmp\ndeny * -> x/web */TCP",
        )
        .expect("parses");
        let icmp = ProbeProtocol::Icmp;
        assert_eq!(e.expected("x/web", "x/db", 0, icmp), Some(false));
        assert_eq!(e.expected("x/app", "x/db", 0, icmp), Some(true));
        assert_eq!(e.expected("x/web", "x/db", 80, Protocol::Tcp), Some(true));
        // `*` covers ICMP; `*/TCP` does not.
        assert_eq!(e.expected("x/db", "x/web", 0, icmp), Some(true));
        assert_eq!(e.expected("x/db", "x/web", 80, Protocol::Tcp), Some(false));
        let m = e.check([("x/web", "x/db", 0, icmp, true)]);
        assert_eq!(
            m[0].to_string(),
            "x/web -> x/db */ICMP: expected denied, got allowed"
        );
    }
}
