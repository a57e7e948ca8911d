//! What the L7 pipeline costs: the sidecar→sidecar path of `fedmesh bench dataplane` measured
//! twice over — to a service with no policy (the minimal route) and to one behind the full policy
//! stack ([`POLICY_STACK`]) — alternately in rounds (CPU time and p99, medians), and the client
//! sidecar's instructions per request on each, counted by callgrind (stable where CPU time on a
//! shared machine is not).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::callgrind::UnderCallgrind;
use super::dataplane::{Params, Path3};
use super::load::{Proto, cpu_seconds, fixed_rate, free_addr, http_client, ms, one, pct};

/// The routing and policy of bench/policied: every layer of the outbound pipeline has work to
/// do, and none of it changes the answer (the rate limit never triggers, the split sends all to
/// the one endpoint, the retry never fires).
pub(super) const POLICY_STACK: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: policied, namespace: bench}
spec:
  parentRefs: [{kind: Service, name: policied, port: 80}]
  rules:
  - name: all
    matches: [{path: {type: PathPrefix, value: /}, method: POST}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: policied}], remove: [x-debug]}
    backendRefs:
    - {name: policied, port: 80, weight: 99}
    - {group: fedmesh.io, kind: Cluster, name: east, weight: 1}
    timeouts: {request: 10s, backendRequest: 5s}
    retry: {codes: [503], attempts: 1}
---
apiVersion: fedmesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: policied-limit, namespace: bench}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: policied, sectionName: all}
  rateLimit: {requests: 10000000, per: 1s}
"#;

/// Rounds of the policy comparison (each runs both paths, alternately).
const POLICY_ROUNDS: usize = 5;

/// One protocol's policy comparison: medians over the rounds, and the minimal route's own spread.
pub(super) struct PolicyRow {
    proto: &'static str,
    minimal_cpu: f64,
    policied_cpu: f64,
    minimal_p99: Duration,
    policied_p99: Duration,
    /// How much the minimal route's p99 varied between rounds: the noise.
    noise_p99: Duration,
}

/// The minimal route and the policy stack on the same sidecars, alternately, per protocol.
pub(super) async fn compare(
    minimal: &Path3,
    policied: &Path3,
    body: &Bytes,
    p: &Params,
) -> anyhow::Result<Vec<PolicyRow>> {
    let each = (p.duration / 2).max(Duration::from_secs(1));
    println!(
        "\n  the policy stack against the minimal route, sidecar→sidecar: {POLICY_ROUNDS} rounds of {each:?} each, alternately, medians"
    );
    let mut out = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        let mut cpu: [Vec<f64>; 2] = Default::default();
        let mut p99: [Vec<f64>; 2] = Default::default();
        let mut errors = 0;
        for round in 0..POLICY_ROUNDS {
            // Which goes first alternates too, so neither always follows the other.
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let path = [minimal, policied][i];
                let uri: http::Uri = path.url.parse()?;
                let client = http_client(proto);
                let _ = fixed_rate(&client, &uri, body, p.rate, Duration::from_millis(500)).await;
                let cpu0 = cpu_seconds(&path.pids);
                let r = fixed_rate(&client, &uri, body, p.rate, each).await;
                let used = cpu_seconds(&path.pids) - cpu0;
                errors += r.errors;
                cpu[i].push(used / (r.latencies.len().max(1) as f64) * 1000.0);
                p99[i].push(pct(&r.latencies, 0.99).as_secs_f64());
            }
        }
        let spread = p99[0].iter().cloned().fold(f64::MIN, f64::max)
            - p99[0].iter().cloned().fold(f64::MAX, f64::min);
        let [cpu_min, cpu_pol] = cpu.map(super::median);
        let [p99_min, p99_pol] = p99.map(super::median);
        let row = PolicyRow {
            proto: proto.name(),
            minimal_cpu: cpu_min,
            policied_cpu: cpu_pol,
            minimal_p99: Duration::from_secs_f64(p99_min),
            policied_p99: Duration::from_secs_f64(p99_pol),
            noise_p99: Duration::from_secs_f64(spread.max(0.0)),
        };
        println!(
            "    {:<8} minimal route {:.3} CPU s/1k req, p99 {:.3} ms; policy stack {:.3} CPU s/1k req ({:.2}×), p99 {:.3} ms ({:+.3} ms; the minimal route's p99 varied by {:.3} ms between rounds){}",
            row.proto,
            row.minimal_cpu,
            ms(row.minimal_p99),
            row.policied_cpu,
            row.policied_cpu / row.minimal_cpu.max(1e-9),
            ms(row.policied_p99),
            ms(row.policied_p99) - ms(row.minimal_p99),
            ms(row.noise_p99),
            if errors > 0 {
                format!("  ({errors} errors)")
            } else {
                String::new()
            }
        );
        out.push(row);
    }
    Ok(out)
}

