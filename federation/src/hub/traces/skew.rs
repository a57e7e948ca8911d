//! Clock skew between clusters, estimated from one trace's client/server span pairs.
//!
//! Each cluster's proxies stamp spans with their own clock; a few milliseconds of skew between
//! clusters is enough to draw a server span before the client span that caused it. A request
//! that crosses clusters is timed on both sides, which is what NTP needs: with the client's
//! start `t0` and end `t3` (its clock) and the server's start `t1` and end `t2` (its clock),
//! the server's clock runs ahead of the client's by about `((t1 − t0) + (t2 − t3)) / 2`,
//! assuming the way there takes as long as the way back. Every pair between two clusters
//! gives one such estimate; the median of a pair of clusters' estimates is their offset, and
//! offsets are chained outwards from the cluster where the trace started (its reference).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::SpanView;

/// A trace's clusters' clock offsets against one of them.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq)]
pub struct ClockSkew {
    /// The cluster the offsets are relative to: where the trace's earliest span was recorded.
    pub reference: String,
    /// The clusters whose offset could be estimated (the reference is not listed).
    pub offsets: Vec<ClusterOffset>,
    /// Clusters of the trace without a client/server pair linking them to the reference: their
    /// spans are shown as recorded.
    pub uncorrected: Vec<String>,
}

/// How far one cluster's clock runs ahead of the reference's.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct ClusterOffset {
    pub cluster: String,
    /// Nanoseconds ahead (negative: behind). A span's corrected start is its start minus this.
    pub offset_ns: i64,
    /// Client/server pairs the estimate rests on (along the chain from the reference).
    pub pairs: usize,
}

impl ClockSkew {
    /// The offset of `cluster` (0 for the reference and for clusters without an estimate).
    pub fn offset(&self, cluster: &str) -> i64 {
        self.offsets
            .iter()
            .find(|o| o.cluster == cluster)
            .map_or(0, |o| o.offset_ns)
    }
}

