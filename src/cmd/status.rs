//! `fedmesh status` and `fedmesh explain`: the hub's view for a person (or JSON for a script).

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use comfy_table::{Cell, Color, ContentArrangement, Table, presets};

use super::hub::AdminArgs;

/// `-o`: a table for people (`wide`: with more columns), JSON or YAML for scripts.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

impl Output {
    /// A table (plain or wide), not a document.
    pub fn is_table(self) -> bool {
        matches!(self, Output::Table | Output::Wide)
    }
}

/// Prints `doc` as JSON or YAML; `false` for the table output (the caller draws it).
pub(super) fn print_doc(output: Output, doc: &serde_json::Value) -> anyhow::Result<bool> {
    match output {
        Output::Table | Output::Wide => return Ok(false),
        Output::Json => println!("{}", serde_json::to_string_pretty(doc)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(doc)?),
    }
    Ok(true)
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The service: NAMESPACE/NAME, or its DNS name (api.shop, api.shop.svc.clusterset.local).
    service: String,
    /// The cluster that wants to reach it.
    #[arg(long)]
    from: String,
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

fn color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

pub(super) fn cell(text: impl ToString, c: Option<Color>) -> Cell {
    let cell = Cell::new(text.to_string());
    match c {
        Some(c) if color() => cell.fg(c),
        _ => cell,
    }
}

/// A table drawn with borders on a terminal; piped, plain columns separated by spaces (as
/// kubectl prints them), so `awk` and `grep` read it.
pub(super) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    if std::io::stdout().is_terminal() {
        t.load_preset(presets::UTF8_BORDERS_ONLY)
            .set_content_arrangement(ContentArrangement::Dynamic);
    } else {
        t.load_preset(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled);
    }
    t.set_header(header.iter().map(|h| cell(h, None)).collect::<Vec<_>>());
    if !std::io::stdout().is_terminal() {
        // As kubectl: no margin on the left, two spaces between columns.
        for c in t.column_iter_mut() {
            c.set_padding((0, 2));
        }
    }
    t
}

pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let client = a.admin.client()?;
    let (clusters, services) = (client.clusters().await?, client.services().await?);
    let plaintext = client.plaintext().await?;
    if print_doc(
        a.output,
        &serde_json::json!({ "clusters": clusters, "services": services, "plaintext": plaintext }),
    )? {
        return Ok(());
    }
    clusters_table(&clusters, a.output == Output::Wide);
    let mut t = table(&[
        "SERVICE",
        "TYPE",
        "PORTS",
        "EXPORTED BY",
        "READY",
        "CONFLICTS",
    ]);
    for s in &services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| {
                if p.name.is_empty() {
                    format!("{}/{}", p.port, p.protocol)
                } else {
                    format!("{}:{}/{}", p.name, p.port, p.protocol)
                }
            })
            .collect();
        let by: Vec<String> = s
            .clusters
            .iter()
            .map(|c| {
                if c.stale {
                    format!("{} (stale)", c.cluster)
                } else {
                    c.cluster.clone()
                }
            })
            .collect();
        let ready: u32 = s
            .clusters
            .iter()
            .map(|c| c.ready_endpoints)
            .fold(0, u32::saturating_add);
        let conflicts: Vec<String> = s
            .conflicts
            .iter()
            .map(|c| format!("{}: {} (winner {})", c.cluster, c.field, c.winner))
            .collect();
        t.add_row(vec![
            cell(&s.service, None),
            cell(&s.type_, None),
            cell(ports.join(", "), None),
            cell(by.join(", "), None),
            cell(
                ready,
                Some(if ready == 0 { Color::Red } else { Color::Green }),
            ),
            cell(
                if conflicts.is_empty() {
                    "-".into()
                } else {
                    conflicts.join("; ")
                },
                (!conflicts.is_empty()).then_some(Color::Yellow),
            ),
        ]);
    }
    println!("{t}");
    let problems: Vec<(&str, &fedmesh_federation::hub::admin::ProblemStatus)> = clusters
        .iter()
        .flat_map(|c| c.problems.iter().map(move |p| (c.name.as_str(), p)))
        .collect();
    if !problems.is_empty() {
        let mut t = table(&["CLUSTER", "OBJECT", "CONDITION", "REASON", "MESSAGE"]);
        for (cluster, p) in problems {
            t.add_row(vec![
                cell(cluster, None),
                cell(format!("{} {}", p.kind, p.name), None),
                cell(
                    format!(
                        "{}={}",
                        p.condition,
                        if p.condition == "PartiallyInvalid" {
                            "True"
                        } else {
                            "False"
                        }
                    ),
                    Some(Color::Yellow),
                ),
                cell(&p.reason, None),
                cell(&p.message, None),
            ]);
        }
        println!("{t}");
    }
    if !plaintext.is_empty() {
        // The migration to mTLS: a PERMISSIVE service whose plain-text share stays at 0 can be
        // made STRICT.
        let mut t = table(&[
            "PERMISSIVE SERVICE",
            "CLUSTER",
            "MTLS/S",
            "PLAIN TEXT/S",
            "PLAIN TEXT",
        ]);
        for p in &plaintext {
            t.add_row(vec![
                cell(&p.service, None),
                cell(&p.cluster, None),
                cell(format!("{:.1}", p.mtls_per_second), None),
                cell(format!("{:.1}", p.plaintext_per_second), None),
                cell(
                    format!("{:.0}%", p.plaintext_share * 100.0),
                    Some(if p.plaintext_per_second > 0.0 {
                        Color::Yellow
                    } else {
                        Color::Green
                    }),
                ),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

pub async fn explain(a: ExplainArgs) -> anyhow::Result<()> {
    let service = fedmesh_api::ServiceKey::from_user_input(&a.service)?;
    let e = a
        .admin
        .client()?
        .explain(&service.to_string(), &a.from)
        .await?;
    if print_doc(a.output, &serde_json::to_value(&e)?)? {
    } else {
        let paint = |s: &str, code: &str| {
            if color() {
                format!("\x1b[{code}m{s}\x1b[0m")
            } else {
                s.to_string()
            }
        };
        println!("Can {} reach {}?", e.from, e.service);
        for step in &e.steps {
            let mark = match step.status.as_str() {
                "ok" => paint("✓", "32"),
                "warn" => paint("!", "33"),
                _ => paint("✗", "31"),
            };
            println!("  {mark} {}", step.message);
            if step.status != "ok"
                && let Some(h) = &step.hint
            {
                println!("      → {h}");
            }
        }
        println!(
            "{}",
            if e.routable {
                paint("routable", "32;1")
            } else {
                paint("NOT routable", "31;1")
            }
        );
    }
    if !e.routable {
        std::process::exit(2);
    }
    Ok(())
}

/// The clusters as `fedmesh status` and `fedmesh cluster list` draw them.
/// `wide` adds the federation protocol, the view version applied (of the hub's) and the hub
/// replica holding the cluster's stream.
pub(super) fn clusters_table(
    clusters: &[fedmesh_federation::hub::admin::ClusterStatus],
    wide: bool,
) {
    let mut header = vec![
        "CLUSTER",
        "TRUST DOMAIN",
        "REGION",
        "STATE",
        "LAST SEEN",
        "EXPORTS",
        "BUNDLE",
        "GATEWAYS",
    ];
    if wide {
        header.extend(["PROTOCOL", "VIEW", "REPLICA"]);
    }
    let mut t = table(&header);
    for c in clusters {
        let (state, col) = if c.expired {
            ("expired", Color::Red)
        } else if c.stale {
            ("stale", Color::Yellow)
        } else if c.connected {
            ("connected", Color::Green)
        } else {
            ("disconnected", Color::Yellow)
        };
        let mut row = vec![
            cell(&c.name, None),
            cell(&c.trust_domain, None),
            cell(if c.region.is_empty() { "-" } else { &c.region }, None),
            cell(state, Some(col)),
            cell(
                c.seconds_since_seen
                    .map(|s| format!("{s}s ago"))
                    .unwrap_or_else(|| "never".into()),
                None,
            ),
            cell(c.exports, None),
            cell(
                c.bundle_sequence
                    .map(|s| format!("seq {s}"))
                    .unwrap_or_else(|| "missing".into()),
                None,
            ),
            cell(
                if c.gateways.is_empty() {
                    "-".into()
                } else {
                    c.gateways.join(", ")
                },
                None,
            ),
        ];
        if wide {
            row.extend([
                cell(c.protocol_version, None),
                cell(format!("{}/{}", c.acked_version, c.view_version), None),
                cell(c.hub_replica.as_deref().unwrap_or("-"), None),
            ]);
        }
        t.add_row(row);
    }
    println!("{t}");
}
