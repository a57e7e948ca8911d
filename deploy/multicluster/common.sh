# Shared by up.sh, down.sh and smoke.sh (sourced, not run).
# The variables are used by the scripts that source this file.
# shellcheck shell=bash disable=SC2034

# The clusterset: three kind clusters, one per region. The hub runs in the first.
CLUSTERS=(east west central)
HUB_CLUSTER=east
# Where the control plane, the agents, the gateway and the hub run.
NS=fedmesh-system
# The image every component runs (one binary); `fedmesh inject` defaults to the same tag.
IMAGE=${FEDMESH_IMAGE:-fedmesh:dev}
# Fixed NodePorts (base/hub/hub.yaml, base/gateway/gateway.yaml): with them, a node's docker
# address is all another cluster needs to reach the hub or a gateway.
HUB_NODE_PORT=30743
GATEWAY_NODE_PORT=31443

say() { printf '\n==> %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# need COMMAND WHERE-TO-GET-IT
need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is not installed; $2"
}

# kc CLUSTER KUBECTL-ARGS...: kubectl against one kind cluster (kind names the context kind-NAME).
kc() {
  local c=$1
  shift
  kubectl --context "kind-$c" "$@"
}

# The docker-network address of a cluster's control-plane node: reachable from every other kind
# cluster's nodes and pods, so NodePorts on it are the cross-cluster entry points.
node_ip() {
  kc "$1" get node "$1-control-plane" \
    -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'
}

cluster_exists() {
  kind get clusters 2>/dev/null | grep -qx "$1"
}