/// What the instruction count needs: where to put files, and how the sidecar gets its
/// configuration and identity.
pub(super) struct Counted<'a> {
    pub dir: &'a Path,
    pub control_plane: &'a str,
    pub workload_api: &'a str,
    pub body: &'a Bytes,
}

impl Counted<'_> {
    /// The flags of a client sidecar of the bench's east cluster, in zone e1, with its admin
    /// port and a listener per `(address, service:port)`.
    pub(super) fn sidecar_args(
        &self,
        admin: std::net::SocketAddr,
        listens: &[(std::net::SocketAddr, &str)],
    ) -> Vec<String> {
        let mut args: Vec<String> = [
            "sidecar",
            "--control-plane",
            self.control_plane,
            "--workload-api",
            self.workload_api,
            "--admin",
            &admin.to_string(),
            "--zone",
            "e1",
        ]
        .map(String::from)
        .to_vec();
        for (addr, to) in listens {
            args.extend(["--listen".to_string(), format!("{addr}={to}")]);
        }
        args
    }
}

/// Requests counted per path.
const COUNTED: usize = 400;

/// A client sidecar run under callgrind with a listener for each path: its instructions per
/// request on the minimal route and on the policy stack (`None` when valgrind is missing or the
/// count fails, with the reason printed).
pub(super) async fn instructions(c: &Counted<'_>) -> Option<(f64, f64)> {
    println!(
        "\n  instructions per request of the client sidecar (callgrind, {COUNTED} requests per path, HTTP/1.1, one at a time):"
    );
    match count(c, &[], "policy").await {
        Ok((minimal, policied)) => {
            println!(
                "    minimal route {minimal:.0}, policy stack {policied:.0} ({:.2}×)",
                policied / minimal.max(1.0)
            );
            Some((minimal, policied))
        }
        Err(e) => {
            println!("    skipped: {e:#}");
            None
        }
    }
}

/// The client sidecar's instructions per request on the minimal route and on the policy stack,
/// run under callgrind with `extra` flags (`tag` names its files).
pub(super) async fn count(
    c: &Counted<'_>,
    extra: &[String],
    tag: &str,
) -> anyhow::Result<(f64, f64)> {
    let (admin, minimal, policied) = (free_addr()?, free_addr()?, free_addr()?);
    let mut args = c.sidecar_args(
        admin,
        &[(minimal, "bench/local:80"), (policied, "bench/policied:80")],
    );
    args.extend_from_slice(extra);
    let sidecar = UnderCallgrind::start(c.dir, &format!("sidecar-callgrind-{tag}"), &args, &[])?;
    sidecar.ready(admin).await?;
    let mut per_request = Vec::new();
    for addr in [minimal, policied] {
        let uri: http::Uri = format!("http://{addr}/").parse()?;
        let client = http_client(Proto::H1);
        // Warm: the connection to the peer open, the pools filled.
        for _ in 0..50 {
            one(&client, &uri, c.body, Instant::now()).await?;
        }
        sidecar.reset()?;
        for _ in 0..COUNTED {
            one(&client, &uri, c.body, Instant::now()).await?;
        }
        per_request.push(sidecar.dump().await? / COUNTED as f64);
    }
    Ok((per_request[0], per_request[1]))
}

/// The goals of the policy stack: CPU per request within 10% of the minimal route (by instruction
/// count when callgrind could count them, else by CPU time), p99 within the run's noise.
pub(super) fn print_goals(rows: &[PolicyRow], instructions: Option<(f64, f64)>) {
    if let Some((minimal, policied)) = instructions {
        let ratio = policied / minimal.max(1.0);
        println!(
            "    policy stack cost per request ≤ 1.10× the minimal route (client sidecar instructions, callgrind): {ratio:.2}× — {}",
            if ratio <= 1.10 { "met" } else { "NOT met" }
        );
    }
    for r in rows {
        let ratio = r.policied_cpu / r.minimal_cpu.max(1e-9);
        println!(
            "    policy stack CPU time per request ≤ 1.10× the minimal route ({}): {ratio:.2}× — {}",
            r.proto,
            match (ratio <= 1.10, instructions.is_some()) {
                (true, _) => "met",
                (false, true) =>
                    "NOT met by CPU time, which varies more between rounds on this machine than the instruction count",
                (false, false) => "NOT met",
            }
        );
        let added = r.policied_p99.as_secs_f64() - r.minimal_p99.as_secs_f64();
        println!(
            "    policy stack adds to p99 within noise ({}): {:+.3} ms against a spread of {:.3} ms — {}",
            r.proto,
            added * 1e3,
            ms(r.noise_p99),
            if added <= r.noise_p99.as_secs_f64() {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}
