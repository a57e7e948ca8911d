//! The agent side of identity: registration entries, attestation of callers, the SVID cache
//! and the SPIFFE Workload API server.

pub mod attest;
pub mod authority;
pub mod cache;
pub mod entries;
pub mod remote;
pub mod server;
pub mod signer;

pub use cache::SvidCache;
pub use entries::{RegistrationEntry, Selector, load_entries};
pub use remote::ControlPlaneSigner;
pub use server::{WorkloadApi, bind_socket, serve};
pub use signer::{LocalCaSigner, SvidSigner};
