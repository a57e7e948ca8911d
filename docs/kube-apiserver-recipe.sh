#!/usr/bin/env bash
# Reference recipe: etcd + kube-apiserver on loopback, admin client cert, SA token issuing.
# Usage: kas-recipe.sh DIR   (prints KUBECONFIG path; pids in DIR/*.pid; stop: kill $(cat DIR/*.pid))
set -euo pipefail
D=$1; mkdir -p "$D/pki"; P=$D/pki
KAS=${KAS:-/work/main/target/peers/kube-apiserver/bin/kube-apiserver}
freeport() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
# --- PKI (all P-256, PKCS#8 keys)
ec "$P/ca.key"
openssl req -x509 -new -key "$P/ca.key" -out "$P/ca.crt" -days 3650 -subj "/CN=fedmesh-test-ca" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
ec "$P/server.key"
openssl req -new -key "$P/server.key" -subj "/CN=kube-apiserver" | openssl x509 -req -CA "$P/ca.crt" -CAkey "$P/ca.key" \
  -CAcreateserial -CAserial "$P/ca.srl" -days 3650 -out "$P/server.crt" \
  -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n')
ec "$P/admin.key"
openssl req -new -key "$P/admin.key" -subj "/O=system:masters/CN=admin" | openssl x509 -req -CA "$P/ca.crt" -CAkey "$P/ca.key" \
  -CAserial "$P/ca.srl" -days 3650 -out "$P/admin.crt" \
  -extfile <(printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n')
ec "$P/sa.key"; openssl pkey -in "$P/sa.key" -pubout -out "$P/sa.pub"
# --- etcd
EC=$(freeport); EP=$(freeport); KP=$(freeport)
etcd --name=test --data-dir="$D/etcd" \
  --listen-client-urls=http://127.0.0.1:"$EC" --advertise-client-urls=http://127.0.0.1:"$EC" \
  --listen-peer-urls=http://127.0.0.1:"$EP" --initial-advertise-peer-urls=http://127.0.0.1:"$EP" \
  --initial-cluster=test=http://127.0.0.1:"$EP" \
  --heartbeat-interval=10 --election-timeout=100 --logger=zap --log-level=warn >"$D/etcd.log" 2>&1 &
echo $! >"$D/etcd.pid"
t0=$(date +%s%N)
until curl -sf "http://127.0.0.1:$EC/health" >/dev/null; do sleep 0.02; done
t1=$(date +%s%N)
# --- kube-apiserver
"$KAS" \
  --etcd-servers=http://127.0.0.1:"$EC" \
  --bind-address=127.0.0.1 --secure-port="$KP" --advertise-address=127.0.0.1 \
  --tls-cert-file="$P/server.crt" --tls-private-key-file="$P/server.key" \
  --client-ca-file="$P/ca.crt" \
  --authorization-mode=RBAC \
  --service-account-issuer=https://kubernetes.default.svc \
  --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
  --api-audiences=https://kubernetes.default.svc \
  --service-cluster-ip-range=10.0.0.0/24 \
  --endpoint-reconciler-type=none \
  --enable-priority-and-fairness=false --profiling=false >"$D/kube-apiserver.log" 2>&1 &
echo $! >"$D/kube-apiserver.pid"
until curl -sf --cacert "$P/ca.crt" "https://127.0.0.1:$KP/readyz" >/dev/null 2>&1; do sleep 0.05; done
t2=$(date +%s%N)
echo "etcd healthy in $(( (t1-t0)/1000000 )) ms; kube-apiserver /readyz ok $(( (t2-t1)/1000000 )) ms after start" >&2
# --- kubeconfig (certs embedded)
export KUBECONFIG=$D/kubeconfig
kubectl config set-cluster test --server=https://127.0.0.1:"$KP" --certificate-authority="$P/ca.crt" --embed-certs >/dev/null
kubectl config set-credentials admin --client-certificate="$P/admin.crt" --client-key="$P/admin.key" --embed-certs >/dev/null
kubectl config set-context test --cluster=test --user=admin >/dev/null
kubectl config use-context test >/dev/null
echo "$KUBECONFIG"
