//! The app's own spans, relayed by its sidecar: an OTLP/gRPC port on loopback
//! (`--app-otlp 127.0.0.1:4317`, where OpenTelemetry SDKs send by default) that forwards each
//! export to the cluster's control plane over the sidecar's mTLS channel, and so to the hub's
//! trace window, where the app's spans join the mesh's spans of the same requests. The app
//! needs no certificate and no collector address; the hub stamps the spans with the cluster
//! the sidecar's identity proves.
//!
//! Only a loopback address is accepted: whoever reaches the port sends spans under the
//! sidecar's identity, and in a pod only the pod's own containers share its loopback. Each
//! export is bounded in size and time, and at most a few are forwarded at once; beyond that
//! the app's exporter is told to retry later, never held up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::MAX_OTLP_EXPORT_BYTES;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Exports forwarded at once.
const IN_FLIGHT: usize = 8;
/// One forward may take this long.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

struct AppRelay {
    control_plane: TraceServiceClient<Channel>,
    in_flight: Arc<Semaphore>,
}

#[tonic::async_trait]
impl TraceService for AppRelay {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "the sidecar is already relaying {IN_FLIGHT} exports to the control plane; retry later"
            )));
        };
        let mut client = self.control_plane.clone();
        match tokio::time::timeout(FORWARD_TIMEOUT, client.export(req.into_inner())).await {
            // The hub's partial success (spans it refused, and why) reaches the app unchanged.
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(status)) => Err(Status::unavailable(format!(
                "the control plane did not take the spans: {}",
                status.message()
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "the control plane did not take the spans within {FORWARD_TIMEOUT:?}"
            ))),
        }
    }
}

/// Binds the relay's port: a loopback address only.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--app-otlp {addr}: give a loopback address (such as 127.0.0.1:4317): whoever reaches \
             the port sends spans under the sidecar's identity"
        ));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (--app-otlp): {e}"))
}

/// Serves the relay on `listener` until `shutdown`, forwarding over `control_plane`.
pub async fn serve(listener: TcpListener, control_plane: Channel, shutdown: CancellationToken) {
    let relay = AppRelay {
        control_plane: TraceServiceClient::new(control_plane)
            .max_encoding_message_size(MAX_OTLP_EXPORT_BYTES),
        in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
    };
    let service = TraceServiceServer::new(relay).max_decoding_message_size(MAX_OTLP_EXPORT_BYTES);
    use tokio_stream::StreamExt as _;
    // The app is local, but held to the limits of every gRPC port all the same: a client that
    // connects and says nothing is cut (`Preface`), streams and resets are bounded.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
        .map(|s| s.map(fedmesh_trust::limits::Preface::h2));
    if let Err(e) = fedmesh_trust::grpc::server()
        .timeout(FORWARD_TIMEOUT + Duration::from_secs(1))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
    {
        tracing::warn!(error = %e, "the app's OTLP relay stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_loopback_address_is_accepted() {
        let err = bind("0.0.0.0:0".parse().unwrap()).await.unwrap_err();
        assert!(err.contains("give a loopback address"), "{err}");
        assert!(bind("127.0.0.1:0".parse().unwrap()).await.is_ok());
    }
}
