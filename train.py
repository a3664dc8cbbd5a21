"""
Train one stage of the growing ladder.

One process (CPU or one GPU):
    python train.py config/tiny_stage1.py
DDP on 8 GPUs of one node:
    torchrun --standalone --nproc_per_node=8 train.py config/stage3.py
Two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py config/stage3.py

A stage starts from scratch, resumes its own checkpoint, or grows another stage's checkpoint
(init_from='grow'): the parameters growth adds are a new generation with this config's
learning-rate schedule, while the old generations continue their own schedules.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from grow import OPTIONS as GROWTH_OPTIONS, GrowError, grow_checkpoint
from model import CHECKPOINT_KEYS, GPT, GPTConfig, RESUME_KEYS, checkpoint_params, fused_kernel_names, \
    load_checkpoint, load_fused_kernels, model_from_checkpoint, runnable_device_type, save_checkpoint
import prepare

# -----------------------------------------------------------------------------
# config, overridable by config/*.py and --key=value
out_dir = "out/tiny_stage1"
init_from = "scratch"  # 'scratch' | 'resume' (this out_dir's checkpoint) | 'grow' (grow_from, grown to this shape)
# | 'branch' (a new run from branch_from's checkpoint, same shape: for a cooldown at that point)
grow_from = ""  # checkpoint of the previous stage
branch_from = ""  # checkpoint to branch from
parent_data_dir = ""  # grow: the parent's tier, where it is not (any longer) where its checkpoint says
eval_only = False  # evaluate the checkpoint (init_from='resume') once, print it and exit: nothing is written
write_checkpoints = True  # False: evaluate but never write ckpt.pt (benchmark runs; 7B with AdamW state is ~81 GB)
snapshot_interval = 0  # also keep ckpt_<iter>.pt every this many iterations, to branch from later (0: off)
# data
data_dir = "data/tinyshakespeare/llama2_v512"  # a tier written by prepare.py
tokenizer = "llama2"  # for new rows at their pieces' mean: a tokenizer.model path or name; "llama2": meta.json's
tier_ramp_iters = 0  # after a vocabulary growth, rows come from the parent's tier with odds falling 1 -> 0 (0: off)
# model
vocab_size = 512
n_layer = 2
n_head = 2
head_dim = 16
ffn_hidden = 96
block_size = 64
rope_theta = 10000.0
norm_eps = 1e-5
dropout = 0.0
# growth (init_from='grow')
layer_place = "top"  # 'top' | 'interleave'
layer_init = "zero"  # 'zero' (identity) | 'copy' (duplicate the layer below) | 'stack' (the old stack again, on top)
vocab_init = "mean"  # new embedding rows: 'mean' of the old-tier pieces' rows | 'random'
head_init = "mean"  # new lm_head rows: 'mean' of the pieces' rows | 'zero'
reset_optimizer = False  # drop the AdamW state at growth (ablation)
condense_upto = -1  # merge generations <= this into one block after growing (-1: off)
# batch: tokens per iteration = batch_size * block_size * grad_accum_steps (over all ranks)
batch_size = 16  # per micro-step and rank
grad_accum_steps = 1  # in total, divided among the ranks
max_iters = 100  # iterations this stage trains
# the schedule of the generation this stage adds, on its own clock from its birth: a linear warmup to
# learning_rate * lr_mult, then 'wsd' holds it, 'cosine' decays to min_lr at decay_iters
schedule = "wsd"  # 'wsd' | 'cosine'
learning_rate = 3e-3
warmup_iters = 10
decay_iters = 100  # cosine only
min_lr = 3e-4
lr_mult = 1.0
cooldown_iters = 0  # the stage's last this-many iterations take every generation toward min_lr * its mult (0: none)
cooldown_shape = "linear"  # 'linear' | '1-sqrt'
old_lr_mult = 1.0  # from this stage on, the generations born before it run at this multiple of their LR
lr_mode = "generation"  # 'generation' (each its own schedule) | 'global' (this stage's schedule for all, from its start)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation and logging
eval_interval = 50
eval_windows = 64  # val windows per eval, fixed and spread over the split, so evals compare across stages and runs
log_interval = 10
seed = 1337
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
compile = False
activation_checkpointing = False  # recompute each block's activations in backward: ~1/3 more compute, far less memory
triton_kernels = True  # RoPE and SwiGLU's backward in gpt_kernels.py (CUDA, Ampere on); False: torch's
fused_kernels = ""  # 'all', or ops of model.FUSABLE joined by '+', run by liger-kernel's Triton kernels (CUDA; optional)
parallelism = "ddp"  # 'ddp' (replicate) | 'fsdp' (FSDP2: shard every block and the root; past one GPU's memory)
peak_flops = 989e12  # per GPU, for MFU
peak_flops_name = "H100/H200 SXM bf16 dense"
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
defaults = {k: globals()[k] for k in config_keys}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
config = {k: globals()[k] for k in config_keys}
# a resume continues the run as it was set up: these are the checkpoint's (a branch may change the optimizer's)
RUN_KEYS = ("schedule", "learning_rate", "warmup_iters", "decay_iters", "min_lr", "lr_mult", "cooldown_iters",
            "cooldown_shape", "old_lr_mult", "lr_mode", "tier_ramp_iters", "weight_decay", "beta1", "beta2", "grad_clip")
# a branch sets its own cooldown, old_lr_mult and optimizer settings; the generations' records (and a ramp) are the parent's
BRANCH_KEEPS = ("schedule", "learning_rate", "warmup_iters", "decay_iters", "min_lr", "lr_mult", "lr_mode",
                "tier_ramp_iters")
for key, allowed in (("init_from", ("scratch", "resume", "grow", "branch")), ("lr_mode", ("generation", "global")),
                     ("schedule", ("wsd", "cosine")), ("cooldown_shape", ("linear", "1-sqrt")),
                     ("parallelism", ("ddp", "fsdp")), ("dtype", ("bfloat16", "float16", "float32")),
                     *GROWTH_OPTIONS.items()):
    if config[key] not in allowed:
        raise SystemExit(f"{key}={config[key]!r} is not one of {', '.join(allowed)}")
for key in ("batch_size", "grad_accum_steps", "eval_interval", "eval_windows", "log_interval", "lr_mult",
            "peak_flops"):
    if config[key] <= 0:
        raise SystemExit(f"{key}={config[key]} must be positive")
for key in ("cooldown_iters", "tier_ramp_iters", "snapshot_interval", "seed", "learning_rate", "min_lr",
            "weight_decay", "grad_clip", "max_iters", "warmup_iters", "old_lr_mult"):
    if config[key] < 0:
        raise SystemExit(f"{key}={config[key]} must be >= 0")
for key in ("beta1", "beta2", "dropout"):
    if not 0 <= config[key] < 1:
        raise SystemExit(f"{key}={config[key]} must be in [0, 1)")
if max_iters == 0 and not eval_only:
    raise SystemExit("max_iters=0 trains nothing: pass max_iters >= 1, or --eval_only=True to evaluate")
if cooldown_iters > max_iters:
    raise SystemExit(f"cooldown_iters={cooldown_iters} is longer than the stage (max_iters={max_iters})")
for key, path in (("grow", grow_from), ("branch", branch_from)):
    if init_from == key and not path:
        raise SystemExit(f"init_from={key!r} needs --{key}_from=PATH/ckpt.pt")
if not out_dir:
    raise SystemExit("out_dir is empty: pass --out_dir=DIR")
if condense_upto < -1:
    raise SystemExit(f"condense_upto={condense_upto}: pass a generation (0, 1, ...) or -1 (off)")
try:
    device_type = runnable_device_type(device)  # cuda:N under torchrun below is still cuda
except ValueError as e:
    raise SystemExit(str(e)) from None
if dtype == "float16" and (device_type != "cuda" or parallelism == "fsdp"):
    raise SystemExit("dtype='float16' (with a GradScaler, for GPUs without bfloat16 such as the T4) needs "
                     "device=cuda and parallelism='ddp'; elsewhere use bfloat16 or float32")
if dtype != "float32" and device_type != "cuda":  # the CPU runs without autocast: say so, and record it
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"dtype={dtype} is for CUDA's autocast; on {device} this run trains in float32")
    dtype = config["dtype"] = "float32"
try:
    fused = fused_kernel_names(fused_kernels)
except ValueError as e:
    raise SystemExit(str(e))
load_fused_kernels(fused, torch.device(device))  # here, before anything is read or written: it may refuse
# -----------------------------------------------------------------------------

ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
master = rank == 0
writes_run = master and not eval_only  # the process that writes out_dir; an eval-only run writes nothing


def refuse_together(reason):
    """Rank 0's reason to stop (or None), raised on every rank: a rank left running would die in its next
    collective with a traceback. Rank 0 decides what only its filesystem may show (out_dir, the log)."""
    box = [reason]
    if ddp:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise SystemExit(box[0] if master else 1)  # said once


def unwritable(folder):
    """Why folder cannot take a run's files (None if it can), checked without making it."""
    nearest = os.path.abspath(folder)  # the nearest folder that exists must take them
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest) or not os.access(nearest, os.W_OK):
        return (f"out_dir {folder} cannot be written ({nearest} is "
                f"{'a file' if not os.path.isdir(nearest) else 'read-only'}); pass another --out_dir")
    return None


