//! A real Kubernetes API server on loopback: `kube-apiserver` as `scripts/peers` builds it, on a
//! real etcd, with RBAC on and the TokenRequest/TokenReview APIs working. Tests apply our CRDs
//! and RBAC with `kubectl`, then run fedmesh's components with their own service accounts'
//! tokens, so a permission missing from our manifests fails the test.
//!
//! Credentials: an admin client certificate (group `system:masters`) for the test's own setup,
//! and service-account tokens from the TokenRequest API for the components.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{ChildGuard, EtcdServer, free_port, peer_bin};

/// etcd + kube-apiserver, killed (API server first) and their files removed on drop.
pub struct KubeApiServer {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The cluster's CA certificate (it signed the serving and admin certificates).
    pub ca_file: PathBuf,
    /// A kubeconfig acting as cluster admin (client certificate in `system:masters`).
    pub admin_kubeconfig: PathBuf,
    server: ChildGuard,
    _etcd: EtcdServer,
    dir: tempfile::TempDir,
}

impl KubeApiServer {
    /// Starts etcd and the API server and waits until `/readyz` answers; `None` (after saying
    /// why) when the peer is not built and peers are not required.
    pub fn start() -> Option<Self> {
        let bin = peer_bin("kube-apiserver", "kube-apiserver")?;
        let etcd = EtcdServer::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::write(dir.path());
        for _attempt in 0..3 {
            let port = free_port();
            let url = format!("https://127.0.0.1:{port}");
            let admin_kubeconfig = dir.path().join("admin.kubeconfig");
            write_kubeconfig(
                &admin_kubeconfig,
                &url,
                &pki.ca,
                &format!(
                    "client-certificate: {}\n    client-key: {}",
                    pki.admin_cert.display(),
                    pki.admin_key.display()
                ),
            );
            let mut cmd = Command::new(&bin);
            cmd.arg(format!("--etcd-servers={}", etcd.url))
                .arg(format!("--secure-port={port}"))
                .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
                .arg(format!("--tls-cert-file={}", pki.server_cert.display()))
                .arg(format!(
                    "--tls-private-key-file={}",
                    pki.server_key.display()
                ))
                .arg(format!("--client-ca-file={}", pki.ca.display()))
                .arg("--authorization-mode=RBAC")
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg(format!(
                    "--service-account-key-file={}",
                    pki.sa_pub.display()
                ))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    pki.sa_key.display()
                ))
                .arg("--api-audiences=https://kubernetes.default.svc")
                .arg("--service-cluster-ip-range=10.0.0.0/24")
                // Endpoints refuse loopback addresses: the API server would log, every few
                // seconds, that it cannot publish its own address in default/kubernetes.
                .arg("--endpoint-reconciler-type=none")
                .args(["--enable-priority-and-fairness=false", "--profiling=false"]);
            let mut server = ChildGuard::spawn("kube-apiserver", &mut cmd, dir.path())
                .expect("spawn kube-apiserver");
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                if let Ok(Some(status)) = server.child.try_wait() {
                    eprintln!("kube-apiserver exited ({status}):\n{}", server.log());
                    break; // the port was taken meanwhile, or a bad flag: try again
                }
                let ready = kubectl_with(&admin_kubeconfig, &["get", "--raw", "/readyz"], None);
                if ready.status.success() {
                    eprintln!(
                        "kube-apiserver ready at {url} in {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                    return Some(Self {
                        url,
                        ca_file: pki.ca.clone(),
                        admin_kubeconfig,
                        server,
                        _etcd: etcd,
                        dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if server.child.try_wait().ok().flatten().is_none() {
                panic!(
                    "kube-apiserver did not become ready in 60 s:\n{}",
                    server.log()
                );
            }
        }
        panic!("kube-apiserver did not start after 3 attempts");
    }

