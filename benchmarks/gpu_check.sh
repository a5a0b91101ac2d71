#!/usr/bin/env bash
# Every `cuda` test and the GPU step benchmark, prepared for a lent GPU: at most
# 8 minutes on one H100 (the limits below add up to 7.5). Run from the project root
# with the project installed beside a CUDA build of torch:
#
#   bash benchmarks/gpu_check.sh [OUT]      # OUT (default gpu-check/): logs and JSON
#
# It exits non-zero if torch sees no GPU, a test fails, or a step lies outside the
# goals (a pruning step at most 1.2x a distillation step; BERT-base at most 35 ms).
set -uo pipefail
out="${1:-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 2
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt"

# 1. every test marked cuda (the dvc repro one included): 4.5 minutes
timeout 270 python -m pytest -q -m cuda -p no:cacheprovider --durations=10 tests/ 2>&1 | tee "$out/cuda-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2. pruning against distillation steps, batch 32 x 128, fp32 and bf16: BERT-base eager
#    (75 s), MiniLM eager and compiled (105 s: compiling takes the extra time)
steps() {  # shape, time limit in s, extra flags
  local shape="$1" limit="$2"; shift 2
  timeout "$limit" python benchmarks/bench_prune_step.py --device cuda --shape "$shape" --repeats 10 --warmup 3 \
    --read-steps 0 --sparsities "$@" --json "$out/steps-$shape.json" 2>&1 | tee "$out/steps-$shape.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
steps bert-base 75
steps minilm 105 --compile

# 3. the goals, read from the JSON the benchmark wrote
python - "$out" <<'PY' || status=1
import json, sys
from pathlib import Path
out, failed = Path(sys.argv[1]), False
for shape, limit_ms in (("bert-base", 35.0), ("minilm", None)):
    path = out / f"steps-{shape}.json"
    if not path.exists():
        print(f"{shape}: no results"); failed = True; continue
    steps = json.loads(path.read_text())["steps"]
    prune, distill = steps["prune/fp32"]["median_ms"], steps["distill/fp32"]["median_ms"]
    ok = prune <= 1.2 * distill and (limit_ms is None or prune <= limit_ms)
    failed |= not ok
    print(f"{shape}: pruning step {prune:.1f} ms, distillation {distill:.1f} ms ({prune / distill:.2f}x) "
          f"{'meets' if ok else 'misses'} the goals")
sys.exit(1 if failed else 0)
PY
exit $status
