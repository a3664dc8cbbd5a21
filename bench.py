"""
Time training steps (forward, backward, fused AdamW) on synthetic data, after warm-up, with
CUDA events. In one run it compares, for the shape of a config:
    fresh      a freshly built model
    grown      the same shape reached by growing through three generations, blocks not condensed
    condensed  the grown model with its blocks merged into one per weight
each eager and compiled (per block and head), each with or without our Triton kernels for RoPE and
SwiGLU's backward (triton_kernels: gpt_kernels.py), with today's kernels or liger-kernel's fused ones
(fused_kernels), and with the attention backend torch picks or flash or cuDNN first (attention).
A run with Triton kernels (ours or liger's) or another attention backend first checks its loss and
gradients against torch's own code (eager, no Triton kernels), and is not timed if they differ.
A step is micro_steps forward/backward passes of batch_size x block_size tokens and one optimizer
step, as a training iteration on one GPU. MFU counts 6 FLOPs per weight per token plus attention
with the causal discount (only the lower triangle of the scores is computed).

    python bench.py config/stage1.py
    python bench.py config/stage3.py --variants=fresh --compile_modes=compiled --profile=True  # where the time goes
    python bench.py config/stage3.py --variants=fresh --compile_modes=compiled --triton_kernels=on,off  # ours
    python bench.py config/stage3.py --variants=fresh --compile_modes=compiled --fused_kernels=none,all  # liger's
    python bench.py config/stage3.py --variants=fresh --compile_modes=compiled --attention=default,flash,cudnn \
        --profile=True  # the attention backends
    torchrun --standalone --nproc_per_node=2 bench.py config/stage1.py --variants=fresh  # DDP scaling

With --sample=True it times generation instead, at batch 1 on a random model of the config's shape (bf16 on
CUDA, float32 on the CPU, where it runs too), by decoder: `none` runs the whole sequence again for every
token, `dynamic` is GPT.generate's KV cache (the attended prefix grows, so every token has new shapes),
`static` StaticDecoder eager, `compiled` StaticDecoder with one CUDA graph per token; each with the weights
as sample.py holds them (`joined`: q, k, v and gate, up in one storage each, GPT.join_stacked_weights) and, for
comparison, `copied` (copied together at every token, as before).

    python bench.py config/stage3.py --sample=True
    python bench.py config/stage1.py --sample=True --sample_modes=none,dynamic,static  # on the CPU, not compiled

    torchrun --standalone --nproc_per_node=1 bench.py config/stage6.py --variants=fresh,grown \
        --compile_modes=eager --batch_size=1 --warmup_steps=2 --timed_steps=3  # FSDP2 peak memory

A config's parallelism='fsdp' (stages 5-7) shards as train.py does (FSDP2, bf16 blocks, fp32 root), over
torchrun's ranks; on one rank nothing is sharded, and the peak is the whole model's.
"""

import copy
import functools
import itertools
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import torch
import torch._dynamo
import torch._functorch.config
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

from grow import condense, grow_model
from model import GPT, GPTConfig, StaticDecoder, fused_kernel_names, load_fused_kernels

