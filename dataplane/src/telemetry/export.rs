//! Where spans go: the OTLP exporter (`opentelemetry-otlp`), a bounded queue in front of it and
//! the one task that batches the queue into it.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::EnvResourceDetector;
use opentelemetry_sdk::trace::{Sampler, SpanData, SpanExporter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Inner, Spans};
use crate::config::ConfigHandle;
use crate::metrics::ProxyMetrics;

/// How spans are exported: `--otlp-*` flags, or the standard `OTEL_*` variables.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The collector; `None`: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` if set, else tracing is off.
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// The share of traces that start at this proxy to keep (a caller's decision is kept).
    pub sampling: SamplerArg,
    /// Spans of requests at least this slow are kept whatever the sampling said.
    pub slow: Duration,
    /// Spans waiting for export; beyond this, new ones are dropped and counted.
    pub queue: usize,
    /// Spans per export call.
    pub batch: usize,
    /// A batch is sent at least this often.
    pub interval: Duration,
    /// `service.name` (`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` override it).
    pub service_name: String,
    /// More resource attributes (`service.namespace`, `k8s.*`, the trust domain...).
    pub resource: Vec<KeyValue>,
    /// Where spans go when no collector is named: the cluster's control plane, which relays
    /// them to the hub (OTLP/gRPC over the proxy's mTLS channel).
    pub control_plane: Option<tonic::transport::Channel>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: OtlpProtocol::Grpc,
            sampling: SamplerArg(0.01),
            slow: Duration::from_secs(1),
            queue: 4096,
            batch: 512,
            interval: Duration::from_secs(1),
            service_name: "fedmesh-proxy".into(),
            resource: Vec::new(),
            control_plane: None,
        }
    }
}

impl ExportConfig {
    /// Names the proxy in its spans' resource: the workload it serves (the SVID's namespace and
    /// service account: `service.name` is the account, `fedmesh-gateway` for a gateway), its
    /// role (`fedmesh.proxy`), identity, trust domain and node. The cluster is added once the
    /// configuration names it.
    pub fn for_proxy(mut self, role: &str, id: &fedmesh_trust::SpiffeId, node: &str) -> Self {
        let (namespace, account) = match id.namespace_and_service_account() {
            Some((ns, sa)) => (Some(ns), Some(sa)),
            None => (None, None),
        };
        self.resource = vec![
            KeyValue::new("fedmesh.trust_domain", id.trust_domain().to_string()),
            KeyValue::new("fedmesh.proxy", role.to_string()),
            KeyValue::new("fedmesh.spiffe_id", id.to_string()),
            KeyValue::new("service.instance.id", node.to_string()),
        ];
        if let Some(ns) = namespace {
            self.resource
                .push(KeyValue::new("service.namespace", ns.to_string()));
            self.resource
                .push(KeyValue::new("k8s.namespace.name", ns.to_string()));
        }
        self.service_name = match (role, account) {
            ("sidecar", Some(sa)) => sa.to_string(),
            _ => format!("fedmesh-{role}"),
        };
        self
    }
}

/// OTLP's two transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl std::str::FromStr for OtlpProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(format!(
                "OTLP protocol {other:?} is not supported: use grpc or http/protobuf"
            )),
        }
    }
}

/// The ratio of new traces kept, read as `--trace-sampling` or the standard
/// `OTEL_TRACES_SAMPLER` (+ `_ARG`) say it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerArg(pub f64);

impl SamplerArg {
    /// `RATIO` between 0 and 1.
    pub fn parse_ratio(s: &str) -> Result<Self, String> {
        match s.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(Self(r)),
            _ => Err(format!(
                "sampling ratio {s:?} is not a number between 0 and 1 (0.01 keeps 1% of new traces)"
            )),
        }
    }

    /// From `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, as the OpenTelemetry
    /// specification names them. A proxy always keeps its caller's decision, so the
    /// `parentbased_` prefix changes nothing. `None` when the variable is not set.
    pub fn from_env_values(
        sampler: Option<&str>,
        arg: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let Some(sampler) = sampler.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let ratio = match sampler.trim_start_matches("parentbased_") {
            "always_on" => Self(1.0),
            "always_off" => Self(0.0),
            "traceidratio" => match arg {
                Some(a) => {
                    Self::parse_ratio(a).map_err(|e| format!("OTEL_TRACES_SAMPLER_ARG: {e}"))?
                }
                None => Self(1.0),
            },
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other} is not supported: use always_on, always_off, \
                     traceidratio or their parentbased_ forms"
                ));
            }
        };
        Ok(Some(ratio))
    }
}

/// Whether spans have somewhere to go, and tracing is not switched off
/// (`OTEL_TRACES_EXPORTER=none`, `OTEL_SDK_DISABLED=true`).
fn enabled(config: &ExportConfig) -> bool {
    let off = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none")
        || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
    !off && (collector_named(config.endpoint.as_deref()) || config.control_plane.is_some())
}

