//! A clusterset built from [`Net`]'s namespaces: the hub on the WAN, each cluster's node with its
//! control plane, agent and gateway, and pods with their sidecars and apps.

use super::*;

/// One cluster: its node namespace and the addresses of its parts.
pub struct ClusterNet {
    pub name: String,
    pub index: u8,
    pub region: String,
    pub trust_domain: String,
    pub node: String,
    pub wan_ip: Ipv4Addr,
    pub node_ip: Ipv4Addr,
    pub objects: PathBuf,
    pub agent_socket: PathBuf,
    /// Service accounts with their uids (the agent's registration entries).
    pub accounts: Vec<(String, u32)>,
    /// The control plane's and the gateway's process indexes in [`Net::procs`].
    pub control_plane: usize,
    pub gateway: usize,
    /// Every gateway replica's process index (the first is [`ClusterNet::gateway`]).
    pub gateways: Vec<usize>,
    cp_args: Vec<String>,
    gateway_args: Vec<String>,
    next_pod: u8,
}

impl ClusterNet {
    pub fn gateway(&self) -> SocketAddr {
        SocketAddr::from((self.wan_ip, GATEWAY_PORT))
    }
    pub fn dns(&self) -> SocketAddr {
        SocketAddr::from((self.node_ip, 53))
    }
    /// The gateway's admin port (on the node's bridge).
    pub fn gateway_admin(&self) -> SocketAddr {
        self.gateway_replica_admin(0)
    }

    /// Gateway replica `k`'s admin port.
    pub fn gateway_replica_admin(&self, k: u16) -> SocketAddr {
        SocketAddr::from((self.node_ip, GATEWAY_ADMIN + k))
    }

    /// The control plane's `--data-dir` (its CA and admin socket are inside).
    pub fn control_plane_data(&self) -> &str {
        let i = self.cp_args.iter().position(|a| a == "--data-dir").unwrap();
        &self.cp_args[i + 1]
    }

    /// Connections gateway replica `k` has admitted (`sni_connections_total`, all outcomes).
    pub fn gateway_connections(&self, k: u16) -> u64 {
        let admin = self.gateway_replica_admin(k);
        let (_, metrics) = in_ns(&self.node, || {
            http_get(admin, "/metrics", "x").expect("the gateway's admin port")
        });
        metrics
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains("sni_connections_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
    pub fn uid_of(&self, account: &str) -> u32 {
        self.accounts
            .iter()
            .find(|(a, _)| a == account)
            .unwrap_or_else(|| panic!("no account {account} in {}", self.name))
            .1
    }
    /// Writes (or replaces) an object file of the cluster's directory source.
    pub fn write(&self, file: &str, yaml: &str) {
        let tmp = self.objects.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.objects.join(file)).unwrap();
    }
}

/// A pod: its own namespace with the app and the sidecar, intercepted by iptables.
pub struct Pod {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub name: String,
    pub app: Option<usize>,
    pub sidecar: usize,
}

impl Pod {
    pub fn app_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, APP_PORT))
    }
}

/// The hub and the WAN.
pub struct Mesh {
    pub net: Net,
    pub wan: String,
    hub_data: PathBuf,
    /// The hub's process index in [`Net::procs`] (with two replicas: replica a).
    pub hub: usize,
    hub_args: Vec<String>,
    /// With [`Mesh::start_with_etcd_replicas`]: replica b's process index and flags.
    pub hub_b: Option<usize>,
    hub_b_args: Vec<String>,
    /// What control planes are given as `--hub`.
    hub_addrs: String,
    /// The etcd the replicas share, running in the WAN namespace.
    etcd: Option<fedmesh_test_support::EtcdServer>,
    /// More flags for every control plane of a cluster added from now on.
    pub control_plane_args: Vec<String>,
}

impl Mesh {
    pub fn start(dir: &Path) -> Mesh {
        Self::start_with_hub_args(dir, &[])
    }