refuse_together(unwritable(out_dir) if writes_run else None)  # here, not after minutes of loading
if grad_accum_steps % world:
    raise SystemExit(f"grad_accum_steps={grad_accum_steps} must be a multiple of the {world} ranks")
if eval_windows % world:  # every rank evaluates its share: the same windows on any number of GPUs
    raise SystemExit(f"eval_windows={eval_windows} must be a multiple of the {world} ranks")
accum = grad_accum_steps // world
tokens_per_iter = batch_size * block_size * grad_accum_steps
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = nullcontext() if device_type == "cpu" else torch.autocast(device_type, dtype=ptdtype)
torch.manual_seed(seed)  # the same initial weights on every rank: FSDP shards them as they are
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def log(msg):
    if master:
        print(msg, flush=True)


# ---- data -------------------------------------------------------------------

def open_tier(path):
    """(meta.json, the bins as memmaps) of a tier, checked by prepare.open_tier; a problem is one line."""
    try:
        return prepare.open_tier(path)
    except prepare.PrepareError as e:
        raise SystemExit(str(e))


meta, bins = open_tier(data_dir)
if meta["vocab_size"] != vocab_size:
    raise SystemExit(f"data tier {data_dir} has vocab {meta['vocab_size']} but the model has {vocab_size}; "
                     f"set data_dir to the v{vocab_size} tier or vocab_size={meta['vocab_size']}")
