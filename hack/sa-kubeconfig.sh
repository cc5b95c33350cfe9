#!/usr/bin/env bash
# Writes a kubeconfig that authenticates as a ServiceAccount, with a token
# minted by `kubectl create token`; cluster and CA are taken from an admin
# kubeconfig. Usage: sa-kubeconfig.sh NAMESPACE SERVICEACCOUNT OUT [ADMIN_KUBECONFIG]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ns=$1 sa=$2 out=$3
admin=${4:-${KUBECONFIG:-${JOBWATCH_CLUSTER_DIR:-$(dirname "$here")/.cache/cluster}/admin.kubeconfig}}
kubectl=${KUBECTL:-$("$here/build-controlplane.sh")/kubectl}

token=$("$kubectl" --kubeconfig "$admin" -n "$ns" create token "$sa" --duration 24h)
server=$("$kubectl" --kubeconfig "$admin" config view --minify --raw -o jsonpath='{.clusters[0].cluster.server}')
ca=$("$kubectl" --kubeconfig "$admin" config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
insecure=$("$kubectl" --kubeconfig "$admin" config view --minify --raw -o jsonpath='{.clusters[0].cluster.insecure-skip-tls-verify}')

umask 077
{
  echo "apiVersion: v1"
  echo "kind: Config"
  echo "clusters:"
  echo "- name: cluster"
  echo "  cluster:"
  echo "    server: $server"
  if [[ -n $ca ]]; then echo "    certificate-authority-data: $ca"; fi
  if [[ $insecure == true ]]; then echo "    insecure-skip-tls-verify: true"; fi
  echo "users:"
  echo "- name: $ns-$sa"
  echo "  user:"
  echo "    token: $token"
  echo "contexts:"
  echo "- name: $ns-$sa"
  echo "  context: {cluster: cluster, user: $ns-$sa, namespace: $ns}"
  echo "current-context: $ns-$sa"
} > "$out"
echo "$out"