/// Whether a collector is named: `--otlp-endpoint` (`endpoint`), or
/// `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`.
pub fn collector_named(endpoint: Option<&str>) -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    endpoint.is_some()
        || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        || set("OTEL_EXPORTER_OTLP_ENDPOINT")
}

fn exporter(config: &ExportConfig) -> Result<opentelemetry_otlp::SpanExporter, String> {
    if !collector_named(config.endpoint.as_deref())
        && let Some(channel) = &config.control_plane
    {
        return opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_channel(channel.clone())
            .build()
            .map_err(|e| format!("cannot set up span export to the control plane: {e}"));
    }
    let built = match config.protocol {
        OtlpProtocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(e) = &config.endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.build()
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            if let Some(e) = &config.endpoint {
                // A base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is: the signal's path is added.
                b = b.with_endpoint(format!("{}/v1/traces", e.trim_end_matches('/')));
            }
            b.build()
        }
    };
    built.map_err(|e| format!("cannot set up the OTLP exporter: {e}"))
}

fn resource(config: &ExportConfig, cluster: &str) -> Resource {
    let mut attrs = vec![KeyValue::new("service.name", config.service_name.clone())];
    attrs.extend(config.resource.iter().cloned());
    if !cluster.is_empty() {
        attrs.push(KeyValue::new("fedmesh.cluster", cluster.to_string()));
    }
    let mut b = Resource::builder_empty()
        .with_attributes(attrs)
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Ok(name) = std::env::var("OTEL_SERVICE_NAME")
        && !name.trim().is_empty()
    {
        b = b.with_service_name(name);
    }
    b.build()
}

/// The export task, running until [`Exporting::finish`].
pub struct Exporting {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Exporting {
    /// Exports what is still queued (within the flush time given to [`start`]) and stops. Call
    /// it once the proxy has drained, so the last requests' spans go out too.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts exporting: `Spans::off()` and no task when spans have nowhere to go.
pub fn start(
    config: &ExportConfig,
    metrics: Arc<ProxyMetrics>,
    table: ConfigHandle,
    flush: Duration,
) -> Result<(Spans, Option<Exporting>), String> {
    if !enabled(config) {
        return Ok((Spans::off(), None));
    }
    let exporter = exporter(config)?;
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let task = Exporter {
        rx,
        exporter,
        config: config.clone(),
        metrics: metrics.clone(),
        table,
        cluster: None,
        last_warning: None,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(task.run(stop.clone(), flush));
    let spans = Spans(Some(Arc::new(Inner {
        queue: tx,
        root: Sampler::TraceIdRatioBased(config.sampling.0),
        ratio: config.sampling.0,
        slow: config.slow,
        scope: InstrumentationScope::builder("fedmesh")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
        metrics,
    })));
    Ok((spans, Some(Exporting { stop, task })))
}

struct Exporter {
    rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    config: ExportConfig,
    metrics: Arc<ProxyMetrics>,
    table: ConfigHandle,
    /// The cluster the resource names (known once the first configuration arrives).
    cluster: Option<String>,
    last_warning: Option<tokio::time::Instant>,
}

impl Exporter {
    async fn run(mut self, shutdown: CancellationToken, flush: Duration) {
        let max = self.config.batch.max(1);
        let mut batch = Vec::with_capacity(max);
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Always at least 1: a full batch is exported before the next turn.
            let room = max - batch.len();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                n = self.rx.recv_many(&mut batch, room) => {
                    if n == 0 {
                        break;
                    }
                    if batch.len() < max {
                        continue;
                    }
                }
                _ = tick.tick() => {
                    if batch.is_empty() {
                        continue;
                    }
                }
            }
            self.export(std::mem::replace(&mut batch, Vec::with_capacity(max)))
                .await;
        }
        // Shutting down: what is queued goes out, bounded by the drain time.
        while let Ok(s) = self.rx.try_recv() {
            batch.push(s);
        }
        let _ = tokio::time::timeout(flush, async {
            for chunk in batch.chunks(max) {
                self.export(chunk.to_vec()).await;
            }
        })
        .await;
        let _ = self.exporter.shutdown();
    }

    async fn export(&mut self, batch: Vec<SpanData>) {
        let cluster = self.table.table().cluster_name().to_string();
        if self.cluster.as_deref() != Some(cluster.as_str()) {
            self.exporter
                .set_resource(&resource(&self.config, &cluster));
            self.cluster = Some(cluster);
        }
        let n = batch.len() as u64;
        match self.exporter.export(batch).await {
            Ok(()) => self.metrics.count_spans("exported", n),
            Err(e) => {
                self.metrics.count_spans("failed", n);
                // One warning per half minute: a collector that is down must not flood the log.
                let now = tokio::time::Instant::now();
                if self
                    .last_warning
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30))
                {
                    self.last_warning = Some(now);
                    tracing::warn!(spans = n, error = %e, "OTLP export failed; spans dropped (counted in the spans metric)");
                }
            }
        }
    }
}
