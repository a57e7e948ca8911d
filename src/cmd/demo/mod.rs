//! `fedmesh demo`: a hub and three clusters on this machine, with traffic flowing, and nothing to
//! set up. Everything is the real thing in one process: the hub (redb), a control plane and CA per
//! cluster, a Workload API agent per workload, east-west gateways and sidecars on 127.0.0.1 with
//! mTLS between them. A frontend in east calls two services while the demo moves traffic around:
//!
//! - `shop/api`, exported by east and west: locality keeps it in east; east's instance goes down and
//!   traffic fails over to west with no failed request, then comes back.
//! - `shop/reviews`, exported by west and central, split 70/30 by an HTTPRoute, changed live; its
//!   v2 (`shop/reviews-v2`, in west and central too) gets the requests of premium users
//!   (`x-user: premium`) — a canary by header across clusters; a TrafficPolicy injects a fault into
//!   a share of the other requests for a while.
//! - `shop/ratings`, v1 and v2 in east and west: an automated canary ([`rollout`]) moves it to v2
//!   in east, then in west, each cluster judging its own canary on its own callers' requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use fedmesh_dataplane::telemetry::SamplerArg;
use fedmesh_federation::hub::traces::TraceQuery;
use fedmesh_testbed::client::ProxyClient;
use fedmesh_testbed::{Cluster, ClusterSpec, Testbed, Workload, WorkloadSpec};

use super::parse_duration;

mod rollout;

#[derive(Args)]
pub struct DemoArgs {
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Requests per second from the frontend (to each service).
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Keep the clusterset's files here (default: a temporary directory, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How often the traffic table is printed.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    every: Duration,
    /// How many clusters: east, west and central, then c4, c5, ... each serving shop/api and
    /// shop/greeter too.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=16))]
    clusters: u8,
    /// Only bring the clusterset up (for calling it by hand); no generated traffic.
    #[arg(long)]
    no_traffic: bool,
    /// The share of new traces the proxies keep and send to the hub (every failed or slow
    /// request is kept too), 0 to 1.
    #[arg(long, default_value = "0.01", value_parser = SamplerArg::parse_ratio)]
    trace_sampling: SamplerArg,
}

/// Answers per service: cluster → count, failures, latencies.
#[derive(Default)]
struct Tally {
    by_cluster: BTreeMap<String, u64>,
    /// Answered by an injected fault (a TrafficPolicy's faultInjection), not a failure.
    injected: u64,
    failed: u64,
    last_failure: Option<String>,
    latencies: Vec<Duration>,
}

type Tallies = Arc<Mutex<BTreeMap<&'static str, Tally>>>;

/// The demo's route for shop/reviews, in east (the caller's cluster): premium users to v2 in any
/// cluster, everyone else split between west and central.
fn reviews_route(west: u32) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews, namespace: shop}}
spec:
  parentRefs: [{{group: multicluster.x-k8s.io, kind: ServiceImport, name: reviews}}]
  rules:
  - name: premium
    matches: [{{headers: [{{name: x-user, value: premium}}]}}]
    backendRefs: [{{group: multicluster.x-k8s.io, kind: ServiceImport, name: reviews-v2}}]
  - name: everyone
    backendRefs:
    - {{group: fedmesh.io, kind: Cluster, name: west, weight: {west}}}
    - {{group: fedmesh.io, kind: Cluster, name: central, weight: {central}}}
"#,
        central = 100 - west
    )
}

/// A TrafficPolicy that aborts 20% of the `everyone` rule's requests with 503.
const REVIEWS_FAULT: &str = r#"apiVersion: fedmesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews-chaos, namespace: shop}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews, sectionName: everyone}
  faultInjection:
    abort: {httpStatus: 503, percentage: 20}
"#;

