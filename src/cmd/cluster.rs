//! `fedmesh cluster list|remove|link` (also under `fedmesh hub cluster`): the clusters of the
//! clusterset, and joining one in one command — `link` creates its join token on the hub and
//! hands it to the cluster: on Kubernetes it writes the Secret and ConfigMap the control plane
//! reads (`fedmesh-join-token`, `fedmesh-federation`); on hosts it writes the token to a 0600 file
//! and prints the one line that starts the control plane (as `linkerd multicluster link` and
//! `cilium clustermesh connect` do for theirs).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use fedmesh_api::{ClusterName, TrustDomain};

use super::hub::AdminArgs;
use super::status::{Output, clusters_table, print_doc};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// The clusters of the clusterset: trust domain, region, state, last seen, exports, bundle,
    /// gateways.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove a cluster from the clusterset: its exports are withdrawn and its trust bundle
    /// leaves every other cluster, so its workloads can no longer open connections into them.
    /// It may join again only with a new join token.
    Remove {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Join a cluster in one step: create its join token on the hub and hand it over (with
    /// --kubernetes, as the Secret and ConfigMap its control plane reads; otherwise to a 0600 file,
    /// printing the command that starts its control plane).
    Link(Box<LinkArgs>),
}

#[derive(Args)]
pub struct LinkArgs {
    /// The cluster's name (a DNS label).
    #[arg(long)]
    cluster: String,
    /// Its own trust domain (every cluster has its own).
    #[arg(long)]
    trust_domain: String,
    /// The hub's federation address(es) as the cluster's control plane reaches them,
    /// HOST:PORT[,HOST:PORT].
    #[arg(long)]
    hub: String,
    /// The address(es) other clusters reach this cluster's east-west gateway at, HOST:PORT.
    #[arg(long = "gateway")]
    gateways: Vec<String>,
    /// How long the token may wait to be used (1s to 7d).
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Write the Secret `fedmesh-join-token` and the ConfigMap `fedmesh-federation` into the
    /// Kubernetes cluster of the current kubeconfig context (or --context).
    #[arg(long)]
    kubernetes: bool,
    /// The kubeconfig context of the cluster (implies --kubernetes).
    #[arg(long)]
    context: Option<String>,
    /// The namespace fedmesh runs in.
    #[arg(long, default_value = "fedmesh-system")]
    namespace: String,
    /// On hosts: where to write the token (mode 0600; an existing file is not overwritten;
    /// default ./CLUSTER.token).
    #[arg(long)]
    out: Option<PathBuf>,
    /// On hosts: the control plane's --source and --data-dir, for the command printed.
    #[arg(long, default_value = "dir:/etc/fedmesh/services")]
    source: String,
    #[arg(long, default_value = "/var/lib/fedmesh/control-plane")]
    data_dir: PathBuf,
    #[command(flatten)]
    admin: AdminArgs,
}

pub async fn run(c: ClusterCommand) -> anyhow::Result<()> {
    match c {
        ClusterCommand::List { admin, output } => {
            let clusters = admin.client()?.clusters().await?;
            if !print_doc(output, &serde_json::to_value(&clusters)?)? {
                clusters_table(&clusters, output == Output::Wide);
            }
            Ok(())
        }
        ClusterCommand::Remove { name, admin } => {
            ClusterName::new(&name).with_context(|| format!("{name:?} is not a cluster name"))?;
            admin.client()?.remove_cluster(&name).await?;
            println!(
                "removed cluster {name}: its exports are withdrawn and the other clusters stop trusting its identities"
            );
            Ok(())
        }
        ClusterCommand::Link(a) => link(*a).await,
    }
}

async fn link(a: LinkArgs) -> anyhow::Result<()> {
    let cluster = ClusterName::new(&a.cluster)?;
    let td = TrustDomain::new(&a.trust_domain)?;
    let kubernetes = a.kubernetes || a.context.is_some();
    // Where the token goes is checked before the token exists: a token made for nothing would
    // wait, usable, until it expires.
    let target = if kubernetes {
        let client = kube_client(a.context.as_deref()).await?;
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(client.clone(), &a.namespace);
        if secrets.get_opt(SECRET).await?.is_some() {
            anyhow::bail!(
                "secret {}/{SECRET} exists already: this cluster was linked before (a control plane that joined keeps its hub credentials and needs no new token). To link it again, `fedmesh cluster remove {cluster}` and delete the secret first",
                a.namespace
            );
        }
        Target::Kubernetes(client)
    } else {
        let path = a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{cluster}.token")));
        anyhow::ensure!(
            !path.exists(),
            "{} exists already: remove it or give another --out",
            path.display()
        );
        Target::File(path)
    };
    let made = a
        .admin
        .client()?
        .create_token(cluster.as_str(), td.as_str(), Some(&a.ttl))
        .await?;
    match target {
        Target::Kubernetes(client) => {
            write_kubernetes(&client, &a, &made.token).await?;
            println!(
                "linked {cluster} ({td}): wrote secret {ns}/{SECRET} (a join token, usable once until {}) and configmap {ns}/{CONFIGMAP} (hub {}{})",
                made.expires,
                a.hub,
                if a.gateways.is_empty() {
                    String::new()
                } else {
                    format!(", gateway {}", a.gateways.join(","))
                },
                ns = a.namespace,
            );
            println!(
                "next: deploy the control plane (kubectl apply -k deploy/multicluster/overlays/...), or restart it if it runs: kubectl -n {} rollout restart deploy/fedmesh-control-plane",
                a.namespace
            );
        }
        Target::File(path) => {
            fedmesh_trust::files::write_private(&path, made.token.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            println!(
                "linked {cluster} ({td}): wrote its join token to {} (0600, usable once until {}); start its control plane with:",
                path.display(),
                made.expires
            );
            let gateways: String = a
                .gateways
                .iter()
                .map(|g| format!(" --gateway {g}"))
                .collect();
            println!(
                "fedmesh control-plane --cluster {cluster} --trust-domain {td} --hub {} --join-token-file {}{gateways} --source {} --data-dir {}",
                a.hub,
                path.display(),
                a.source,
                a.data_dir.display()
            );
        }
    }
    Ok(())
}

const SECRET: &str = "fedmesh-join-token";
const CONFIGMAP: &str = "fedmesh-federation";

enum Target {
    Kubernetes(kube::Client),
    File(PathBuf),
}

async fn kube_client(context: Option<&str>) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(String::from),
        ..Default::default()
    };
    let config = match kube::Config::from_kubeconfig(&options).await {
        Ok(c) => c,
        Err(e) if context.is_none() => kube::Config::infer()
            .await
            .with_context(|| format!("no Kubernetes cluster to link: {e}"))?,
        Err(e) => return Err(e).context("cannot use that kubeconfig context"),
    };
    Ok(kube::Client::try_from(config)?)
}

