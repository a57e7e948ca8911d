# Shared by scripts/*: install what is missing on a Debian machine.
# shellcheck shell=bash

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_need PACKAGE... : installs the Debian packages that are not installed yet.
apt_need() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# The build needs protoc and the well-known .proto files.
need_build_tools() {
  apt_need protobuf-compiler libprotobuf-dev
  if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust from https://rustup.rs first" >&2
    exit 1
  fi
}

# A Python with the PyPI `spiffe` client, PyJWT, h2 and schemathesis, in a venv under target/
# (exported as FEDMESH_PYTHON).
need_python_spiffe() {
  if python3 -c 'import spiffe, jwt, cryptography, h2, schemathesis' 2>/dev/null; then
    FEDMESH_PYTHON=$(command -v python3)
  else
    local venv=target/py-venv
    if [ ! -x "$venv/bin/python" ]; then
      python3 -m venv "$venv" 2>/dev/null || { apt_need python3-venv; python3 -m venv "$venv"; }
    fi
    # PyJWT (with cryptography) signs the tokens of the request-authentication tests; h2 lets a
    # workload outside the mesh speak HTTP/2 to a sidecar (the SPIRE federation tests);
    # schemathesis holds the hub's admin API to its OpenAPI document.
    "$venv/bin/python" -c 'import spiffe, jwt, cryptography, h2, schemathesis' 2>/dev/null \
      || "$venv/bin/pip" install --quiet 'spiffe==0.3.2' 'PyJWT[crypto]==2.15.1' 'h2==4.3.0' \
        'schemathesis==4.32.5'
    FEDMESH_PYTHON=$PWD/$venv/bin/python
  fi
  export FEDMESH_PYTHON
}

# A real OpenTelemetry collector for the trace tests: rotel (a Rust OTLP collector) from PyPI, in
# the same venv; its binary is exported as FEDMESH_ROTEL.
need_otlp_collector() {
  local venv=target/py-venv
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || { apt_need python3-venv; python3 -m venv "$venv"; }
  fi
  "$venv/bin/python" -c 'import rotel' 2>/dev/null || "$venv/bin/pip" install --quiet 'rotel==0.0.1a15'
  FEDMESH_ROTEL=$("$venv/bin/python" -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')
  export FEDMESH_ROTEL
}

# The UI test's browser: Debian's chromium, driven by playwright-core from npm (installed into
# tests/ui/node_modules from its lock file; it never downloads a browser of its own).
need_ui_browser() {
  apt_need chromium
  # node and npm may come from elsewhere than Debian (NodeSource's nodejs conflicts with its npm).
  command -v npm >/dev/null || apt_need nodejs npm
  if [ ! -d tests/ui/node_modules/playwright-core ]; then
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/ui --no-audit --no-fund --loglevel=error
  fi
}
