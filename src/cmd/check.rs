//! `fedmesh check`: the clusterset checked end to end, from the hub — every cluster joined and
//! heard from, every trust bundle at the hub and every cluster on the latest view (so bundles and
//! imports went both ways), every gateway reachable from every other cluster by an mTLS probe,
//! every proxy holding its latest configuration — and, with `--kubernetes`, the CRDs of the
//! current kubeconfig context. Each failure says what is wrong and the command that looks
//! further; the exit code is 1 when any check failed, so CI can run it (`linkerd check
//! --multicluster`, `istioctl analyze`, `cilium clustermesh status` in one).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Args;
use fedmesh_federation::hub::admin::{ClusterStatus, ServiceStatus};
use fedmesh_federation::hub::gateways::GatewayStatus;
use fedmesh_federation::hub::proxies::ProxyStatus;
use serde::Serialize;

use super::hub::AdminArgs;
use super::parse_duration;
use super::status::{Output, print_doc};

#[derive(Args)]
pub struct CheckArgs {
    /// Also check the Kubernetes cluster of the current kubeconfig context: fedmesh's CRDs
    /// installed and serving the versions fedmesh reads.
    #[arg(long)]
    kubernetes: bool,
    /// Pre-flight only, before installing: the Kubernetes cluster of the current kubeconfig
    /// context (reachable, its version, fedmesh's CRDs); the hub is not asked.
    #[arg(long)]
    pre: bool,
    /// How long changes in flight — a view a cluster has not acknowledged yet, an update a proxy
    /// has not, a gateway not probed yet — may take to settle before they count as failures.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    settle: Duration,
    #[command(flatten)]
    admin: AdminArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome.
#[derive(Serialize, Clone, Debug)]
pub struct Check {
    pub section: &'static str,
    pub status: Verdict,
    pub message: String,
    /// The command (or step) that looks further.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Default)]
struct Checks {
    list: Vec<Check>,
    /// Something may still be on its way (judged again until `--settle` runs out).
    unsettled: bool,
}

impl Checks {
    fn add(
        &mut self,
        section: &'static str,
        status: Verdict,
        message: String,
        hint: Option<String>,
    ) {
        self.list.push(Check {
            section,
            status,
            message,
            hint,
        });
    }
    fn ok(&mut self, section: &'static str, message: String) {
        self.add(section, Verdict::Ok, message, None);
    }
    fn warn(&mut self, section: &'static str, message: String, hint: &str) {
        self.add(section, Verdict::Warn, message, Some(hint.to_string()));
    }
    fn fail(&mut self, section: &'static str, message: String, hint: String) {
        self.add(section, Verdict::Fail, message, Some(hint));
    }
    /// A failure that may be a change still in flight.
    fn pending(&mut self, section: &'static str, message: String, hint: String) {
        self.unsettled = true;
        self.fail(section, message, hint);
    }
}

/// What the hub says, fetched at once.
struct Seen {
    clusters: Vec<ClusterStatus>,
    services: Vec<ServiceStatus>,
    gateways: Vec<GatewayStatus>,
    proxies: Vec<ProxyStatus>,
}

pub async fn run(a: CheckArgs) -> anyhow::Result<()> {
    let mut checks = Vec::new();
    if a.kubernetes || a.pre {
        checks.extend(kubernetes_checks().await);
    }
    if !a.pre {
        checks.extend(live_checks(&a).await);
    }
    let failed = checks.iter().filter(|c| c.status == Verdict::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Verdict::Warn).count();
    if !print_doc(
        a.output,
        &serde_json::json!({ "ok": failed == 0, "checks": checks }),
    )? {
        print(&checks);
        println!(
            "\n{} checks: {} ok, {warned} warning(s), {failed} failed",
            checks.len(),
            checks.len() - failed - warned
        );
    }
    anyhow::ensure!(failed == 0, "{failed} check(s) failed");
    Ok(())
}

/// The hub's checks, judged again while something is in flight, until `--settle` runs out.
async fn live_checks(a: &CheckArgs) -> Vec<Check> {
    let mut hub = Checks::default();
    let client = match a.admin.client() {
        Ok(c) => c,
        Err(e) => {
            hub.fail(
                "hub",
                format!("cannot use the hub's admin API: {e:#}"),
                "give the admin URL (--admin or FEDMESH_ADMIN) and a token (FEDMESH_ADMIN_TOKEN or --admin-token-file)".into(),
            );
            return hub.list;
        }
    };
    let deadline = Instant::now() + a.settle;
    loop {
        let seen = async {
            Ok::<_, fedmesh_federation::hub::client::ClientError>(Seen {
                clusters: client.clusters().await?,
                services: client.services().await?,
                gateways: client.gateways().await?,
                proxies: client.proxies().await?,
            })
        }
        .await;
        let seen = match seen {
            Ok(s) => s,
            Err(e) => {
                hub.fail(
                    "hub",
                    format!("the hub's admin API at {} did not answer: {e}", a.admin.url),
                    "is `fedmesh hub` running with --admin-listen there? (--admin, FEDMESH_ADMIN)"
                        .into(),
                );
                return hub.list;
            }
        };
        let judged = judge(&seen, &a.admin.url);
        if !judged.unsettled || Instant::now() >= deadline {
            return judged.list;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn judge(seen: &Seen, url: &str) -> Checks {
    let mut c = Checks::default();
    let view = seen
        .clusters
        .iter()
        .map(|c| c.view_version)
        .max()
        .unwrap_or(0);
    c.ok(
        "hub",
        format!(
            "the hub answers at {url}: {} cluster(s), {} service(s), view version {view}",
            seen.clusters.len(),
            seen.services.len()
        ),
    );
    clusters(&mut c, seen);
    trust(&mut c, seen);
    gateways(&mut c, seen);
    proxies(&mut c, seen);
    services(&mut c, seen);
    c
}

fn clusters(c: &mut Checks, seen: &Seen) {
    const S: &str = "clusters";
    if seen.clusters.is_empty() {
        c.fail(
            S,
            "no cluster has joined the clusterset".into(),
            "create a join token (`fedmesh hub token create --cluster NAME --trust-domain TD`) and start the cluster's control plane with it".into(),
        );
    }
    let look = |name: &str| {
        format!(
            "fedmesh status; the log of {name}'s control plane (is it running, can it reach the hub?)"
        )
    };
    for cl in &seen.clusters {
        let seen_ago = cl
            .seconds_since_seen
            .map(|s| format!("{s}s ago"))
            .unwrap_or_else(|| "never".into());
        if cl.expired {
            c.fail(
                S,
                format!(
                    "{} expired: silent too long, its exports are withdrawn (last seen {seen_ago})",
                    cl.name
                ),
                look(&cl.name),
            );
        } else if cl.stale {
            c.fail(
                S,
                format!("{} is stale: the hub has not heard from it since {seen_ago}; it keeps routing with its last view", cl.name),
                look(&cl.name),
            );
        } else if !cl.connected {
            c.fail(
                S,
                format!(
                    "{} is not connected to the hub (last seen {seen_ago})",
                    cl.name
                ),
                look(&cl.name),
            );
        } else {
            c.ok(
                S,
                format!(
                    "{} is connected (trust domain {}, last seen {seen_ago}, {} export(s))",
                    cl.name, cl.trust_domain, cl.exports
                ),
            );
        }
    }
}

fn trust(c: &mut Checks, seen: &Seen) {
    const S: &str = "trust";
    for cl in seen.clusters.iter().filter(|c| !c.expired) {
        match cl.bundle_sequence {
            None => c.fail(
                S,
                format!(
                    "the hub has no trust bundle of {} ({}): no other cluster can verify its workloads",
                    cl.trust_domain, cl.name
                ),
                format!(
                    "a control plane publishes its bundle when it connects: fedmesh status; the log of {}'s control plane",
                    cl.name
                ),
            ),
            Some(seq) => {
                if cl.connected && cl.acked_version < cl.view_version {
                    c.pending(
                        S,
                        format!(
                            "{} has applied view version {} of {}: it lacks the latest bundles and imports",
                            cl.name, cl.acked_version, cl.view_version
                        ),
                        format!("the log of {}'s control plane (it says why it could not apply an update)", cl.name),
                    );
                } else if cl.connected {
                    c.ok(
                        S,
                        format!(
                            "{} holds every cluster's bundle and import (view version {}); its own bundle is at the hub (sequence {seq})",
                            cl.name, cl.acked_version
                        ),
                    );
                }
            }
        }
    }
}

fn gateways(c: &mut Checks, seen: &Seen) {
    const S: &str = "gateways";
    let live: Vec<_> = seen.clusters.iter().filter(|c| !c.expired).collect();
    for cl in &live {
        if cl.gateways.is_empty() && cl.exports > 0 && live.len() > 1 {
            c.warn(
                S,
                format!(
                    "{} exports {} service(s) but publishes no east-west gateway: other clusters cannot reach them",
                    cl.name, cl.exports
                ),
                "start its control plane with --gateway HOST:PORT (the address other clusters reach its `fedmesh gateway` at)",
            );
        }
    }
    for g in &seen.gateways {
        let what = format!("{} → {} gateway {}", g.from, g.cluster, g.address);
        let look = format!(
            "fedmesh gateways --cluster {}; is `fedmesh gateway` running in {} and reachable from {} at {}?",
            g.cluster, g.cluster, g.from, g.address
        );
        match g.state.as_str() {
            "reachable" if g.ready => c.ok(
                S,
                format!(
                    "{what}: mTLS in {} (config version {}, {} service(s))",
                    super::gateways::latency(g),
                    g.config_version,
                    g.exported_services
                ),
            ),
            "reachable" => c.pending(
                S,
                format!("{what} answers but holds no configuration from its control plane: it admits nothing"),
                format!("the gateway's log (can it reach {}'s control plane?)", g.cluster),
            ),
            "unknown" => c.pending(S, format!("{what}: not probed yet — {}", g.error), look),
            _ => c.fail(S, format!("{what} is unreachable: {}", g.error), look),
        }
    }
}

fn proxies(c: &mut Checks, seen: &Seen) {
    const S: &str = "proxies";
    if seen.proxies.is_empty() {
        c.warn(
            S,
            "no sidecar or gateway has reported to any control plane".into(),
            "fedmesh proxy-status; proxies appear once their configuration stream to the control plane is open",
        );
        return;
    }
    let now = std::time::SystemTime::now();
    let mut synced = 0;
    for p in &seen.proxies {
        let who = format!(
            "{} {} in {} ({})",
            p.role,
            p.identity,
            p.cluster,
            if p.node.is_empty() { "-" } else { &p.node }
        );
        let look = format!(
            "fedmesh proxy-status --cluster {}; the proxy's log",
            p.cluster
        );
        let expired = p
            .svid_not_after
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .is_some_and(|t| t <= now);
        if expired {
            c.fail(
                S,
                format!(
                    "{who} connected with an SVID that has expired ({})",
                    p.svid_not_after.as_deref().unwrap_or("-")
                ),
                format!("{look}; is the node's agent renewing SVIDs?"),
            );
        }
        match p.sync.as_str() {
            "SYNCED" => synced += 1,
            "NACK" => c.fail(
                S,
                format!(
                    "{who} refused configuration version {}: {}",
                    p.sent_version, p.nack_error
                ),
                look,
            ),
            _ => c.pending(
                S,
                format!(
                    "{who} is behind: sent configuration version {}, it acknowledged {}",
                    p.sent_version, p.acked_version
                ),
                format!("{look} (is it stuck or overloaded?)"),
            ),
        }
    }
    let clusters: std::collections::BTreeSet<_> = seen.proxies.iter().map(|p| &p.cluster).collect();
    if synced == seen.proxies.len() {
        c.ok(
            S,
            format!(
                "all {synced} proxies in {} cluster(s) hold their latest configuration",
                clusters.len()
            ),
        );
    }
}

fn services(c: &mut Checks, seen: &Seen) {
    const S: &str = "services";
    for s in &seen.services {
        for k in &s.conflicts {
            c.warn(
                S,
                format!("{}: {}", s.service, k.message),
                "fedmesh status (MCS conflict resolution: the oldest export wins)",
            );
        }
    }
    for cl in &seen.clusters {
        for p in &cl.problems {
            let hint = match p.services.first() {
                Some(svc) => format!(
                    "fedmesh explain {svc} --from {}; the object's status",
                    cl.name
                ),
                None => "the object's status".to_string(),
            };
            c.warn(
                S,
                format!(
                    "{} {} in {}: {} ({}): {}",
                    p.kind, p.name, cl.name, p.condition, p.reason, p.message
                ),
                &hint,
            );
        }
    }
    if !seen.services.is_empty() && c.list.iter().all(|x| x.section != S) {
        c.ok(
            S,
            format!(
                "{} exported service(s), no conflicts, every route and policy accepted",
                seen.services.len()
            ),
        );
    }
}

/// The CRDs fedmesh reads in the current kubeconfig context, at the versions it reads.
async fn kubernetes_checks() -> Vec<Check> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::{CustomResourceExt, Resource};
    const S: &str = "kubernetes";
    let mut c = Checks::default();
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            c.fail(
                S,
                format!("cannot reach a Kubernetes API with the current kubeconfig: {e}"),
                "kubectl cluster-info (KUBECONFIG, --context)".into(),
            );
            return c.list;
        }
    };
    // (CRD name, version fedmesh reads, kind, required): the control plane reads the policies
    // and routes when their CRDs exist and none when they do not; the MCS ones it needs.
    let wanted: Vec<(String, String, String, bool)> = vec![
        crd::<fedmesh_api::mcs::ServiceExport>(true),
        crd::<fedmesh_api::mcs::ServiceImport>(true),
        crd::<fedmesh_api::policy::TrafficPolicy>(false),
        crd::<fedmesh_api::authz::AuthorizationPolicy>(false),
        crd::<fedmesh_api::authn::PeerAuthentication>(false),
        crd::<fedmesh_api::authn::RequestAuthentication>(false),
        crd::<fedmesh_api::federation::FederatedTrustDomain>(false),
        crd::<fedmesh_api::rollout::Rollout>(false),
        crd::<fedmesh_api::gateway::HTTPRoute>(false),
        crd::<fedmesh_api::gateway::GRPCRoute>(false),
    ];
    fn crd<K: CustomResourceExt + Resource<DynamicType = ()>>(
        required: bool,
    ) -> (String, String, String, bool) {
        (
            K::crd_name().to_string(),
            K::version(&()).to_string(),
            K::kind(&()).to_string(),
            required,
        )
    }
    match client.apiserver_version().await {
        Err(e) => {
            c.fail(
                S,
                format!("the Kubernetes API of the current kubeconfig context did not answer: {e}"),
                "kubectl cluster-info (KUBECONFIG, --context)".into(),
            );
            return c.list;
        }
        Ok(v) => c.ok(S, format!("Kubernetes {} answers", v.git_version)),
    }
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client);
    const INSTALL: &str =
        "kubectl apply -k deploy/multicluster/base/crds (or: fedmesh crds | kubectl apply -f -)";
    for (name, version, kind, required) in wanted {
        match api.get_opt(&name).await {
            Err(e) => {
                c.fail(S, format!("cannot read CRD {name}: {e}"), "kubectl auth can-i get customresourcedefinitions".into());
            }
            Ok(None) if required => c.fail(
                S,
                format!("CRD {name} is not installed"),
                INSTALL.into(),
            ),
            Ok(None) if name.ends_with(fedmesh_api::gateway::GROUP) => c.warn(
                S,
                format!("CRD {name} is not installed: no {kind} can be created, the control plane reads none"),
                "install the Gateway API CRDs (standard channel) to route with them",
            ),
            Ok(None) => c.warn(
                S,
                format!("CRD {name} is not installed: no {kind} can be created, the control plane reads none"),
                INSTALL,
            ),
            Ok(Some(d)) => {
                let served: Vec<&str> = d
                    .spec
                    .versions
                    .iter()
                    .filter(|v| v.served)
                    .map(|v| v.name.as_str())
                    .collect();
                if served.contains(&version.as_str()) {
                    c.ok(S, format!("CRD {name} serves {version}"));
                } else {
                    c.fail(
                        S,
                        format!("CRD {name} serves {} but fedmesh reads {version}", served.join(", ")),
                        INSTALL.into(),
                    );
                }
            }
        }
    }
    c.list
}

fn print(checks: &[Check]) {
    let tty = std::io::stdout().is_terminal();
    let colour = tty && std::env::var_os("NO_COLOR").is_none();
    let mut section = "";
    for c in checks {
        if c.section != section {
            section = c.section;
            println!("{section}");
        }
        let mark = match (c.status, tty) {
            (Verdict::Ok, true) => "✓",
            (Verdict::Warn, true) => "!",
            (Verdict::Fail, true) => "✗",
            (Verdict::Ok, false) => "ok",
            (Verdict::Warn, false) => "warn",
            (Verdict::Fail, false) => "FAIL",
        };
        let mark = match (colour, c.status) {
            (true, Verdict::Ok) => format!("\x1b[32m{mark}\x1b[0m"),
            (true, Verdict::Warn) => format!("\x1b[33m{mark}\x1b[0m"),
            (true, Verdict::Fail) => format!("\x1b[31m{mark}\x1b[0m"),
            (false, _) if !tty => format!("{mark:<4}"),
            (false, _) => mark.to_string(),
        };
        println!("  {mark} {}", c.message);
        if c.status != Verdict::Ok
            && let Some(h) = &c.hint
        {
            println!("      → {h}");
        }
    }
}