/// The Secret (the token) and the ConfigMap (hub and gateway addresses) the control plane's
/// manifest reads, labelled as fedmesh's; the namespace is created when missing.
async fn write_kubernetes(client: &kube::Client, a: &LinkArgs, token: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
    use kube::api::{Patch, PatchParams, PostParams};
    let labels = std::collections::BTreeMap::from([(
        "app.kubernetes.io/part-of".to_string(),
        "fedmesh".to_string(),
    )]);
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    if namespaces.get_opt(&a.namespace).await?.is_none() {
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(a.namespace.clone()),
                labels: Some(labels.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces.create(&PostParams::default(), &ns).await?;
    }
    let meta = |name: &str| kube::api::ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(a.namespace.clone()),
        labels: Some(labels.clone()),
        ..Default::default()
    };
    let secret = Secret {
        metadata: meta(SECRET),
        string_data: Some([("token".to_string(), token.to_string())].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    kube::Api::<Secret>::namespaced(client.clone(), &a.namespace)
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("cannot create secret {}/{SECRET}", a.namespace))?;
    let mut data = std::collections::BTreeMap::from([("hub".to_string(), a.hub.clone())]);
    data.insert("gateway".into(), a.gateways.join(","));
    let cm = ConfigMap {
        metadata: meta(CONFIGMAP),
        data: Some(data),
        ..Default::default()
    };
    kube::Api::<ConfigMap>::namespaced(client.clone(), &a.namespace)
        .patch(
            CONFIGMAP,
            &PatchParams::apply("fedmesh-link").force(),
            &Patch::Apply(&cm),
        )
        .await
        .with_context(|| format!("cannot write configmap {}/{CONFIGMAP}", a.namespace))?;
    Ok(())
}
