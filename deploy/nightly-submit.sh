#!/usr/bin/env bash
# Nightly repair on a plain Ray cluster (no Kubernetes): submit, and on failure resubmit with a new
# submission id (Ray refuses to reuse one). Each attempt resumes from the manifest on shared storage.
# cron:  0 2 * * *  /opt/dgrepair/deploy/nightly-submit.sh /mnt/checkpoints/jobs/repair.yaml
set -uo pipefail
config=${1:?usage: nightly-submit.sh CONFIG.yaml [ATTEMPTS]}
attempts=${2:-3}
address=${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
day=$(date -u +%Y%m%d)
for n in $(seq 1 "$attempts"); do
  id="dgrepair-${day}-a${n}-$(date -u +%H%M%S)"
  echo "submitting ${id} (attempt ${n}/${attempts}) to ${address}"
  ray job submit --address "$address" --submission-id "$id" -- python -m dgrepair.cluster.job --config "$config"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "${id} succeeded"
    exit 0
  fi
  echo "${id} failed (exit ${rc}); resubmitting, the next attempt resumes from the manifest" >&2
  sleep 30
done
echo "dgrepair: ${attempts} attempts failed; see 'ray job logs' and OUT/dgrepair/failures.json" >&2
exit 1
