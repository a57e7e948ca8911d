//! `gateway` and `sidecar`: their flags, and the process around the gateway and sidecar crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fedmesh_dataplane::admin::{self, AdminState};
use fedmesh_dataplane::config::{self, ConfigHandle};
use fedmesh_dataplane::metrics::ProxyMetrics;
use fedmesh_dataplane::telemetry::{
    self, ExportConfig, Exporting, OtlpProtocol, SamplerArg, Spans,
};
use fedmesh_gateway::{Gateway, GatewayOptions};
use fedmesh_sidecar::{Dest, Sidecar, SidecarOptions};
use fedmesh_trust::source::WorkloadApiFollower;
use fedmesh_trust::tls::MeshIdentity;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::parse_duration;

/// What both proxies need: an identity and the control plane's configuration.
#[derive(Args)]
pub struct CommonArgs {
    /// The cluster's control plane (HOST:PORT, its gRPC port).
    #[arg(long, env = "FEDMESH_CONTROL_PLANE")]
    control_plane: String,
    /// The SPIFFE Workload API (ours, `fedmesh agent`, or a SPIRE agent's).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    workload_api: String,
    /// This proxy's zone; traffic prefers endpoints in the same zone.
    #[arg(long, env = "FEDMESH_ZONE", default_value = "")]
    zone: String,
    /// A name for this proxy in the control plane's status (default: the host name).
    #[arg(long, env = "FEDMESH_NODE")]
    node: Option<String>,
    /// Keep the last configuration here, so a restart while the control plane is down still
    /// routes.
    #[arg(long)]
    config_cache: Option<PathBuf>,
    /// Admin port: /metrics, /healthz, /readyz, /config.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// How long open connections get to finish on shutdown (SIGTERM).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    drain_timeout: Duration,
    /// Opaque TCP connections idle this long are closed.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    idle_timeout: Duration,
    /// Connections beyond this many are refused.
    #[arg(long, default_value_t = 16384)]
    max_connections: usize,
    /// One log line per request and per opaque connection (target `access`), with the trace ID;
    /// JSON with --log-format json.
    #[arg(long, env = "FEDMESH_ACCESS_LOG", value_parser = clap::builder::BoolishValueParser::new())]
    access_log: bool,
    #[command(flatten)]
    tracing: TracingArgs,
}

/// Spans: where they go and which are kept. The standard `OTEL_*` variables work too.
#[derive(Args)]
#[command(next_help_heading = "Tracing")]
struct TracingArgs {
    /// An OpenTelemetry collector to send spans to (OTLP), e.g. http://otel-collector:4317
    /// (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; neither:
    /// the cluster's control plane, which relays them to the hub's trace window).
    /// OTEL_TRACES_EXPORTER=none turns spans off.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// grpc or http/protobuf.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "grpc")]
    otlp_protocol: OtlpProtocol,
    /// The share of traces that start at this proxy to keep, 0 to 1 (a caller's decision is
    /// always kept; failed and slow requests always are). Default: OTEL_TRACES_SAMPLER(_ARG),
    /// else 0.01.
    #[arg(long, value_name = "RATIO", value_parser = SamplerArg::parse_ratio)]
    trace_sampling: Option<SamplerArg>,
    /// Requests at least this slow keep their spans whatever the sampling said.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    trace_slow: Duration,
}

impl TracingArgs {
    /// The export settings, resource included: the workload (its SVID's namespace and service
    /// account), this proxy, the trust domain; the cluster is added once the configuration
    /// names it.
    fn export_config(
        &self,
        role: &str,
        id: &fedmesh_trust::SpiffeId,
        node: &str,
    ) -> anyhow::Result<ExportConfig> {
        let sampling = match self.trace_sampling {
            Some(s) => s,
            None => SamplerArg::from_env_values(
                std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
                std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
            )
            .map_err(anyhow::Error::msg)?
            .unwrap_or(ExportConfig::default().sampling),
        };
        Ok(ExportConfig {
            endpoint: self.otlp_endpoint.clone(),
            protocol: self.otlp_protocol,
            sampling,
            slow: self.trace_slow,
            ..ExportConfig::default()
        }
        .for_proxy(role, id, node))
    }
}

