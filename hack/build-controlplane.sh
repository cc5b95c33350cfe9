#!/usr/bin/env bash
# Builds (or reuses) the pinned etcd, kube-apiserver, kube-controller-manager
# and kubectl binaries and prints the folder that holds them.
#
# The cache lives outside the checkout (CI clones main afresh every run, so a
# cache inside the work tree would never be reused). The folder name carries a
# hash of the pinning go.mod/go.sum files: a new pin builds a new folder, an
# unchanged pin rebuilds nothing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${JOBWATCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobwatch}

kube_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/controlplane/kube/go.mod")
etcd_version=$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" {print $3}' "$here/controlplane/etcd/go.mod")
key=$(cat "$here"/controlplane/*/go.mod "$here"/controlplane/*/go.sum | sha256sum | cut -c1-12)
out="$cache_root/bin/$kube_version-etcd$etcd_version-$key"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly
mkdir -p "$out"

minor=${kube_version#v}; major=${minor%%.*}; minor=${minor#*.}; minor=${minor%%.*}
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

# build NAME MODULE_DIR PACKAGE LDFLAGS: builds into a temporary name first,
# so an interrupted build never leaves a binary that looks complete.
build() {
  [[ -x "$out/$1" ]] && return 0
  echo "building $1 ($3) into $out; a cold build of all four takes 10-20 minutes" >&2
  local start=$SECONDS
  (cd "$here/controlplane/$2" && go build -trimpath -ldflags "$4" -o "$out/$1.partial" "$3") >&2
  mv "$out/$1.partial" "$out/$1"
  echo "built $1 in $(( SECONDS - start ))s" >&2
}

build kube-apiserver kube k8s.io/kubernetes/cmd/kube-apiserver "$kube_ldflags"
build kube-controller-manager kube k8s.io/kubernetes/cmd/kube-controller-manager "$kube_ldflags"
build kubectl kube k8s.io/kubernetes/cmd/kubectl "$kube_ldflags"
build etcd etcd go.etcd.io/etcd/server/v3 "-s -w"
echo "$out"