for split, data in bins.items():
    if len(data) < block_size + 2:  # a row and its targets, from at least two starts
        raise SystemExit(f"{split}.bin in {data_dir} has {len(data)} tokens, too few for block_size={block_size}: "
                         f"lower block_size below {len(data) - 1} or prepare more text")


def old_tier_odds(ramp, it):
    """The chance that a row of iteration it comes from the parent's tier: 1 at the growth, 0 after the ramp."""
    return max(0.0, 1 - (it - ramp["start"]) / ramp["iters"]) if ramp else 0.0


def draw_rows(it):
    """The global batch of iteration it: (bins, start) per row. It depends only on (seed, it), never on the
    number of ranks, so DDP matches one process and a resumed run sees exactly the batches it would
    have seen. During a tier ramp each row also draws its tier, from a stream of its own."""
    n = batch_size * grad_accum_steps
    starts = np.random.default_rng([seed, it]).integers(0, len(bins["train"]) - block_size - 1, size=n)
    rows = [(bins["train"], s) for s in starts]
    odds = old_tier_odds(tier_ramp, it)
    if odds > 0:
        ramp_rng = np.random.default_rng([seed, it, 1])
        old = ramp_rng.random(n) < odds
        old_starts = ramp_rng.integers(0, len(ramp_train) - block_size - 1, size=n)
        rows = [(ramp_train, o) if is_old else row for row, is_old, o in zip(rows, old, old_starts)]
    return rows


def get_batch(rows, micro):
    """This rank's rows for a micro-step: rank r takes every world-th slice of batch_size rows."""
    mine = rows[(micro * world + rank) * batch_size:][:batch_size]
    x = torch.from_numpy(np.stack([data[s:s + block_size] for data, s in mine]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[s + 1:s + 1 + block_size] for data, s in mine]).astype(np.int64))
    if device_type == "cuda":  # pinned + non_blocking: the copy overlaps the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model, data, meta, n_windows, T):
    """Val loss and bits per byte on n_windows fixed windows, spread over the ranks.
    Logits are restricted to the data's vocabulary, so a grown model can be scored on its
    parent's tier: restricted, it must give the parent's numbers."""
    model.eval()
    n_windows = -(-n_windows // world) * world  # as many batches on every rank: FSDP forwards are collective
    starts = prepare.eval_window_starts(len(data), n_windows, T)[rank::world]
    total = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of losses, count)
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        x = torch.from_numpy(np.stack([data[j:j + T] for j in s]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([data[j + 1:j + 1 + T] for j in s]).astype(np.int64)).to(device)
        with autocast:
            logits, _ = model(x)
        v = meta["vocab_size"]
        loss = F.cross_entropy(logits[..., :v].float().reshape(-1, v), y.view(-1), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(y.numel(), device=device, dtype=torch.float64)])
    if ddp:
        dist.all_reduce(total)
    model.train()
    loss = (total[0] / total[1]).item()
    # nats per token -> bits per byte, with the split's token and UTF-8 byte counts
    return loss, loss * meta["val"]["tokens"] / meta["val"]["bytes"] / math.log(2)


# ---- learning rates -----------------------------------------------------------
# One record per generation, kept in the checkpoint: its schedule, birth, multiplier and the cooldown
# window of the stage that trains it. A stage writes its settings into every record when it starts,
# so a resume reads them back as they were.

def stage_schedule(gen, birth):
    return dict(gen=gen, birth=birth, schedule=schedule, warmup=warmup_iters, lr=learning_rate, min_lr=min_lr,
                decay_iters=decay_iters, mult=lr_mult)


def start_stage(generations, born):
    """This stage's settings on every generation's record: with lr_mode='global' each takes this stage's
    schedule from its start; those born before it (not in `born`) run at old_lr_mult times their LR;
    all share the stage's cooldown window (none when cooldown_iters is 0). A branch goes on with its parent's
    records (no new clock); every generation was born before it, so old_lr_mult (default 1) scales them all."""
    end = stage_start + max_iters
    cooldown = [end - cooldown_iters, end] if cooldown_iters else None
    records = []
    for g in generations:
        g = {"schedule": "cosine", **g}  # records from before WSD were cosine
        if init_from != "branch" and lr_mode == "global":
            g.update(stage_schedule(g["gen"], stage_start))
        if g["gen"] not in born:
            g["mult"] *= old_lr_mult
        records.append({**g, "cooldown": cooldown, "cooldown_shape": cooldown_shape})
    return records


