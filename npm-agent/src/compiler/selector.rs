//! Label selector matching (Kubernetes semantics).
use crate::model::{Labels, Requirement, Selector, SelectorOp};

impl Requirement {
    /// `NotIn` and `DoesNotExist` match when the key is absent.
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            SelectorOp::In => v.is_some_and(|v| self.values.contains(v)),
            SelectorOp::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            SelectorOp::Exists => v.is_some(),
            SelectorOp::DoesNotExist => v.is_none(),
        }
    }
}

impl Selector {
    /// matchLabels AND every matchExpression; the empty selector matches everything.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: SelectorOp, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            op,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn operators() {
        let l = labels(&[("app", "web"), ("tier", "fe")]);
        assert!(req("app", SelectorOp::In, &["web", "db"]).matches(&l));
        assert!(!req("app", SelectorOp::In, &["db"]).matches(&l));
        assert!(!req("missing", SelectorOp::In, &["x"]).matches(&l));
        assert!(req("app", SelectorOp::NotIn, &["db"]).matches(&l));
        assert!(!req("app", SelectorOp::NotIn, &["web"]).matches(&l));
        assert!(
            req("missing", SelectorOp::NotIn, &["web"]).matches(&l),
            "NotIn matches absent keys"
        );
        assert!(req("tier", SelectorOp::Exists, &[]).matches(&l));
        assert!(!req("missing", SelectorOp::Exists, &[]).matches(&l));
        assert!(req("missing", SelectorOp::DoesNotExist, &[]).matches(&l));
        assert!(!req("app", SelectorOp::DoesNotExist, &[]).matches(&l));
    }

    #[test]
    fn empty_selector_matches_all_and_terms_are_anded() {
        let l = labels(&[("app", "web"), ("tier", "fe")]);
        assert!(Selector::default().matches(&l));
        assert!(Selector::default().matches(&Labels::new()));
        let s = Selector {
            match_labels: labels(&[("app", "web")]),
            match_expressions: vec![req("tier", SelectorOp::In, &["be"])],
        };
        assert!(!s.matches(&l));
    }
}
