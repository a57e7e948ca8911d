//! OTLP trace intake: who may send spans to the hub, and what becomes of them. On the federation
//! port (gRPC, SPIFFE mTLS) and on the hub's own OTLP listener with TLS ([`super::listener`]),
//! only a joined cluster's identity may send, and every span it sends is stamped with that
//! cluster. On an explicitly configured plain-text listener anyone who reaches it may send, and
//! the spans are stamped [`UNVERIFIED`]: no span can claim a cluster it did not prove. Invalid
//! spans are refused one by one (OTLP's partial success says how many and why); a batch over the
//! size limit is refused whole; the window stays within its bounds whatever comes.

use std::sync::Arc;

use fedmesh_api::MAX_OTLP_EXPORT_BYTES;
use fedmesh_api::SpiffeId;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

use crate::hub::{Hub, cluster_of};

/// The cluster stamped on spans that came through a plain-text listener: no mTLS identity proved
/// where they come from. Not a valid cluster name, so no cluster can be confused with it.
pub const UNVERIFIED: &str = "(unverified)";

/// Who sent an export, as the connection proves it.
#[derive(Clone, Debug)]
pub enum Sender {
    /// A verified SPIFFE ID (mTLS), if the caller presented one.
    Mtls(Option<SpiffeId>),
    /// A plain-text listener the operator configured: anyone.
    Plaintext,
}

#[derive(Clone)]
pub struct Intake {
    hub: Arc<Hub>,
}

/// The OTLP TraceService for the hub's gRPC server (the federation port).
pub fn server(hub: Arc<Hub>) -> TraceServiceServer<Intake> {
    grpc(Intake::new(hub))
}

/// The OTLP TraceService over `intake`, with the export size limit.
pub fn grpc(intake: Intake) -> TraceServiceServer<Intake> {
    TraceServiceServer::new(intake).max_decoding_message_size(MAX_OTLP_EXPORT_BYTES)
}

impl Intake {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    /// The cluster `sender`'s spans are stamped with, or why it may not send.
    fn cluster(&self, sender: &Sender) -> Result<String, Status> {
        let id = match sender {
            Sender::Plaintext => return Ok(UNVERIFIED.to_string()),
            Sender::Mtls(Some(id)) => id,
            Sender::Mtls(None) => {
                self.hub.metrics.refuse("traces_unauthenticated");
                return Err(Status::unauthenticated(
                    "spans are accepted only from a joined cluster's identity (mTLS): present the cluster's SVID, or send through the hub's plain-text OTLP listener (--otlp-plaintext-listen) if the operator configured one",
                ));
            }
        };
        let td = self.hub.trust_domain();
        let cluster = cluster_of(&td, id).ok_or_else(|| {
            self.hub.metrics.refuse("traces_not_a_cluster");
            Status::permission_denied(format!("{id} is not a cluster identity of {td}"))
        })?;
        if self.hub.view().cluster(&cluster).is_none() {
            self.hub.metrics.refuse("traces_not_joined");
            return Err(Status::permission_denied(format!(
                "cluster {cluster} is not joined to this hub"
            )));
        }
        Ok(cluster.to_string())
    }

    /// Takes one export from `sender` into the window.
    pub fn take(
        &self,
        sender: &Sender,
        req: ExportTraceServiceRequest,
    ) -> Result<ExportTraceServiceResponse, Status> {
        let cluster = self.cluster(sender)?;
        if let Some(forward) = &self.hub.forward {
            forward.send(&cluster, req.clone());
        }
        let got = self.hub.traces.insert(&cluster, req);
        let m = &self.hub.metrics;
        m.count_spans("accepted", got.accepted as u64);
        m.count_spans("rejected", got.rejected as u64);
        m.count_spans("dropped", got.dropped as u64);
        m.trace_window_spans.set(got.held as i64);
        m.trace_window_bytes.set(got.held_bytes as i64);
        if let Some(e) = &got.error {
            tracing::debug!(%cluster, rejected = got.rejected, error = %e, "spans refused");
        }
        Ok(ExportTraceServiceResponse {
            partial_success: (got.rejected > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: got.rejected as i64,
                error_message: got.error.unwrap_or_default(),
            }),
        })
    }
}

/// Who sent a gRPC request: the federation port's TLS peer, or the connection an axum listener
/// ([`super::listener`]) recorded.
fn sender_of<T>(req: &Request<T>) -> Sender {
    if let Some(p) = req.extensions().get::<Sender>() {
        return p.clone();
    }
    Sender::Mtls(fedmesh_trust::grpc::peer_id(req))
}

#[tonic::async_trait]
impl TraceService for Intake {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let sender = sender_of(&req);
        self.take(&sender, req.into_inner()).map(Response::new)
    }
}