struct Basics {
    identity: MeshIdentity,
    _follower: WorkloadApiFollower,
    config: ConfigHandle,
    metrics: Arc<ProxyMetrics>,
    shutdown: CancellationToken,
    spans: Spans,
    /// Exports the last spans once the proxy has drained.
    exporting: Option<Exporting>,
}

impl Basics {
    async fn finish(self) {
        if let Some(e) = self.exporting {
            e.finish().await;
        }
    }
}

async fn basics(c: &CommonArgs, role: &str) -> anyhow::Result<Basics> {
    let identity = MeshIdentity::new();
    let follower =
        WorkloadApiFollower::start(&c.workload_api, identity.clone(), Duration::from_secs(30))
            .await?;
    let id = identity
        .spiffe_id()
        .context("the Workload API gave no SVID")?;
    tracing::info!(spiffe_id = %id, "identity from the Workload API");
    let node = c.node.clone().unwrap_or_else(hostname);
    let shutdown = CancellationToken::new();
    let config = config::start(
        c.control_plane.clone(),
        identity.clone(),
        role,
        &node,
        c.config_cache.clone(),
        shutdown.clone(),
    );
    let metrics = Arc::new(ProxyMetrics::new(&format!("fedmesh_{role}")));
    let mut export = c.tracing.export_config(role, &id, &node)?;
    export.control_plane = Some(
        config::control_plane_channel(&c.control_plane, &identity).map_err(anyhow::Error::msg)?,
    );
    let (spans, exporting) =
        telemetry::start(&export, metrics.clone(), config.clone(), c.drain_timeout)
            .map_err(anyhow::Error::msg)?;
    if spans.enabled() {
        tracing::info!(service_name = %export.service_name, sampling = export.sampling.0, "exporting spans over OTLP");
    }
    let signal = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        signal.cancel();
    });
    Ok(Basics {
        identity,
        _follower: follower,
        config,
        metrics,
        shutdown,
        spans,
        exporting,
    })
}

/// The app's OTLP port: only where this sidecar's own spans go to the hub (through the control
/// plane), so an app's spans and the mesh's land in the same place.
async fn relay_listener(c: &CommonArgs, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    if telemetry::collector_named(c.tracing.otlp_endpoint.as_deref()) {
        anyhow::bail!(
            "--app-otlp relays the app's spans to the hub through the control plane, but this \
             sidecar sends its own to a collector (--otlp-endpoint or OTEL_EXPORTER_OTLP_*): \
             point the app's exporter at that collector instead"
        );
    }
    telemetry::relay::bind(addr)
        .await
        .map_err(anyhow::Error::msg)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what}); is another process using it?"))
}

fn serve_admin(
    addr: Option<SocketAddr>,
    listener: Option<TcpListener>,
    state: AdminState,
    shutdown: CancellationToken,
) {
    if let (Some(l), Some(a)) = (listener, addr) {
        tracing::info!(address = %a, "admin listening");
        tokio::spawn(admin::serve(l, state, shutdown));
    }
}

#[derive(Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Worker threads (default: one per CPU).
    #[arg(long, env = "FEDMESH_PROXY_THREADS")]
    pub threads: Option<usize>,
    /// Where other clusters' sidecars connect (the address published as this cluster's gateway).
    #[arg(long, default_value = "0.0.0.0:15443")]
    listen: SocketAddr,
    /// The ClientHello must arrive within this time.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    hello_timeout: Duration,
}

impl GatewayArgs {
    pub fn access_log(&self) -> bool {
        self.common.access_log
    }
}

pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let listener = bind(args.listen, "gateway").await?;
    let admin = match args.common.admin {
        Some(a) => Some(bind(a, "admin").await?),
        None => None,
    };
    let b = basics(&args.common, "gateway").await?;
    let options = GatewayOptions {
        hello_timeout: args.hello_timeout,
        idle_timeout: args.common.idle_timeout,
        max_connections: args.common.max_connections,
        drain_timeout: args.common.drain_timeout,
        zone: args.common.zone.clone(),
        spans: b.spans.clone(),
        access_log: args.common.access_log,
        identity: Some(b.identity.clone()),
        ..GatewayOptions::default()
    };
    let gw = Arc::new(Gateway::new(options, b.config.clone(), b.metrics.clone()));
    serve_admin(
        args.common.admin,
        admin,
        AdminState {
            role: "gateway",
            metrics: b.metrics.clone(),
            config: b.config.clone(),
            identity: b.identity.clone(),
            draining: gw.draining(),
        },
        b.shutdown.clone(),
    );
    tracing::info!(address = %args.listen, control_plane = %args.common.control_plane, "east-west gateway listening");
    gw.serve(listener, b.shutdown.clone()).await;
    b.finish().await;
    Ok(())
}

#[derive(Args)]
pub struct SidecarArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Worker threads. A sidecar serves one workload: one thread keeps its CPU and memory small
    /// and predictable; raise it for a workload that needs more than a core of proxying.
    #[arg(long, env = "FEDMESH_PROXY_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Inbound mTLS listener and the app behind it, LISTEN=APP (e.g.
    /// 127.0.0.1:15006=127.0.0.1:8080). The LISTEN address is the endpoint address the
    /// cluster's EndpointSlices carry for this workload. Repeatable.
    #[arg(long = "inbound", value_name = "LISTEN=APP")]
    inbound: Vec<String>,
    /// An HTTP proxy for the app (point `http_proxy` at it); also does CONNECT for TCP.
    #[arg(long, value_name = "ADDR")]
    http_proxy: Option<SocketAddr>,
    /// A local listener for one service port, ADDR=NAMESPACE/NAME:PORT. Repeatable.
    #[arg(long = "listen", value_name = "ADDR=NAMESPACE/NAME:PORT")]
    listen: Vec<String>,
    /// Transparent mode (iptables REDIRECT): outbound on --outbound-port, inbound on
    /// --inbound-port, both by original destination.
    #[arg(long)]
    transparent: bool,
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// SO_MARK on the sidecar's own connections, for iptables to leave them alone.
    #[arg(long)]
    mark: Option<u32>,
    /// On undeclared ports, wait this long for the client to speak before treating the
    /// connection as opaque TCP.
    #[arg(long, value_parser = parse_duration, default_value = "250ms")]
    protocol_detect_timeout: Duration,
    /// An OTLP/gRPC port on loopback for the app's own spans (e.g. 127.0.0.1:4317, where
    /// OpenTelemetry SDKs send by default): relayed over this sidecar's mTLS channel to the
    /// control plane and on to the hub's trace window, where they join the mesh's spans.
    #[arg(long, value_name = "ADDR")]
    app_otlp: Option<SocketAddr>,
}

fn parse_pair(s: &str, what: &str) -> anyhow::Result<(SocketAddr, String)> {
    let (a, b) = s
        .split_once('=')
        .with_context(|| format!("{what} {s:?}: expected ADDR=..."))?;
    let a: SocketAddr = a.parse().with_context(|| {
        format!("{what} {s:?}: {a:?} is not an address such as 127.0.0.1:15006")
    })?;
    Ok((a, b.to_string()))
}

impl SidecarArgs {
    pub fn access_log(&self) -> bool {
        self.common.access_log
    }
}