    /// [`Mesh::start`] with more flags for the hub.
    pub fn start_with_hub_args(dir: &Path, hub_args: &[&str]) -> Mesh {
        let mut mesh = Self::wan_only(dir);
        let data = mesh.hub_data.to_str().unwrap().to_string();
        let (g, a) = (
            format!("{HUB_IP}:{HUB_GRPC}"),
            format!("{HUB_IP}:{HUB_ADMIN}"),
        );
        let mut args = vec![
            "hub",
            "--data-dir",
            &data,
            "--listen",
            &g,
            "--admin-listen",
            &a,
        ];
        args.extend_from_slice(hub_args);
        mesh.hub_args = args.iter().map(|a| a.to_string()).collect();
        mesh.start_hub();
        mesh
    }

    /// The hub as two replicas on one etcd (secured, in the WAN namespace): replica a on the
    /// usual ports, replica b on the next ones ([`HUB_ADMIN_B`]); control planes are given both.
    pub fn start_with_etcd_replicas(dir: &Path) -> Mesh {
        let mut mesh = Self::wan_only(dir);
        let etcd = in_ns(&mesh.wan, fedmesh_test_support::EtcdServer::start_secure);
        let token = mesh.hub_data.join("admin-token");
        let replica = |name: &str, grpc: u16, admin: u16| {
            super::super::federation::etcd_replica_args(
                &etcd,
                dir,
                name,
                &token,
                &format!("{HUB_IP}:{grpc}"),
                &format!("{HUB_IP}:{admin}"),
            )
        };
        std::fs::create_dir_all(&mesh.hub_data).unwrap();
        mesh.hub_args = replica("hub-a", HUB_GRPC, HUB_ADMIN);
        mesh.hub_b_args = replica("hub-b", HUB_GRPC + 1, HUB_ADMIN_B);
        mesh.hub_addrs = format!("{HUB_IP}:{HUB_GRPC},{HUB_IP}:{}", HUB_GRPC + 1);
        mesh.etcd = Some(etcd);
        mesh.start_hub();
        // The second replica starts once the first has made the shared CA and admin token.
        mesh.start_hub_b();
        mesh
    }

    /// The WAN bridge and no hub yet.
    fn wan_only(dir: &Path) -> Mesh {
        let mut net = Net::new(dir);
        let wan = net.add_ns("wan");
        net.ip(&wan, &["link", "add", "wan", "type", "bridge"]);
        net.ip(
            &wan,
            &["addr", "add", &format!("{HUB_IP}/24"), "dev", "wan"],
        );
        net.ip(&wan, &["link", "set", "wan", "up"]);
        Mesh {
            net,
            wan,
            hub_data: dir.join("hub"),
            hub: usize::MAX,
            hub_args: Vec::new(),
            hub_b: None,
            hub_b_args: Vec::new(),
            hub_addrs: format!("{HUB_IP}:{HUB_GRPC}"),
            etcd: None,
            control_plane_args: Vec::new(),
        }
    }

    /// Starts hub replica b (again: the one before must have exited).
    pub fn start_hub_b(&mut self) {
        let name = format!("hub-b-{}", self.net.procs.len());
        let args: Vec<&str> = self.hub_b_args.iter().map(String::as_str).collect();
        self.hub_b = Some(self.net.spawn(&self.wan, &name, None, &args));
        wait_admin(&self.wan, HUB_ADMIN_B);
    }

