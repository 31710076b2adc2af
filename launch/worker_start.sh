#!/usr/bin/env bash
# Start `codemix ARGS...` on this TPU VM worker in the background, detached from the ssh session
# that ran this (`codemix launch create` runs it on every worker at once). The command's log is
# ~/codemix.log, its process id ~/codemix.pid and, once it has ended, its exit status ~/codemix.exit.
#
#   bash launch/worker_start.sh experiment --gin_file ARM --root gs://... --distributed
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f ~/codemix.exit
# shellcheck disable=SC2016  # expanded by the detached bash, not here
setsid nohup bash -c '.venv/bin/codemix "$@" & echo $! > ~/codemix.pid; wait $!; echo $? > ~/codemix.exit' \
  codemix "$@" >> ~/codemix.log 2>&1 < /dev/null &
