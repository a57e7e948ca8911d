#!/usr/bin/env bash
# Smoke test of the kind clusterset (up.sh runs it last; run it alone any time): from the frontend
# pod in east (and in central) call the sample service that only west exports, by its clusterset
# name, and check the answer: it must come from cluster west and name the caller's SPIFFE ID of
# its own trust domain, as west's sidecar saw it through end-to-end mTLS (the path is frontend ->
# frontend's sidecar -> west's east-west gateway (SNI passthrough) -> api's sidecar -> api).
#
#   deploy/multicluster/smoke.sh
#   SMOKE_FROM=east SMOKE_TIMEOUT=60 deploy/multicluster/smoke.sh
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

need kubectl "see https://kubernetes.io/docs/tasks/tools/"
URL=http://api.shop.svc.clusterset.local/smoke
EXPECT_CLUSTER=west
# Seconds to wait for the export to reach every cluster (hub, DNS, sidecar configuration).
TIMEOUT=${SMOKE_TIMEOUT:-180}
read -r -a FROM <<<"${SMOKE_FROM:-east central}"

# json_field NAME JSON: a string field of the sample app's one-line JSON answer.
json_field() {
  printf '%s\n' "$2" | sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" | head -n 1
}

diagnose() { # FROM-CLUSTER
  echo "--- the hub's view: fedmesh explain shop/api --from $1" >&2
  kc "$HUB_CLUSTER" -n "$NS" exec deploy/fedmesh-hub -c hub -- \
    fedmesh explain shop/api --from "$1" >&2 || true
  echo "--- ServiceImport in $1" >&2
  kc "$1" -n shop get serviceimports -o wide >&2 || true
  echo "--- the caller's sidecar routing table (admin /config)" >&2
  kc "$1" -n shop exec deploy/frontend -c app -- \
    curl -sS --max-time 5 http://127.0.0.1:15020/config >&2 || true
  echo >&2
  echo "More: README.md, Troubleshooting." >&2
}

check_from() { # FROM-CLUSTER
  local from=$1 caller_want out cluster caller deadline
  caller_want="spiffe://$from.fedmesh.test/ns/shop/sa/frontend"
  deadline=$((SECONDS + TIMEOUT))
  while :; do
    out=$(kc "$from" -n shop exec deploy/frontend -c app -- \
      curl -sS -i --max-time 5 "$URL" 2>&1) || true
    cluster=$(json_field cluster "$out")
    caller=$(json_field caller "$out")
    if [ "$cluster" = "$EXPECT_CLUSTER" ] && [ "$caller" = "$caller_want" ]; then
      echo "ok: $from -> $URL answered by cluster $cluster ($(json_field zone "$out")), caller $caller" >&2
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      {
        echo "FAIL: $from -> $URL"
        echo "  want: cluster $EXPECT_CLUSTER, caller $caller_want"
        echo "  got:  cluster '${cluster}', caller '${caller}'"
        echo "--- last answer (a fedmesh-proxy-error header means the sidecar answered, not the app)"
        printf '%s\n' "$out"
      } >&2
      diagnose "$from"
      return 1
    fi
    sleep 5
  done
}

failed=0
for from in "${FROM[@]}"; do
  check_from "$from" || failed=1
done
if [ "$failed" != 0 ]; then
  die "smoke test failed"
fi
echo "smoke test passed" >&2
