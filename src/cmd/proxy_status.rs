//! `fedmesh proxy-status` (every proxy of the clusterset, through the hub) and `fedmesh
//! control-plane proxy-status` (one control plane's, through its admin socket): each sidecar
//! and gateway with a configuration stream open, whether it holds what it was last sent, and
//! the SVID it connected with.

use clap::Args;
use comfy_table::Color;
use fedmesh_federation::hub::proxies::ProxyStatus;

use super::hub::AdminArgs;
use super::status::{Output, cell, print_doc, table};

#[derive(Args)]
pub struct ProxyStatusArgs {
    /// Only this cluster's proxies.
    #[arg(long)]
    cluster: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub async fn run(a: ProxyStatusArgs) -> anyhow::Result<()> {
    let mut proxies = a.admin.client()?.proxies().await?;
    if let Some(c) = &a.cluster {
        proxies.retain(|p| &p.cluster == c);
    }
    print(&proxies, a.output)?;
    if proxies.is_empty() && a.output.is_table() {
        eprintln!(
            "no proxies reported{}: control planes report their sidecars' and gateways' configuration streams every few seconds",
            a.cluster
                .as_deref()
                .map(|c| format!(" by cluster {c}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// What a proxy's outlier detection holds ejected: `west@gw:15443 (4s)` for another cluster's
/// gateway, `shop/api 10.0.0.7:15006 (2s)` for an endpoint; `-` for nothing.
fn ejected(p: &ProxyStatus) -> String {
    if p.ejected.is_empty() {
        return "-".into();
    }
    p.ejected
        .iter()
        .map(|e| {
            let left = e.remaining_seconds.ceil() as u64;
            if e.remote {
                format!("{}@{} ({left}s)", e.cluster, e.address)
            } else {
                format!("{} {} ({left}s)", e.service, e.address)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The table (or JSON/YAML) of `proxies`. VERSION is acknowledged/sent (and the control plane's
/// version now: a proxy is sent a version only when its view changed).
pub fn print(proxies: &[ProxyStatus], output: Output) -> anyhow::Result<()> {
    if print_doc(output, &serde_json::to_value(proxies)?)? {
        return Ok(());
    }
    let wide = output == Output::Wide;
    let mut header = vec![
        "CLUSTER",
        "PROXY",
        "ROLE",
        "NODE",
        "SYNC",
        "VERSION",
        "SVID UNTIL",
    ];
    if wide {
        header.extend(["CONNECTED", "ACKED AT", "EJECTED"]);
    }
    let mut t = table(&header);
    for p in proxies {
        let colour = match p.sync.as_str() {
            "SYNCED" => Color::Green,
            "NACK" => Color::Red,
            _ => Color::Yellow,
        };
        let mut row = vec![
            cell(&p.cluster, None),
            cell(&p.identity, None),
            cell(&p.role, None),
            cell(if p.node.is_empty() { "-" } else { &p.node }, None),
            cell(
                if p.nack_error.is_empty() {
                    p.sync.clone()
                } else {
                    format!("{}: {}", p.sync, p.nack_error)
                },
                Some(colour),
            ),
            cell(
                format!(
                    "{}/{} (now {})",
                    p.acked_version, p.sent_version, p.config_version
                ),
                None,
            ),
            cell(p.svid_not_after.as_deref().unwrap_or("-"), None),
        ];
        if wide {
            row.extend([
                cell(&p.connected_at, None),
                cell(p.acked_at.as_deref().unwrap_or("-"), None),
                cell(ejected(p), None),
            ]);
        }
        t.add_row(row);
    }
    println!("{t}");
    Ok(())
}