fn publish(c: &Cluster, name: &str, ws: &[&Workload]) -> anyhow::Result<()> {
    let eps: Vec<_> = ws.iter().map(|w| w.endpoint()).collect();
    c.serve_http("shop", name, &eps)
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| {
                format!("cannot create --dir {} (is it writable?)", d.display())
            })?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("fedmesh-demo")
                .tempdir()
                .context("cannot create a temporary directory (is TMPDIR writable?)")?;
            tmp.path().to_path_buf()
        }
    };
    println!(
        "fedmesh demo: a hub and {} clusters on this machine (files in {})",
        a.clusters,
        dir.display()
    );
    let mut specs = vec![
        ClusterSpec::new("east", "us-east"),
        ClusterSpec::new("west", "us-west"),
        ClusterSpec::new("central", "eu-central"),
    ];
    let extra: Vec<(String, String)> = (4..=a.clusters)
        .map(|i| (format!("c{i}"), format!("region-{i}")))
        .collect();
    for (name, region) in &extra {
        specs.push(ClusterSpec::new(name, region));
    }
    // The demo's proxies send spans to the hub (1% of traces by default, and every failed or
    // slow request), so `fedmesh traces` and the UI have something to show.
    for s in &mut specs {
        s.traces = Some(a.trace_sampling.0);
    }
    let tb = Testbed::start(&dir, &specs)
        .await
        .context("starting the clusterset")?;
    let (east, west, central) = (
        tb.cluster("east"),
        tb.cluster("west"),
        tb.cluster("central"),
    );
    let extras: Vec<&Cluster> = extra.iter().map(|(n, _)| tb.cluster(n)).collect();
    for c in [east, west, central]
        .into_iter()
        .chain(extras.iter().copied())
    {
        println!(
            "  cluster {:<8} trust domain {:<26} control plane {}  gateway {}",
            c.name, c.trust_domain, c.cp_addr, c.gateway_addr
        );
    }

    // shop/api in east and west; shop/reviews in west and central, split 70/30.
    let (api_e, api_e_app) = east
        .http_echo_workload("shop", "api", "us-east-1a", 0)
        .await?;
    let api_e_port = api_e.inbound.port();
    let (api_w, _api_w_app) = west
        .http_echo_workload("shop", "api", "us-west-1a", 0)
        .await?;
    let (rev_w, _rev_w_app) = west
        .http_echo_workload("shop", "reviews", "us-west-1a", 0)
        .await?;
    let (rev_c, _rev_c_app) = central
        .http_echo_workload("shop", "reviews", "eu-central-1a", 0)
        .await?;
    publish(east, "api", &[&api_e])?;
    publish(west, "api", &[&api_w])?;
    publish(west, "reviews", &[&rev_w])?;
    publish(central, "reviews", &[&rev_c])?;
    // reviews v2: its own Service in west and central (in Kubernetes, selecting version: v2).
    let (rev2_w, _rev2_w_app) = west
        .http_echo_workload("shop", "reviews-v2", "us-west-1a", 0)
        .await?;
    let (rev2_c, _rev2_c_app) = central
        .http_echo_workload("shop", "reviews-v2", "eu-central-1a", 0)
        .await?;
    publish(west, "reviews-v2", &[&rev2_w])?;
    publish(central, "reviews-v2", &[&rev2_c])?;
    // shop/greeter, a gRPC service, in west, central and every extra cluster (which also serve
    // shop/api).
    let mut others = Vec::new();
    let greeter_at: Vec<&Cluster> = [west, central]
        .into_iter()
        .chain(extras.iter().copied())
        .collect();
    for c in &greeter_at {
        let zone = format!("{}-1a", c.region);
        let (g, g_app) = c.http_echo_workload("shop", "greeter", &zone, 0).await?;
        publish(c, "greeter", &[&g])?;
        others.push((g, g_app));
    }
    for c in &extras {
        let zone = format!("{}-1a", c.region);
        let (w, app) = c.http_echo_workload("shop", "api", &zone, 0).await?;
        publish(c, "api", &[&w])?;
        others.push((w, app));
    }
    // The caller's cluster holds the route that steers its traffic.
    east.write("reviews-route.yaml", &reviews_route(70))?;
    let frontend = east
        .workload(
            &WorkloadSpec::new("shop", "frontend", "us-east-1a"),
            "127.0.0.1:9".parse()?,
        )
        .await?;
    frontend
        .wait_config("shop/api and shop/reviews from every cluster", |t| {
            let api = t.service_named("shop/api").is_some_and(|e| {
                e.svc.endpoints.iter().any(|x| x.ready) && e.svc.remote.iter().any(|r| r.ready > 0)
            });
            let reviews = ["shop/reviews", "shop/reviews-v2"].iter().all(|s| {
                t.service_named(s)
                    .is_some_and(|e| e.svc.remote.iter().filter(|r| r.ready > 0).count() == 2)
            }) && t
                .service_named("shop/reviews")
                .is_some_and(|e| e.policy.routes.len() == 2);
            let greeter = t.service_named("shop/greeter").is_some_and(|e| {
                e.svc.remote.iter().filter(|r| r.ready > 0).count() == greeter_at.len()
            });
            api && reviews && greeter
        })
        .await?;
    for c in greeter_at.iter() {
        frontend.wait_trusts(&c.trust_domain).await?;
        c.wait_gateway_serves("shop/greeter").await?;
    }
    for (c, svc) in [
        (west, "shop/api"),
        (west, "shop/reviews"),
        (central, "shop/reviews"),
        (west, "shop/reviews-v2"),
        (central, "shop/reviews-v2"),
    ] {
        c.wait_gateway_serves(svc).await?;
    }
    for c in &extras {
        c.wait_gateway_serves("shop/api").await?;
    }
    // The frontend's gRPC client reaches shop/greeter through a sidecar listener.
    let greeter_addr = frontend.listen("shop/greeter:80").await?;
    let mut ratings = rollout::start(east, west, &frontend).await?;

    println!("\nTry it yourself while it runs:");
    println!(
        "  curl -x http://{} http://api.shop.svc.clusterset.local/        # as the east frontend",
        frontend.proxy
    );
    println!(
        "  curl -x http://{} http://reviews.shop.svc.clusterset.local/",
        frontend.proxy
    );
    println!(
        "  curl -x http://{} -H 'x-user: premium' http://reviews.shop.svc.clusterset.local/   # v2",
        frontend.proxy
    );
    println!(
        "  Drop an HTTPRoute or a TrafficPolicy into {} (east's source directory) to try one;",
        east.src.display()
    );
    println!(
        "  its status appears in {}",
        east.data.join("status").display()
    );
    println!(
        "  curl http://{}/config                                     # the frontend sidecar's routing table",
        frontend.admin
    );
    println!("  curl http://{}/metrics", frontend.admin);
    println!(
        "  FEDMESH_ADMIN=http://{} FEDMESH_ADMIN_TOKEN={} fedmesh status",
        tb.hub_admin, tb.hub_admin_token
    );
    println!(
        "  FEDMESH_ADMIN=http://{} FEDMESH_ADMIN_TOKEN={} fedmesh traces --errors   # then: fedmesh trace ID",
        tb.hub_admin, tb.hub_admin_token
    );
    println!(
        "  open http://{}/ui#token={}   # the hub's web UI: clusterset, service graph, traces",
        tb.hub_admin, tb.hub_admin_token
    );
    println!(
        "  shop/greeter (gRPC, fedmesh.testbed.v1.Echo) for the east frontend: h2c on {greeter_addr}"
    );

    if a.no_traffic {
        println!(
            "\nThe clusterset is up{}; Ctrl-C stops it.",
            a.duration
                .map(|d| format!(" for {}", humantime::format_duration(d)))
                .unwrap_or_default()
        );
        match a.duration {
            Some(d) => {
                tokio::select! {
                    _ = super::shutdown_signal() => {}
                    _ = tokio::time::sleep(d) => {}
                }
            }
            None => super::shutdown_signal().await,
        }
        println!("stopping");
        drop(ratings);
        drop((api_e, api_e_app, api_w, rev_w, rev_c, frontend, others));
        drop((rev2_w, rev2_c));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tb.shutdown().await;
        return Ok(());
    }

    let tallies: Tallies = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut traffic = Vec::new();
    for (proxy, label, svc, user) in [
        (frontend.proxy, "api", "api", None),
        (frontend.proxy, "reviews", "reviews", None),
        (
            frontend.proxy,
            "reviews premium",
            "reviews",
            Some("premium"),
        ),
        (frontend.proxy, "ratings", "ratings", None),
        (
            ratings.west_frontend.proxy,
            "ratings (west)",
            "ratings",
            None,
        ),
    ] {
        traffic.push(tokio::spawn(generate(
            proxy,
            (label, svc, user),
            a.rate.max(1),
            tallies.clone(),
            stop.clone(),
        )));
    }
    traffic.push(tokio::spawn(generate_grpc(
        greeter_addr,
        a.rate.max(1),
        tallies.clone(),
        stop.clone(),
    )));

    // The story, on a loop: east's api down, east's api back, a fault injected into reviews, a new
    // split (and the fault gone), steady.
    let started = Instant::now();
    let deadline = a.duration.map(|d| started + d);
    let mut api_e = Some((api_e, api_e_app));
    let mut step = 0usize;
    let mut next_step = Instant::now() + a.every * 3;
    let mut split_west = 70;
    let mut ctrl_c = std::pin::pin!(super::shutdown_signal());
    let (mut total_ok, mut total_failed) = (0u64, 0u64);
    println!(
        "\n  t      service               answered by (share)                                  failed  p50     p99"
    );
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(a.every) => {}
        }
        ratings.report(&[east, west]);
        let (ok, failed) = print_table(started, &tallies);
        (total_ok, total_failed) = (total_ok + ok, total_failed + failed);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if Instant::now() < next_step {
            continue;
        }
        next_step = Instant::now() + a.every * 3;
        match step % 5 {
            0 => {
                println!(
                    "  >> east's shop/api goes down (sidecar drains, app stops): traffic fails over to west"
                );
                if let Some((w, app)) = api_e.take() {
                    w.stop_and_drain().await;
                    app.stop();
                }
            }
            1 => {
                println!(
                    "  >> east's shop/api comes back on the same address: traffic returns to east"
                );
                api_e = Some(
                    east.http_echo_workload("shop", "api", "us-east-1a", api_e_port)
                        .await?,
                );
            }
            2 => {
                println!(
                    "  >> TrafficPolicy shop/reviews-chaos injects 503 into 20% of everyone's reviews requests (premium users spared)"
                );
                east.write("reviews-chaos.yaml", REVIEWS_FAULT)?;
            }
            3 => {
                split_west = if split_west == 70 { 20 } else { 70 };
                println!(
                    "  >> HTTPRoute shop/reviews changed live: west {split_west} / central {}; the fault is removed",
                    100 - split_west
                );
                east.remove("reviews-chaos.yaml");
                east.write("reviews-route.yaml", &reviews_route(split_west))?;
            }
            _ => println!("  >> steady"),
        }
        step += 1;
    }
    stop.cancel();
    for t in traffic {
        let _ = t.await;
    }
    let (ok, failed) = print_table(started, &tallies);
    (total_ok, total_failed) = (total_ok + ok, total_failed + failed);
    // What the hub's trace window caught of the run (the injected faults, 1% of the rest).
    let held = tb.hub.traces.search(&TraceQuery {
        limit: Some(1000),
        ..TraceQuery::default()
    });
    let failed_traces = held.iter().filter(|t| t.error).count();
    let crossing = held.iter().filter(|t| t.clusters.len() > 1).count();
    println!(
        "\nthe hub holds {} trace(s) of the run: {failed_traces} with a failed span, {crossing} crossing clusters (fedmesh traces, fedmesh trace ID)",
        held.len()
    );
    println!("\nstopping; {total_failed} request(s) failed in the whole run");
    // The workloads first, so nothing complains that its control plane went away.
    drop(ratings);
    drop((api_e, api_w, rev_w, rev_c, frontend, others));
    drop((rev2_w, rev2_c));
    tokio::time::sleep(Duration::from_millis(100)).await;
    tb.shutdown().await;
    anyhow::ensure!(
        total_ok > 0,
        "no request was answered; run with RUST_LOG=info to see why"
    );
    Ok(())
}

