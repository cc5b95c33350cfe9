#!/usr/bin/env bash
# Stops the local control plane started by cluster-up.sh and waits until no
# process of it is left. Keeps the logs; removes the etcd data.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${JOBWATCH_CLUSTER_DIR:-$(dirname "$here")/.cache/cluster}

for name in kcm apiserver etcd; do
  pidfile="$dir/$name.pid"
  [[ -f $pidfile ]] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
done
# Anything of this control plane whose pid file was lost (every command line
# names a file under $dir).
pkill -KILL -f -- "$dir/" 2>/dev/null || true
rm -rf "$dir/etcd-data"
echo "control plane stopped"
