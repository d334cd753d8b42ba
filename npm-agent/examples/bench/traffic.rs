//! Part 2: real traffic between two lab pods, enforcement off and on. Not written yet: every
//! cell is reported as not measured.
use crate::report::{Row, Sink};

pub(crate) fn run(_full: bool, sink: &mut Sink) {
    for figure in [
        "TCP request/response latency p50",
        "TCP request/response latency p99",
        "throughput",
        "new connections/s",
    ] {
        sink.push(Row {
            section: "2 traffic".into(),
            figure: figure.into(),
            size: String::new(),
            pods: None,
            policies: None,
            value: None,
            unit: String::new(),
            target_max: None,
            note: Some("not implemented yet".into()),
        });
    }
}
