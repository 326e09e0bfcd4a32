"""Table 1 of Narayanan et al. 2021 (SC'21, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM"): GPT models on A100-80GB (DGX A100 nodes of 8), seq 2048, vocab 51200,
fp16 with full recomputation; TFLOP/s per GPU count the recomputed forward (the 96 coefficient).
Micro-batch and interleaving as in the paper's reproduction script (see the planner issue)."""
from tools.perf_model import Layout, Shape

#          params(B) heads hidden layers tp  pp  gpus  batch  micro  vp  TFLOP/s
TABLE1 = [(1.7, 24, 2304, 24, 1, 1, 32, 512, 16, 1, 137),
          (3.6, 32, 3072, 30, 2, 1, 64, 512, 16, 1, 138),
          (7.5, 32, 4096, 36, 4, 1, 128, 512, 16, 1, 142),
          (18.4, 48, 6144, 40, 8, 1, 256, 1024, 8, 1, 135),
          (39.1, 64, 8192, 48, 8, 2, 512, 1536, 4, 1, 138),
          (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 2, 3, 140),
          (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 2, 2, 148),
          (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 1, 2, 155),
          (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 1, 3, 163),
          (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 1, 1, 163)]


def rows() -> list[dict]:
    out = []
    for params, heads, hidden, layers, tp, pp, gpus, batch, micro, vp, tflops in TABLE1:
        shape = Shape(hidden, layers, heads, heads, 4 * hidden, 51200, 2048, swiglu=False, tied=True)
        lay = Layout(tp, pp, gpus // (tp * pp), micro, vp, "full", 0, sp=False)
        out.append({"params_b": params, "shape": shape, "layout": lay, "batch": batch, "gpus": gpus,
                    "tflops": tflops})
    return out