/// What one call of a traffic generator got.
enum Answer {
    /// Answered by this (`cluster`, or `workload@cluster` for another version).
    By(String),
    /// Answered by a fault a TrafficPolicy injected on purpose.
    Injected,
}

/// One call of a traffic generator: who answered, or why there was no answer.
type Call<'a> = futures::future::BoxFuture<'a, Result<Answer, String>>;

/// Calls `call` on `client` `rate` times a second until `stop`, counting each answer under the
/// cluster it came from, or as a failure, in `svc`'s tally.
async fn drive<C: Send>(
    svc: &'static str,
    rate: u32,
    tallies: Tallies,
    stop: tokio_util::sync::CancellationToken,
    mut client: C,
    call: fn(&mut C) -> Call<'_>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let start = Instant::now();
        let r = call(&mut client).await;
        let elapsed = start.elapsed();
        let mut t = tallies.lock().unwrap_or_else(|p| p.into_inner());
        let t = t.entry(svc).or_default();
        match r {
            Ok(Answer::By(who)) => {
                *t.by_cluster.entry(who).or_default() += 1;
                t.latencies.push(elapsed);
            }
            Ok(Answer::Injected) => t.injected += 1,
            Err(why) => {
                t.failed += 1;
                t.last_failure = Some(why);
            }
        }
    }
}

