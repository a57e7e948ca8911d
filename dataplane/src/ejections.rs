//! What a proxy's outlier detection holds ejected, told to its control plane on the configuration
//! stream ([`ConfigHandle::report_health`]): the hub shows it in `fedmesh explain` and
//! `fedmesh proxy-status`.

use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::pb::dataplane as pb;
use tokio_util::sync::CancellationToken;

use crate::balance::Balancer;
use crate::config::ConfigHandle;

/// How often a proxy looks at what its outlier detection holds ejected, to tell its control plane.
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// Tells the control plane, through `config`, what `balancer` holds ejected: every
/// [`HEALTH_EVERY`] until `shutdown`, sending only changes (`fedmesh explain` shows them).
pub async fn report_ejections(
    balancer: Arc<Balancer>,
    config: ConfigHandle,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        config.report_health(pb::Health {
            ejected: balancer
                .ejected()
                .into_iter()
                .map(|e| pb::Ejection {
                    cluster: e.cluster.to_string(),
                    remote: e.remote,
                    address: e.address,
                    service: e.service.to_string(),
                    remaining_ms: e.remaining.as_millis().min(u128::from(u32::MAX)) as u32,
                    ejections: e.ejections,
                })
                .collect(),
        });
    }
}
