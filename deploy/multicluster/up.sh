#!/usr/bin/env bash
# Brings up the fedmesh clusterset on kind: three clusters (east, west, central), the federation
# hub in east, a control plane, node agents and an east-west gateway in each, the sample app with
# injected sidecars, then runs smoke.sh. Running it again keeps what exists (clusters, join
# tokens, data) and re-applies the manifests.
#
#   deploy/multicluster/up.sh
#   SKIP_BUILD=1 deploy/multicluster/up.sh     # reuse the fedmesh:dev image already built
#   HUB_OVERLAY=hub-etcd deploy/multicluster/up.sh   # the hub's state in etcd
#   KIND_NODE_IMAGE=kindest/node:v1.31.x deploy/multicluster/up.sh   # pin the Kubernetes version
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

HUB_OVERLAY=${HUB_OVERLAY:-hub}
TIMEOUT=${TIMEOUT:-240s}

need docker "see https://docs.docker.com/engine/install/"
need kind "v0.24 or newer: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "see https://kubernetes.io/docs/tasks/tools/"
docker info >/dev/null 2>&1 ||
  die "docker is installed but does not answer: start it, or let this user use it (group docker)"
[ -d "$HERE/overlays/$HUB_OVERLAY" ] || die "HUB_OVERLAY=$HUB_OVERLAY: no $HERE/overlays/$HUB_OVERLAY"

# --- 1. clusters -------------------------------------------------------------------------------
kind_args=()
if [ -n "${KIND_NODE_IMAGE:-}" ]; then
  kind_args+=(--image "$KIND_NODE_IMAGE")
fi
for c in "${CLUSTERS[@]}"; do
  if cluster_exists "$c"; then
    say "kind cluster $c exists; keeping it"
  else
    say "creating kind cluster $c"
    kind create cluster --name "$c" --config "$HERE/kind/$c.yaml" --wait 180s \
      ${kind_args[@]+"${kind_args[@]}"}
  fi
done

# --- 2. the image ------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  docker image inspect "$IMAGE" >/dev/null 2>&1 || die "SKIP_BUILD=1, but there is no image $IMAGE"
else
  say "building $IMAGE (the first build compiles fedmesh in release mode: allow several minutes)"
  DOCKER_BUILDKIT=1 docker build -f "$HERE/Dockerfile" -t "$IMAGE" "$ROOT"
fi
for c in "${CLUSTERS[@]}"; do
  say "loading $IMAGE into $c"
  kind load docker-image "$IMAGE" --name "$c"
done

# --- 3. the hub, in east -----------------------------------------------------------------------
say "installing the hub in $HUB_CLUSTER (overlays/$HUB_OVERLAY)"
kc "$HUB_CLUSTER" apply -k "$HERE/overlays/$HUB_OVERLAY"
kc "$HUB_CLUSTER" -n "$NS" rollout status deploy/fedmesh-hub --timeout="$TIMEOUT"
HUB_ADDR="$(node_ip "$HUB_CLUSTER"):$HUB_NODE_PORT"
[ "$HUB_ADDR" != ":$HUB_NODE_PORT" ] || die "cannot find the address of node $HUB_CLUSTER-control-plane"

# apply_secret CLUSTER NAME VALUE: a Secret with the key `token`, created or updated. The value
# goes through stdin, never onto a command line.
apply_secret() {
  [ -n "$3" ] || die "$1: refusing to store an empty $2"
  printf '%s' "$3" |
    kc "$1" -n "$NS" create secret generic "$2" --from-file=token=/dev/stdin \
      --dry-run=client -o yaml |
    kc "$1" label --local -f - -o yaml app.kubernetes.io/part-of=fedmesh |
    kc "$1" apply -f -
}

# Clusterset names for the cluster's pods: CoreDNS forwards clusterset.local to the control
# plane's DNS (fedmesh-control-plane Service, port 53). Replaces the block it added before.
configure_dns() {
  local c=$1 ip old new
  ip=$(kc "$c" -n "$NS" get svc fedmesh-control-plane -o jsonpath='{.spec.clusterIP}')
  [ -n "$ip" ] || die "$c: the fedmesh-control-plane Service has no cluster IP"
  old=$(kc "$c" -n kube-system get configmap coredns -o jsonpath='{.data.Corefile}')
  new=$(printf '%s\n' "$old" | sed '/^# fedmesh:begin/,/^# fedmesh:end/d')
  new+="
# fedmesh:begin (deploy/multicluster/up.sh) clusterset names from the fedmesh control plane
clusterset.local:53 {
    errors
    cache 5
    forward . $ip:53
}
# fedmesh:end"
  if [ "$new" = "$old" ]; then
    return
  fi
  say "$c: CoreDNS forwards clusterset.local to the control plane ($ip)"
  printf '%s\n' "$new" |
    kc "$c" -n kube-system create configmap coredns --from-file=Corefile=/dev/stdin \
      --dry-run=client -o yaml |
    kc "$c" apply --server-side --force-conflicts --field-manager=fedmesh-up -f -
  kc "$c" -n kube-system rollout restart deploy/coredns
  kc "$c" -n kube-system rollout status deploy/coredns --timeout="$TIMEOUT"
}

