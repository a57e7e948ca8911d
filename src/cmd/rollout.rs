//! `fedmesh rollout status|pause|resume|promote|abort`: a cluster's Rollouts, through its control
//! plane's admin socket — where each stands, the analysis of the step now, every decision with
//! its numbers, and the manual controls.

use clap::{Args, Subcommand};
use comfy_table::Color;
use fedmesh_api::ServiceKey;
use fedmesh_federation::control_plane::admin::AdminSocketClient;
use fedmesh_federation::control_plane::rollouts::RolloutView;

use super::status::{Output, cell, print_doc, table};

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Every rollout of the cluster (or one, with its decisions).
    Status {
        /// NAME or NAMESPACE/NAME; none: every rollout.
        name: Option<String>,
        #[command(flatten)]
        at: At,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Every Rollout of the clusterset, cluster by cluster (in wave order), and for those in
    /// waves which wave runs (through the hub's admin API).
    #[command(alias = "waves")]
    List {
        #[command(flatten)]
        admin: super::hub::AdminArgs,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Hold the canary's share where it is (the analysis stops judging).
    Pause(Target),
    /// Go on from a pause (the step's analysis starts again), or start a rolled back or aborted
    /// rollout again from its first step.
    Resume(Target),
    /// Give the canary every request now, skipping the remaining steps.
    Promote(Target),
    /// Send every request to the stable version now.
    Abort(Target),
}

#[derive(Args)]
pub struct At {
    /// The namespace of a NAME given without one.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// The control plane's --data-dir (its admin socket is admin.sock inside).
    #[arg(long, default_value = "/var/lib/fedmesh/control-plane")]
    data_dir: std::path::PathBuf,
}

#[derive(Args)]
pub struct Target {
    /// NAME or NAMESPACE/NAME.
    name: String,
    #[command(flatten)]
    at: At,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

fn key(name: &str, namespace: &str) -> anyhow::Result<ServiceKey> {
    let full = if name.contains('/') {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    };
    full.parse()
        .map_err(|e| anyhow::anyhow!("rollout {full:?}: {e} (write NAME or NAMESPACE/NAME)"))
}

pub async fn run(c: RolloutCommand) -> anyhow::Result<()> {
    let fail = |e: String| anyhow::anyhow!(e);
    let (command, t) = match c {
        RolloutCommand::Status { name, at, output } => {
            let mut all = AdminSocketClient::new(&at.data_dir)
                .rollouts()
                .await
                .map_err(fail)?;
            if let Some(n) = &name {
                let k = key(n, &at.namespace)?;
                all.retain(|r| r.namespace == k.namespace.as_str() && r.name == k.name.as_str());
                if all.is_empty() {
                    anyhow::bail!(
                        "there is no Rollout {k} in this cluster (`fedmesh rollout status` lists them)"
                    );
                }
            }
            print(&all, output, name.is_some())?;
            if all.is_empty() && output.is_table() {
                eprintln!(
                    "no rollouts in this cluster: write a Rollout (fedmesh.io/v1alpha1) to start one"
                );
            }
            return Ok(());
        }
        RolloutCommand::List { admin, output } => {
            let all = admin.client()?.rollouts().await?;
            print_list(&all, output)?;
            if all.is_empty() && output.is_table() {
                eprintln!(
                    "no rollouts: control planes report theirs to the hub every 2 s (write a Rollout, fedmesh.io/v1alpha1, in a cluster)"
                );
            }
            return Ok(());
        }
        RolloutCommand::Pause(t) => ("pause", t),
        RolloutCommand::Resume(t) => ("resume", t),
        RolloutCommand::Promote(t) => ("promote", t),
        RolloutCommand::Abort(t) => ("abort", t),
    };
    let k = key(&t.name, &t.at.namespace)?;
    let by = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .map(|u| format!("{u} (fedmesh rollout)"))
        .unwrap_or_else(|| "fedmesh rollout".into());
    let v = AdminSocketClient::new(&t.at.data_dir)
        .rollout_command(&k, command, &by)
        .await
        .map_err(fail)?;
    print(std::slice::from_ref(&v), t.output, true)
}

fn print_list(
    rollouts: &[fedmesh_federation::hub::rollouts::ClustersetRollout],
    output: Output,
) -> anyhow::Result<()> {
    if print_doc(output, &serde_json::to_value(rollouts)?)? {
        return Ok(());
    }
    let mut t = table(&[
        "ROLLOUT", "WAVE", "CLUSTER", "PHASE", "STEP", "CANARY", "REQUESTS", "SUCCESS", "P99",
        "GATE", "WHY",
    ]);
    for r in rollouts {
        for c in &r.clusters {
            let colour = match c.gate.as_str() {
                "GO" => Color::Green,
                "ROLL_BACK" => Color::Red,
                _ => Color::Yellow,
            };
            let why = if c.gate == "HOLD" || c.gate == "ROLL_BACK" {
                &c.reason
            } else {
                &c.message
            };
            let dash = |s: String| if r.waves { s } else { "-".into() };
            t.add_row(vec![
                cell(&r.rollout, None),
                cell(dash(c.wave.to_string()), None),
                cell(&c.cluster, None),
                cell(&c.phase, None),
                cell(format!("{}/{}", (c.step + 1).min(c.steps), c.steps), None),
                cell(format!("{}%", c.canary_weight), None),
                cell(c.requests.to_string(), None),
                cell(
                    c.success_rate
                        .map_or_else(|| "-".into(), |s| format!("{s:.2}%")),
                    None,
                ),
                cell(
                    c.latency_p99_ms
                        .map_or_else(|| "-".into(), |l| format!("{l:.1} ms")),
                    None,
                ),
                cell(dash(c.gate.clone()), r.waves.then_some(colour)),
                cell(why, None),
            ]);
        }
    }
    println!("{t}");
    Ok(())
}

/// The condition `type_`'s message, or "-".
fn condition<'a>(r: &'a RolloutView, type_: &str) -> Option<&'a str> {
    r.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.as_str())
}