/// Estimates the clusters' offsets from `spans` (one trace).
pub fn estimate(spans: &[SpanView]) -> ClockSkew {
    // The reference: where the request started, not a gateway's connection (which may have been
    // opened by an earlier request, and is shown with this one through a link).
    let gateway = |s: &SpanView| s.proxy() == Some("gateway");
    let Some(first) = spans
        .iter()
        .filter(|s| !gateway(s))
        .min_by_key(|s| s.start_unix_nano)
        .or_else(|| spans.iter().min_by_key(|s| s.start_unix_nano))
    else {
        return ClockSkew::default();
    };
    let by_id: HashMap<&str, &SpanView> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    // Estimates per ordered pair of clusters (client's, server's): how far the server's clock
    // is ahead of the client's.
    let mut samples: BTreeMap<(&str, &str), Vec<i64>> = BTreeMap::new();
    // A gateway's span covers a connection, not one request's way there and back: no pair.
    for server in spans.iter().filter(|s| s.kind == "server" && !gateway(s)) {
        let Some(client) = by_id.get(server.parent_span_id.as_str()) else {
            continue;
        };
        if client.kind != "client" || client.cluster == server.cluster {
            continue;
        }
        let (t0, t3) = (client.start_unix_nano as i128, end(client) as i128);
        let (t1, t2) = (server.start_unix_nano as i128, end(server) as i128);
        let theta = ((t1 - t0) + (t2 - t3)) / 2;
        samples
            .entry((client.cluster.as_str(), server.cluster.as_str()))
            .or_default()
            .push(theta.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
    }
    // Both directions of a pair of clusters make one set of estimates (of the second's offset
    // from the first), so a trace that goes east → west → east uses both hops.
    let mut edges: BTreeMap<&str, Vec<(&str, i64, usize)>> = BTreeMap::new();
    let mut merged: BTreeMap<(&str, &str), Vec<i64>> = BTreeMap::new();
    for ((a, b), v) in samples {
        if a < b {
            merged.entry((a, b)).or_default().extend(v);
        } else {
            merged
                .entry((b, a))
                .or_default()
                .extend(v.iter().map(|x| -x));
        }
    }
    for ((a, b), v) in merged {
        let m = median(v.clone());
        edges.entry(a).or_default().push((b, m, v.len()));
        edges.entry(b).or_default().push((a, -m, v.len()));
    }
    // Breadth-first from the reference: each cluster's offset through the fewest hops.
    let reference = first.cluster.as_str();
    let mut known: BTreeMap<&str, (i64, usize)> = BTreeMap::from([(reference, (0, 0))]);
    let mut queue = VecDeque::from([reference]);
    while let Some(c) = queue.pop_front() {
        let (base, pairs) = known[c];
        for (next, off, n) in edges.get(c).into_iter().flatten() {
            if !known.contains_key(next) {
                known.insert(next, (base + off, pairs + n));
                queue.push_back(next);
            }
        }
    }
    let clusters: BTreeSet<&str> = spans.iter().map(|s| s.cluster.as_str()).collect();
    ClockSkew {
        reference: reference.to_string(),
        offsets: known
            .iter()
            .filter(|(c, _)| **c != reference)
            .map(|(c, (offset_ns, pairs))| ClusterOffset {
                cluster: c.to_string(),
                offset_ns: *offset_ns,
                pairs: *pairs,
            })
            .collect(),
        uncorrected: clusters
            .into_iter()
            .filter(|c| !known.contains_key(c))
            .map(str::to_string)
            .collect(),
    }
}

/// `spans` with each start moved onto the reference cluster's clock.
pub fn corrected(spans: &[SpanView], skew: &ClockSkew) -> Vec<SpanView> {
    spans
        .iter()
        .map(|s| {
            let mut s = s.clone();
            let off = skew.offset(&s.cluster);
            s.start_unix_nano = (s.start_unix_nano as i128 - off as i128).max(0) as u64;
            s
        })
        .collect()
}

fn end(s: &SpanView) -> u64 {
    s.start_unix_nano.saturating_add(s.duration_ns)
}

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[n / 2],
        n => ((v[n / 2 - 1] as i128 + v[n / 2] as i128) / 2) as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: &str, kind: &str, cluster: &str, start: u64, dur: u64) -> SpanView {
        SpanView {
            service: format!("svc-{cluster}"),
            start_unix_nano: start,
            duration_ns: dur,
            ..super::super::test_span(id, parent, kind, cluster)
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_cluster_whose_clock_runs_ahead_is_moved_back_inside_its_caller() {
        // east calls west; the way there and back take 1 ms each; west's clock is 5 ms ahead,
        // so west's server span appears to start 4 ms after east's client span ended.
        let t = 1_000 * MS;
        let spans = vec![
            span("a1", "", "client", "east", t, 10 * MS),
            span("b1", "a1", "server", "west", t + MS + 5 * MS, 8 * MS),
            // A second call, 2 ms each way, the same skew.
            span("a2", "", "client", "east", t + 20 * MS, 10 * MS),
            span("b2", "a2", "server", "west", t + 22 * MS + 5 * MS, 6 * MS),
        ];
        let skew = estimate(&spans);
        assert_eq!(skew.reference, "east");
        assert_eq!(
            skew.offsets,
            vec![ClusterOffset {
                cluster: "west".into(),
                offset_ns: 5 * MS as i64,
                pairs: 2
            }]
        );
        assert!(skew.uncorrected.is_empty());
        let fixed = corrected(&spans, &skew);
        assert_eq!(fixed[1].start_unix_nano, t + MS);
        assert_eq!(fixed[3].start_unix_nano, t + 22 * MS);
        assert_eq!(
            fixed[0], spans[0],
            "the reference's spans stay where they were"
        );
    }

    #[test]
    fn offsets_chain_through_clusters_and_unpaired_clusters_stay_uncorrected() {
        let t = 1_000 * MS;
        // east → west (west 3 ms ahead) → north (north 1 ms behind east, so 4 ms behind west);
        // south only sent an internal span.
        let spans = vec![
            span("a", "", "client", "east", t, 20 * MS),
            span("b", "a", "server", "west", t + MS + 3 * MS, 18 * MS),
            span("c", "b", "client", "west", t + 2 * MS + 3 * MS, 10 * MS),
            span("d", "c", "server", "north", t + 3 * MS - MS, 8 * MS),
            span("e", "d", "internal", "south", t + 4 * MS, MS),
        ];
        let skew = estimate(&spans);
        assert_eq!(skew.offset("west"), 3 * MS as i64);
        assert_eq!(skew.offset("north"), -(MS as i64));
        assert_eq!(skew.offset("east"), 0);
        assert_eq!(skew.uncorrected, vec!["south".to_string()]);
    }

    #[test]
    fn same_cluster_pairs_and_orphans_give_no_estimate() {
        let spans = vec![
            span("a", "", "client", "east", 10 * MS, 5 * MS),
            span("b", "a", "server", "east", 11 * MS, 3 * MS),
            span("c", "zz", "server", "west", 12 * MS, 3 * MS),
        ];
        let skew = estimate(&spans);
        assert!(skew.offsets.is_empty());
        assert_eq!(skew.uncorrected, vec!["west".to_string()]);
        // A gateway's connection span under a client span is no pair either.
        let mut gw = span("g", "a", "server", "west", 20 * MS, 3 * MS);
        std::sync::Arc::make_mut(&mut gw.resource).insert("fedmesh.proxy".into(), "gateway".into());
        let skew = estimate(&[spans[0].clone(), gw]);
        assert!(skew.offsets.is_empty(), "{skew:?}");
        assert_eq!(estimate(&[]), ClockSkew::default());
    }
}
