//! The federation hub and the per-cluster control plane.

pub mod control_plane;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod store;
pub mod tokens;
