//! The hub's own OTLP listener: OTLP/gRPC and OTLP/HTTP (`POST /v1/traces`, protobuf) on one
//! port, HTTP/1.1 and HTTP/2. With TLS (`--otlp-listen`), callers authenticate with a joined
//! cluster's SVID, as on the federation port; without (`--otlp-plaintext-listen`, configured
//! explicitly), anyone who reaches the port may send and the spans are stamped
//! [`UNVERIFIED`](super::intake::UNVERIFIED). Either way an export is at most
//! [`MAX_OTLP_EXPORT_BYTES`], at most [`MAX_IN_FLIGHT`] are taken at once, and the window's bounds
//! hold.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use fedmesh_api::MAX_OTLP_EXPORT_BYTES;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio_util::sync::CancellationToken;

use super::intake::{self, Intake, Sender};
use crate::hub::Hub;
use fedmesh_trust::http_server::{self, HttpListener, Peer, Versions};

/// Exports taken at once; more wait (their connections' HTTP/2 flow control pushes back).
pub const MAX_IN_FLIGHT: usize = 64;

const PROTOBUF: &str = "application/x-protobuf";

/// `google.rpc.Status`, the body of an OTLP/HTTP error (its `details` are not used).
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

fn protobuf(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, PROTOBUF)], body).into_response()
}

/// An OTLP/HTTP error: the HTTP status and a `google.rpc.Status` saying why.
fn error(status: StatusCode, code: tonic::Code, message: String) -> Response {
    protobuf(
        status,
        RpcStatus {
            code: code as i32,
            message,
        }
        .encode_to_vec(),
    )
}

/// `POST /v1/traces`.
async fn export_http(intake: Intake, sender: Sender, headers: HeaderMap, body: Bytes) -> Response {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = media.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case(PROTOBUF) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            tonic::Code::InvalidArgument,
            format!(
                "content type {media:?} is not taken here: send OTLP/HTTP as {PROTOBUF} \
                 (OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf), or use OTLP/gRPC on this port"
            ),
        );
    }
    if let Some(enc) = headers.get(header::CONTENT_ENCODING)
        && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            tonic::Code::InvalidArgument,
            format!(
                "content encoding {:?} is not taken here: send exports uncompressed \
                 (OTEL_EXPORTER_OTLP_COMPRESSION=none)",
                String::from_utf8_lossy(enc.as_bytes())
            ),
        );
    }
    let req = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                tonic::Code::InvalidArgument,
                format!("the body is not an OTLP ExportTraceServiceRequest: {e}"),
            );
        }
    };
    match intake.take(&sender, req) {
        Ok(resp) => protobuf(StatusCode::OK, resp.encode_to_vec()),
        Err(s) => {
            let status = match s.code() {
                tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_REQUEST,
            };
            error(status, s.code(), s.message().to_string())
        }
    }
}

/// Serves OTLP on `listener` until `shutdown`: with `tls`, for joined clusters' identities;
/// without, for anyone (spans stamped unverified).
pub async fn serve(
    hub: Arc<Hub>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let plaintext = tls.is_none();
    let intake = Intake::new(hub);
    let http_intake = intake.clone();
    let app = tonic::service::Routes::new(intake::grpc(intake))
        .prepare()
        .into_axum_router()
        .route(
            "/v1/traces",
            post(
                move |axum::Extension(sender): axum::Extension<Sender>,
                      headers: HeaderMap,
                      body: Bytes| {
                    export_http(http_intake.clone(), sender, headers, body)
                },
            ),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "this is the fedmesh hub's OTLP listener: POST /v1/traces (OTLP/HTTP, protobuf) \
                 or OTLP/gRPC (opentelemetry.proto.collector.trace.v1.TraceService)\n",
            )
        })
        // Who sent it, for both protocols: the gRPC service reads it from the request too.
        .layer(middleware::from_fn(
            move |ConnectInfo(peer): ConnectInfo<Peer>, mut req: Request, next: Next| {
                let sender = if plaintext {
                    Sender::Plaintext
                } else {
                    Sender::Mtls(peer.spiffe_id)
                };
                req.extensions_mut().insert(sender);
                next.run(req)
            },
        ))
        .layer(DefaultBodyLimit::max(MAX_OTLP_EXPORT_BYTES))
        .layer(tower::limit::ConcurrencyLimitLayer::new(MAX_IN_FLIGHT));
    let name = if plaintext {
        "OTLP (plain text)"
    } else {
        "OTLP"
    };
    let listener = HttpListener::new(listener, tls, name)?;
    http_server::serve(listener, app, Versions::Http1And2, name, shutdown).await;
    Ok(())
}