# Deletes a component's pods that are not ready, so they start again now instead of after a
# crash-loop back-off (they were waiting for something this script just created).
restart_unready() { # CLUSTER NAME
  local names
  names=$(kc "$1" -n "$NS" get pods -l "app.kubernetes.io/name=$2" \
    -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
    awk '$2 != "True" {print $1}')
  if [ -n "$names" ]; then
    # shellcheck disable=SC2086 # one pod name per word
    kc "$1" -n "$NS" delete pod --wait=false $names
  fi
}

# --- 4. one control plane, agents and gateway per cluster ---------------------------------------
for c in "${CLUSTERS[@]}"; do
  say "cluster $c: CRDs, namespace, addresses, join token"
  # CRDs first: the control plane publishes nothing until its watchers have listed all of them.
  kc "$c" apply -k "$HERE/base/crds"
  kc "$c" wait --for condition=established --timeout=60s \
    crd/serviceexports.multicluster.x-k8s.io crd/serviceimports.multicluster.x-k8s.io \
    crd/trafficpolicies.fedmesh.io crd/authorizationpolicies.fedmesh.io \
    crd/peerauthentications.fedmesh.io crd/requestauthentications.fedmesh.io \
    crd/federatedtrustdomains.fedmesh.io
  kc "$c" apply -k "$HERE/base/namespace"

  gateway="$(node_ip "$c"):$GATEWAY_NODE_PORT"
  changed=$(kc "$c" -n "$NS" create configmap fedmesh-federation \
    --from-literal=hub="$HUB_ADDR" --from-literal=gateway="$gateway" --dry-run=client -o yaml |
    kc "$c" label --local -f - -o yaml app.kubernetes.io/part-of=fedmesh |
    kc "$c" apply -f -)
  echo "$changed"

  # One-time join token, only while the cluster has none: a control plane that joined keeps its
  # hub credentials on its volume and never needs another.
  if kc "$c" -n "$NS" get secret fedmesh-join-token >/dev/null 2>&1; then
    echo "secret/fedmesh-join-token exists; keeping it"
  else
    # The hub's CLI defaults reach its own admin API (http://127.0.0.1:7080) with its admin
    # token file (/var/lib/fedmesh/hub/admin-token), so no admin secret leaves the hub's pod.
    join_token=$(kc "$HUB_CLUSTER" -n "$NS" exec deploy/fedmesh-hub -c hub -- \
      fedmesh hub token create --cluster "$c" --trust-domain "$c.fedmesh.test")
    apply_secret "$c" fedmesh-join-token "$join_token"
    unset join_token
  fi

  say "cluster $c: control plane (hub $HUB_ADDR, gateway $gateway)"
  kc "$c" apply -k "$HERE/overlays/$c"
  if [[ $changed == *configured* ]]; then
    # The addresses are read at start (environment); a changed one needs a restart.
    kc "$c" -n "$NS" rollout restart deploy/fedmesh-control-plane
  fi
  kc "$c" -n "$NS" rollout status deploy/fedmesh-control-plane --timeout="$TIMEOUT"

  say "cluster $c: agents (joining with their pods' service-account tokens), gateway"
  # The agents mount the trust bundle the control plane publishes; wait for it rather than for
  # the kubelet's retry of a missing ConfigMap.
  for _ in $(seq 1 30); do
    kc "$c" -n "$NS" get configmap fedmesh-ca-bundle >/dev/null 2>&1 && break
    sleep 2
  done
  kc "$c" -n "$NS" get configmap fedmesh-ca-bundle >/dev/null 2>&1 ||
    die "$c: the control plane published no ConfigMap fedmesh-ca-bundle; see: kubectl --context kind-$c -n $NS logs deploy/fedmesh-control-plane"
  restart_unready "$c" fedmesh-agent
  kc "$c" -n "$NS" rollout status ds/fedmesh-agent --timeout="$TIMEOUT"
  restart_unready "$c" fedmesh-gateway
  kc "$c" -n "$NS" rollout status deploy/fedmesh-gateway --timeout="$TIMEOUT"

  configure_dns "$c"
done

# --- 5. the sample app, injected by the control plane's webhook (namespace shop is labelled
# fedmesh.io/inject=enabled) ---------------------------------------------------------------------
for c in "${CLUSTERS[@]}"; do
  say "cluster $c: sample app (sample/$c, injected by the webhook)"
  kc "$c" apply -k "$HERE/sample/$c"
done
for c in "${CLUSTERS[@]}"; do
  kc "$c" -n shop wait --for=condition=Available deploy --all --timeout="$TIMEOUT"
done

# --- 6. smoke test -----------------------------------------------------------------------------
"$HERE/smoke.sh"

cat >&2 <<EOF

The clusterset is up: kubectl contexts kind-east, kind-west, kind-central.
  hub status:   kubectl --context kind-$HUB_CLUSTER -n $NS exec deploy/fedmesh-hub -- fedmesh status
  explain:      kubectl --context kind-$HUB_CLUSTER -n $NS exec deploy/fedmesh-hub -- fedmesh explain shop/api --from east
  call api:     kubectl --context kind-east -n shop exec deploy/frontend -c app -- curl -s http://api.shop.svc.clusterset.local/
  tear down:    $HERE/down.sh
EOF