fn print(rollouts: &[RolloutView], output: Output, history: bool) -> anyhow::Result<()> {
    if print_doc(output, &serde_json::to_value(rollouts)?)? {
        return Ok(());
    }
    let mut t = table(&[
        "NAMESPACE",
        "NAME",
        "SERVICE",
        "STABLE → CANARY",
        "PHASE",
        "STEP",
        "CANARY",
        "ANALYSIS",
    ]);
    for r in rollouts {
        let colour = match r.status.phase.as_str() {
            "Promoted" => Color::Green,
            "RolledBack" | "Aborted" | "Invalid" => Color::Red,
            _ => Color::Yellow,
        };
        let ended = !matches!(r.status.phase.as_str(), "Progressing" | "Paused");
        let last = r.status.history.last().map(|d| d.message.as_str());
        let analysis = condition(r, "RouteConflict")
            .or(if ended { last } else { None })
            .or_else(|| condition(r, "Healthy"))
            .or_else(|| condition(r, "Accepted"))
            .unwrap_or("-");
        t.add_row(vec![
            cell(&r.namespace, None),
            cell(&r.name, None),
            cell(&r.service, None),
            cell(format!("{} → {}", r.stable, r.canary), None),
            cell(&r.status.phase, Some(colour)),
            cell(
                format!("{}/{}", (r.status.step + 1).min(r.steps), r.steps),
                None,
            ),
            cell(format!("{}%", r.status.canary_weight), None),
            cell(analysis, None),
        ]);
    }
    println!("{t}");
    if !history {
        return Ok(());
    }
    for r in rollouts {
        let mut h = table(&[
            "TIME", "ACTION", "STEP", "CANARY", "REQUESTS", "SUCCESS", "P99", "WHY",
        ]);
        for d in &r.status.history {
            h.add_row(vec![
                cell(&d.time, None),
                cell(&d.action, None),
                cell(d.step.to_string(), None),
                cell(format!("{}%", d.canary_weight), None),
                cell(d.requests.to_string(), None),
                cell(
                    d.success_rate
                        .map_or_else(|| "-".into(), |s| format!("{s:.2}%")),
                    None,
                ),
                cell(
                    d.latency_p99_ms
                        .map_or_else(|| "-".into(), |l| format!("{l:.1} ms")),
                    None,
                ),
                cell(&d.message, None),
            ]);
        }
        println!("\n{}/{}: decisions\n{h}", r.namespace, r.name);
    }
    Ok(())
}