/// HTTP calls to `svc` (as `user`, when given), tallied under `label`.
async fn generate(
    proxy: SocketAddr,
    (label, svc, user): (&'static str, &'static str, Option<&'static str>),
    rate: u32,
    tallies: Tallies,
    stop: tokio_util::sync::CancellationToken,
) {
    struct Http {
        client: ProxyClient,
        proxy: SocketAddr,
        svc: &'static str,
        url: String,
        user: Option<&'static str>,
    }
    fn call(h: &mut Http) -> Call<'_> {
        Box::pin(async move {
            let headers: Vec<(&str, &str)> = h.user.map(|u| ("x-user", u)).into_iter().collect();
            let get = h
                .client
                .request("GET", &h.url, &headers, bytes::Bytes::new());
            match tokio::time::timeout(Duration::from_secs(5), get).await {
                Ok(Ok(reply)) if reply.status.is_success() => reply
                    .echo()
                    .map(|e| {
                        Answer::By(if e.workload == h.svc {
                            e.cluster
                        } else {
                            format!("{}@{}", e.workload, e.cluster)
                        })
                    })
                    .map_err(|e| e.to_string()),
                Ok(Ok(reply))
                    if reply
                        .headers
                        .get("fedmesh-proxy-error")
                        .is_some_and(|v| v == "fault-injected") =>
                {
                    Ok(Answer::Injected)
                }
                Ok(Ok(reply)) => Err(format!(
                    "{}: {}",
                    reply.status,
                    String::from_utf8_lossy(&reply.body).trim()
                )),
                Ok(Err(e)) => {
                    h.client = ProxyClient::new(h.proxy);
                    Err(e.to_string())
                }
                Err(_) => {
                    h.client = ProxyClient::new(h.proxy);
                    Err("no answer within 5s".into())
                }
            }
        })
    }
    let http = Http {
        client: ProxyClient::new(proxy),
        proxy,
        svc,
        url: format!("http://{svc}.shop.svc.clusterset.local/"),
        user,
    };
    drive(label, rate, tallies, stop, http, call).await
}

