//! fedmesh identity: SPIFFE IDs, the per-trust-domain CA, X.509- and JWT-SVIDs, SPIFFE bundles
//! and their federation endpoint, the SPIFFE Workload API, and rustls configs that verify a peer
//! against the bundle of its own trust domain.

pub mod bundle;
pub mod ca;
pub mod endpoint;
pub mod files;
pub mod grpc;
pub mod http_server;
pub mod jwt;
pub mod limits;
pub mod listen;
pub mod source;
pub mod svid;
pub mod tls;
pub mod workload;

pub use fedmesh_api::{IdError, SpiffeId, TrustDomain};

/// Generated from the official SPIFFE `workload.proto` (no package: its gRPC paths are
/// `/SpiffeWorkloadAPI/<Method>`, as every SPIFFE client expects).
pub mod workload_pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("_");
}
