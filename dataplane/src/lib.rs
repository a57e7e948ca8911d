//! What fedmesh's east-west gateway and sidecar share.

pub mod access;
pub mod admin;
pub mod balance;
pub mod config;
pub mod connect;
pub mod ejections;
pub mod error;
pub mod h2pool;
pub mod hop;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod prefixed;
pub mod probe;
pub mod ratelimit;
pub mod relay;
pub mod signals;
pub mod sni;
pub mod target;
pub mod telemetry;
pub mod trace;
