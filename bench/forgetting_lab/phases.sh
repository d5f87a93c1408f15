#!/usr/bin/env bash
# The order in which the committed docs/results.md was produced on 2 shared CPU cores: fine-tunes in one
# background process, repairs/evals here in priority order (the matched-rho comparison first, then the rest
# of the grid), each phase resuming from the workdir cache, then a report from whatever finished
# (`--cached-only`). `run.py --seeds 0 1 2 --steps 15 30 --report docs/results.md` alone computes the full grid.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
W=${W:-bench/_work/lab}
CORE="dg_hard@1 wise_ft@rho ties@rho dare@rho fixed_rank@rho"
RUN="$PY bench/forgetting_lab/run.py --wait --workdir $W"
$PY bench/forgetting_lab/finetune_all.py --seeds 0 1 2 --steps 15 30 --workdir "$W" &
$RUN --seeds 0 1 2 --steps 30 --variants $CORE
$RUN --seeds 0 1 2 --steps 15 --variants dg_hard@1 --repair-only
$RUN --seeds 0 --steps 30 --variants dg_hard@1 wise_ft@0.5 dg_hard@0.5 dg_hard@2 ties dare fixed_rank wise_ft@0.25 \
    wise_ft@0.75
$RUN --seeds 1 2 --steps 30 --variants dg_hard@1 wise_ft@0.5 dg_hard@0.5 dg_hard@2
$RUN --seeds 0 1 2 --steps 15 --variants $CORE
$RUN --seeds 0 1 2 --steps 15 30
wait
$RUN --seeds 0 1 2 --steps 15 30 --cached-only --report docs/results.md
