#!/usr/bin/env bash
# Offline check of the kind deployment: needs no docker, kind or cluster (scripts/check-deploy
# runs it). It
#   1. renders every kustomization directory with `kubectl kustomize` (components through the
#      overlays that use them);
#   2. with a built fedmesh binary (FEDMESH_BIN, else the newest target/{release,debug}/fedmesh; it
#      never builds), also renders the sample app as up.sh deploys it, through `fedmesh inject`;
#   3. validates every object against the Kubernetes schema (kubernetes-validate, strict) or, for
#      our CRDs' kinds, against base/crds/fedmesh-crds.yaml, and runs check.py's checks (hygiene,
#      references, fedmesh flags against src/, kind configs, entries, build context);
#   4. runs shellcheck on the scripts.
# Exits non-zero with a FAIL line per problem. kubernetes-validate is installed into a venv under
# ${TMPDIR:-/tmp} when python3 cannot import it. K8S_VERSION (default 1.31) picks the schema.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
K8S_VERSION=${K8S_VERSION:-1.31}
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0

fail() {
  printf 'check.sh: FAIL: %s\n' "$*" >&2
  exit 1
}
step() { printf '%s\n' "$*"; }

command -v kubectl >/dev/null || fail "kubectl is needed (for kubectl kustomize): https://kubernetes.io/docs/tasks/tools/"
command -v python3 >/dev/null || fail "python3 is needed"
if ! command -v shellcheck >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null; }; then
      fail "could not install shellcheck"
    fi
  else
    fail "shellcheck is needed: apt-get install shellcheck (or https://www.shellcheck.net)"
  fi
fi

# A Python that has kubernetes-validate (and with it PyYAML and jsonschema).
PYTHON=python3
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  venv=${TMPDIR:-/tmp}/fedmesh-check-venv
  if ! "$venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
    step "installing $KUBERNETES_VALIDATE into $venv"
    python3 -m venv "$venv" || fail "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE" ||
      fail "pip install $KUBERNETES_VALIDATE failed (is PyPI reachable?)"
  fi
  PYTHON=$venv/bin/python
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

step "1. kubectl kustomize"
dirs=0
while IFS= read -r k; do
  d=$(dirname "$k")
  r=${d#"$HERE"/}
  if grep -q '^kind: Component' "$k"; then
    # A Component cannot be built alone; check.py's overlays cover it (see the check below).
    grep -rqs --include=kustomization.yaml "components/$(basename "$d")" "$HERE/overlays" ||
      fail "component $r is used by no overlay, so nothing renders (and checks) it"
    step "  $r: component (rendered through the overlays that use it)"
    continue
  fi
  if ! kubectl kustomize "$d" >"$out/${r//\//__}.yaml" 2>"$out/error"; then
    cat "$out/error" >&2
    fail "kubectl kustomize $r"
  fi
  step "  $r: $(grep -c '^kind:' "$out/${r//\//__}.yaml") objects"
  dirs=$((dirs + 1))
done < <(find "$HERE" -name kustomization.yaml | sort)
[ "$dirs" -gt 0 ] || fail "no kustomization directories under $HERE"

step "2. fedmesh inject of the sample app"
bin=${FEDMESH_BIN:-}
if [ -z "$bin" ]; then
  for b in "$ROOT/target/release/fedmesh" "$ROOT/target/debug/fedmesh"; do
    if [ -x "$b" ] && { [ -z "$bin" ] || [ "$b" -nt "$bin" ]; }; then
      bin=$b
    fi
  done
fi
if [ -z "$bin" ]; then
  step "  skipped: no built fedmesh binary (set FEDMESH_BIN to check it)"
else
  [ -x "$bin" ] || fail "FEDMESH_BIN=$bin is not an executable"
  # A private copy: executing target/*/fedmesh in place could make a concurrent cargo build fail
  # to relink it (ETXTBSY).
  cp "$bin" "$out/fedmesh"
  if "$out/fedmesh" inject --help >/dev/null 2>&1; then
    for f in "$out"/sample__*.yaml; do
      name=$(basename "$f")
      injected=$out/injected__$name
      "$out/fedmesh" inject --image fedmesh:dev <"$f" >"$injected" || fail "$bin inject failed on $name"
    done
    step "  injected with $bin"
  else
    step "  skipped: $bin has no \`inject\` subcommand (an older build)"
  fi
  rm -f "$out/fedmesh"
fi

step "3. schemas (Kubernetes $K8S_VERSION, fedmesh CRDs) and consistency (check.py)"
"$PYTHON" "$HERE/check.py" --rendered "$out" --k8s-version "$K8S_VERSION" ||
  fail "manifests (see the FAIL lines above)"

step "4. shellcheck"
(cd "$HERE" && shellcheck -x up.sh down.sh smoke.sh check.sh common.sh) || fail "shellcheck"
(cd "$ROOT" && shellcheck -x scripts/check-deploy) || fail "shellcheck scripts/check-deploy"

step "deploy/multicluster: all checks passed"
