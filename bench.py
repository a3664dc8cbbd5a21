"""
Time training steps (forward, backward, fused AdamW) on synthetic data, after warm-up, with
CUDA events. In one run it compares, for the shape of a config:
    fresh      a freshly built model
    grown      the same shape reached by growing through three generations, blocks not condensed
    condensed  the grown model with its blocks merged into one per weight
each eager and compiled (per block and head). A step is micro_steps forward/backward passes of
batch_size x block_size tokens and one optimizer step, as a training iteration on one GPU. MFU
counts 6 FLOPs per weight per token plus attention with the causal discount (only the lower
triangle of the scores is computed).

    python bench.py config/stage1.py
    python bench.py config/stage3.py --variants=fresh --compile_modes=compiled --profile=True  # where the time goes
    torchrun --standalone --nproc_per_node=2 bench.py config/stage1.py --variants=fresh  # DDP scaling
    torchrun --standalone --nproc_per_node=1 bench.py config/stage6.py --variants=fresh,grown \
        --compile_modes=compiled --batch_size=1 --warmup_steps=2 --timed_steps=3  # FSDP2 peak memory

A config's parallelism='fsdp' (stages 5-7) shards as train.py does (FSDP2, bf16 blocks, fp32 root), over
torchrun's ranks; on one rank nothing is sharded, and the peak is the whole model's.
"""

import json
import os
import re
from contextlib import nullcontext

import torch
import torch._dynamo
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from grow import condense, grow_model
from model import GPT, GPTConfig

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
profile = False  # after timing, profile 3 steps and print GPU time by kind of kernel
parallelism = "ddp"  # 'ddp' | 'fsdp' (FSDP2 as train.py; under torchrun, where one process is enough)
# the config files set training keys bench ignores
(out_dir, init_from, grow_from, data_dir, max_iters, learning_rate, min_lr, warmup_iters, decay_iters, lr_mult,
 cooldown_iters, eval_interval, eval_windows, log_interval, compile, grad_accum_steps) = (None,) * 16
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

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
torch.backends.cuda.matmul.allow_tf32 = True
final = GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, head_dim=head_dim,
                  ffn_hidden=ffn_hidden, block_size=block_size)


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
        with runner.no_sync() if ddp and not fsdp and micro < micro_steps - 1 else nullcontext():  # sync the last only
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = runner(x, x)
            loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


KERNEL_KINDS = [("attention", r"sdpa|flash|fmha|attn|cudnn"), ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|matmul"),
                ("adamw", r"adam"), ("elementwise (inductor)", r"^triton_")]


def profile_kernels(step, steps=3):
    """GPU time per step by kind of kernel (by name: cuBLAS, cuDNN, inductor's Triton, AdamW), in ms."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kinds = dict.fromkeys([k for k, _ in KERNEL_KINDS] + ["other"], 0.0)
    for event in prof.key_averages():
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, event.key, re.I)), "other")
        kinds[kind] += event.self_device_time_total / steps / 1e3
    return kinds


def bench(variant, compiled):
    torch.manual_seed(0)
    torch._dynamo.reset()  # no graphs or dynamic-shape decisions carried over from the previous variant
    model = build(variant).to(device)
    if compiled:
        model.compile_parts()
    if fsdp:
        model.shard(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, fused=True)
    runner = DDP(model, device_ids=[device.index]) if ddp and not fsdp else model
    x = torch.randint(0, vocab_size, (batch_size, block_size), device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch._dynamo.utils.counters.clear()
    for step in range(warmup_steps + timed_steps):
        if step == warmup_steps:
            start.record()
        train_step(runner, optimizer, x)
    end.record()
    torch.cuda.synchronize()
    dt = start.elapsed_time(end) / 1e3 / timed_steps
    if profile:  # every rank steps (DDP all-reduces), rank 0 reports
        kernel_ms = profile_kernels(lambda: train_step(runner, optimizer, x))
        if rank == 0:
            print(f"{variant} {'compiled' if compiled else 'eager'}: of {1e3 * dt:.1f} ms/step, GPU kernels "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in kernel_ms.items()), flush=True)
    tok_per_s = micro_steps * batch_size * block_size / dt  # per GPU
    return dict(variant=variant, compiled=compiled, gpus=world, blocks=sum(1 for _ in model.parameters()),
                step_ms=1e3 * dt, tok_per_s_per_gpu=tok_per_s,
                mfu=model.flops_per_token(block_size) * tok_per_s / peak_flops,
                compiled_frames=torch._dynamo.utils.counters["stats"]["unique_graphs"],
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30)


results = []
for variant in variants.split(","):
    for mode in compile_modes.split(","):
        r = bench(variant, mode == "compiled")
        results.append(r)
        if rank == 0:
            print(f"{variant:9s} {mode:8s} {r['blocks']:4d} blocks  {r['step_ms']:8.1f} ms/step  "
                  f"{r['tok_per_s_per_gpu']:10,.0f} tok/s/GPU  MFU {100 * r['mfu']:5.1f}%  "
                  f"graphs {r['compiled_frames']}  peak {r['peak_mem_gb']:.1f} GiB", flush=True)
        torch.cuda.reset_peak_memory_stats()
if rank == 0:
    print(f"{torch.cuda.get_device_name()}, {world} GPU(s){' under FSDP2' if fsdp else ''}, {micro_steps} x batch "
          f"{batch_size}x{block_size} per step, MFU against {peak_flops / 1e12:.0f} TFLOP/s ({peak_flops_name}), "
          "causal attention FLOPs")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), config=str(final), results=results), f, indent=1)
if ddp:
    dist.destroy_process_group()