# -----------------------------------------------------------------------------
vocab_size, n_layer, n_head, head_dim, ffn_hidden, block_size = 4096, 10, 5, 128, 1792, 2048
batch_size = 8
micro_steps = 1  # forward/backward passes per optimizer step (train.py's grad_accum_steps / GPUs)
warmup_steps, timed_steps = 10, 20
variants = "fresh,grown,condensed"
compile_modes = "eager,compiled"
peak_flops = 989e12
peak_flops_name = "H100/H200 SXM bf16 dense"
out_json = ""  # also write the results here
profile = False  # after timing, profile 3 steps: GPU time by kind of kernel, the slowest GEMMs and elementwise kernels
triton_kernels = "on"  # comma-separated runs: 'on' (today's code: gpt_kernels.py's RoPE and SwiGLU backward), 'off'
fused_kernels = "none"  # comma-separated runs, each 'none', 'all' or ops of model.FUSABLE joined by '+'
attention = "default"  # comma-separated runs, each 'default' (torch's own order: today's code), 'flash' or 'cudnn'
fused_batch_size = 0  # the fused runs' micro-batch (0: batch_size): the fused cross-entropy holds no logits
sample = False  # time generation instead (batch 1; CPU too)
sample_modes = "none,dynamic,static,compiled"
sample_weights = "joined,copied"
prompt_tokens = 16
max_new_tokens = 0  # per timed generation; 0: 256 on CUDA, 32 on the CPU, or what block_size leaves
parallelism = "ddp"  # 'ddp' | 'fsdp' (FSDP2 as train.py; under torchrun, where one process is enough)
# the config files set training keys bench ignores
(out_dir, init_from, grow_from, data_dir, max_iters, learning_rate, min_lr, warmup_iters, decay_iters, lr_mult,
 cooldown_iters, eval_interval, eval_windows, log_interval, compile, grad_accum_steps) = (None,) * 16
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
try:
    final = GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, head_dim=head_dim,
                      ffn_hidden=ffn_hidden, block_size=block_size)
except ValueError as e:
    raise SystemExit(f"bench.py: {e}") from None
if sample and max_new_tokens == 0:  # the default: what fits, up to 256 on CUDA and 32 on the CPU
    max_new_tokens = min(256 if torch.cuda.is_available() else 32, block_size - prompt_tokens)
if sample and (prompt_tokens < 1 or max_new_tokens < 1 or prompt_tokens + max_new_tokens > block_size):
    raise SystemExit(f"bench.py: --prompt_tokens={prompt_tokens} --max_new_tokens={max_new_tokens}: pass a prompt of "
                     f"1 or more tokens and 1 or more new ones, {block_size} (block_size) at most in all")
