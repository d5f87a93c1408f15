#!/usr/bin/env bash
# Round 1 (a record): how the committed docs/results-round1.md was produced, with the lab code of commit 17c0ae0
# (capitals n=80, 100 held-out additions, `seed{N}/` layout); today's code runs it with the round-2 eval sets
# and layout. Round 2 is `round2.py`.
# How the committed docs/results-round1.md was produced on 2 shared CPU cores within one session: fine-tunes in one
# background process, repairs/evals in priority order (the matched-rho comparison at 30 steps first, then the
# rest of the grid), each step resuming from the workdir cache. The session ran some of these steps side by
# side (never two on the same seed and length; results are per-model files, so the order does not change
# them) and stopped the last two at its deadline; the report is assembled from whatever finished
# (`--cached-only`) and lists what did not run. `run.py --seeds 0 1 2 --steps 15 30 --report docs/results-round1.md`
# alone computes the full grid (about 2 min per evaluated model on this machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
W=${W:-bench/_work/lab}
CORE="dg_hard@1 wise_ft@rho ties@rho dare@rho fixed_rank@rho"
RUN="$PY bench/forgetting_lab/run.py --workdir $W"
$PY bench/forgetting_lab/finetune_all.py --seeds 0 1 2 --steps 15 30 --workdir "$W" &
$RUN --wait --seeds 0 1 2 --steps 30 --variants $CORE
$RUN --wait --seeds 0 1 2 --steps 15 --variants dg_hard@1 --repair-only
wait
$RUN --seeds 0 --steps 30 --variants dg_hard@1 dg_hard@0.5 dg_hard@2 wise_ft@0.25 wise_ft@0.5 wise_ft@0.75 ties dare \
    fixed_rank
$RUN --seeds 1 2 --steps 30 --variants dg_hard@1 wise_ft@0.5 dg_hard@0.5 dg_hard@2
$RUN --seeds 1 2 --steps 30 --variants dg_hard@1 ties dare wise_ft@0.25 wise_ft@0.75 fixed_rank
$RUN --seeds 0 1 2 --steps 15 --variants $CORE
$RUN --seeds 0 1 2 --steps 15 30 --cached-only --report docs/results-round1.md
