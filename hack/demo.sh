#!/usr/bin/env bash
# `make demo`: a local control plane, the demo job API, the operator (with its
# own ServiceAccount's token, so its RBAC is the one in manifests/rbac), and the
# sample JobWatch from manifests/samples/job-api.yaml, watched until it ends.
# Progress is written every second (not every 15s) so that `kubectl get jw -w`
# shows the attempts climb. Everything keeps running afterwards for you to explore; `make demo-down` stops it.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
dir=${JOBWATCH_CLUSTER_DIR:-$repo/.cache/cluster}
demo=$repo/.cache/demo

stop_pid() { [[ -f $1 ]] && kill "$(cat "$1")" 2>/dev/null; rm -f "$1"; }
if [[ ${1:-} == --down ]]; then
  stop_pid "$demo/operator.pid"
  stop_pid "$demo/jobservice.pid"
  hack/cluster-down.sh
  exit 0
fi

mkdir -p "$demo"
hack/cluster-up.sh
bin=$(cat "$dir/bin-dir")
export KUBECONFIG=$dir/admin.kubeconfig
k() { "$bin/kubectl" "$@"; }

echo "== installing the CRD and the operator's ServiceAccount and RBAC"
k apply -k crds/ >/dev/null
k apply -f manifests/manager/namespace.yaml >/dev/null
k apply -k manifests/rbac/ >/dev/null
k wait --for=condition=Established --timeout=60s crd/jobwatches.jobwatch.dev >/dev/null

echo "== starting the demo job API"
stop_pid "$demo/jobservice.pid"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/python demo/jobservice.py --port "$port" --queued 3 --processing 8 \
  >"$demo/jobservice.log" 2>&1 &
echo $! > "$demo/jobservice.pid"
until curl -sf "http://127.0.0.1:$port/api/jobs/probe/status" >/dev/null; do sleep 0.2; done

echo "== starting the operator as ServiceAccount jobwatch-system/jobwatch-operator"
stop_pid "$demo/operator.pid"
KUBECTL=$bin/kubectl hack/sa-kubeconfig.sh jobwatch-system jobwatch-operator \
  "$demo/operator.kubeconfig" "$KUBECONFIG" >/dev/null
KUBECONFIG=$demo/operator.kubeconfig JOBWATCH_HEALTH_PORT=0 JOBWATCH_METRICS_PORT=0 \
  JOBWATCH_STATUS_PROGRESS_INTERVAL=1s \
  .venv/bin/python -m jobwatch >"$demo/operator.log" 2>&1 &
echo $! > "$demo/operator.pid"

echo "== applying manifests/samples/job-api.yaml, pointed at the demo job API"
k delete jobwatch report-42 --ignore-not-found >/dev/null
sed "s#http://reports.default.svc#http://127.0.0.1:$port#" manifests/samples/job-api.yaml | k apply -f -

echo "== kubectl get jw -w   (the job is QUEUED 3s, then PROCESSING 8s, then COMPLETED)"
"$bin/kubectl" get jw report-42 -w &
watcher=$!
k wait --for=condition=Finished --timeout=120s jw/report-42 >/dev/null
sleep 0.5
kill $watcher 2>/dev/null || true
wait $watcher 2>/dev/null || true

echo
echo "== the finished watch"
k get jw report-42 -o wide
k get jw report-42 -o jsonpath='{"phase: "}{.status.phase}{"\nreason: "}{.status.reason}{"\nresult: "}{.status.result}{"\nconditions: "}{range .status.conditions[*]}{.type}={.status} {end}{"\n"}'
k get events --field-selector involvedObject.name=report-42 \
  -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message
cat <<MSG

Still running, for you to explore:
  export KUBECONFIG=$KUBECONFIG
  $bin/kubectl get jw -w
  operator log: $demo/operator.log   job API: http://127.0.0.1:$port/api/jobs/<id>/status
  (ids containing "fail" end FAILED)
Stop everything with: make demo-down
MSG
