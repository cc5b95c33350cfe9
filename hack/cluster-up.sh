#!/usr/bin/env bash
# Starts a local Kubernetes control plane (etcd, kube-apiserver with RBAC,
# kube-controller-manager) as background processes on loopback and writes an
# admin kubeconfig to $JOBWATCH_CLUSTER_DIR/admin.kubeconfig.
#
# No kubelet runs, so no pods start: the operator runs as a local process.
set -euo pipefail
# Private files: tokens.csv and the kubeconfigs hold tokens of system:masters, and
# on a machine shared with other users they must not be readable by them.
umask 077

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
dir=${JOBWATCH_CLUSTER_DIR:-$repo/.cache/cluster}
started_ns=$(date +%s%N)

bin=$("$here/build-controlplane.sh")

if [[ -f "$dir/apiserver.pid" ]] && kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null; then
  echo "control plane already running; kubeconfig: $dir/admin.kubeconfig"
  exit 0
fi
"$here/cluster-down.sh" >/dev/null 2>&1 || true

mkdir -p "$dir/pki" "$dir/logs"
rm -rf "$dir/etcd-data"
cd "$dir"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port); kcm_port=$(free_port)

# A CA that signs the API server's serving certificate, so kubeconfigs verify
# TLS instead of skipping it.
pki=$dir/pki
if [[ ! -f $pki/ca.crt ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=jobwatch-local-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes.default.svc\n' > "$pki/san.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 3650 -extfile "$pki/san.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
fi
# Fresh tokens at every start. The controller manager runs all its controllers
# under one identity, so it gets the admin group rather than per-controller
# ServiceAccounts (there is no token controller to mint those).
printf '%s,admin,admin,system:masters\n' "$(openssl rand -hex 24)" > "$pki/tokens.csv"
printf '%s,system:kube-controller-manager,kcm,system:masters\n' "$(openssl rand -hex 24)" >> "$pki/tokens.csv"
admin_token=$(awk -F, '$2 == "admin" {print $1}' "$pki/tokens.csv")
kcm_token=$(awk -F, '$2 == "system:kube-controller-manager" {print $1}' "$pki/tokens.csv")

setsid "$bin/etcd" --name local --data-dir "$dir/etcd-data" --unsafe-no-fsync \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "local=http://127.0.0.1:$peer_port" --log-level warn \
  >"$dir/logs/etcd.log" 2>&1 < /dev/null &
echo $! > "$dir/etcd.pid"

wait_for() { # wait_for WHAT SECONDS COMMAND...
  local what=$1 limit=$2; shift 2
  local deadline=$(( SECONDS + limit ))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS > deadline )); then
      echo "$what did not become ready within ${limit}s; logs in $dir/logs" >&2
      tail -n 20 "$dir/logs/"*.log >&2
      exit 1
    fi
    sleep 0.2
  done
}
wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"

setsid "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --secure-port "$api_port" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --token-auth-file "$pki/tokens.csv" \
  --service-account-issuer "https://kubernetes.default.svc" \
  --service-account-key-file "$pki/sa.pub" \
  --service-account-signing-key-file "$pki/sa.key" \
  --api-audiences "https://kubernetes.default.svc" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --authorization-mode RBAC \
  --disable-admission-plugins ServiceAccount \
  --allow-privileged=false \
  >"$dir/logs/kube-apiserver.log" 2>&1 < /dev/null &
echo $! > "$dir/apiserver.pid"

server="https://127.0.0.1:$api_port"
write_kubeconfig() { # write_kubeconfig FILE USER TOKEN
  "$bin/kubectl" config --kubeconfig "$1" set-cluster local --server "$server" \
    --certificate-authority "$pki/ca.crt" --embed-certs >/dev/null
  "$bin/kubectl" config --kubeconfig "$1" set-credentials "$2" --token "$3" >/dev/null
  "$bin/kubectl" config --kubeconfig "$1" set-context local --cluster local --user "$2" >/dev/null
  "$bin/kubectl" config --kubeconfig "$1" use-context local >/dev/null
}
rm -f "$dir/admin.kubeconfig" "$dir/kcm.kubeconfig"
write_kubeconfig "$dir/admin.kubeconfig" admin "$admin_token"
write_kubeconfig "$dir/kcm.kubeconfig" kube-controller-manager "$kcm_token"
wait_for kube-apiserver 90 "$bin/kubectl" --kubeconfig "$dir/admin.kubeconfig" get --raw /readyz

# The controller manager finishes namespace deletion and runs garbage
# collection, as a real cluster does.
setsid "$bin/kube-controller-manager" \
  --kubeconfig "$dir/kcm.kubeconfig" --authentication-kubeconfig "$dir/kcm.kubeconfig" \
  --authorization-kubeconfig "$dir/kcm.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$kcm_port" \
  --leader-elect=false --use-service-account-credentials=false \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --controllers '*,-nodeipam,-nodelifecycle,-route,-service,-cloud-node-lifecycle,-persistentvolume-binder,-attachdetach' \
  >"$dir/logs/kube-controller-manager.log" 2>&1 < /dev/null &
echo $! > "$dir/kcm.pid"
echo "$bin" > "$dir/bin-dir"

elapsed_ms=$(( ($(date +%s%N) - started_ns) / 1000000 ))
printf 'control plane up in %d.%03ds: %s\nkubeconfig: %s\n' \
  $(( elapsed_ms / 1000 )) $(( elapsed_ms % 1000 )) "$server" "$dir/admin.kubeconfig"
