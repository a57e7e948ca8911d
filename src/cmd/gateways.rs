//! `fedmesh gateways`: every cluster's east-west gateways as every other cluster reaches them —
//! each control plane probes the others' gateways with mTLS every few seconds and reports to the
//! hub (as `linkerd multicluster gateways` shows a link's gateway liveness and latency).

use clap::Args;
use comfy_table::Color;
use fedmesh_federation::hub::gateways::GatewayStatus;

use super::hub::AdminArgs;
use super::status::{Output, cell, print_doc, table};

#[derive(Args)]
pub struct GatewaysArgs {
    /// Only the gateways of this cluster.
    #[arg(long)]
    cluster: Option<String>,
    /// Only as this cluster reaches them.
    #[arg(long)]
    from: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub async fn run(a: GatewaysArgs) -> anyhow::Result<()> {
    let mut gateways = a.admin.client()?.gateways().await?;
    gateways.retain(|g| {
        a.cluster.as_ref().is_none_or(|c| &g.cluster == c)
            && a.from.as_ref().is_none_or(|f| &g.from == f)
    });
    print(&gateways, a.output)?;
    if gateways.is_empty() && a.output.is_table() {
        eprintln!(
            "no gateways to show: a gateway appears once its cluster publishes its address (--gateway) and another cluster is joined"
        );
    }
    Ok(())
}

/// Latency as a person reads it.
pub fn latency(g: &GatewayStatus) -> String {
    g.latency_ms
        .map(|ms| format!("{ms:.1}ms"))
        .unwrap_or_else(|| "-".into())
}

pub fn print(gateways: &[GatewayStatus], output: Output) -> anyhow::Result<()> {
    if print_doc(output, &serde_json::to_value(gateways)?)? {
        return Ok(());
    }
    let wide = output == Output::Wide;
    let mut header = vec![
        "FROM", "CLUSTER", "GATEWAY", "STATE", "LATENCY", "CONFIG", "SERVICES", "PROBED",
    ];
    if wide {
        header.push("GATEWAY ID");
    }
    let mut t = table(&header);
    for g in gateways {
        let (state, colour) = match g.state.as_str() {
            "reachable" if g.ready => ("reachable".to_string(), Color::Green),
            "reachable" => ("reachable, no config yet".to_string(), Color::Yellow),
            "unknown" => ("unknown".to_string(), Color::Yellow),
            _ => (format!("unreachable: {}", g.error), Color::Red),
        };
        let mut row = vec![
            cell(&g.from, None),
            cell(&g.cluster, None),
            cell(&g.address, None),
            cell(state, Some(colour)),
            cell(latency(g), None),
            cell(
                if g.reachable() {
                    g.config_version.to_string()
                } else {
                    "-".into()
                },
                None,
            ),
            cell(
                if g.reachable() {
                    g.exported_services.to_string()
                } else {
                    "-".into()
                },
                None,
            ),
            cell(
                g.probed_seconds_ago
                    .map(|s| format!("{s}s ago"))
                    .unwrap_or_else(|| "never".into()),
                None,
            ),
        ];
        if wide {
            row.push(cell(
                if g.gateway_id.is_empty() {
                    "-"
                } else {
                    &g.gateway_id
                },
                None,
            ));
        }
        t.add_row(row);
    }
    println!("{t}");
    Ok(())
}
