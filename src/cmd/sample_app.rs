//! `fedmesh sample-app`: the app of the demo and the kind deployment. HTTP/1.1 and h2c echo (JSON
//! naming the cluster, zone and workload that answered and the caller's SPIFFE ID from
//! `x-forwarded-client-cert`) and the gRPC `fedmesh.echo.Echo` service, on one port.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use fedmesh_testbed::apps::{self, AppInfo};

#[derive(Args)]
pub struct SampleAppArgs {
    /// Where to listen.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// The workload's name, echoed back.
    #[arg(long, env = "FEDMESH_WORKLOAD", default_value = "sample")]
    name: String,
    /// The cluster it runs in, echoed back.
    #[arg(long, env = "FEDMESH_CLUSTER", default_value = "")]
    cluster: String,
    /// The zone it runs in, echoed back.
    #[arg(long, env = "FEDMESH_ZONE", default_value = "")]
    zone: String,
}

pub async fn run(a: SampleAppArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is the port taken?)", a.listen))?;
    let app = apps::sample_app(
        listener,
        AppInfo {
            cluster: a.cluster,
            zone: a.zone,
            workload: a.name,
        },
    )
    .await;
    tracing::info!(listen = %app.addr, "sample app: HTTP echo and gRPC echo");
    super::shutdown_signal().await;
    app.stop();
    Ok(())
}
