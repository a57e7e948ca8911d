//! What fedmesh's east-west gateway and sidecar share.

pub mod admin;
pub mod balance;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod ratelimit;
pub mod relay;
pub mod sni;
pub mod target;
pub mod trace;