# the order in which scaled_dot_product_attention tries its backends; each falls back to the next where it cannot run
FALLBACKS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ATTENTION = {"default": None, "flash": [SDPBackend.FLASH_ATTENTION, *FALLBACKS],
             "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, *FALLBACKS]}
if not set(attention.split(",")) <= set(ATTENTION):
    raise SystemExit(f"bench.py: --attention={attention}: pick from {','.join(ATTENTION)}")
if not set(triton_kernels.split(",")) <= {"on", "off"}:
    raise SystemExit(f"bench.py: --triton_kernels={triton_kernels}: pick 'on', 'off' or 'on,off'")


def seconds(fn, sync):
    """Wall time of fn, the device's queue drained before and after."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench_sampling():
    """Tokens/s of a generation (prompt included, as sample.py prints it), the best of 3 after one of the same
    shape as warm-up (compilation, the CUDA graph's recording), at sample.py's default temperature and top_k."""
    modes = sample_modes.split(",")
    if not set(modes) <= {"none", "dynamic", "static", "compiled"}:
        raise SystemExit(f"bench.py: --sample_modes={sample_modes}: pick from none,dynamic,static,compiled")
    on_cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if on_cuda else lambda: None
    weights_asked = sample_weights.split(",")
    if not set(weights_asked) <= {"joined", "copied"}:
        raise SystemExit(f"bench.py: --sample_weights={sample_weights}: pick from joined,copied")
    torch.manual_seed(0)
    models = {"copied": GPT(final).to(device, dtype).eval()}
    if "joined" in weights_asked:  # the same weights, a copy only when both are timed
        both = "copied" in weights_asked
        models["joined"] = (copy.deepcopy(models["copied"]) if both else models["copied"]).join_stacked_weights()
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens), device=device)
    print(f"sampling {final}: batch 1, {prompt_tokens} prompt + {max_new_tokens} new tokens, "
          f"{torch.cuda.get_device_name() if on_cuda else 'cpu'}, {str(dtype)[6:]}", flush=True)
    for mode, weights in itertools.product(modes, weights_asked):
        model = models[weights]
        if mode in ("none", "dynamic"):
            generate = functools.partial(model.generate, use_cache=mode == "dynamic")
        else:
            generate = StaticDecoder(model, 1, prompt_tokens + max_new_tokens, compile=mode == "compiled").generate
        torch._dynamo.utils.counters.clear()
        generate(prompt, max_new_tokens, 0.8, 200)
        dt = min(seconds(lambda: generate(prompt, max_new_tokens, 0.8, 200), sync) for _ in range(3))
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]  # 0 unless CUDA graphs fell back
        print(f"{mode:8s} {weights:6s} {max_new_tokens / dt:8.1f} tokens/s  {1e3 * dt / max_new_tokens:7.2f} ms/token"
              + (f"  CUDA graph skips {skips}" if mode == "compiled" and on_cuda else ""), flush=True)


if sample:
    bench_sampling()
    sys.exit()
if not torch.cuda.is_available():
    raise SystemExit("bench.py times CUDA kernels: run it on a machine with an NVIDIA GPU")
ddp = "RANK" in os.environ
if ddp:
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
fsdp = ddp and parallelism == "fsdp"
if parallelism == "fsdp" and not ddp:
    print("parallelism='fsdp' shards over torchrun's ranks; this single process runs unsharded")
device = torch.device("cuda", torch.cuda.current_device())
try:
    runs = {spec: fused_kernel_names(spec) for spec in fused_kernels.split(",")}
except ValueError as e:
    raise SystemExit(str(e))
load_fused_kernels(frozenset().union(*runs.values()), device)  # refused now, not after the other runs
# AOTAutograd's cache keys a compiled block by its traced graph, where attention is still one generic op: a run
# under another backend order would reuse the previous run's kernels
torch._functorch.config.enable_autograd_cache = False


def attention_order(backend):
    return nullcontext() if ATTENTION[backend] is None else sdpa_kernel(ATTENTION[backend], set_priority=True)


def attention_backend(backend, batch):
    """The backend torch's attention picks for a training step's shapes under backend's order."""
    q = torch.empty(batch, final.n_head, block_size, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    with attention_order(backend):
        return SDPBackend(torch._fused_sdp_choice(q, q, q, None, 0.0, True)).name
torch.backends.cuda.matmul.allow_tf32 = True


def build(variant):
    if variant == "fresh":
        return GPT(final)
    # three generations: about half, then three quarters, then the full shape on every axis
    model = None
    for f in (0.5, 0.75, 1.0):
        c = GPTConfig(vocab_size=int(vocab_size * f), n_layer=max(1, round(n_layer * f)),
                      n_head=max(1, round(n_head * f)), head_dim=head_dim,
                      ffn_hidden=8 * round(ffn_hidden * f / 8), block_size=block_size)
        model = GPT(c) if model is None else grow_model(model, c, vocab_init="random", head_init="zero")[0]
    if variant == "condensed":
        model, _ = condense(model, max(model.generations()))
    return model


def train_step(runner, optimizer, x):
    for micro in range(micro_steps):
        if fsdp:  # reduce-scatter on the last micro-step only, as train.py
            runner.set_requires_gradient_sync(micro == micro_steps - 1)
        with runner.no_sync() if ddp and not fsdp and micro < micro_steps - 1 else nullcontext():  # sync the last only
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = runner(x, x)
            loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# Triton kernels (ours, liger's) compared with torch's own code on the same weights and batch, under bf16
# autocast: the loss to LOSS_RTOL, and each gradient to GRAD_RTOL of its norm. bf16 keeps 8 significant bits
# (0.4%); measured on the CPU, torch's eager and compiled code differ by up to 1% of a gradient's norm, and RoPE
# in float32 (liger's) against bf16 RoPE by up to 1.6% (wq, wk; 8 layers, d=512). A wrong layout, scale or gain
# is off by tens of percent.
LOSS_RTOL, GRAD_RTOL = 1e-3, 0.05


def loss_and_grads(model, x, rows, backend):
    """The mean loss of model on x (as its own targets) and every parameter's gradient, rows of x at a time."""
    loss_sum = 0.0
    for chunk in x.split(rows):
        with torch.autocast("cuda", dtype=torch.bfloat16), attention_order(backend):
            _, loss = model(chunk, chunk)
        (loss * len(chunk) / len(x)).backward()
        loss_sum += loss.item() * len(chunk)
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss_sum / len(x), grads


def check_kernels(model, reference, kernels, backend, x):
    """Refuse to time kernels (SystemExit) whose loss or gradients on x are not torch's own code's (reference, eager,
    the same weights, torch's own attention backend; 8 rows at a time, so that a batch only the fused head fits
    still runs)."""
    loss, grads = loss_and_grads(model, x, len(x), backend)
    ref_loss, ref_grads = loss_and_grads(reference, x, 8, "default")
    rel = {n: ((grads[n] - g).norm() / g.norm()).item() for n, g in ref_grads.items()}
    worst = max(rel, key=lambda n: rel[n] if math.isfinite(rel[n]) else math.inf)
    said = (f"loss {loss:.6f} against torch's code's {ref_loss:.6f}, gradients off by up to {rel[worst]:.2%} of "
            f"their norm (worst: {worst})")
    if not (abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss) and rel[worst] <= GRAD_RTOL):
        raise SystemExit(f"{kernels} is not the model torch's own code runs: {said}; tolerances {LOSS_RTOL:g} on the "
                         f"loss, {GRAD_RTOL:.0%} on a gradient: not timed")
    if rank == 0:
        print(f"{kernels} checked: {said}", flush=True)


def unfused_copy(model):
    """Draw model's weights afresh (gains around 1, no zero strips: every path carries a gradient, and a kernel
    that ignored a gain would show) and return a copy that runs torch's own code, without Triton kernels."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(mean=1.0 if p.dim() == 1 else 0.0, std=0.2 if p.dim() == 1 else 0.02)
    reference = copy.deepcopy(model)
    reference.use_triton_kernels(False)
    return reference


KERNEL_KINDS = [("ours (gpt_kernels.py)", r"^gpt_"),
                ("liger", r"^_rms_norm|^_triton_rope|^_swiglu|liger_cross_entropy|element_mul"),
                ("attention (cuDNN)", r"cudnn"), ("attention", r"sdpa|flash|fmha|attn"),
                ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|matmul"),
                ("adamw", r"adam"), ("elementwise (inductor)", r"^triton_")]


def profile_kernels(step, steps=3, top=12):
    """GPU time per step by kind of kernel (by name: ours, liger's, cuBLAS, cuDNN, inductor's Triton, AdamW), in ms,
    and the slowest GEMMs and the slowest kernels of the other kinds (not attention or AdamW), each
    [(name, launches per step, ms)]: inductor names a kernel by the ops it fused, and kernels of one name are summed."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kinds = dict.fromkeys([k for k, _ in KERNEL_KINDS] + ["other"], 0.0)
    gemms, rest = [], []
    for event in prof.key_averages():
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, event.key, re.I)), "other")
        ms = event.self_device_time_total / steps / 1e3
        kinds[kind] += ms
        if kind not in ("attention", "attention (cuDNN)", "adamw"):
            (gemms if kind == "gemm" else rest).append((event.key, event.count // steps, ms))
    return kinds, *(sorted(kernels, key=lambda kernel: -kernel[2])[:top] for kernels in (gemms, rest))


def bench(variant, compiled, spec, backend, triton_run):
    torch.manual_seed(0)
    torch._dynamo.reset()  # no graphs or dynamic-shape decisions carried over from the previous variant
    model = build(variant).to(device)
    fused = runs[spec]
    ours = model.use_triton_kernels(triton_run == "on")  # off where they cannot run: the row then says so
    triton_run = "on" if ours else "off"
    checked = fused or backend != "default" or ours
    reference = unfused_copy(model) if checked else None
    model.use_fused_kernels(fused)
    if compiled:
        model.compile_parts()
    batch = fused_batch_size if fused and fused_batch_size else batch_size
    x = torch.randint(0, vocab_size, (batch, block_size), device=device)
    torch._dynamo.utils.counters.clear()  # the check compiles the graphs the timed steps run, at the same shapes
    if checked:
        check_kernels(model, reference, f"triton_kernels={triton_run} fused_kernels={spec} attention={backend}",
                      backend, x)
        del reference
    if fsdp:
        model.shard(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, fused=True)
    runner = DDP(model, device_ids=[device.index]) if ddp and not fsdp else model
    picked = attention_backend(backend, batch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.reset_peak_memory_stats()  # the timed steps' peak, not the check's
    with attention_order(backend):  # compiled code takes the backend when it is traced
        for step in range(warmup_steps + timed_steps):
            if step == warmup_steps:
                start.record()
            train_step(runner, optimizer, x)
        end.record()
        torch.cuda.synchronize()
        dt = start.elapsed_time(end) / 1e3 / timed_steps
        if profile:  # every rank steps (DDP all-reduces), rank 0 reports
            kernel_ms, gemms, slowest = profile_kernels(lambda: train_step(runner, optimizer, x))
            if rank == 0:
                kinds = ", ".join(f"{k} {v:.1f} ms" for k, v in kernel_ms.items())
                print(f"{variant} {'compiled' if compiled else 'eager'} triton={triton_run} fused={spec} "
                      f"attention={backend}: of "
                      f"{1e3 * dt:.1f} ms/step, GPU kernels {kinds}", flush=True)
                for kind, kernels in [("GEMMs", gemms), ("kernels that are not GEMMs, attention or AdamW", slowest)]:
                    print(f"  the slowest {kind}:")
                    for name, launches, ms in kernels:
                        print(f"    {ms:6.2f} ms in {launches:3d} launches  {name[:100]}", flush=True)
    tok_per_s = micro_steps * batch * block_size / dt  # per GPU
    counters = torch._dynamo.utils.counters
    return dict(variant=variant, compiled=compiled, triton_kernels=triton_run, fused_kernels=spec, attention=backend,
                attention_picked=picked, batch_size=batch, gpus=world,
                blocks=sum(1 for _ in model.parameters()), step_ms=1e3 * dt, tok_per_s_per_gpu=tok_per_s,
                mfu=model.flops_per_token(block_size) * tok_per_s / peak_flops,
                compiled_frames=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30)


results = []
for variant in variants.split(","):
    for mode in compile_modes.split(","):
        for spec, backend, triton_run in itertools.product(runs, attention.split(","), triton_kernels.split(",")):
            r = bench(variant, mode == "compiled", spec, backend, triton_run)
            results.append(r)
            if rank == 0:  # graph breaks: the fused cross-entropy's one is on purpose (torch.compiler.disable)
                print(f"{variant:9s} {mode:8s} triton={r['triton_kernels']:3s} fused={spec:5s} attention {backend}: "
                      f"{r['attention_picked']:<15s} "
                      f"batch {r['batch_size']:3d} {r['blocks']:4d} blocks  "
                      f"{r['step_ms']:8.1f} ms/step  {r['tok_per_s_per_gpu']:10,.0f} tok/s/GPU  "
                      f"MFU {100 * r['mfu']:5.1f}%  graphs {r['compiled_frames']} breaks {r['graph_breaks']}  "
                      f"peak {r['peak_mem_gb']:.1f} GiB", flush=True)
if rank == 0:
    print(f"{torch.cuda.get_device_name()}, {world} GPU(s){' under FSDP2' if fsdp else ''}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}, {micro_steps} "
          f"micro-steps of {block_size} tokens per row per step, MFU against {peak_flops / 1e12:.0f} TFLOP/s "
          f"({peak_flops_name}), causal attention FLOPs")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), config=str(final), results=results), f, indent=1)
if ddp:
    dist.destroy_process_group()
