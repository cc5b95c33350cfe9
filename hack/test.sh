#!/usr/bin/env bash
# Runs the test suite (arguments go to pytest). The e2e tests start their own
# control plane under .cache/test-cluster (see tests/e2e/conftest.py) unless
# JOBWATCH_E2E_EXISTING_CLUSTER=1 points them at the cluster KUBECONFIG names.
# Whatever happens, no control-plane process outlives this script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export JOBWATCH_TEST_CLUSTER_DIR=${JOBWATCH_TEST_CLUSTER_DIR:-$PWD/.cache/test-cluster}
if [[ ${JOBWATCH_E2E_EXISTING_CLUSTER:-} != 1 ]]; then
  hack/build-controlplane.sh >/dev/null
  trap 'JOBWATCH_CLUSTER_DIR=$JOBWATCH_TEST_CLUSTER_DIR hack/cluster-down.sh >/dev/null' EXIT
fi

start=$SECONDS
status=0
.venv/bin/pytest "$@" || status=$?
echo "suite wall time: $(( SECONDS - start ))s; logs of a failed run: _out/test-logs/"
exit $status
