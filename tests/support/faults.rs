//! What the fault suites share (`tests/faults.rs`, `tests/trust_faults.rs`): three namespaced
//! clusters — east calls, west serves `api` and half of `reviews`, central the other half — and
//! the steady load that crosses them while a fault happens.

use fedmesh_testbed::yaml;

use super::netns::load::{Clients, Outcome, longest_gap, report};
use super::netns::{ClusterNet, Mesh, Pod};
use super::pods::{clusterset_ip, export, wait_answer_from};

pub const API: &str = "api.shop.svc.clusterset.local";
pub const REVIEWS: &str = "reviews.shop.svc.clusterset.local";

/// East calls; west serves `api` and half of `reviews`, central the other half.
pub struct Setup {
    pub mesh: Mesh,
    pub east: ClusterNet,
    pub west: ClusterNet,
    pub central: ClusterNet,
    pub frontend: Pod,
    /// west's `api` and `reviews` pods, central's `reviews` pod.
    pub pods: Vec<Pod>,
}

pub fn setup(dir: &std::path::Path, hub_args: &[&str]) -> Setup {
    setup_with(dir, hub_args, 1)
}

/// [`setup`] with `west_gateways` gateway replicas in west.
pub fn setup_with(dir: &std::path::Path, hub_args: &[&str], west_gateways: u16) -> Setup {
    setup_on(Mesh::start_with_hub_args(dir, hub_args), west_gateways)
}

/// The clusters, pods and exports of [`setup`] on a hub already running.
pub fn setup_on(mut mesh: Mesh, west_gateways: u16) -> Setup {
    let mut east = mesh.add_cluster(1, "east", "us-east", &["frontend"]);
    let mut west =
        mesh.add_cluster_with_gateways(2, "west", "us-west", &["api", "reviews"], west_gateways);
    let mut central = mesh.add_cluster(3, "central", "eu-central", &["reviews"]);
    let api = mesh.add_pod(&mut west, "api", "us-west-1a", true);
    let rev_w = mesh.add_pod(&mut west, "reviews", "us-west-1a", true);
    let rev_c = mesh.add_pod(&mut central, "reviews", "eu-central-1a", true);
    export(&west, "api", &[(&api, "us-west-1a")]);
    export(&west, "reviews", &[(&rev_w, "us-west-1a")]);
    export(&central, "reviews", &[(&rev_c, "eu-central-1a")]);
    east.write(
        "reviews-split.yaml",
        &yaml::cluster_split("shop", "reviews", &[("west", 50), ("central", 50)]),
    );
    let frontend = mesh.add_pod(&mut east, "frontend", "us-east-1a", false);
    let api_ip = clusterset_ip(&frontend, &east, "api");
    let reviews_ip = clusterset_ip(&frontend, &east, "reviews");
    wait_answer_from(&frontend, api_ip, API, "west");
    wait_answer_from(&frontend, reviews_ip, REVIEWS, "west");
    wait_answer_from(&frontend, reviews_ip, REVIEWS, "central");
    Setup {
        mesh,
        east,
        west,
        central,
        frontend,
        pods: vec![api, rev_w, rev_c],
    }
}

/// From east's frontend: on `api`, two HTTP/1.1 clients, one HTTP/2 and one gRPC; on `reviews`,
/// two HTTP/1.1 clients.
pub fn load(s: &Setup) -> (Clients, Clients) {
    let api = clusterset_ip(&s.frontend, &s.east, "api");
    let reviews = clusterset_ip(&s.frontend, &s.east, "reviews");
    (
        Clients::start(&s.frontend, api, API, &["GET", "GET"], "/").with_h2_and_grpc(
            &s.frontend,
            api,
            API,
        ),
        Clients::start(&s.frontend, reviews, REVIEWS, &["GET", "GET"], "/"),
    )
}

/// One line of the reliability report; panics naming the failures if any request failed.
pub fn assert_none_failed(case: &str, what: &str, outcomes: &[Outcome]) {
    let (sent, failed, gap) = report(outcomes);
    let mut by_kind: Vec<String> = Vec::new();
    for o in outcomes {
        if !by_kind.iter().any(|k| k.starts_with(o.method)) {
            let n = outcomes.iter().filter(|p| p.method == o.method).count();
            by_kind.push(format!("{} {n}", o.method));
        }
    }
    let (_, at) = longest_gap(outcomes);
    eprintln!(
        "RELIABILITY | {case} | {what} | {sent} requests ({}) | {failed} failed | longest gap {gap:?} ({at:.1?} after the load began)",
        by_kind.join(", ")
    );
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok()).take(10).collect();
    assert_eq!(failed, 0, "{case}: {what}: {failures:?}");
}
