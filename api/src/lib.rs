//! fedmesh's shared vocabulary: identities, names, the MCS CRD types and the protocols between
//! components. No I/O lives here.

pub mod identity;
pub mod mcs;
pub mod names;
pub mod policy;

pub use identity::{IdError, SpiffeId, TrustDomain};
pub use names::{ClusterName, Locality, NameError, Namespace, ServiceKey, ServiceName};

/// Generated protocol types and gRPC stubs.
pub mod pb {
    /// Hub ⇄ control plane.
    pub mod federation {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("fedmesh.federation.v1");
    }
    /// Control plane ⇄ data plane (sidecars, gateways).
    pub mod dataplane {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("fedmesh.dataplane.v1");
    }
    /// Control plane ⇄ node agent.
    pub mod identity {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("fedmesh.identity.v1");
    }
}

/// The newest federation protocol version this build speaks.
pub const FEDERATION_PROTOCOL_VERSION: u32 = 1;

/// The newest data-plane protocol version this build speaks.
pub const DATAPLANE_PROTOCOL_VERSION: u32 = 1;
