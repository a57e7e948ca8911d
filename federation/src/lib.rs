//! The federation hub and the per-cluster control plane.

pub mod control_plane;
pub mod hub;
pub mod inject;
pub mod metrics;
pub mod store;
pub mod tokens;
pub mod update_parts;

/// An error with its sources, each after a colon (what a client library hides in `source()`).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
