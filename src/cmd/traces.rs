//! `fedmesh traces` and `fedmesh trace ID`: the hub's recent traces for people who live in a
//! shell — a list to search, and one trace as a waterfall, each span with its cluster.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use comfy_table::Color;
use fedmesh_federation::hub::traces::skew::{self, ClockSkew};
use fedmesh_federation::hub::traces::{SpanView, TraceQuery, bounds};

use super::hub::AdminArgs;
use super::parse_duration;
use super::status::{Output, cell, print_doc, table};

#[derive(Args)]
pub struct TracesArgs {
    /// Traces with a span of this service (its `service.name`, e.g. the service account).
    #[arg(long)]
    service: Option<String>,
    /// Traces with a span from this cluster.
    #[arg(long)]
    cluster: Option<String>,
    /// Only traces with a failed span.
    #[arg(long)]
    errors: bool,
    /// Only traces lasting at least this long (e.g. 100ms).
    #[arg(long, value_parser = parse_duration)]
    min_duration: Option<Duration>,
    /// At most this many, newest first (1 to 1000).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: u16,
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args)]
pub struct TraceArgs {
    /// The trace ID (32 hex digits), as `fedmesh traces` or an access log shows it.
    id: String,
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

pub async fn traces(a: TracesArgs) -> anyhow::Result<()> {
    let client = a.admin.client()?;
    let q = TraceQuery {
        service: a.service,
        cluster: a.cluster,
        error: a.errors.then_some(true),
        min_duration_ms: a.min_duration.map(|d| d.as_millis() as u64),
        since_unix_ms: None,
        limit: Some(usize::from(a.limit)),
    };
    let found = client.traces(&q).await?;
    if print_doc(a.output, &serde_json::to_value(&found)?)? {
        return Ok(());
    }
    if found.is_empty() {
        println!(
            "no traces in the hub's window match (proxies keep 1% of new traces, and every failed or slow request)"
        );
        return Ok(());
    }
    let mut t = table(&["TRACE ID", "ROOT", "CLUSTERS", "SPANS", "DURATION", "ERROR"]);
    for s in &found {
        t.add_row(vec![
            cell(&s.trace_id, None),
            cell(&s.root, None),
            cell(s.clusters.join(","), None),
            cell(s.spans, None),
            cell(ms(s.duration_ns), None),
            if s.error {
                cell("yes", Some(Color::Red))
            } else {
                cell("-", None)
            },
        ]);
    }
    println!("{t}");
    Ok(())
}

pub async fn trace(a: TraceArgs) -> anyhow::Result<()> {
    let client = a.admin.client()?;
    let id = a.id.to_ascii_lowercase();
    let spans = client.trace(&id).await?;
    if print_doc(a.output, &serde_json::to_value(&spans)?)? {
        return Ok(());
    }
    // Drawn on the clock of the cluster where the trace started, so a server span sits inside
    // the client span that caused it however far the clusters' clocks disagree.
    let skew = skew::estimate(&spans);
    let spans = skew::corrected(&spans, &skew);
    print!(
        "{}",
        waterfall(&id, &spans, std::io::stdout().is_terminal())
    );
    if let Some(line) = skew_line(&skew) {
        println!("{line}");
    }
    Ok(())
}

/// What the clock-skew correction did, when it did anything.
pub fn skew_line(skew: &ClockSkew) -> Option<String> {
    if skew.offsets.is_empty() {
        return None;
    }
    let pairs: usize = skew.offsets.iter().map(|o| o.pairs).max().unwrap_or(0);
    let offsets: Vec<String> = skew
        .offsets
        .iter()
        .map(|o| format!("{} {:+.2} ms", o.cluster, o.offset_ns as f64 / 1e6))
        .collect();
    let mut line = format!(
        "clock skew corrected (estimated from {pairs} client/server pair(s)): {} relative to {}",
        offsets.join(", "),
        skew.reference
    );
    if !skew.uncorrected.is_empty() {
        line.push_str(&format!(
            "; no estimate for {} (shown as recorded)",
            skew.uncorrected.join(", ")
        ));
    }
    Some(line)
}

/// Width of the timeline bar.
const BAR: usize = 32;

/// One trace as text: a line per span, children under their parent, with its cluster, kind,
/// service, name, start offset and length, a bar on the trace's timeline, and why it failed.
/// Spans of other traces (`trace_id` is not `id`: a pooled connection's gateway admission, which
/// belongs to the request that opened the connection) are marked as linked.
pub fn waterfall(id: &str, spans: &[SpanView], unicode: bool) -> String {
    let (start, end) = bounds(spans);
    let total = (end - start).max(1);
    let clusters: std::collections::BTreeSet<&str> =
        spans.iter().map(|s| s.cluster.as_str()).collect();
    let mut out = format!(
        "trace {} — {} spans, {} cluster(s) ({}), {}\n",
        id,
        spans.len(),
        clusters.len(),
        clusters.into_iter().collect::<Vec<_>>().join(", "),
        ms(total)
    );
    // Depth-first from the roots (spans whose parent is not in the trace), in start order.
    let ids: HashMap<&str, usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.span_id.as_str(), i))
        .collect();
    let mut children: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        if ids.contains_key(s.parent_span_id.as_str()) {
            children
                .entry(s.parent_span_id.as_str())
                .or_default()
                .push(i);
        } else {
            roots.push(i);
        }
    }
    let mut stack: Vec<(usize, usize)> = roots.into_iter().rev().map(|i| (i, 0)).collect();
    let (full, empty) = if unicode { ('█', ' ') } else { ('#', '.') };
    while let Some((i, depth)) = stack.pop() {
        let s = &spans[i];
        let from = ((s.start_unix_nano - start) as u128 * BAR as u128 / total as u128) as usize;
        let len = ((s.duration_ns as u128 * BAR as u128).div_ceil(total as u128) as usize).max(1);
        let bar: String = (0..BAR)
            .map(|k| {
                if k >= from && k < from + len {
                    full
                } else {
                    empty
                }
            })
            .collect();
        let linked = if s.trace_id == id { "" } else { " (linked)" };
        let label = format!(
            "{}{} {} {}{linked}",
            "  ".repeat(depth),
            s.kind,
            s.service,
            s.name
        );
        let tried = s
            .attributes
            .get("fedmesh.tried")
            .map(|t| format!("  tried {t}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {:<10} {:<44} {:>10} {:>10} |{bar}|{}{tried}\n",
            s.cluster,
            label,
            ms(s.start_unix_nano - start),
            ms(s.duration_ns),
            s.error
                .as_ref()
                .map(|e| format!("  failed: {e}"))
                .unwrap_or_default(),
        ));
        if let Some(c) = children.get(s.span_id.as_str()) {
            let mut c = c.clone();
            c.sort_by_key(|&j| spans[j].start_unix_nano);
            stack.extend(c.into_iter().rev().map(|j| (j, depth + 1)));
        }
    }
    out
}
