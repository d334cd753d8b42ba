//! The table and the JSON: one row per (figure, size), plus the growth of each figure.
//!
//! JSON field names are a contract (extend, never rename): the document is
//! `{"date", "machine", "size", "rows": [Row], "growth": [Growth]}`.
use std::collections::BTreeMap;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Row {
    /// "1 per-packet", "2 traffic", "3 control plane".
    pub(crate) section: String,
    pub(crate) figure: String,
    /// Human-readable size, e.g. "pods=10000 policies=1000".
    pub(crate) size: String,
    pub(crate) pods: Option<usize>,
    pub(crate) policies: Option<usize>,
    /// `None`: not measured (the note says why).
    pub(crate) value: Option<f64>,
    pub(crate) unit: String,
    /// The target for this figure, when it has one (value must be at most this).
    pub(crate) target_max: Option<f64>,
    pub(crate) note: Option<String>,
}

impl Row {
    pub(crate) fn met(&self) -> Option<bool> {
        Some(self.value? <= self.target_max?)
    }
}

/// How a figure grows along one axis, from its smallest to its largest measured size with the
/// other axis fixed: the exponent k in value ∝ n^k (0 constant, 1 linear, 2 quadratic).
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Growth {
    pub(crate) section: String,
    pub(crate) figure: String,
    /// "pods" or "policies".
    pub(crate) axis: String,
    /// The other axis' value, fixed.
    pub(crate) fixed: usize,
    pub(crate) from: usize,
    pub(crate) to: usize,
    /// value(to) / value(from).
    pub(crate) ratio: f64,
    pub(crate) exponent: f64,
    pub(crate) class: String,
}

#[derive(Default)]
pub(crate) struct Sink {
    pub(crate) rows: Vec<Row>,
}

impl Sink {
    pub(crate) fn push(&mut self, row: Row) {
        eprintln!(
            "  {} | {} | {} = {}",
            row.section,
            row.figure,
            row.size,
            row.value
                .map_or("not measured".into(), |v| format!("{v:.1} {}", row.unit))
        );
        self.rows.push(row);
    }
}

fn class(exponent: f64) -> &'static str {
    if exponent < 0.15 {
        "constant"
    } else if exponent < 0.6 {
        "sublinear"
    } else if exponent < 1.3 {
        "linear"
    } else if exponent < 1.7 {
        "superlinear"
    } else {
        "quadratic or worse"
    }
}

/// (section, figure, axis, the other axis' value): one series of (n, value) points.
type SeriesKey = (String, String, &'static str, usize);

/// Growth along each axis for every figure measured at two or more sizes of it.
pub(crate) fn growth(rows: &[Row]) -> Vec<Growth> {
    let mut out = Vec::new();
    let mut series: BTreeMap<SeriesKey, Vec<(usize, f64)>> = BTreeMap::new();
    // The largest value of each axis per figure: series are taken with the other axis fixed
    // at its largest (the case that matters), one per axis.
    let mut max: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    for r in rows {
        if let (Some(pods), Some(policies)) = (r.pods, r.policies) {
            let m = max
                .entry((r.section.clone(), r.figure.clone()))
                .or_default();
            m.0 = m.0.max(pods);
            m.1 = m.1.max(policies);
        }
    }
    for r in rows {
        let (Some(pods), Some(policies), Some(v)) = (r.pods, r.policies, r.value) else {
            continue;
        };
        let key = |axis, fixed| (r.section.clone(), r.figure.clone(), axis, fixed);
        let (max_pods, max_policies) = max[&(r.section.clone(), r.figure.clone())];
        if policies == max_policies {
            series
                .entry(key("pods", policies))
                .or_default()
                .push((pods, v));
        }
        if pods == max_pods {
            series
                .entry(key("policies", pods))
                .or_default()
                .push((policies, v));
        }
        // Sizes that grow pods and policies together (the control plane's 10:1 clusters).
        series
            .entry(key("pods and policies together", 0))
            .or_default()
            .push((pods, v));
    }
    for ((section, figure, axis, fixed), mut pts) in series {
        pts.sort_by_key(|p| p.0);
        pts.dedup_by_key(|p| p.0);
        if pts.len() < 2 {
            continue;
        }
        // The joint series only where no single-axis series exists.
        if fixed == 0 && section.starts_with('1') {
            continue;
        }
        let (n0, v0) = pts[0];
        let (n1, v1) = pts[pts.len() - 1];
        if v0 <= 0.0 || v1 <= 0.0 {
            continue;
        }
        let ratio = v1 / v0;
        let exponent = ratio.ln() / (n1 as f64 / n0 as f64).ln();
        out.push(Growth {
            section,
            figure,
            axis: axis.into(),
            fixed,
            from: n0,
            to: n1,
            ratio,
            exponent,
            class: class(exponent).into(),
        });
    }
    out
}

/// Flatness of each per-packet figure that has a target: its value at the largest size
/// (most pods and policies) over its value at the smallest; the issue asks for at most 1.2.
pub(crate) fn flatness(rows: &[Row]) -> Vec<Row> {
    let mut by_figure: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        if r.section.starts_with('1') && r.target_max.is_some() && r.value.is_some() {
            by_figure.entry(r.figure.as_str()).or_default().push(r);
        }
    }
    let mut out = Vec::new();
    for (figure, rs) in by_figure {
        let key = |r: &&&Row| (r.pods.unwrap_or(0), r.policies.unwrap_or(0));
        let (Some(small), Some(large)) = (rs.iter().min_by_key(key), rs.iter().max_by_key(key))
        else {
            continue;
        };
        let (Some(v0), Some(v1)) = (small.value, large.value) else {
            continue;
        };
        out.push(Row {
            section: "4 growth".into(),
            figure: format!("flatness: {figure}"),
            size: format!("({}) / ({})", large.size, small.size),
            pods: None,
            policies: None,
            value: Some(v1 / v0),
            unit: "×".into(),
            target_max: Some(1.2),
            note: None,
        });
    }
    out
}

pub(crate) fn print_table(rows: &[Row], growth: &[Growth]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| section | figure | size | value | target | met | note |\n|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let value = r.value.map_or_else(
            || "not measured".to_string(),
            |v| {
                let digits = if v.abs() < 10.0 { 2 } else { 1 };
                format!("{v:.digits$} {}", r.unit)
            },
        );
        let target = r
            .target_max
            .map_or(String::new(), |t| format!("≤ {t} {}", r.unit));
        let met = match r.met() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.section,
            r.figure,
            r.size,
            value,
            target,
            met,
            r.note.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(
        s,
        "\nGrowth (value ∝ n^k from the smallest to the largest size, the other axis fixed):\n\n| section | figure | axis | fixed | from → to | ratio | k | growth |\n|---|---|---|---|---|---|---|---|"
    );
    for g in growth {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} → {} | {:.2}× | {:.2} | {} |",
            g.section, g.figure, g.axis, g.fixed, g.from, g.to, g.ratio, g.exponent, g.class
        );
    }
    s
}
