#!/usr/bin/env bash
# Builds (or reuses) one pinned Go tool from a module of our own under hack/tools/NAME
# (its go.mod/go.sum pin the versions) and prints the binary's path.
#
#   hack/build-tool.sh NAME [PACKAGE]
#
# PACKAGE defaults to the module itself (a main package in hack/tools/NAME). As with the
# control plane (build-controlplane.sh), the cache lives outside the checkout and its
# folder name carries a hash of the pinning files: a new pin builds anew, an unchanged
# one builds nothing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=${1:?usage: hack/build-tool.sh NAME [PACKAGE]}
package=${2:-.}
dir="$here/tools/$name"
[[ -f $dir/go.mod ]] || { echo "no module at $dir" >&2; exit 2; }
cache_root=${JOBWATCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobwatch}
# version-var is optional (below): a missing one adds nothing to the key.
key=$({ cat "$dir"/go.mod "$dir"/go.sum "$dir"/*.go "$dir"/version-var 2>/dev/null || true; } | sha256sum | cut -c1-12)
out="$cache_root/tools/$name-$key"
if [[ ! -x $out/$name ]]; then
  mkdir -p "$out"
  echo "building $name ($package) into $out" >&2
  start=$SECONDS
  ldflags="-s -w"
  # hack/tools/NAME/version-var (optional) holds "MODULE VARIABLE": the pinned version of
  # MODULE is stamped into VARIABLE, for a tool that prints its version (helm's is
  # "v4.3" without it, as for any build outside its Makefile).
  if [[ -f $dir/version-var ]]; then
    read -r module variable < "$dir/version-var"
    version=$(cd "$dir" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go list -m -f '{{.Version}}' "$module")
    ldflags+=" -X $variable=$version"
  fi
  (cd "$dir" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
    go build -trimpath -ldflags "$ldflags" -o "$out/$name.partial" "$package") >&2
  mv "$out/$name.partial" "$out/$name"
  echo "built $name in $(( SECONDS - start ))s" >&2
fi
echo "$out/$name"
