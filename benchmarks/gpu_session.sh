#!/usr/bin/env bash
# The GPU checks and figures of one lent-GPU session, in one command (such a lease holds ~10 minutes):
#
#   OUT=runs/gpu_session bash benchmarks/gpu_session.sh        # from the repository root, on a GPU host
#
# 1. the alignment tests on the GPU, plus a case of several 8192-row tiles against numpy (GPU_TESTS=0 skips);
# 2. the train step, JAX against PyTorch eager on the same GPU: default model (float32), paper model (bf16),
#    also with 4 windows packed per row;
# 3. configs/paper.py: demos (made on the CPUs while 1 and 2 run), training, closed-loop evaluation.
#    Training runs the config's steps if the time left (BUDGET_S in all) holds them at the step time
#    measured in 2 (or the host's batch time, if slower); else as many as fit, the cosine schedule over
#    them, and session.log says so;
# 4. with any time left, the alignment benchmark at N = 20 000 and the scaling run, warm (compiled) times too.
# PAPER_FLAGS adds config overrides to stage 3 and THROUGHPUT_FLAGS flags to stage 2 (smoke runs on a CPU).
set -u
OUT=${OUT:-runs/gpu_session}
PAPER=${PAPER_WORKDIR:-/tmp/lvaa_paper}
PY=${PYTHON:-python3}
END=$((SECONDS + ${BUDGET_S:-540}))
EVAL_RESERVE_S=${EVAL_RESERVE_S:-130}  # compile, 8 levels x 500 episodes, checkpoints
PAPER_FLAGS=${PAPER_FLAGS:-}
THROUGHPUT_FLAGS=${THROUGHPUT_FLAGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }
quiet() { grep -v -E '^[IWE][0-9]{4} |^\s*$'; }  # drops absl/XLA log lines

log "versions"
{ nvidia-smi -L
  $PY -c "import sys, jax, flax, optax, orbax.checkpoint as o, chex, torch, minigrid, transformers as t
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'orbax', o.__version__, 'chex', chex.__version__, 'torch', torch.__version__, 'minigrid', minigrid.__version__,
      'transformers', t.__version__, jax.devices())"; } 2>&1 | quiet | tee -a "$OUT/session.log"

log "paper demos start (background, CPU only)"
JAX_PLATFORMS=cpu $PY scripts/make_demos.py --config=configs/paper.py --workdir="$PAPER" \
  --config.data.num_workers=14 $PAPER_FLAGS >"$OUT/paper_demos.log" 2>&1 &
DEMOS=$!

if [ "${GPU_TESTS:-1}" != 0 ]; then
  log "alignment tests on the accelerator"
  JAX_PLATFORMS=cuda $PY -m pytest -q -p no:cacheprovider tests/test_alignment.py \
    -k "not tile_sizes_and_sharding" 2>&1 | tail -n 4 | tee -a "$OUT/session.log"
fi

# The paper config's own batch runs last: its step time sizes stage 3.
for args in "--model=default --dtype=float32" "--model=paper --dtype=bfloat16 --windows_per_row=4" \
  "--model=paper --dtype=bfloat16"; do
  log "train throughput $args"
  $PY -m benchmarks.train_throughput $args --steps=20 $THROUGHPUT_FLAGS 2>&1 | quiet | tee -a "$OUT/session.log"
done
STEP_MS=$(awk '$1 == "JAX" && $3 == "step" {v = $5} END {print v + 0}' "$OUT/session.log")

log "waiting for the paper demos"
wait $DEMOS || { log "demos failed"; tail -n 5 "$OUT/paper_demos.log" | tee -a "$OUT/session.log"; }
tail -n 11 "$OUT/paper_demos.log" | quiet | tee -a "$OUT/session.log"

read -r HOST_MS CONFIG_STEPS < <($PY - "$PAPER" <<'EOF' 2>/dev/null
import sys, time
import jax
from configs.paper import get_config
from lvaa_jax.agent.train import make_mesh, shard_batch
from lvaa_jax.babyai import WindowBatches, load_demos
c = get_config()
batches, mesh = WindowBatches(load_demos(sys.argv[1] + "/demos"), c.train.batch_size, c.model.context, 0, c.train.windows_per_row), make_mesh()
shard_batch(next(batches), mesh)  # the first transfer starts the device's runtime (seconds)
start = time.perf_counter()
for _ in range(50):
    batch = shard_batch(next(batches), mesh)
jax.block_until_ready(batch)
print(f"{(time.perf_counter() - start) / 50 * 1e3:.2f} {c.train.steps}")
EOF
)
STEPS=$($PY -c "
s = min(${CONFIG_STEPS:-0}, int(max($END - $SECONDS - $EVAL_RESERVE_S - 60, 0) / (1.15e-3 * max($STEP_MS, ${HOST_MS:-0}, 1e-3))))
print(max(s // 100 * 100 if s > 100 else s, 1))")
log "paper training: device step ${STEP_MS} ms, host batch ${HOST_MS:-?} ms -> ${STEPS} steps (config: ${CONFIG_STEPS:-?})"
$PY scripts/train.py --config=configs/paper.py --workdir="$PAPER" --config.train.steps="$STEPS" \
  --config.train.eval_every=0 $PAPER_FLAGS 2>&1 | quiet >"$OUT/paper_train.log"
tail -n 10 "$OUT/paper_train.log" | tee -a "$OUT/session.log"
cp "$PAPER"/metrics/train.csv "$OUT/paper_train.csv" 2>/dev/null
cp "$PAPER"/eval/step_*.json "$OUT/" 2>/dev/null

LEFT=$((END - SECONDS))
if [ "$LEFT" -gt 60 ]; then
  log "alignment benchmark ($LEFT s left)"
  timeout "$LEFT" $PY -m benchmarks.alignment_scale --sizes=20000 --dims=384,4096 --refs=torch --ref_pairs=1 \
    --max_n=400000 --warm_max_n=400000 --device_summary 2>&1 | quiet >"$OUT/alignment.log"
fi
log "done"