def get_lr(s, it):
    """Learning rate of generation record s at global iteration it; its own clock starts at birth."""
    t = it - s["birth"]
    if t < s["warmup"]:
        lr = s["lr"] * (t + 1) / (s["warmup"] + 1)
    elif s["schedule"] == "wsd":
        lr = s["lr"]
    elif t >= s["decay_iters"]:
        lr = s["min_lr"]
    else:
        ratio = (t - s["warmup"]) / max(1, s["decay_iters"] - s["warmup"])
        lr = s["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (s["lr"] - s["min_lr"])
    if s.get("cooldown") and it >= s["cooldown"][0]:  # the cooldown's first step keeps the stable LR
        begin, end = s["cooldown"]
        done = min(1.0, (it - begin) / (end - begin))
        lr += (s["min_lr"] - lr) * (done if s["cooldown_shape"] == "linear" else math.sqrt(done))
    return lr * s["mult"]


# ---- how the run starts: scratch, resume, grow or branch --------------------------
# Each gives the model (on the CPU), its AdamW state by parameter name, and the run's counters.

def check_same_shape(ckpt, how):
    for k in ("vocab_size", "n_layer", "n_head", "head_dim", "ffn_hidden", "block_size"):  # (growth rescales norm_eps)
        if ckpt["model_config"][k] != config[k]:
            raise SystemExit(f"--init_from={how} keeps the checkpoint's shape, but {k}={config[k]} "
                             f"(checkpoint: {ckpt['model_config'][k]}); drop the override, or grow it with "
                             "--init_from=grow into a new out_dir")


def check_tokenizer(ckpt):
    if ckpt["data"]["tokenizer_sha256"] != meta["tokenizer_sha256"]:
        raise SystemExit(f"the checkpoint was trained with tokenizer {ckpt['data']['tokenizer']} "
                         f"({ckpt['data']['tokenizer_sha256'][:12]}) but {data_dir} uses "
                         f"{meta['tokenizer']} ({meta['tokenizer_sha256'][:12]}); prepare data with the same tokenizer")


def tier_text(tier_meta):
    """What a tier holds, as a checkpoint records it: a resume must find the same text at its data_dir."""
    return f"{tier_meta['train']['tokens']:,} train and {tier_meta['val']['tokens']:,} val tokens"


def trimmed_log(upto):
    """This out_dir's log without the steps a killed run logged past its checkpoint (they run again) or a line
    the kill cut short; a reason to stop instead where a line is not a record."""
    log_path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(log_path):
        return None, None
    try:
        with open(log_path) as f:
            lines = [line for line in f if line.endswith("\n")]
        return [line for line in lines if json.loads(line)["iter"] <= upto], None
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        return None, (f"{log_path} holds a line that is not one of train.py's records; mend or remove that line, "
                      "then resume")


def continued(ckpt):
    """The counters of a checkpoint's run, to go on from."""
    return dict(optim_state=ckpt["optimizer"], generations=ckpt["generations"], iter_num=ckpt["iter_num"],
                tokens=ckpt["tokens"], flops=ckpt["flops"], best_val_bpb=ckpt["best_val_bpb"],
                tier_ramp=ckpt.get("tier_ramp"), rng=ckpt["rng"], scaler=ckpt.get("scaler"))


def scheduled(generations):
    """(records, the generations born in this stage): grow.py writes a new generation's record with no schedule
    (it trains nothing), so one grown by it, once or more, takes this stage's schedule from its birth."""
    return ([g if "lr" in g else stage_schedule(g["gen"], g["birth"]) for g in generations],
            {g["gen"] for g in generations if "lr" not in g})


def scratch():
    return dict(model=GPT(model_config), optim_state={}, generations=[stage_schedule(0, 0)], iter_num=0, tokens=0,
                flops=0, best_val_bpb=None, stage_start=0, born={0}, tier_ramp=None, rng=None)


def resume(ckpt):
    """This out_dir's run, where its checkpoint left it. A checkpoint grown by grow.py starts its stage here."""
    check_same_shape(ckpt, "resume")
    run = dict(continued(ckpt), model=model_from_checkpoint(ckpt), stage_start=ckpt["stage_start"])
    run["generations"], run["born"] = scheduled(run["generations"])
    if run["born"]:  # grow.py's output: its stage starts here
        if "parent_data" in ckpt:  # a growth as train.py's own: its check, and a ramp if asked for
            run.update(grown_from_tier(ckpt["parent_data"], ckpt["iter_num"]), rng=None)
    else:
        recorded = ckpt["data"].get("text")  # checkpoints from before 2026-12-03 lack it
        if recorded and recorded != tier_text(meta):
            raise SystemExit(f"{data_dir} holds other text than this run trained on ({recorded} when it was "
                             f"saved, {tier_text(meta)} now): point data_dir at the run's tier, or start a new run")
        changed = {k: f"{ckpt['config'][k]} -> {config[k]}" for k in ("batch_size", "grad_accum_steps", "seed")
                   if ckpt["config"][k] != config[k]}
        if changed:  # allowed (a smaller GPU may need a smaller batch), but it is no longer the same run
            log(f"warning: resuming with {changed}: the batches from here differ from the original run's")
        fixed = RUN_KEYS + (("max_iters",) if ckpt["config"].get("cooldown_iters") else ())  # the cooldown is placed
        for k in fixed:
            if k in ckpt["config"] and ckpt["config"][k] != config[k]:
                raise SystemExit(f"--init_from=resume continues the run as it was set up, but {k}={config[k]} "
                                 f"(the run's: {ckpt['config'][k]}); drop the override, or start a new run from "
                                 f"its checkpoint with --init_from=branch --branch_from={ckpt_path}")
    return run


def branch(ckpt):
    """A new run (this out_dir) from another run's checkpoint, same shape: model, AdamW state, iteration,
    FLOPs and RNG, so its first step is the one the parent would have taken. Typically only a cooldown."""
    check_same_shape(ckpt, "branch")
    kept = {k: f"{config[k]} (the parent's {ckpt['config'][k]})" for k in BRANCH_KEEPS
            if ckpt["config"].get(k, config[k]) != config[k]}
    if kept:
        log(f"warning: a branch keeps the parent's learning-rate records, so these do nothing here: {kept}")
    run = dict(continued(ckpt), model=model_from_checkpoint(ckpt), stage_start=ckpt["iter_num"],
               parent_val_bpb=ckpt["last_val_bpb"])
    run["generations"], run["born"] = scheduled(run["generations"])  # none unless grow.py's output, untrained
    return run


def parent_tier(data):
    """The parent's data tier: parent_data_dir if given, else where its checkpoint's data record says (as
    given, then absolute)."""
    recorded = data["data_dir"], data.get("data_dir_abs", "")
    for path in (parent_data_dir,) if parent_data_dir else recorded:
        if os.path.isfile(os.path.join(path, "meta.json")):
            tier_meta, bins = open_tier(path)
            if (tier_meta["vocab_size"], tier_meta["tokenizer_sha256"]) != (data["vocab_size"], data["tokenizer_sha256"]):
                raise SystemExit(f"{path} is a v{tier_meta['vocab_size']} tier, but the parent was trained on "
                                 f"v{data['vocab_size']} (from {data['data_dir']}) with its tokenizer: pass "
                                 "--parent_data_dir=PATH of that tier")
            return path, tier_meta, bins
    where = parent_data_dir or " or ".join(p for p in recorded if p)
    raise SystemExit(f"the parent's data tier is not at {where}: pass --parent_data_dir=PATH (the tier it was "
                     "trained on)")


def grown_from_tier(parent_data, birth):
    """The parent's tier, found now, before anything is written (the growth check scores it), and the tier
    ramp from it when the vocabulary grew and tier_ramp_iters asks for one."""
    tier = parent_tier(parent_data)
    ramp = dict(data_dir=tier[0], start=birth, iters=tier_ramp_iters) \
        if tier_ramp_iters and vocab_size > parent_data["vocab_size"] else None
    return dict(parent_tier=tier, tier_ramp=ramp)


def grow(ckpt):
    """The parent's model grown to this config: a new generation with this stage's schedule."""
    tok = meta["tokenizer"] if tokenizer == "llama2" else tokenizer  # the default: the file the tier records
    try:
        model, optim_state, generations = grow_checkpoint(
            ckpt, model_config, tokenizer=tok, schedule=stage_schedule(0, 0), reset_optimizer=reset_optimizer,
            condense_upto=condense_upto, layer_place=layer_place, layer_init=layer_init, vocab_init=vocab_init,
            head_init=head_init)
    except GrowError as e:
        raise SystemExit(f"cannot grow {grow_from} to this config: {e}")
    generations, untrained = scheduled(generations)  # the parent may be grow.py's output, never trained
    run = dict(continued(ckpt), model=model, optim_state=optim_state, generations=generations,
               stage_start=ckpt["iter_num"], born={generations[-1]["gen"]} | untrained,
               **grown_from_tier(ckpt["data"], ckpt["iter_num"]))
    log(f"grew {grow_from}: {checkpoint_params(ckpt):,} -> {model.get_num_params():,} "
        f"parameters, generation {generations[-1]['gen']} born at iteration {ckpt['iter_num']}")
    return run


try:
    model_config = GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, head_dim=head_dim,
                             ffn_hidden=ffn_hidden, block_size=block_size, rope_theta=rope_theta,
                             norm_eps=norm_eps, dropout=dropout)
