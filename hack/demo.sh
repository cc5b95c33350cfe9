#!/usr/bin/env bash
# `make demo`: a local control plane, the demo job API, the operator (with its
# own ServiceAccount's token, so its RBAC is the one in manifests/rbac), and the
# sample JobWatch from manifests/samples/job-api.yaml, watched until it ends.
# Progress is written every second (not every 15s) so that `kubectl get jw -w`
# shows the attempts climb. Everything keeps running afterwards for you to explore; `make demo-down` stops it.
#
# `hack/demo.sh --operator KUBECONFIG` runs just the operator as the demo does, in the
# foreground (tests/e2e/test_demo_nonroot.py runs it as an unprivileged user).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

if [[ ${1:-} == --operator ]]; then
  # No health or metrics endpoint (0): a second demo, a non-root user or a busy
  # 8080/9090 must not stop it; every port it would listen on has to be named.
  KUBECONFIG=$2 JOBWATCH_HEALTH_PORT=0 JOBWATCH_METRICS_PORT=0 \
    JOBWATCH_STATUS_PROGRESS_INTERVAL=1s exec .venv/bin/python -m jobwatch
fi
dir=${JOBWATCH_CLUSTER_DIR:-$repo/.cache/cluster}
demo=$repo/.cache/demo

# A process that has already exited (an operator that failed) is no error.
stop_pid() { [[ -f $1 ]] && { kill "$(cat "$1")" 2>/dev/null || true; }; rm -f "$1"; }
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
k apply -f manifests/base/namespace.yaml >/dev/null
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
hack/demo.sh --operator "$demo/operator.kubeconfig" >"$demo/operator.log" 2>&1 &
operator=$!
echo $operator > "$demo/operator.pid"

echo "== applying manifests/samples/job-api.yaml, pointed at the demo job API"
k delete jobwatch report-42 --ignore-not-found >/dev/null
sed "s#http://reports.default.svc#http://127.0.0.1:$port#" manifests/samples/job-api.yaml | k apply -f -

echo "== kubectl get jw -w   (the job is QUEUED 3s, then PROCESSING 8s, then COMPLETED)"
"$bin/kubectl" get jw report-42 -w &
watcher=$!
"$bin/kubectl" wait --for=condition=Finished --timeout=120s jw/report-42 >/dev/null &
waiter=$!
# Whichever ends first: an operator that exits is reported at once, with its log,
# rather than after the two minutes of the wait.
status=0 ended=
wait -n -p ended $waiter $operator || status=$?
sleep 0.5
kill $watcher $waiter 2>/dev/null || true
wait $watcher $waiter 2>/dev/null || true
if [[ $ended != "$waiter" || $status != 0 ]]; then
  if [[ $ended == "$operator" ]]; then
    echo "the operator exited (status $status); the end of $demo/operator.log:" >&2
  else
    echo "report-42 did not finish within 120s; the end of $demo/operator.log:" >&2
  fi
  tail -n 20 "$demo/operator.log" >&2
  exit 1
fi

echo
echo "== the finished watch"
k get jw report-42 -o wide
k get jw report-42 -o jsonpath='{"phase: "}{.status.phase}{"\nreason: "}{.status.reason}{"\nresult: "}{.status.result}{"\nconditions: "}{range .status.conditions[*]}{.type}={.status} {end}{"\n"}'
# In the order they happened. kubectl lists Events by name (random here), and their
# timestamps are whole seconds (Pending and Polling often share one): ties go by
# resourceVersion, which the API server hands out in the order of its writes.
k get events --field-selector involvedObject.name=report-42 -o json | .venv/bin/python -c '
import json, sys
events = json.load(sys.stdin)["items"]
events.sort(key=lambda e: (e["lastTimestamp"], int(e["metadata"]["resourceVersion"])))
row = "{:<22}{:<9}{:<21}{}"
print(row.format("TIME", "TYPE", "REASON", "MESSAGE"))
for e in events:
    print(row.format(e["lastTimestamp"], e["type"], e["reason"], e["message"]))
'
cat <<MSG

Still running, for you to explore:
  export KUBECONFIG=$KUBECONFIG
  $bin/kubectl get jw -w
  operator log: $demo/operator.log   job API: http://127.0.0.1:$port/api/jobs/<id>/status
  (ids containing "fail" end FAILED)
Stop everything with: make demo-down
MSG