/// Unary gRPC calls to shop/greeter at `rate` per second through the frontend's sidecar.
async fn generate_grpc(
    addr: SocketAddr,
    rate: u32,
    tallies: Tallies,
    stop: tokio_util::sync::CancellationToken,
) {
    use fedmesh_testbed::pb::{EchoRequest, echo_client::EchoClient};
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e.timeout(Duration::from_secs(5)),
        Err(_) => return,
    };
    type Grpc = EchoClient<tonic::transport::Channel>;
    fn call(client: &mut Grpc) -> Call<'_> {
        Box::pin(async move {
            client
                .unary(EchoRequest {
                    message: "hello".into(),
                    ..Default::default()
                })
                .await
                .map(|reply| Answer::By(reply.into_inner().cluster))
                .map_err(|status| format!("gRPC {:?}: {}", status.code(), status.message()))
        })
    }
    let client = EchoClient::new(endpoint.connect_lazy());
    drive("greeter", rate, tallies, stop, client, call).await
}

/// Prints what each service's requests since the last table were answered by, then resets.
/// Returns the answers and the failures counted in that time.
fn print_table(started: Instant, tallies: &Tallies) -> (u64, u64) {
    let mut all = tallies.lock().unwrap_or_else(|p| p.into_inner());
    let (mut answered, mut failed) = (0, 0);
    for (svc, t) in all.iter_mut() {
        let total: u64 = t.by_cluster.values().sum::<u64>() + t.injected;
        if total == 0 && t.failed == 0 {
            continue;
        }
        let share = |n: u64| n as f64 * 100.0 / total.max(1) as f64;
        let mut shares: Vec<String> = t
            .by_cluster
            .iter()
            .map(|(c, n)| format!("{c} {:>3.0}%", share(*n)))
            .collect();
        if t.injected > 0 {
            shares.push(format!("injected 503 {:>3.0}%", share(t.injected)));
        }
        t.latencies.sort_unstable();
        let pct = |p: f64| -> f64 {
            t.latencies
                .get(((t.latencies.len().saturating_sub(1)) as f64 * p) as usize)
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(0.0)
        };
        println!(
            "  {:>4.0}s  shop/{:<16} {:<52} {:>6}  {:>5.1}ms {:>5.1}ms{}",
            started.elapsed().as_secs_f64(),
            svc,
            shares.join("  "),
            t.failed,
            pct(0.5),
            pct(0.99),
            t.last_failure
                .as_ref()
                .map(|f| format!("  last failure: {f}"))
                .unwrap_or_default()
        );
        answered += total;
        failed += t.failed;
        *t = Tally::default();
    }
    (answered, failed)
}