pub async fn sidecar(args: SidecarArgs) -> anyhow::Result<()> {
    // Parse and bind everything first: a bad flag or a taken port fails before anything starts.
    let mut inbound = Vec::new();
    for spec in &args.inbound {
        let (l, app) = parse_pair(spec, "--inbound")?;
        let app: SocketAddr = app.parse().with_context(|| {
            format!("--inbound {spec:?}: the app must be an address such as 127.0.0.1:8080")
        })?;
        inbound.push((bind(l, "inbound").await?, Some(app)));
    }
    let mut services = Vec::new();
    for spec in &args.listen {
        let (l, d) = parse_pair(spec, "--listen")?;
        let dest: Dest = d
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--listen: {e}"))?;
        services.push((bind(l, "service listener").await?, dest));
    }
    let proxy = match args.http_proxy {
        Some(a) => Some(bind(a, "HTTP proxy").await?),
        None => None,
    };
    let transparent = if args.transparent {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        let out = bind(
            SocketAddr::new(any.ip(), args.outbound_port),
            "transparent outbound",
        )
        .await?;
        let inb = bind(
            SocketAddr::new(any.ip(), args.inbound_port),
            "transparent inbound",
        )
        .await?;
        Some((out, inb))
    } else {
        None
    };
    if inbound.is_empty() && services.is_empty() && proxy.is_none() && transparent.is_none() {
        anyhow::bail!(
            "nothing to do: give --inbound, --http-proxy, --listen or --transparent (see sidecar --help)"
        );
    }
    let admin = match args.common.admin {
        Some(a) => Some(bind(a, "admin").await?),
        None => None,
    };
    let app_otlp = match args.app_otlp {
        Some(a) => Some(relay_listener(&args.common, a).await?),
        None => None,
    };
    let b = basics(&args.common, "sidecar").await?;
    if let Some(l) = app_otlp {
        let channel = config::control_plane_channel(&args.common.control_plane, &b.identity)
            .map_err(anyhow::Error::msg)?;
        tracing::info!(address = ?l.local_addr().ok(), "relaying the app's spans (OTLP/gRPC) to the control plane");
        tokio::spawn(telemetry::relay::serve(l, channel, b.shutdown.clone()));
    }
    let options = SidecarOptions {
        zone: args.common.zone.clone(),
        protocol_detect_timeout: args.protocol_detect_timeout,
        idle_timeout: args.common.idle_timeout,
        drain_timeout: args.common.drain_timeout,
        mark: args.mark,
        max_connections: args.common.max_connections,
        spans: b.spans.clone(),
        access_log: args.common.access_log,
        ..SidecarOptions::default()
    };
    let sc = Sidecar::new(
        options,
        b.identity.clone(),
        b.config.clone(),
        b.metrics.clone(),
    );
    serve_admin(
        args.common.admin,
        admin,
        AdminState {
            role: "sidecar",
            metrics: b.metrics.clone(),
            config: b.config.clone(),
            identity: b.identity.clone(),
            draining: sc.draining(),
        },
        b.shutdown.clone(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for (l, app) in inbound {
        tracing::info!(listen = ?l.local_addr().ok(), app = ?app, "inbound listening");
        tasks.spawn(sc.clone().serve_inbound(l, app, b.shutdown.clone()));
    }
    for (l, dest) in services {
        tracing::info!(listen = ?l.local_addr().ok(), service = %dest, "service listener");
        tasks.spawn(sc.clone().serve_service(l, dest, b.shutdown.clone()));
    }
    if let Some(l) = proxy {
        tracing::info!(listen = ?l.local_addr().ok(), "HTTP proxy listening");
        tasks.spawn(sc.clone().serve_http_proxy(l, b.shutdown.clone()));
    }
    if let Some((out, inb)) = transparent {
        tracing::info!(outbound = ?out.local_addr().ok(), inbound = ?inb.local_addr().ok(), "transparent mode");
        tasks.spawn(sc.clone().serve_transparent(out, b.shutdown.clone()));
        tasks.spawn(sc.clone().serve_inbound(inb, None, b.shutdown.clone()));
    }
    while tasks.join_next().await.is_some() {}
    b.finish().await;
    Ok(())
}
