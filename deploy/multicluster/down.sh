#!/usr/bin/env bash
# Deletes the kind clusters up.sh created (and with them everything in them). The fedmesh:dev
# image stays in docker; `docker image rm fedmesh:dev` removes it.
#
#   deploy/multicluster/down.sh
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

need kind "v0.24 or newer: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need docker "see https://docs.docker.com/engine/install/"

for c in "${CLUSTERS[@]}"; do
  if cluster_exists "$c"; then
    say "deleting kind cluster $c"
    kind delete cluster --name "$c"
  else
    echo "kind cluster $c does not exist" >&2
  fi
done
