//! OTLP trace intake on the hub's federation port (gRPC, SPIFFE mTLS): only a joined cluster's
//! identity may send, and every span it sends is stamped with that cluster. Invalid spans are
//! refused one by one (OTLP's partial success says how many and why); a batch over the size
//! limit is refused whole by the gRPC layer; the window stays within its bounds whatever comes.

use std::sync::Arc;

use fedmesh_api::MAX_OTLP_EXPORT_BYTES;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

use crate::hub::{Hub, cluster_of};

pub struct Intake {
    hub: Arc<Hub>,
}

/// The OTLP TraceService for the hub's gRPC server.
pub fn server(hub: Arc<Hub>) -> TraceServiceServer<Intake> {
    TraceServiceServer::new(Intake { hub }).max_decoding_message_size(MAX_OTLP_EXPORT_BYTES)
}

#[tonic::async_trait]
impl TraceService for Intake {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let td = self.hub.trust_domain();
        let id = fedmesh_trust::grpc::peer_id(&req).ok_or_else(|| {
            Status::unauthenticated(
                "spans are accepted only from a joined cluster's identity (mTLS)",
            )
        })?;
        let cluster = cluster_of(&td, &id).ok_or_else(|| {
            Status::permission_denied(format!("{id} is not a cluster identity of {td}"))
        })?;
        if self.hub.view().cluster(&cluster).is_none() {
            self.hub.metrics.refuse("traces_not_joined");
            return Err(Status::permission_denied(format!(
                "cluster {cluster} is not joined to this hub"
            )));
        }
        let got = self.hub.traces.insert(cluster.as_str(), req.into_inner());
        let m = &self.hub.metrics;
        m.count_spans("accepted", got.accepted as u64);
        m.count_spans("rejected", got.rejected as u64);
        m.count_spans("dropped", got.dropped as u64);
        m.trace_window_spans.set(got.held as i64);
        m.trace_window_bytes.set(got.held_bytes as i64);
        if let Some(e) = &got.error {
            tracing::debug!(%cluster, rejected = got.rejected, error = %e, "spans refused");
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: (got.rejected > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: got.rejected as i64,
                error_message: got.error.unwrap_or_default(),
            }),
        }))
    }
}
