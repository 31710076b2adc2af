#!/usr/bin/env bash
# Run `codemix train` as N JAX processes on this machine, as a multi-host pod would (each process
# reads its own data shard and holds its own devices). For testing multi-host code without a pod.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [codemix train flags...]
#   launch/local_multiprocess.sh 2 2 --gin_file gin/experiments/smoke.gin --run_dir runs/mp
#
# Every process logs to RUN_DIR/process_<i>.log; the script fails if any process fails.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
num_processes=$1 devices_per_process=$2
shift 2
run_dir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ ${args[i]} == --run_dir ]] && run_dir=${args[i + 1]}
done
[[ -n $run_dir ]] || { echo "--run_dir is required" >&2; exit 2; }
mkdir -p "$run_dir"
codemix=${CODEMIX:-"$(dirname "$0")/../.venv/bin/codemix"}
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')

pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices_per_process \
    "$codemix" train "$@" --coordinator_address "localhost:$port" \
    --num_processes "$num_processes" --process_id "$i" >"$run_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[i]}"; then
    echo "process $i failed; see $run_dir/process_$i.log" >&2
    status=1
  fi
done
exit $status
