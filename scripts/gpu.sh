#!/usr/bin/env bash
# The `gpu` profile on a lent GPU machine that has PyTorch but neither DVC nor Jupyter (see README, "GPU profile").
#
#   scripts/gpu.sh [DATA_NPZ]     run (or resume) data_prep -> prototypes -> ldm_finetune -> guided_sampling
#
# Each stage runs its notebook's code in-process (`python -m pathsynth.run --inline`) with the same lib code
# as `dvc repro`. Training resumes from checkpoints/, so the script can be called again after a command was cut
# off at its time limit; finished stages are marked in .gpu-run/ and skipped. With $OUT set (the device tool's
# output folder) it packs what comes back: the run log, metrics/figures/plots/prompt tables (gpu-results.tar.gz)
# and one JPEG NPZ per synthetic set (guided_sampling_<mode>.npz), never model weights.
#
# Environment: PATHSYNTH_WHEELS (default .whl) holds wheels of the pure-Python packages the machine lacks;
# PATHSYNTH_DEADLINE (seconds, default 540) stops starting stages after that much wall time.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
DEADLINE=${PATHSYNTH_DEADLINE:-540}
WHEELS=${PATHSYNTH_WHEELS:-.whl}
DATA=${1:-}
mkdir -p .gpu-run
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg PYTHONHASHSEED=0

if [ -d "$WHEELS" ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && touch /tmp/site/.done || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/lib${PYTHONPATH:+:$PYTHONPATH}
LOG=.gpu-run/log.txt

# params.yaml is written on every call: the device tool sends the tracked files again each time, so a
# params.yaml written by an earlier call is replaced by the local one (the default profile)
python3 -m pathsynth.config use gpu || exit 1
if [ -n "$DATA" ]; then
  python3 - "$DATA" <<'EOF' || exit 1
import sys, yaml
p = yaml.safe_load(open("params.yaml")); p["data"]["source"]["path"] = sys.argv[1]
open("params.yaml", "w").write("# gpu profile, data path given to scripts/gpu.sh\n" + yaml.safe_dump(p, sort_keys=False))
EOF
fi
# a stage counts as done only under the params it was done with (training itself resumes from checkpoints)
sha=$(sha256sum params.yaml | cut -c1-16)
if [ "$(cat .gpu-run/params.sha 2>/dev/null)" != "$sha" ]; then rm -f .gpu-run/*.done; echo "$sha" > .gpu-run/params.sha; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $LOG

status=0
for stage in data_prep prototypes ldm_finetune guided_sampling; do
  [ -f .gpu-run/$stage.done ] && continue
  left=$((DEADLINE - (SECONDS - T0)))
  if [ $left -lt 30 ]; then echo "deadline: $stage not started" | tee -a $LOG; status=3; break; fi
  echo "=== $stage (at ${SECONDS}s, ${left}s left)" | tee -a $LOG
  t=$SECONDS
  timeout --signal=TERM $left python3 -m pathsynth.run --inline $stage 2>&1 | tee -a $LOG | grep -vE "^\s*$" | tail -n 400
  rc=${PIPESTATUS[0]}
  echo "=== $stage exit $rc after $((SECONDS - t))s" | tee -a $LOG
  if [ $rc -ne 0 ]; then status=$rc; break; fi
  echo $((SECONDS - t)) > .gpu-run/$stage.done
done

if [ -n "${OUT:-}" ]; then
  cp $LOG "$OUT/gpu-log.txt"
  if [ -f .gpu-run/guided_sampling.done ]; then
    for s in data_prep prototypes ldm_finetune guided_sampling; do echo "$s $(cat .gpu-run/$s.done)"; done > .gpu-run/stage_seconds.txt
    tar czf "$OUT/gpu-results.tar.gz" params.yaml metrics plots reports/figures .gpu-run/stage_seconds.txt \
      data/prototypes/centroids.npz data/prototypes/prompts_train.csv data/prototypes/prompts_valid.csv \
      data/prototypes/prompts_test.csv models/ldm_finetune/samples 2>/dev/null
    python3 -m pathsynth.data.npz export data/guided_sampling "$OUT" 75 || status=4
  fi
fi
exit $status
