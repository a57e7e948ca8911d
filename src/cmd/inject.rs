//! `fedmesh inject`: adds the sidecar to workloads, like `linkerd inject`. Reads Kubernetes YAML
//! (one or many documents, or a `List`) from a file or stdin and writes it back injected (see
//! [`fedmesh_federation::inject`]); the control plane's admission webhook does the same to pods
//! as they are created.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedmesh_federation::inject::{InjectOptions, inject};

#[derive(Args, Clone, Debug)]
pub struct InjectArgs {
    /// The YAML to inject (`-` or nothing: stdin).
    #[arg(default_value = "-")]
    file: PathBuf,
    /// The fedmesh image for the sidecar and the init container.
    #[arg(long, env = "FEDMESH_IMAGE", default_value = "fedmesh:dev")]
    image: String,
    /// The cluster's control plane, as the sidecar reaches it.
    #[arg(
        long,
        default_value = "fedmesh-control-plane.fedmesh-system.svc.cluster.local:15012"
    )]
    control_plane: String,
    /// The uid the sidecar runs as (exempt from interception).
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The sidecar's admin port (/metrics, /healthz, /readyz); not intercepted.
    #[arg(long, default_value_t = 15020)]
    admin_port: u16,
    /// The host directory holding the node agent's Workload API socket (`agent.sock`).
    #[arg(long, default_value = "/run/fedmesh")]
    agent_socket_dir: String,
    /// Inject a native sidecar (an init container with `restartPolicy: Always`; Kubernetes
    /// 1.29+): it starts before the app and stops after it. The admission webhook decides this
    /// from the cluster's version.
    #[arg(long)]
    native_sidecar: bool,
}

impl InjectArgs {
    pub fn options(&self) -> InjectOptions {
        InjectOptions {
            image: self.image.clone(),
            control_plane: self.control_plane.clone(),
            proxy_uid: self.proxy_uid,
            admin_port: self.admin_port,
            agent_socket_dir: self.agent_socket_dir.clone(),
            native_sidecar: self.native_sidecar,
        }
    }
}

pub fn run(a: InjectArgs) -> anyhow::Result<()> {
    let text = if a.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?
    };
    print!("{}", inject(&text, &a.options())?);
    Ok(())
}