except ValueError as e:
    raise SystemExit(str(e))
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from != "resume" and any(os.path.exists(os.path.join(out_dir, f)) for f in ("ckpt.pt", "log.jsonl")):
    raise SystemExit(f"{out_dir} already holds a run; use --init_from=resume, another --out_dir, "
                     "or delete it (a run killed before its first checkpoint leaves only log.jsonl)")
t_load, parent = time.time(), None
if init_from == "scratch":
    run = scratch()
else:
    # all three go on from the checkpoint's run (tier_ramp is optional); a growth or branch also reads the parent's
    # last_val_bpb, which its log records: of a parent run more than once, it tells which run's checkpoint it was
    keys = CHECKPOINT_KEYS + RESUME_KEYS + (("last_val_bpb",) if init_from in ("grow", "branch") else ())
    # not scanned for NaN on load (every rank would read the whole file): train.py never saves one, and the
    # divergence guard stops a run from one at its first step
    ckpt = load_checkpoint({"resume": ckpt_path, "grow": grow_from, "branch": branch_from}[init_from], keys,
                           finite=False)
    check_tokenizer(ckpt)
    run = {"resume": resume, "grow": grow, "branch": branch}[init_from](ckpt)
    if "parent_tier" in run:  # grown here or by grow.py: the growth check below
        parent = {"config": ckpt["config"], "last_val_bpb": ckpt["last_val_bpb"], "tier": run["parent_tier"]}
    del ckpt