    /// The API server's log so far (klog on stderr).
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// A directory that lives as long as the server, for kubeconfigs and manifests.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `kubectl ARGS` as cluster admin, with `stdin` piped in when given.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl_with(&self.admin_kubeconfig, args, stdin)
    }

    /// [`Self::kubectl`] that must succeed; returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Applies the kind overlay `deploy/multicluster/overlays/<overlay>` (our CRDs, the
    /// fedmesh-system namespace, each component's service account and RBAC, its workloads)
    /// with `kubectl apply -k`, as a user installs fedmesh, and waits until the CRDs are
    /// established.
    pub fn install_fedmesh(&self, overlay: &str) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/multicluster/overlays")
            .join(overlay);
        self.kubectl_ok(&["apply", "-k", dir.to_str().expect("utf-8 path")], None);
        self.wait_crds_established();
    }

    /// Waits until every CRD applied so far serves its kind.
    pub fn wait_crds_established(&self) {
        self.kubectl_ok(
            &[
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                "--timeout=60s",
            ],
            None,
        );
    }

    /// Namespace `ns` (created if missing) with Service `name` (port 80 to 8080), its
    /// EndpointSlice with one ready endpoint `ip` in `zone`, and its ServiceExport, as YAML for
    /// [`Self::apply`].
    pub fn exported_service(ns: &str, name: &str, ip: &str, zone: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abc\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n  - addresses: [{ip}]\n    zone: {zone}\n    conditions: {{ready: true}}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        )
    }

    /// `kubectl apply -f -` of `manifest` (YAML or JSON) as cluster admin.
    pub fn apply(&self, manifest: &str) -> String {
        self.kubectl_ok(&["apply", "-f", "-"], Some(manifest))
    }

    /// The object `kind/name` (in `namespace` unless empty) as JSON, or None if it does not
    /// exist.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<serde_json::Value> {
        let mut args = vec!["get", kind, name, "-o", "json", "--show-managed-fields"];
        if !namespace.is_empty() {
            args.extend(["-n", namespace]);
        }
        let out = self.kubectl(&args, None);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("NotFound"),
                "kubectl {}: {err}",
                args.join(" ")
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("kubectl printed JSON"))
    }

    /// Creates the pod `namespace/name` of service account `sa` (created too if missing),
    /// scheduled on `node`, and sets its phase as the kubelet would (no kubelet runs here, so it
    /// runs nothing). Returns its uid.
    pub fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        sa: &str,
        node: &str,
        phase: &str,
    ) -> String {
        self.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {namespace}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {sa}}}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: registry.invalid/app}}]\n"
        ));
        self.set_pod_phase(namespace, name, phase);
        let pod = self
            .get("pod", namespace, name)
            .expect("the pod just created");
        pod["metadata"]["uid"].as_str().expect("uid").to_string()
    }

    /// Sets a pod's `status.phase` through the status subresource, as the kubelet does.
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) {
        self.kubectl_ok(
            &[
                "patch",
                "pod",
                name,
                "-n",
                namespace,
                "--subresource=status",
                "--type=merge",
                "-p",
                &format!("{{\"status\":{{\"phase\":\"{phase}\"}}}}"),
            ],
            None,
        );
    }

    /// A token of service account `namespace/name` from the TokenRequest API, for `audience`
    /// (None: the API server's own), bound to a pod when `pod` is given (its name; the API server
    /// fills in its uid), as the kubelet projects it.
    pub fn token(
        &self,
        namespace: &str,
        name: &str,
        audience: Option<&str>,
        pod: Option<&str>,
    ) -> String {
        let mut args = vec!["create", "token", name, "-n", namespace, "--duration=1h"];
        if let Some(a) = audience {
            args.extend(["--audience", a]);
        }
        if let Some(p) = pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", p]);
        }
        self.kubectl_ok(&args, None).trim().to_string()
    }

    /// A kubeconfig (0600) that authenticates with `token` only, as a pod's service account
    /// does; written as `<name>.kubeconfig` beside the server's files.
    pub fn kubeconfig_for_token(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        write_kubeconfig(&path, &self.url, &self.ca_file, &format!("token: {token}"));
        path
    }
}

impl KubeApiServer {
    /// A kube client that acts as service account `namespace/name`, with a token from the
    /// TokenRequest API (what the pod of a component mounts).
    pub async fn client_as(&self, namespace: &str, name: &str) -> kube::Client {
        let token = self.token(namespace, name, None, None);
        client(&self.kubeconfig_for_token(&format!("{namespace}-{name}"), &token)).await
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        // Before etcd (dropped after this), or it retries etcd noisily until killed.
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
    }
}

/// Runs `kubectl --kubeconfig KUBECONFIG ARGS`.
pub fn kubectl_with(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("kubectl is required for these tests (with kustomize; it is on the project's machine image)");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes())
            .expect("write kubectl's stdin");
    }
    child.wait_with_output().expect("kubectl")
}

/// A kube client from a kubeconfig file, as `KUBECONFIG` gives one to our binaries.
pub async fn client(kubeconfig: &Path) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .expect("a client config from the kubeconfig");
    kube::Client::try_from(config).expect("a kube client")
}

fn write_kubeconfig(path: &Path, url: &str, ca: &Path, user: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: user\n  user:\n    {user}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\ncurrent-context: test\n",
        ca = ca.display()
    );
    crate::write_private(path, text.as_bytes());
}

/// The API server's certificates and keys (P-256), as files.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    /// Signs service-account tokens; `sa_pub` verifies them.
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        use std::os::unix::fs::PermissionsExt;
        let write = |name: &str, data: &str, mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, data).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            p
        };
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fedmesh test cluster CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate().expect("key");
        let mut p =
            CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).expect("names");
        p.distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = p.signed_by(&key, &issuer).expect("server cert");
        let server_key = write("server.key", &key.serialize_pem(), 0o600);

        // The API server takes O= as the user's groups and CN= as its name.
        let admin_key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        p.distinguished_name.push(DnType::CommonName, "admin");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin = p.signed_by(&admin_key, &issuer).expect("admin cert");

        let sa = KeyPair::generate().expect("key");
        Self {
            ca: write("ca.crt", &ca.pem(), 0o644),
            server_cert: write("server.crt", &server.pem(), 0o644),
            server_key,
            admin_cert: write("admin.crt", &admin.pem(), 0o644),
            admin_key: write("admin.key", &admin_key.serialize_pem(), 0o600),
            sa_key: write("sa.key", &sa.serialize_pem(), 0o600),
            sa_pub: write("sa.pub", &sa.public_key_pem(), 0o644),
        }
    }
}
