#!/usr/bin/env bash
# Starts (or stops) a real Kubernetes control plane on 127.0.0.1 from binaries you supply,
# for running the e2e suite against it (testkit/README.md, "A real control plane"):
#
#   K8S_BIN=/path/to/bin testkit/real-cluster.sh up     # etcd, kube-apiserver,
#                                                       # kube-controller-manager, kube-scheduler
#   export STRATOS_E2E_KUBECONFIG=$HOME/.cache/stratos/real-cluster/admin.kubeconfig
#   cargo test --test lifecycle
#   testkit/real-cluster.sh down                        # stop; `wipe` also deletes the data
#   K8S_BIN=... testkit/real-cluster.sh outage 30       # kill kube-apiserver, restart it
#                                                       # 30 s later (the outage tests:
#   export STRATOS_E2E_OUTAGE_CMD="K8S_BIN=... $PWD/testkit/real-cluster.sh outage")
#
# K8S_BIN holds kube-apiserver, kube-controller-manager and kube-scheduler (any build of
# Kubernetes 1.30+). etcd comes from ETCD or PATH (Debian: etcd-server). Nothing here builds
# or downloads Kubernetes. Every process listens on 127.0.0.1 only; the controller-manager
# runs every default controller, the node lifecycle controller included.
set -euo pipefail

dir="${STRATOS_REAL_CLUSTER_DIR:-$HOME/.cache/stratos/real-cluster}"
port="${STRATOS_REAL_CLUSTER_PORT:-6443}"
etcd_port="${STRATOS_REAL_CLUSTER_ETCD_PORT:-2379}"

stop() {
  local pid
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    if [ -f "$dir/$name.pid" ]; then
      pid=$(cat "$dir/$name.pid")
      kill "$pid" 2>/dev/null || true
      # Wait for it to let go of its port before anything starts again.
      for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
      done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$name.pid"
    fi
  done
}

certs() {
  local pki="$dir/pki"
  [ -f "$pki/admin.crt" ] && return
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=stratos-e2e-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    cat >server.ext <<EOF
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
EOF
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
      -keyout apiserver.key -out apiserver.csr 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -extfile server.ext -out apiserver.crt 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=stratos-e2e-admin" \
      -keyout admin.key -out admin.csr 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -extfile client.ext -out admin.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

kubeconfig() {
  local pki="$dir/pki"
  cat >"$dir/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 "$pki/admin.crt")
    client-key-data: $(base64 -w0 "$pki/admin.key")
contexts:
- name: e2e
  context: {cluster: e2e, user: admin}
current-context: e2e
EOF
}

start() {
  local name=$1
  shift
  "$@" >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

start_apiserver() {
  local pki="$dir/pki"
  start kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
    --client-ca-file "$pki/ca.crt" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --authorization-mode Node,RBAC --allow-privileged
  local ready=""
  for _ in $(seq 1 120); do
    if curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
      "https://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      ready=1
      break
    fi
    sleep 0.5
  done
  [ -n "$ready" ] || { echo "kube-apiserver did not become ready; see $dir/kube-apiserver.log" >&2; exit 1; }
}

# Stops kube-apiserver (SIGKILL, as a crash), keeps it down for $1 seconds, starts it again
# and returns once it is ready: the outage tests' STRATOS_E2E_OUTAGE_CMD.
outage() {
  local secs=${1:?seconds}
  : "${K8S_BIN:?set K8S_BIN to the folder holding kube-apiserver}"
  local pid
  pid=$(cat "$dir/kube-apiserver.pid")
  kill -9 "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  sleep "$secs"
  start_apiserver
}

up() {
  : "${K8S_BIN:?set K8S_BIN to the folder holding kube-apiserver, kube-controller-manager and kube-scheduler}"
  local etcd="${ETCD:-$(command -v etcd || true)}"
  [ -x "$etcd" ] || { echo "etcd not found: set ETCD or install it (Debian: etcd-server)" >&2; exit 1; }
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    [ -x "$K8S_BIN/$b" ] || { echo "missing $K8S_BIN/$b" >&2; exit 1; }
  done
  stop
  mkdir -p "$dir/etcd"
  certs
  kubeconfig
  local pki="$dir/pki"
  start etcd "$etcd" --data-dir "$dir/etcd" --name e2e \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
    --initial-cluster "e2e=http://127.0.0.1:$((etcd_port + 1))"
  start_apiserver
  start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$dir/admin.kubeconfig" \
    --authentication-kubeconfig "$dir/admin.kubeconfig" --authorization-kubeconfig "$dir/admin.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10257 --leader-elect=false \
    --controllers '*' \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key"
  start kube-scheduler "$K8S_BIN/kube-scheduler" \
    --kubeconfig "$dir/admin.kubeconfig" \
    --authentication-kubeconfig "$dir/admin.kubeconfig" --authorization-kubeconfig "$dir/admin.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false
  echo "control plane up (logs in $dir)"
  echo "export STRATOS_E2E_KUBECONFIG=$dir/admin.kubeconfig"
}

case "${1:-up}" in
  up) up ;;
  outage) outage "${2:-}" ;;
  down) stop ;;
  wipe) stop; rm -rf "$dir" ;;
  *) echo "usage: $0 up|down|wipe|outage SECONDS" >&2; exit 2 ;;
esac