model, optim_state, iter_num, stage_start = run["model"], run["optim_state"], run["iter_num"], run["stage_start"]
if iter_num >= stage_start + max_iters and not eval_only:  # only a resume can be there
    go_on = "branch from it (--init_from=branch)" if cooldown_iters else "raise max_iters"
    raise SystemExit(f"nothing to train: {ckpt_path} is at iteration {iter_num}, past its stage's end (it began at "
                     f"{stage_start}, max_iters={max_iters}); {go_on} to go on, or pass --eval_only=True")
tokens_total, flops_total, best_val_bpb, tier_ramp = run["tokens"], run["flops"], run["best_val_bpb"], run["tier_ramp"]
generations = run["generations"]
starts_stage = init_from != "resume" or bool(run["born"])  # a resumed grow.py output starts one too
if starts_stage:
    generations = start_stage(generations, run["born"])
ramp_train = open_tier(tier_ramp["data_dir"])[1]["train"] if tier_ramp else None

torch.manual_seed(seed + rank)  # dropout differs between ranks
if run["rng"] is not None and init_from in ("resume", "branch") and master:
    # the checkpoint holds rank 0's: with dropout, ranks > 0 continue on a new stream
    torch.set_rng_state(run["rng"]["torch"])
    if "cuda" in run["rng"] and device_type == "cuda":  # dropout on the GPU draws from the device's generator
        torch.cuda.set_rng_state(run["rng"]["cuda"])
scaler_state = run.get("scaler") if init_from in ("resume", "branch") else None
branched_from_bpb = run.get("parent_val_bpb")  # a branch's parent's last eval: its log records it
del run
model.to(device)
model.use_fused_kernels(fused)
triton_on = model.use_triton_kernels(triton_kernels)  # False where they cannot run: the log says which
model_config = model.config
raw_model = model  # saved and grown; the compiled / DDP wrappers only run it
if compile:
    model.compile_parts()
model.checkpoint_blocks = activation_checkpointing
fsdp = ddp and parallelism == "fsdp"
if parallelism == "fsdp" and not ddp:
    log("parallelism='fsdp' shards over torchrun's ranks; this single process runs unsharded")
if fsdp:
    model.shard(ptdtype)
optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=learning_rate, betas=(beta1, beta2),
                              fused=device_type == "cuda")
params = dict(raw_model.named_parameters())
for name, state in optim_state.items():  # keyed by name: growth shifts positions, not names
    p = params[name]
    if fsdp:  # full tensors in the checkpoint; each rank keeps its shard
        state = {k: v if k == "step" else distribute_tensor(v.to(device), p.device_mesh, p.placements)
                 for k, v in state.items()}
    optimizer.state[p] = {k: v.to(p.device if k != "step" or device_type == "cuda" else "cpu")
                          for k, v in state.items()}
del optim_state
if init_from != "scratch":  # the checkpoint is memory-mapped: most reads happen while moving it to the device
    log(f"checkpoint read{', grown' if init_from == 'grow' else ''} and on {device} in {time.time() - t_load:.1f} s")
if ddp and not fsdp:  # the RoPE buffers never change: nothing to broadcast before each forward
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # float16 gradients underflow unscaled
if scaler.is_enabled() and scaler_state:  # its scale goes on as it was, so a resumed float16 run is the same run
    scaler.load_state_dict(scaler_state)
