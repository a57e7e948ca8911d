//! The agent side of identity: registration entries, attestation of callers, the SVID cache
//! and the SPIFFE Workload API server.

pub mod attest;
pub mod authority;
pub mod cache;
pub mod entries;
pub mod k8s;
pub mod remote;
pub mod server;
pub mod signer;

pub use cache::SvidCache;
pub use entries::{EntryFile, RegistrationEntry, Selector, load_entry_file};
pub use k8s::{K8sAttestor, PodIndex, PodInfo};
pub use remote::{ControlPlaneSigner, JoinCredential};
pub use server::{WorkloadApi, bind_socket, serve, serve_with_attestor};
pub use signer::{LocalCaSigner, SvidSigner};
