#!/usr/bin/env bash
# GPU checks on one CUDA device (e.g. the lent H200), with that machine's own python3 (PLATFORM.md:
# CUDA torch, transformers, pytest; no vLLM, no megatron-core, no Transformer Engine unless installed).
#   1. the `gpu`-marked tests (tests/test_gpu.py): device-true train steps under the device guard,
#      NCCL at world size 1, FP8 on real FP8 tensor cores, TE against trident's FP8 where TE imports;
#   2. `trident bench train` on the 1B-class size G1B: bf16 and fp8 against transformers and each other,
#      MFU against a bf16 matmul peak measured in the same run (and the fp8 GEMM peak).
# Results go under $OUT (default ./gpu_check_out): one file per part plus summary.json. Budget: < 8 min.
#
#   OUT=/tmp/out bash tools/gpu_check.sh            # PYTHON=... to pick another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout -k 5 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
tests_rc=$?
tail -15 "$OUT/gpu_tests.txt"

timeout -k 5 270 $PY -m tools.bench train --size G1B --precision bf16,fp8 --compare hf --device cuda \
    --steps 6 --warmup 2 > "$OUT/bench_train_G1B.txt" 2>&1
bench_rc=$?
grep -v '^{' "$OUT/bench_train_G1B.txt" | tail -12
tail -1 "$OUT/bench_train_G1B.txt" > "$OUT/bench_train_G1B.json"

$PY - "$OUT" "$tests_rc" "$bench_rc" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
out, tests_rc, bench_rc, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
summary = {"gpu_tests_rc": tests_rc, "bench_rc": bench_rc, "seconds": seconds}
try:
    res = json.load(open(f"{out}/bench_train_G1B.json"))
    p = res["precisions"]
    summary.update(device=res["device_name"], peak_bf16_tflops=round(res["peak_tflops"], 1),
                   peak_fp8_tflops=round(res.get("fp8_peak_tflops", 0), 1),
                   mfu_bf16=round(p["bf16"]["mfu"], 4), mfu_fp8=round(p["fp8"]["mfu"], 4),
                   tokens_per_s_bf16=round(p["bf16"]["tokens_per_s"]), tokens_per_s_fp8=round(p["fp8"]["tokens_per_s"]),
                   fp8_vs_bf16=round(p["fp8"]["ratio_vs_bf16"], 3), bf16_vs_hf=round(p["bf16"]["ratio_vs_hf"], 3),
                   fp8_vs_hf=round(p["fp8"]["ratio_vs_hf"], 3), hf_mfu=round(res["hf_mfu"], 4))
except Exception as e:  # the bench failed: its log says why
    summary["bench_error"] = repr(e)
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary))
EOF
exit $(( tests_rc != 0 || bench_rc != 0 ))
