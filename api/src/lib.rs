//! fedmesh's shared vocabulary: identities, CRD types and protocol messages. No I/O lives here.

pub mod identity;

pub use identity::{IdError, SpiffeId, TrustDomain};
