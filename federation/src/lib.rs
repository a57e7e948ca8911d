//! The federation hub and the per-cluster control plane.

pub mod store;