    /// Starts the hub (again: the one before must have exited) on its data directory, and waits
    /// for its admin API.
    pub fn start_hub(&mut self) {
        let name = match self.hub {
            usize::MAX => "hub".to_string(),
            _ => format!("hub-{}", self.net.procs.len()),
        };
        let args: Vec<&str> = self.hub_args.iter().map(String::as_str).collect();
        self.hub = self.net.spawn(&self.wan, &name, None, &args);
        let wan = self.wan.clone();
        wait_until("the hub's admin API", Duration::from_secs(30), || {
            in_ns(&wan, || {
                TcpStream::connect_timeout(
                    &SocketAddr::from((HUB_IP, HUB_ADMIN)),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
        });
    }

    /// Takes cluster `c`'s WAN link down (`up: false`) or brings it back: a partition.
    pub fn set_wan_link(&self, c: &ClusterNet, up: bool) {
        let state = if up { "up" } else { "down" };
        self.net.ip(
            &self.wan,
            &["link", "set", &format!("to-{}", c.name), state],
        );
    }

    /// A GET on the hub's admin API (with its admin token), from the WAN: (status, body).
    pub fn hub_admin_get(&self, path: &str) -> (u16, String) {
        let token = std::fs::read_to_string(self.hub_data.join("admin-token"))
            .expect("the hub's admin token")
            .trim()
            .to_string();
        let path = path.to_string();
        in_ns(&self.wan, move || {
            http_get_with(
                SocketAddr::from((HUB_IP, HUB_ADMIN)),
                &path,
                "hub",
                &[("Authorization".into(), format!("Bearer {token}"))],
            )
            .expect("the hub's admin API answers")
        })
    }

    /// Runs `fedmesh ARGS --admin <hub> --admin-token-file <its token>` from the WAN: stdout.
    pub fn fedmesh_admin(&self, args: &[&str]) -> String {
        let out = self.fedmesh_admin_unchecked(args);
        assert!(
            out.status.success(),
            "fedmesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// [`Mesh::fedmesh_admin`], whether it succeeds or not.
    pub fn fedmesh_admin_unchecked(&self, args: &[&str]) -> Output {
        self.fedmesh_admin_at(HUB_ADMIN, args)
    }

    /// [`Mesh::fedmesh_admin_unchecked`] through the replica whose admin port is `port`.
    pub fn fedmesh_admin_at(&self, port: u16, args: &[&str]) -> Output {
        let admin = format!("http://{HUB_IP}:{port}");
        let token_file = self.hub_data.join("admin-token");
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--admin",
            &admin,
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ]);
        self.net.exec_unchecked(&self.wan, fedmesh_bin(), &all)
    }

    fn join_token(&self, cluster: &str, trust_domain: &str) -> String {
        let admin = format!("http://{HUB_IP}:{HUB_ADMIN}");
        let token_file = self.hub_data.join("admin-token");
        let out = self.net.exec(
            &self.wan,
            fedmesh_bin(),
            &[
                "hub",
                "token",
                "create",
                "--cluster",
                cluster,
                "--trust-domain",
                trust_domain,
                "--admin",
                &admin,
                "--admin-token-file",
                token_file.to_str().unwrap(),
            ],
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A real OTLP collector on the WAN (rotel, [`super::otlp`]); every proxy started after
    /// this sends it all its spans. Returns the collector's process index (its log holds the
    /// spans).
    pub fn start_collector(&mut self) -> usize {
        let args = super::super::otlp::rotel_args(&format!("{HUB_IP}:4317"));
        let rotel = super::super::otlp::rotel_bin();
        let idx = self
            .net
            .spawn_program(&self.wan.clone(), "collector", &rotel, &args);
        self.send_spans_to_wan_otlp("the collector's");
        idx
    }

    /// Jaeger (all-in-one, in-memory storage) on the WAN: its OTLP receivers on `HUB_IP:4317`
    /// (gRPC) and `:4318` (HTTP), its query API on `HUB_IP:16686`. Returns its process index.
    pub fn start_jaeger(&mut self, jaeger: &Path) -> usize {
        // Jaeger's listeners bind JAEGER_LISTEN_HOST (localhost by default); the query API binds
        // every address of the WAN namespace, which only this test's namespaces can reach.
        let args = [
            format!("JAEGER_LISTEN_HOST={HUB_IP}"),
            jaeger.display().to_string(),
        ];
        let idx = self
            .net
            .spawn_program(&self.wan.clone(), "jaeger", "/usr/bin/env", &args);
        let wan = self.wan.clone();
        wait_until("Jaeger's query API", Duration::from_secs(30), || {
            in_ns(&wan, || {
                TcpStream::connect_timeout(
                    &SocketAddr::from((HUB_IP, 16686)),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
        });
        idx
    }

    /// Waits for an OTLP/gRPC receiver on `HUB_IP:4317` and points the proxies started from now
    /// on at it, sampling as their caller says, with the resource the injector would give.
    fn send_spans_to_wan_otlp(&mut self, whose: &str) {
        let wan = self.wan.clone();
        wait_until(
            &format!("{whose} OTLP port"),
            Duration::from_secs(30),
            || {
                in_ns(&wan, || {
                    TcpStream::connect_timeout(
                        &SocketAddr::from((HUB_IP, 4317)),
                        Duration::from_millis(200),
                    )
                    .is_ok()
                })
            },
        );
        self.net.env.extend([
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://{HUB_IP}:4317"),
            ),
            ("OTEL_TRACES_SAMPLER".into(), "parentbased_always_on".into()),
            // As the injector sets it from the downward API (k8s.pod.name=$(FEDMESH_NODE),...).
            (
                "OTEL_RESOURCE_ATTRIBUTES".into(),
                "k8s.node.name=netns-node,deployment.environment.name=test".into(),
            ),
        ]);
    }

    /// Cluster number `index` (1..): node namespace on the WAN, its control plane joined to the
    /// hub, its node agent (entries for `accounts` in namespace `shop`, and the gateway) and its
    /// east-west gateway.
    pub fn add_cluster(
        &mut self,
        index: u8,
        name: &str,
        region: &str,
        accounts: &[&str],
    ) -> ClusterNet {
        self.add_cluster_with_gateways(index, name, region, accounts, 1)
    }

    /// [`Mesh::add_cluster`] with `replicas` east-west gateways, each on its own port of the
    /// node's WAN address (15443, 15444, ...) and published by the control plane.
    pub fn add_cluster_with_gateways(
        &mut self,
        index: u8,
        name: &str,
        region: &str,
        accounts: &[&str],
        replicas: u16,
    ) -> ClusterNet {
        let net = &mut self.net;
        let node = net.add_ns(name);
        let wan_ip = Ipv4Addr::new(10, 250, 0, 10 + index);
        let node_ip = Ipv4Addr::new(10, 100 + index, 0, 1);
        net.veth(&node, "wan0", &self.wan, &format!("to-{name}"));
        net.ip(
            &self.wan,
            &["link", "set", &format!("to-{name}"), "master", "wan"],
        );
        net.ip(
            &node,
            &["addr", "add", &format!("{wan_ip}/24"), "dev", "wan0"],
        );
        net.ip(&node, &["link", "add", "br0", "type", "bridge"]);
        net.ip(
            &node,
            &["addr", "add", &format!("{node_ip}/24"), "dev", "br0"],
        );
        net.ip(&node, &["link", "set", "br0", "up"]);
        // Pods go out masqueraded; nothing new comes in from the WAN except to the node itself.
        net.sysctl(&node, "net.ipv4.ip_forward", "1");
        let pods = format!("10.{}.0.0/24", 100 + index);
        net.exec(
            &node,
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &pods,
                "-o",
                "wan0",
                "-j",
                "MASQUERADE",
            ],
        );
        net.exec(
            &node,
            "iptables",
            &[
                "-A",
                "FORWARD",
                "-i",
                "wan0",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
        );
        net.exec(
            &node,
            "iptables",
            &["-A", "FORWARD", "-i", "wan0", "-j", "DROP"],
        );

        let data = net.dir.join(name);
        let objects = data.join("objects");
        std::fs::create_dir_all(&objects).unwrap();
        let trust_domain = format!("{name}.fedmesh.test");
        let token_file = data.join("join-token");
        super::super::write_secret(&token_file, &self.join_token(name, &trust_domain));
        let cp_data = data.join("control-plane");
        let (cp_listen, dns, gw) = (
            format!("{node_ip}:{CP_PORT}"),
            format!("{node_ip}:53"),
            format!("{wan_ip}:{GATEWAY_PORT}"),
        );
        let hub = self.hub_addrs.clone();
        let net = &mut self.net;
        let cp_args: Vec<String> = [
            "control-plane",
            "--cluster",
            name,
            "--trust-domain",
            &trust_domain,
            "--region",
            region,
            "--data-dir",
            cp_data.to_str().unwrap(),
            "--source",
            &format!("dir:{}", objects.display()),
            "--hub",
            &hub,
            "--join-token-file",
            token_file.to_str().unwrap(),
            "--listen",
            &cp_listen,
            "--dns-listen",
            &dns,
        ]
        .map(String::from)
        .to_vec();
        let mut cp_args = cp_args;
        cp_args.extend(self.control_plane_args.iter().cloned());
        for k in 0..replicas {
            cp_args.push("--gateway".into());
            cp_args.push(format!("{wan_ip}:{}", GATEWAY_PORT + k));
        }
        let control_plane =
            spawn_args(net, &node, &format!("{name}-control-plane"), None, &cp_args);
        let admin_socket = cp_data.join("admin.sock");
        wait_until(
            "the control plane's admin socket",
            Duration::from_secs(30),
            || admin_socket.exists(),
        );
        let mut uids = Vec::new();
        let mut entries = format!(
            "entries:\n  - spiffe_id: spiffe://{trust_domain}/ns/fedmesh-system/sa/east-west-gateway\n    selectors: [\"unix:uid:{GATEWAY_UID}\"]\n"
        );
        let mut ids = vec![format!(
            "spiffe://{trust_domain}/ns/fedmesh-system/sa/east-west-gateway"
        )];
        for (i, a) in accounts.iter().enumerate() {
            let uid = 2000 + i as u32;
            entries += &format!(
                "  - spiffe_id: spiffe://{trust_domain}/ns/shop/sa/{a}\n    selectors: [\"unix:uid:{uid}\"]\n"
            );
            ids.push(format!("spiffe://{trust_domain}/ns/shop/sa/{a}"));
            uids.push((a.to_string(), uid));
        }
        std::fs::write(data.join("entries.yaml"), entries).unwrap();
        // As an operator enrolls a node: its workloads' identities, then its one-time token.
        let node_name = format!("{name}-node");
        let cp_dir = cp_data.to_str().unwrap();
        for id in &ids {
            let out = net.exec(
                &node,
                fedmesh_bin(),
                &[
                    "control-plane",
                    "entry",
                    "create",
                    "--node",
                    &node_name,
                    "--spiffe-id",
                    id,
                    "--data-dir",
                    cp_dir,
                ],
            );
            assert!(
                out.status.success(),
                "entry create: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let agent_token = data.join("agent-token");
        let out = net.exec(
            &node,
            fedmesh_bin(),
            &[
                "control-plane",
                "token",
                "create",
                "--node",
                &node_name,
                "--out",
                agent_token.to_str().unwrap(),
                "--data-dir",
                cp_dir,
            ],
        );
        assert!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let agent_socket = data.join("agent.sock");
        net.spawn(
            &node,
            &format!("{name}-agent"),
            None,
            &[
                "agent",
                "--control-plane",
                &cp_listen,
                "--node",
                &node_name,
                "--join-token-file",
                agent_token.to_str().unwrap(),
                "--data-dir",
                data.join("agent").to_str().unwrap(),
                "--socket",
                agent_socket.to_str().unwrap(),
                "--entries",
                data.join("entries.yaml").to_str().unwrap(),
            ],
        );
        wait_until("the node agent's socket", Duration::from_secs(30), || {
            agent_socket.exists()
        });
        let wl = format!("unix:{}", agent_socket.display());
        let gateway_args: Vec<String> = [
            "gateway",
            "--control-plane",
            &cp_listen,
            "--workload-api",
            &wl,
            "--listen",
            &gw,
            "--admin",
            &format!("{node_ip}:{GATEWAY_ADMIN}"),
        ]
        .map(String::from)
        .to_vec();
        let mut c = ClusterNet {
            name: name.into(),
            index,
            region: region.into(),
            trust_domain,
            node,
            wan_ip,
            node_ip,
            objects,
            agent_socket,
            accounts: uids,
            control_plane,
            gateway: usize::MAX,
            gateways: Vec::new(),
            cp_args,
            gateway_args,
            next_pod: 10,
        };
        self.start_gateway(&mut c, &[]);
        for k in 1..replicas {
            self.start_gateway_replica(&mut c, k);
        }
        c
    }

    /// Starts gateway replica `k` (1..) of cluster `c`: the usual flags on port 15443 + k, its
    /// admin port on 15021 + k.
    pub fn start_gateway_replica(&mut self, c: &mut ClusterNet, k: u16) {
        let mut args = c.gateway_args.clone();
        for (flag, addr) in [
            ("--listen", SocketAddr::from((c.wan_ip, GATEWAY_PORT + k))),
            ("--admin", c.gateway_replica_admin(k)),
        ] {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1] = addr.to_string();
        }
        let name = format!("{}-gateway-replica-{k}", c.name);
        let i = spawn_args(&mut self.net, &c.node, &name, Some(GATEWAY_UID), &args);
        let admin = c.gateway_replica_admin(k);
        let (node, net) = (c.node.clone(), &mut self.net);
        wait_until(
            "a gateway replica's admin port",
            Duration::from_secs(30),
            || {
                assert!(
                    !net.procs[i].exited(),
                    "gateway replica {k} of {} exited",
                    c.name
                );
                in_ns(&node, || http_get(admin, "/healthz", "x").is_ok())
            },
        );
        c.gateways.push(i);
    }

    /// Starts the cluster's gateway (again) with its usual flags and `extra`, and waits for its
    /// admin port. The one before must have exited.
    pub fn start_gateway(&mut self, c: &mut ClusterNet, extra: &[&str]) {
        let mut args = c.gateway_args.clone();
        args.extend(extra.iter().map(|a| a.to_string()));
        let name = match c.gateway {
            usize::MAX => format!("{}-gateway", c.name),
            _ => format!("{}-gateway-{}", c.name, self.net.procs.len()),
        };
        c.gateway = spawn_args(&mut self.net, &c.node, &name, Some(GATEWAY_UID), &args);
        match c.gateways.first_mut() {
            Some(first) => *first = c.gateway,
            None => c.gateways.push(c.gateway),
        }
        let (node, admin) = (c.node.clone(), c.gateway_admin());
        let net = &mut self.net;
        let start = Instant::now();
        while !in_ns(&node, || http_get(admin, "/healthz", "x").is_ok()) {
            assert!(
                !net.procs[c.gateway].exited(),
                "the gateway of {} exited",
                c.name
            );
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the gateway of {} did not start",
                c.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the cluster's control plane again (the one before must have exited): same flags,
    /// same data directory.
    pub fn restart_control_plane(&mut self, c: &mut ClusterNet) {
        self.restart_control_plane_with(c, &[]);
    }

    /// [`Mesh::restart_control_plane`] with more flags, kept for later restarts.
    pub fn restart_control_plane_with(&mut self, c: &mut ClusterNet, extra: &[&str]) {
        c.cp_args.extend(extra.iter().map(|a| a.to_string()));
        let name = format!("{}-control-plane-{}", c.name, self.net.procs.len());
        c.control_plane = spawn_args(&mut self.net, &c.node, &name, None, &c.cp_args);
    }

    /// A pod of `account` in `zone`: namespace, veth to the node's bridge, iptables interception,
    /// the sample app (unless `app` is false) and the sidecar under the account's uid.
    pub fn add_pod(&mut self, c: &mut ClusterNet, account: &str, zone: &str, app: bool) -> Pod {
        self.add_pod_with(c, account, zone, app, &[])
    }

    /// [`Mesh::add_pod`] with more flags for the sidecar.
    pub fn add_pod_with(
        &mut self,
        c: &mut ClusterNet,
        account: &str,
        zone: &str,
        app: bool,
        sidecar_extra: &[&str],
    ) -> Pod {
        let pod_name = format!("{}-{account}-{}", c.name, c.next_pod);
        let ip = Ipv4Addr::new(10, 100 + c.index, 0, c.next_pod);
        c.next_pod += 1;
        let net = &mut self.net;
        let ns = net.add_ns(&format!("{}-{}", c.name, ip.octets()[3]));
        let host_if = format!("p{}", ip.octets()[3]);
        net.veth(&ns, "eth0", &c.node, &host_if);
        net.ip(&c.node, &["link", "set", &host_if, "master", "br0"]);
        net.ip(&ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        net.ip(
            &ns,
            &["route", "add", "default", "via", &c.node_ip.to_string()],
        );
        let uid = c.uid_of(account);
        // What the injected init container does in Kubernetes.
        net.exec(
            &ns,
            fedmesh_bin(),
            &[
                "iptables",
                "--proxy-uid",
                &uid.to_string(),
                "--exclude-inbound-ports",
                &SIDECAR_ADMIN.to_string(),
            ],
        );
        let app_proc =
            app.then(|| spawn_app(net, &ns, &format!("{pod_name}-app"), c, account, zone));
        let sidecar = self.start_sidecar(c, &ns, &pod_name, account, zone, sidecar_extra);
        Pod {
            ns,
            ip,
            name: pod_name,
            app: app_proc,
            sidecar,
        }
    }

    fn start_sidecar(
        &mut self,
        c: &ClusterNet,
        ns: &str,
        pod_name: &str,
        account: &str,
        zone: &str,
        extra: &[&str],
    ) -> usize {
        let uid = c.uid_of(account);
        let control_plane = format!("{}:{CP_PORT}", c.node_ip);
        let socket = format!("unix:{}", c.agent_socket.display());
        let admin = format!("0.0.0.0:{SIDECAR_ADMIN}");
        let mut args = vec![
            "sidecar",
            "--transparent",
            "--control-plane",
            &control_plane,
            "--workload-api",
            &socket,
            "--zone",
            zone,
            "--node",
            pod_name,
            "--admin",
            &admin,
        ];
        // Without a collector of their own, sidecars relay their app's spans to the hub
        // (tests/traces.rs); with one, the app would send there itself.
        if !self
            .net
            .env
            .iter()
            .any(|(k, _)| k == "OTEL_EXPORTER_OTLP_ENDPOINT")
        {
            args.extend(["--app-otlp", "127.0.0.1:4317"]);
        }
        args.extend_from_slice(extra);
        let idx = self
            .net
            .spawn(ns, &format!("{pod_name}-sidecar"), Some(uid), &args);
        let ns2 = ns.to_string();
        let net = &mut self.net;
        let start = Instant::now();
        loop {
            let ready = in_ns(&ns2, || {
                http_get(
                    SocketAddr::from(([127, 0, 0, 1], SIDECAR_ADMIN)),
                    "/healthz",
                    "x",
                )
                .is_ok()
            });
            if ready {
                break;
            }
            assert!(!net.procs[idx].exited(), "the sidecar of {pod_name} exited");
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the sidecar of {pod_name} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        idx
    }

    /// The pod's app and sidecar go away (sidecar drains first, as on a pod deletion).
    pub fn stop_pod(&mut self, pod: &Pod) {
        self.net.procs[pod.sidecar].terminate(Duration::from_secs(15));
        if let Some(a) = pod.app {
            self.net.procs[a].terminate(Duration::from_secs(5));
        }
    }

    /// Starts the pod's app and sidecar again, on the same address.
    pub fn restart_pod(&mut self, c: &ClusterNet, pod: &mut Pod, account: &str, zone: &str) {
        if pod.app.is_some() {
            let name = format!("{}-app2", pod.name);
            pod.app = Some(spawn_app(&mut self.net, &pod.ns, &name, c, account, zone));
        }
        self.restart_sidecar(c, pod, account, zone, &[]);
    }

    /// Starts the pod's sidecar again (the one before must have exited), with `extra` flags;
    /// waits until its admin port answers (not until it is ready).
    pub fn restart_sidecar(
        &mut self,
        c: &ClusterNet,
        pod: &mut Pod,
        account: &str,
        zone: &str,
        extra: &[&str],
    ) {
        let ns = pod.ns.clone();
        let name = format!("{}-{}", pod.name, self.net.procs.len());
        pod.sidecar = self.start_sidecar(c, &ns, &name, account, zone, extra);
    }
}

/// `fedmesh ARGS` in `ns` (as `uid`), from owned strings.
fn spawn_args(net: &mut Net, ns: &str, name: &str, uid: Option<u32>, args: &[String]) -> usize {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    net.spawn(ns, name, uid, &args)
}

/// The pod's app: `fedmesh sample-app` on :8080, answering as `account` in `c`, `zone`.
fn spawn_app(
    net: &mut Net,
    ns: &str,
    name: &str,
    c: &ClusterNet,
    account: &str,
    zone: &str,
) -> usize {
    net.spawn(
        ns,
        name,
        None,
        &[
            "sample-app",
            "--listen",
            &format!("0.0.0.0:{APP_PORT}"),
            "--name",
            account,
            "--cluster",
            &c.name,
            "--zone",
            zone,
        ],
    )
}

/// East (with a frontend pod) and west (exporting `api`) of a [`Mesh`], and the frontend's
/// answer to one request it sent to west's api with a W3C `traceparent` of trace `trace` under
/// the app's span `b7ad6b7169203331`.
pub struct TracedCall {
    pub east: ClusterNet,
    pub west: ClusterNet,
    pub frontend: Pod,
    pub api: Pod,
}

impl Mesh {
    /// Builds [`TracedCall`]'s two clusters and sends its request; panics unless it answers 200.
    pub fn traced_call(&mut self, trace: &str) -> TracedCall {
        use super::super::pods::{clusterset_ip, export, wait_answer_from};
        let mut east = self.add_cluster(1, "east", "us-east", &["frontend"]);
        let mut west = self.add_cluster(2, "west", "us-west", &["api"]);
        let api = self.add_pod(&mut west, "api", "us-west-1a", true);
        export(&west, "api", &[(&api, "us-west-1a")]);
        let frontend = self.add_pod(&mut east, "frontend", "us-east-1a", false);
        let ip = clusterset_ip(&frontend, &east, "api");
        let host = "api.shop.svc.clusterset.local";
        wait_answer_from(&frontend, ip, host, "west");
        let traceparent = format!("00-{trace}-b7ad6b7169203331-01");
        let (status, body) = super::in_ns(&frontend.ns, move || {
            super::http_get_with(
                SocketAddr::from((ip, 80)),
                "/",
                host,
                &[("traceparent".into(), traceparent)],
            )
            .unwrap()
        });
        assert_eq!(status, 200, "{body}");
        TracedCall {
            east,
            west,
            frontend,
            api,
        }
    }
}

/// The value of one series (name and labels as exposed) of a sidecar's `/metrics`, read in its
/// pod; 0 when absent.
pub fn admin_metric(pod: &Pod, series: &str) -> u64 {
    let metrics = admin_get(pod, "/metrics");
    let series = format!("{series} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The sum of every series of metric family `name` (all label sets) of a sidecar's `/metrics`.
pub fn admin_metric_sum(pod: &Pod, name: &str) -> u64 {
    admin_get(pod, "/metrics")
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
        .sum()
}

/// The sidecar's `/config` (what it routes by, the identity it holds and whom it trusts), read
/// in its pod.
pub fn admin_config(pod: &Pod) -> serde_json::Value {
    serde_json::from_str(&admin_get(pod, "/config")).expect("/config is JSON")
}

/// A GET to the sidecar's admin port, in its pod (loopback, as `/config` requires): the body.
fn admin_get(pod: &Pod, path: &str) -> String {
    let path = path.to_string();
    let (status, body) = in_ns(&pod.ns, move || {
        http_get(
            SocketAddr::from(([127, 0, 0, 1], SIDECAR_ADMIN)),
            &path,
            "x",
        )
        .expect("the sidecar's admin port")
    });
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until a hub's admin port (on the WAN) accepts connections.
fn wait_admin(wan: &str, port: u16) {
    wait_until("the hub's admin API", Duration::from_secs(30), || {
        in_ns(wan, || {
            TcpStream::connect_timeout(
                &SocketAddr::from((HUB_IP, port)),
                Duration::from_millis(200),
            )
            .is_ok()
        })
    });
}
