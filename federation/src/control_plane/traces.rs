//! The control plane relays its proxies' spans to the hub, so a clusterset's traces need no
//! collector of their own: an OTLP TraceService on the control plane's gRPC port (the proxies
//! of its trust domain, mTLS), a bounded queue, and one task that forwards batches to the hub
//! over the cluster's identity (the hub stamps them with this cluster). When the hub is slow or
//! unreachable, batches beyond the queue are refused at once (OTLP's partial success says so),
//! never a proxy held up; a cluster without a hub drops what it gets, and says so once.

use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::MAX_OTLP_EXPORT_BYTES;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::hub_link::HubCredentials;

/// Batches waiting for the hub.
const QUEUE: usize = 64;
/// One forward to the hub may take this long before the batch is given up.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Relay {
    queue: mpsc::Sender<ExportTraceServiceRequest>,
}

/// The relay's TraceService, and its forwarding task (until `shutdown`).
pub fn start(
    hub: Option<Arc<HubCredentials>>,
    shutdown: CancellationToken,
) -> TraceServiceServer<Relay> {
    let (queue, rx) = mpsc::channel(QUEUE);
    tokio::spawn(forward(hub, rx, shutdown));
    TraceServiceServer::new(Relay { queue }).max_decoding_message_size(MAX_OTLP_EXPORT_BYTES)
}

fn spans_in(req: &ExportTraceServiceRequest) -> i64 {
    req.resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as i64)
        .sum()
}

#[tonic::async_trait]
impl TraceService for Relay {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        // The port admits only this trust domain's identities; a caller without one is refused.
        if fedmesh_trust::grpc::peer_id(&req).is_none() {
            return Err(Status::unauthenticated(
                "spans are relayed only for this cluster's proxies (mTLS)",
            ));
        }
        let req = req.into_inner();
        let n = spans_in(&req);
        let partial_success = match self.queue.try_send(req) {
            Ok(()) => None,
            Err(_) => Some(ExportTracePartialSuccess {
                rejected_spans: n,
                error_message: "the control plane's relay to the hub is full (the hub is slow or unreachable); spans dropped".into(),
            }),
        };
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success,
        }))
    }
}

async fn forward(
    hub: Option<Arc<HubCredentials>>,
    mut rx: mpsc::Receiver<ExportTraceServiceRequest>,
    shutdown: CancellationToken,
) {
    let mut client = None;
    let mut warned: Option<tokio::time::Instant> = None;
    let mut warn = |what: String| {
        let now = tokio::time::Instant::now();
        if warned.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30)) {
            warned = Some(now);
            tracing::warn!("{what}");
        }
    };
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            b = rx.recv() => match b {
                Some(b) => b,
                None => return,
            },
        };
        let Some(creds) = &hub else {
            warn("spans from the proxies are dropped: this control plane has no hub".into());
            continue;
        };
        if client.is_none() {
            match creds.channel() {
                Ok(c) => client = Some(TraceServiceClient::new(c)),
                Err(e) => {
                    warn(format!("spans dropped: no channel to the hub ({e})"));
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let n = spans_in(&batch);
        match tokio::time::timeout(FORWARD_TIMEOUT, c.export(batch)).await {
            Ok(Ok(r)) => {
                if let Some(p) = r.into_inner().partial_success
                    && p.rejected_spans > 0
                {
                    tracing::debug!(rejected = p.rejected_spans, error = %p.error_message, "the hub refused some spans");
                }
            }
            Ok(Err(e)) => warn(format!("{n} spans dropped: the hub refused them: {e}")),
            Err(_) => warn(format!(
                "{n} spans dropped: the hub did not take them within {FORWARD_TIMEOUT:?}"
            )),
        }
    }
}
