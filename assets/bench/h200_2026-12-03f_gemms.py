"""Each GEMM of a training step (forward, grad of input, grad of weight; and each with the other operand layout),
bf16, 65536 tokens, timed alone: TFLOP/s and cuBLAS's kernel, with torch's default BLAS and with cublasLt preferred.
The script behind h200_2026-12-03f_gemms_*.txt (README, Speed), run on one H200 as
    python h200_2026-12-03f_gemms.py 1024 16 2816 16384  # stage 3: d, layers, ffn_hidden, vocabulary
    CUBLAS_WORKSPACE_CONFIG=:4096:8 CUBLASLT_WORKSPACE_SIZE=65536 python h200_2026-12-03f_gemms.py 1024 16 2816 16384
    python h200_2026-12-03f_gemms.py 640 10 1792 4096  # stage 1"""
import sys, torch
from torch.profiler import profile, ProfilerActivity
M, d, L = 65536, int(sys.argv[1]), int(sys.argv[2])
shapes = {"qkv": (d, 3 * d), "wo": (d, d), "gate_up": (d, 2 * int(sys.argv[3])), "down": (int(sys.argv[3]), d),
          "head": (d, int(sys.argv[4]))}
def timed(f, reps=20):
    for _ in range(3): f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps): f()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
def kernel(f):
    with profile(activities=[ProfilerActivity.CUDA]) as p: f(); torch.cuda.synchronize()
    names = [e.name for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return ",".join(n[:60] for n in names)
total = {}
for lib in ["cublas", "cublaslt"]:
    torch.backends.cuda.preferred_blas_library(lib)
    step = 0.0
    for name, (k, n) in shapes.items():
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, n, device="cuda", dtype=torch.bfloat16)
        wt = w.t().contiguous()
        passes = {"fwd": lambda: x @ w.t(), "dgrad": lambda: dy @ w, "wgrad": lambda: dy.t() @ x,
                  "fwd_kn": lambda: x @ wt, "dgrad_kn": lambda: dy @ wt.t(), "wgrad_T": lambda: x.t() @ dy}
        for pname, f in passes.items():
            ms = timed(f)
            step += ms * (L if name != "head" else 1) * (pname in ("fwd", "dgrad", "wgrad"))
            print(f"{lib:8s} {name:8s} {pname:5s} {M}x{k}x{n}: {ms:6.3f} ms {2 * M * k * n / ms / 1e9:6.1f} TFLOP/s  {kernel(f)}")
    print(f"{lib}: the step's GEMMs alone {step:.1f} ms")