# a stage that starts at the checkpoint (grow.py's output) logs its start again: keep only what came before
kept_log, reason = trimmed_log(iter_num - starts_stage) if writes_run and init_from == "resume" else (None, None)
refuse_together(reason)
if writes_run:
    log_tmp, config_tmp = os.path.join(out_dir, "log.jsonl.tmp"), os.path.join(out_dir, "config.json.tmp")
    try:
        if kept_log is not None:  # only now, past every refusal: a refused resume leaves its log as it was
            with open(log_tmp, "w") as f:
                f.writelines(kept_log)
            os.replace(log_tmp, os.path.join(out_dir, "log.jsonl"))
        os.makedirs(out_dir, exist_ok=True)
        with open(config_tmp, "w") as f:
            json.dump(config, f, indent=1)
        os.replace(config_tmp, os.path.join(out_dir, "config.json"))
    except OSError as e:  # a full disk: the log and config stay as they were, with no partial copy beside them
        for tmp in (log_tmp, config_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise SystemExit(f"cannot write to out_dir {out_dir}: {e.strerror}; pass another --out_dir") from None
log("config: " + (" ".join(f"{k}={v}" for k, v in config.items() if v != defaults[k]) or "the defaults"))


def full(tensors):
    """Whole tensors on rank 0's CPU: FSDP shards are gathered one tensor at a time (every rank takes
    part), so a checkpoint is the same file whatever the number of GPUs, and resumes on any number."""
    whole = {}
    for k, v in tensors.items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        if master:
            whole[k] = v.cpu()
    return whole


def save(iter_num):
    t_save = time.time()
    model_state = full(raw_model.state_dict())
    optim_state = {name: full(optimizer.state[p]) for name, p in raw_model.named_parameters() if p in optimizer.state}
    if not master:
        return
    save_checkpoint({
        "model": model_state, "model_config": asdict(raw_model.config),
        "optimizer": optim_state,
        "generations": generations, "iter_num": iter_num, "stage_start": stage_start,
        "tokens": tokens_total, "flops": flops_total,
        "best_val_bpb": best_val_bpb, "last_val_bpb": last_val_bpb, "config": config, "tier_ramp": tier_ramp,
        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
        "rng": {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device_type == "cuda" else {})},
        "data": {"tokenizer": meta["tokenizer"], "tokenizer_sha256": meta["tokenizer_sha256"],
                 "vocab_size": meta["vocab_size"], "data_dir": data_dir, "data_dir_abs": os.path.abspath(data_dir),
                 "text": tier_text(meta)},
    }, ckpt_path)
    if snapshot_interval and iter_num % snapshot_interval == 0:  # a hard link: ckpt.pt is later replaced, not rewritten
        snapshot = os.path.join(out_dir, f"ckpt_{iter_num}.pt")
        if os.path.exists(snapshot):
            os.remove(snapshot)
        os.link(ckpt_path, snapshot)
    log(f"saved {ckpt_path} in {time.time() - t_save:.1f} s")


def log_event(event):
    if writes_run:
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(event) + "\n")


flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter
log(f"{raw_model.get_num_params():,} parameters, generations {raw_model.generations()}, "
    f"{tokens_per_iter:,} tokens/iter, {flops_per_iter / tokens_per_iter / 1e6:.1f} MFLOPs/token "
    f"(6N + causal attention)" + (f"; MFU against {peak_flops / 1e12:.0f} TFLOP/s ({peak_flops_name}) per GPU; "
                                  f"gpt_kernels.py's Triton kernels {'on' if triton_on else 'off'}"
                                  if device_type == "cuda" else ""))  # the CPU log shows no MFU

if parent is not None:  # function preservation in practice: the parent's tier, restricted, then this tier
    pc = parent["config"]
    _, parent_meta, parent_bins = parent["tier"]
    parent_windows = pc.get("eval_windows") or pc["eval_iters"] * pc["batch_size"]  # before eval_windows existed
    old_loss, old_bpb = evaluate(model, parent_bins["val"], parent_meta, parent_windows, pc["block_size"])
    loss, bpb = evaluate(model, bins["val"], meta, eval_windows, block_size)
    log_event(dict(event="grow", iter=iter_num, tokens=tokens_total, flops=flops_total,
                   grow_from=grow_from if init_from == "grow" else ckpt_path,
                   parent_tier_val_bpb=old_bpb, parent_val_bpb=parent["last_val_bpb"], val_loss=loss, val_bpb=bpb))
    log(f"after growth: parent-tier val bpb {old_bpb:.5f} (parent's last {parent['last_val_bpb']:.5f}), "
        f"this tier {bpb:.5f}")
    del parent
if init_from == "branch":
    log_event(dict(event="branch", iter=iter_num, tokens=tokens_total, flops=flops_total, branch_from=branch_from,
                   parent_val_bpb=branched_from_bpb))

