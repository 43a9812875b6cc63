//! The targets of the full sidecar path (issue 18), shared by `mesh` and `wrk`: the same path,
//! so the same bar, whichever client drives it. Ratios accelerated/baseline, closed loop.

use crate::stats::{Metric, Target};

/// From this many connections on, a run is held to the many-connection targets (the issue's
/// 16): with several connections in flight the CPUs are saturated and the gain shows as
/// requests per second and CPU per request, not only as latency.
pub const MANY: usize = 16;

/// 16 connections: p50 and p90 ≤ 0.65, QPS ≥ 1.5, CPU per request ≤ 0.65, tails no worse.
const MANY_TARGETS: [Target; 6] = [
    Target::at_most(Metric::P50, 0.65),
    Target::at_most(Metric::P90, 0.65),
    Target::at_least(Metric::Rate, 1.5),
    Target::at_most(Metric::CpuPerReq, 0.65),
    Target::at_most(Metric::P999, 1.0),
    Target::at_most(Metric::Max, 1.0),
];

/// 1 connection: p50 ≤ 0.80, tails no worse (one request in flight: latency is the gain).
const ONE_TARGETS: [Target; 3] = [
    Target::at_most(Metric::P50, 0.80),
    Target::at_most(Metric::P999, 1.0),
    Target::at_most(Metric::Max, 1.0),
];

/// The closed-loop targets of a run with `connections` connections per side.
pub fn closed_loop(connections: usize) -> &'static [Target] {
    if connections >= MANY {
        &MANY_TARGETS
    } else {
        &ONE_TARGETS
    }
}

/// A list of connection counts, as `--connections 1,16` gives it (one type, so that clap takes
/// the list as one value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connections(pub Vec<usize>);

/// Parses a list of connection counts (`1,16`): each at least 1, no duplicates.
pub fn parse_connections(s: &str) -> Result<Connections, String> {
    let mut out: Vec<usize> = Vec::new();
    for part in s.split(',') {
        let n: usize = part
            .trim()
            .parse()
            .map_err(|_| format!("{part:?} is not a connection count (e.g. 1,16)"))?;
        if n == 0 {
            return Err("connection counts start at 1".into());
        }
        if out.contains(&n) {
            return Err(format!("connection count {n} given twice"));
        }
        out.push(n);
    }
    Ok(Connections(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_lists() {
        assert_eq!(parse_connections("1,16"), Ok(Connections(vec![1, 16])));
        assert_eq!(parse_connections(" 4 "), Ok(Connections(vec![4])));
        assert!(parse_connections("0").is_err());
        assert!(parse_connections("1,x").is_err());
        assert!(parse_connections("").is_err());
        assert!(parse_connections("2,2").is_err());
        assert_eq!(closed_loop(16).len(), 6);
        assert_eq!(closed_loop(1)[0].value, 0.80);
    }
}