schedules = {g["gen"]: g for g in generations}
end_iter = stage_start + max_iters
resumed_at = None if starts_stage else iter_num  # a resume's eval there is in the log already
last_val_bpb = None
# the last good checkpoint: where a diverged run can start again
last_good = {"scratch": None, "resume": ckpt_path, "grow": grow_from, "branch": branch_from}[init_from], iter_num
iter_at_start = iter_num
NEVER = 2**62
first_bad = torch.full((), NEVER, device=device)  # the first iteration whose loss or gradient norm was not finite


def stop_if_diverged():
    """Checked (one sync) where the log syncs anyway and before every save: a diverged run never saves."""
    bad = first_bad.clone()
    if ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    if bad.item() != NEVER:
        kept = f"{last_good[0]} (iteration {last_good[1]}) is kept" if last_good[0] else "no checkpoint was written"
        if bad.item() == last_good[1] == iter_at_start and init_from != "scratch":  # its first step: the file is bad
            raise SystemExit(f"{last_good[0]} gives a non-finite loss at its first step (iteration {bad.item()}): "
                             "it holds NaN or inf; pass an earlier checkpoint")
        raise SystemExit(f"training diverged at iteration {bad.item()}: the loss or gradient norm is not finite; "
                         f"{kept}; start again from it with a lower LR: --init_from=branch --branch_from=PATH/ckpt.pt "
                         "--old_lr_mult=0.3 (scales every generation) in a new out_dir, or lower grad_clip")


t0, timed_iters = time.time(), 0
while True:
    lrs = {g: get_lr(schedules[g], iter_num) for g in raw_model.generations()}
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["gen"]]

    snapshot_due = snapshot_interval and iter_num % snapshot_interval == 0
    if ((iter_num % eval_interval == 0 or iter_num == end_iter or snapshot_due) and iter_num != resumed_at) \
            or eval_only:
        val_loss, last_val_bpb = evaluate(model, bins["val"], meta, eval_windows, block_size)
        best_val_bpb = last_val_bpb if best_val_bpb is None else min(best_val_bpb, last_val_bpb)
        log(f"iter {iter_num}: val loss {val_loss:.4f}, val bpb {last_val_bpb:.4f}")
        log_event(dict(event="eval", iter=iter_num, tokens=tokens_total, flops=flops_total,
                       lr=lrs, val_loss=val_loss, val_bpb=last_val_bpb))
        if eval_only:
            break
        if iter_num > stage_start and write_checkpoints:
            if not math.isfinite(last_val_bpb):  # without grad_clip a NaN gradient can get past the loss check
                first_bad.clamp_(max=iter_num)
            stop_if_diverged()
            save(iter_num)
            last_good = ckpt_path, iter_num
        t0, timed_iters = time.time(), 0  # tok/s and MFU time training, not evals and saves
    if iter_num >= end_iter:
        break

    rows = draw_rows(iter_num)  # once per iteration: each micro-step takes its slice
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = get_batch(rows, micro)
        # sync gradients only on the last micro-step
        last_micro = micro == accum - 1
        if fsdp:
            model.set_requires_gradient_sync(last_micro)
        with nullcontext() if not ddp or fsdp or last_micro else model.no_sync():
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
    finite = torch.isfinite(loss_sum)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if not scaler.is_enabled():  # under float16 the scaler skips an overflowing step, as it should
            finite &= torch.isfinite(norm)
    first_bad.copy_(torch.where(~finite, first_bad.clamp(max=iter_num), first_bad))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    timed_iters += 1
    tokens_total += tokens_per_iter
    flops_total += flops_per_iter

    if iter_num % log_interval == 0 or iter_num == end_iter:
        stop_if_diverged()
        dt = time.time() - t0
        tok_per_s = tokens_per_iter * timed_iters / dt
        peak_mem_gb = torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda" else 0.0
        mfu = flops_per_iter * timed_iters / dt / (peak_flops * world)
        if ddp:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / grad_accum_steps  # this iteration's mean over micro-steps and ranks
        speed = f", {tok_per_s:,.0f} tok/s" + (f", mfu {100 * mfu:.1f}%, peak mem {peak_mem_gb:.1f} GiB"
                                               if device_type == "cuda" else "")  # MFU is against a GPU's peak
        log(f"iter {iter_num}: loss {train_loss:.4f}, lr " + " ".join(f"g{g}={v:.2e}" for g, v in lrs.items()) + speed)
        ramp = {"old_tier_rows": sum(data is ramp_train for data, _ in rows) / len(rows)} if tier_ramp else {}
        log_event(dict(event="train", iter=iter_num, tokens=tokens_total, flops=flops_total,
                       lr=lrs, train_loss=train_loss, tok_per_s=tok_per_s, mfu=mfu,
                       peak_mem_gb=peak_mem_gb, **ramp))
        t0, timed_iters = time.time(), 0

if ddp:
    dist.barrier()  # rank 0 may still be writing the checkpoint: leave together
    dist.destroy_process_group()
    # the run is on disk: skip the interpreter's teardown, where a gloo rank now and then aborts after the last line
    # of Python ("terminate called without an active exception": a C++ thread destroyed at exit, about 1 run in 30)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
