"""
train.py end to end on the CPU: tiny stages run as subprocesses, read back from log.jsonl and ckpt.pt.

    ladder    stage 2 grows stage 1; restricted to stage 1's vocabulary, on stage 1's val windows, the
              grown model gives stage 1's final val bpb (train.py's 'grow' event, and again in-process)
    resume    N + M iterations == N, stop, resume for M: a scratch stage (with dropout, so the RNG must
              come back too) and a grown stage (its generations and their schedules survive)
    ddp       torchrun on 2 CPU ranks (gloo) gives one process's losses at the same global batch,
              for a scratch stage and a grown stage
    lr        every generation of a three-stage ladder follows its own schedule from the checkpoint's
              generation table; with lr_mode='global' every generation follows the stage's schedule;
              a WSD ladder: warmup from each birth, hold, old_lr_mult (cumulative), one cooldown at the
              end to min_lr, against a reference written out again (wsd_lr_table prints it for the README)
    flops     flops_per_token against FlopCounterMode, exactly; the log's cumulative flops add up across
              a grow
    errors    every bad input is a one-line error without a traceback, and nothing is written or overwritten;
              so is a resume that changes the run's schedule or optimizer keys (or lr_mode)
    branch    a branch from a snapshot takes the parent's next step (lr, loss with dropout, tokens, flops),
              then cools down to min_lr (linear; '1-sqrt' on a grown stage's two generations)
    ramp      tier_ramp_iters: the old-tier rows per step fall 1 -> 0, come from the parent's tier, are
              the same in two runs, and a resume mid-ramp is the uninterrupted run
    bpb       the exact UTF-8 bytes of the pieces are the split's bytes; the scored windows hold the
              split's bytes per token within 0.5%, in tiers 512, 1024 and 4096

    python -m pytest -q -n auto test_train.py  (8 minutes one at a time on 2 cores, 2026-12-03)

Log conventions read here: an 'eval' event at iter k carries the lr of step k (about to run); a 'train'
event at iter k follows step k - 1 and carries that step's lr; tokens and flops count the steps done.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from grow import grow_model
from model import GPT, Block, GPTConfig, Growable, load_checkpoint, model_from_checkpoint, save_checkpoint
from prepare import eval_window_starts, load_tokenizer, prepare

HERE = os.path.dirname(os.path.abspath(__file__))
from conftest import unpacked_assets  # the shipped assets (assets/), tinyshakespeare.txt unpacked
ASSETS = unpacked_assets()
LLAMA2 = os.path.join(ASSETS, "llama2_tokenizer.model")
# 8 rows per micro-step, 2 micro-steps: a global batch of 16 rows that 2 DDP ranks split evenly
TINY = ["--compile=False", "--batch_size=8", "--grad_accum_steps=2", "--eval_windows=16", "--eval_interval=3",
        "--log_interval=1"]
TOKENS_PER_ITER = 8 * 2 * 64  # batch_size * grad_accum_steps * block_size
# the test ladder: each stage 6 iterations, schedules short enough to show warmup, cosine and min_lr
# (gen 0 still decays through stage 2; gen 2 reaches min_lr at the last step, lr_mult 0.5)
SCHEDULES = [dict(warmup=2, lr=3e-3, min_lr=3e-4, decay_iters=14, mult=1.0),
             dict(warmup=3, lr=2e-3, min_lr=2e-4, decay_iters=10, mult=1.0),
             dict(warmup=2, lr=1e-3, min_lr=1e-4, decay_iters=5, mult=0.5)]
STAGE_ITERS = 6


def schedule_args(s):
    return ["--schedule=cosine", f"--warmup_iters={s['warmup']}", f"--learning_rate={s['lr']}", f"--min_lr={s['min_lr']}",
            f"--decay_iters={s['decay_iters']}", f"--lr_mult={s['mult']}", f"--max_iters={STAGE_ITERS}"]


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(os.path.join(ASSETS, "tinyshakespeare.txt"), LLAMA2, [512, 1024, 4096], str(out), workers=1)
    return out


def run(*args, ranks=1):
    """train.py (or torchrun with `ranks` CPU processes) in the repository root; the CompletedProcess."""
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + ["train.py", *map(str, args)], cwd=HERE, capture_output=True, text=True,
                          env=env, timeout=300)


def train(out_dir, *args, ranks=1):
    r = run(*args, f"--out_dir={out_dir}", ranks=ranks)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_log(out_dir)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def stage_args(data, k, parent=None, lr_mode="generation", schedule=None):
    """Stage k (1, 2, 3) of the test ladder: 1 is tiny_stage1; 2 grows it on every axis (tiny_stage2);
    3 grows stage 2 by one layer, same vocabulary. schedule: its arguments (default: the cosine SCHEDULES')."""
    schedule = schedule_args(SCHEDULES[k - 1]) if schedule is None else schedule
    if k == 1:
        return ["config/tiny_stage1.py", f"--data_dir={data / 'llama2_v512'}", *TINY, *schedule, f"--lr_mode={lr_mode}"]
    return ["config/tiny_stage2.py", f"--data_dir={data / 'llama2_v1024'}", f"--grow_from={parent / 'ckpt.pt'}",
            f"--tokenizer={LLAMA2}", *TINY, *schedule, f"--lr_mode={lr_mode}", *(["--n_layer=4"] if k == 3 else [])]


def train_ladder(root, args_of):
    """Three stages, each growing the one before (args_of(k, parent) gives stage k's arguments): {stage: out_dir}."""
    dirs = {k: root / f"s{k}" for k in (1, 2, 3)}
    for k in (1, 2, 3):
        train(dirs[k], *args_of(k, dirs.get(k - 1)))
    return dirs


@pytest.fixture(scope="session")
def ladder(data, tmp_path_factory):
    return train_ladder(tmp_path_factory.mktemp("ladder"), lambda k, parent: stage_args(data, k, parent))


# the WSD ladder: the same shapes, each generation warms up from its birth and holds; stage 2 scales the
# older generation by 0.8, stage 3 by 0.5 more (gen 0 at 0.4 there); stage 3's last 4 iterations cool every
# generation down to its min_lr. Stage 1 has dropout and a snapshot at 3, to branch from.
WSD = [dict(warmup=2, lr=3e-3, min_lr=3e-4, mult=1.0, old_lr_mult=1.0, cooldown=0),
       dict(warmup=3, lr=2e-3, min_lr=2e-4, mult=0.5, old_lr_mult=0.8, cooldown=0),
       dict(warmup=2, lr=1e-3, min_lr=1e-4, mult=1.0, old_lr_mult=0.5, cooldown=4)]


def wsd_args(s):
    return ["--schedule=wsd", f"--warmup_iters={s['warmup']}", f"--learning_rate={s['lr']}", f"--min_lr={s['min_lr']}",
            f"--lr_mult={s['mult']}", f"--old_lr_mult={s['old_lr_mult']}", f"--cooldown_iters={s['cooldown']}",
            f"--max_iters={STAGE_ITERS}"]


def wsd_stage_args(data, k, parent=None):
    extra = ["--dropout=0.1", "--snapshot_interval=3"] if k == 1 else []
    return stage_args(data, k, parent, schedule=wsd_args(WSD[k - 1])) + extra


@pytest.fixture(scope="session")
def wsd_ladder(data, tmp_path_factory):
    return train_ladder(tmp_path_factory.mktemp("wsd"), lambda k, parent: wsd_stage_args(data, k, parent))


def step_of(event):
    """The iteration whose learning rates an event carries (see the module docstring)."""
    return event["iter"] - 1 if event["event"] == "train" else event["iter"]


def assert_same_run(a, b, rel):
    """Two logs of the same run: the same events, lrs, tokens and flops; losses and bpb to `rel`."""
    keys = [(e["event"], e["iter"], e["tokens"], e["flops"], e.get("lr")) for e in a]
    assert keys == [(e["event"], e["iter"], e["tokens"], e["flops"], e.get("lr")) for e in b]
    for key in ("train_loss", "val_loss", "val_bpb", "parent_tier_val_bpb"):
        xs, ys = [e[key] for e in a if key in e], [e[key] for e in b if key in e]
        assert len(xs) == len(ys)
        assert xs == pytest.approx(ys, rel=rel), key


# -----------------------------------------------------------------------------
# 1. growing keeps the function: stage 1's final val bpb, on stage 1's tier


@torch.no_grad()
def val_bpb(model, tier_dir, n_windows, T):
    """Our own scoring of train.py's fixed val windows (evenly spaced starts), logits cut to the tier."""
    with open(tier_dir / "meta.json") as f:
        meta = json.load(f)
    data = np.memmap(tier_dir / "val.bin", dtype=np.uint16, mode="r")
    starts = np.linspace(0, len(data) - T - 1, n_windows).astype(np.int64)
    x = torch.from_numpy(np.stack([data[s:s + T] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[s + 1:s + 1 + T] for s in starts]).astype(np.int64))
    model.eval()
    logits, _ = model(x)
    logp = F.log_softmax(logits[..., :meta["vocab_size"]].double(), dim=-1)
    nats = -logp.gather(-1, y.unsqueeze(-1)).mean().item()
    return nats * meta["val"]["tokens"] / meta["val"]["bytes"] / math.log(2)


def test_grown_stage_gives_the_parents_val_bpb_on_the_parents_tier(ladder, data):
    s1, log1, log2 = load_checkpoint(ladder[1] / "ckpt.pt"), read_log(ladder[1]), read_log(ladder[2])
    final = [e for e in log1 if e["event"] == "eval"][-1]
    assert final["iter"] == STAGE_ITERS and s1["last_val_bpb"] == final["val_bpb"]
    # train.py's own check, logged before stage 2's first step
    grow = log2[0]
    assert grow["event"] == "grow" and grow["iter"] == STAGE_ITERS and grow["parent_val_bpb"] == final["val_bpb"]
    assert grow["parent_tier_val_bpb"] == pytest.approx(final["val_bpb"], abs=1e-5)

    # again in-process: our scoring reproduces stage 1's number, then the grown model's on the same windows
    c = s1["config"]
    windows = c["eval_windows"]
    model = model_from_checkpoint(s1)
    assert val_bpb(model, data / "llama2_v512", windows, c["block_size"]) == pytest.approx(final["val_bpb"], abs=1e-5)
    s2 = load_checkpoint(ladder[2] / "ckpt.pt")
    torch.manual_seed(0)
    grown, _ = grow_model(model, GPTConfig(**s2["model_config"]), tokenizer=load_tokenizer(LLAMA2, 1024))
    assert grown.generations() == [0, 1] and grown.get_num_params() > 1.5 * model_from_checkpoint(s1).get_num_params()
    assert val_bpb(grown, data / "llama2_v512", windows, c["block_size"]) == pytest.approx(final["val_bpb"], abs=1e-5)
    # on its own tier the drawn weights cannot matter either (their partners are zero): train.py's number
    c2 = s2["config"]
    assert val_bpb(grown, data / "llama2_v1024", c2["eval_windows"], c2["block_size"]) == \
        pytest.approx(grow["val_bpb"], abs=1e-5)
    # and training moved stage 2 on from there
    assert read_log(ladder[2])[-1]["val_bpb"] < grow["val_bpb"] - 0.05


# -----------------------------------------------------------------------------
# 2. resume


def test_resume_is_the_same_run(data, tmp_path):
    """With dropout, so the batches (drawn from (seed, iter)) and the RNG must both come back."""
    args = stage_args(data, 1) + ["--dropout=0.1"]
    whole = train(tmp_path / "whole", *args)
    train(tmp_path / "split", *args, "--max_iters=3")
    shutil.copy(tmp_path / "split" / "ckpt.pt", tmp_path / "ckpt_3.pt")
    split = train(tmp_path / "split", *args, "--init_from=resume", f"--max_iters={STAGE_ITERS}")
    assert_same_run(split, whole, rel=1e-6)
    assert [e["iter"] for e in whole if e["event"] == "train"] == list(range(1, STAGE_ITERS + 1))
    # killed after logging iterations 4-6 but before the checkpoint at 6: the resumed run replays them,
    # and the log must hold them once
    shutil.copy(tmp_path / "ckpt_3.pt", tmp_path / "split" / "ckpt.pt")
    again = train(tmp_path / "split", *args, "--init_from=resume", f"--max_iters={STAGE_ITERS}")
    assert_same_run(again, whole, rel=1e-6)


def test_resume_of_a_grown_stage_keeps_its_generations(ladder, data, tmp_path):
    args = stage_args(data, 2, ladder[1])
    train(tmp_path / "s2", *args, "--max_iters=3")
    half = load_checkpoint(tmp_path / "s2" / "ckpt.pt")
    assert half["iter_num"] == STAGE_ITERS + 3 and [g["gen"] for g in half["generations"]] == [0, 1]
    resumed = train(tmp_path / "s2", *args, "--init_from=resume", f"--max_iters={STAGE_ITERS}")
    assert_same_run(resumed, read_log(ladder[2]), rel=1e-6)
    a, b = load_checkpoint(tmp_path / "s2" / "ckpt.pt"), load_checkpoint(ladder[2] / "ckpt.pt")
    assert a["generations"] == b["generations"] and a["stage_start"] == b["stage_start"] == STAGE_ITERS
    assert a["model"].keys() == b["model"].keys() and a["optimizer"].keys() == b["optimizer"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# 3. DDP on the CPU


def test_ddp_on_two_ranks_matches_one_process(ladder, data, tmp_path):
    """grad_accum_steps counts micro-steps over all ranks, so 2 ranks x 1 micro-step is the ladder's
    1 process x 2 micro-steps. Tolerance: gloo's all-reduce sums in another order (float32 round-off)."""
    two = train(tmp_path / "s1", *stage_args(data, 1), ranks=2)
    assert_same_run(two, read_log(ladder[1]), rel=1e-5)
    # a grown stage: DDP wraps the grown model, so its new blocks are synchronised too
    two = train(tmp_path / "s2", *stage_args(data, 2, ladder[1]), ranks=2)
    assert_same_run(two, read_log(ladder[2]), rel=1e-5)


# -----------------------------------------------------------------------------
# 4. learning rates per generation


def reference_lr(s, it):
    """Generation schedule s at global iteration it, written out again: linear warmup (t+1)/(warmup+1),
    cosine to min_lr at decay_iters, min_lr after; times mult; t counts from the birth."""
    t = it - s["birth"]
    assert t >= 0, "a generation has no learning rate before its birth"
    if t < s["warmup"]:
        lr = s["lr"] * (t + 1) / (s["warmup"] + 1)
    elif t < s["decay_iters"]:
        progress = (t - s["warmup"]) / (s["decay_iters"] - s["warmup"])
        lr = s["min_lr"] + (s["lr"] - s["min_lr"]) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        lr = s["min_lr"]
    return lr * s["mult"]


def lr_table(generations, iters):
    """Markdown: the learning rate of every generation (columns) at the given iterations (rows)."""
    lines = ["| iter | " + " | ".join(f"gen {g['gen']} (born {g['birth']})" for g in generations) + " |",
             "| ---: |" + " ---: |" * len(generations)]
    for it in iters:
        cells = [f"{reference_lr(g, it):.2e}" if it >= g["birth"] else "-" for g in generations]
        lines.append(f"| {it} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def expected_table():
    return [dict(gen=k, birth=k * STAGE_ITERS, schedule="cosine", **s, cooldown=None, cooldown_shape="linear")
            for k, s in enumerate(SCHEDULES)]


def test_every_generation_follows_its_own_schedule(ladder):
    table = load_checkpoint(ladder[3] / "ckpt.pt")["generations"]
    assert table == expected_table()  # the checkpoint stores each stage's schedule and birth
    seen = set()
    for k in (1, 2, 3):
        assert load_checkpoint(ladder[k] / "ckpt.pt")["generations"] == table[:k]
        events = [e for e in read_log(ladder[k]) if "lr" in e]
        assert {step_of(e) for e in events} == set(range((k - 1) * STAGE_ITERS, k * STAGE_ITERS + 1))
        for e in events:
            assert sorted(map(int, e["lr"])) == list(range(k)), e  # every generation born so far, no other
            for gen, lr in e["lr"].items():
                expected = reference_lr(table[int(gen)], step_of(e))
                assert lr == pytest.approx(expected, rel=1e-12), (k, e["event"], e["iter"], gen)
                t, s = step_of(e) - table[int(gen)]["birth"], table[int(gen)]
                seen.add((int(gen), "warmup" if t < s["warmup"] else "cosine" if t < s["decay_iters"] else "min"))
    # the ladder went through every phase, old generations kept decaying past a new one's birth
    assert {(0, "warmup"), (0, "cosine"), (0, "min"), (1, "cosine"), (2, "warmup"), (2, "min")} <= seen
    rows = lr_table(table, [0, 6, 12, 17]).splitlines()
    assert len(rows) == 6 and rows[2].count("| -") == 2 and f"{reference_lr(table[2], 17):.2e}" in rows[-1]


def test_global_lr_mode_gives_every_generation_the_stages_schedule(ladder, data, tmp_path):
    dirs = {1: ladder[1], 2: tmp_path / "s2", 3: tmp_path / "s3"}
    for k in (2, 3):
        log = train(dirs[k], *stage_args(data, k, dirs[k - 1], lr_mode="global"))
        stage = dict(gen=None, birth=(k - 1) * STAGE_ITERS, **SCHEDULES[k - 1])  # the clock restarts at the stage
        events = [e for e in log if "lr" in e]
        assert len(events) == STAGE_ITERS + 3  # evals at 3 iterations, a train event per step
        for e in events:
            assert sorted(map(int, e["lr"])) == list(range(k))
            for lr in e["lr"].values():
                assert lr == pytest.approx(reference_lr(stage, step_of(e)), rel=1e-12), (k, e)
    # the stage wrote its schedule into every generation's record, so a resume reads it back as it was
    assert load_checkpoint(dirs[3] / "ckpt.pt")["generations"] == [
        {**g, **expected_table()[2], "gen": g["gen"]} for g in expected_table()]


def reference_wsd_lr(stages, gen, k, it, shape="linear"):
    """WSD, written out again: generation gen (born at stage gen + 1) at iteration it of stage k (1-based) of
    a ladder of STAGE_ITERS-iteration stages. Warmup (t+1)/(warmup+1) from the birth, then its lr; in stage
    k's cooldown window [end - cooldown, end] from there to its min_lr, linear in (it - begin) / cooldown
    (or its square root for '1-sqrt'); times its mult and every later stage's old_lr_mult up to k."""
    s, birth, end = stages[gen], gen * STAGE_ITERS, k * STAGE_ITERS
    t = it - birth
    assert 0 <= t and (k - 1) * STAGE_ITERS <= it <= end
    lr = s["lr"] * (t + 1) / (s["warmup"] + 1) if t < s["warmup"] else s["lr"]
    cooldown = stages[k - 1]["cooldown"]
    if cooldown and it >= end - cooldown:
        done = (it - (end - cooldown)) / cooldown
        lr += (s["min_lr"] - lr) * (done if shape == "linear" else math.sqrt(done))
    return lr * s["mult"] * math.prod(stages[m]["old_lr_mult"] for m in range(gen + 1, k))


def wsd_lr_table(stages, iters):
    """Markdown: every generation's WSD learning rate (columns) at the given iterations (rows), each
    iteration in the stage that trains it (the last one also at its end)."""
    lines = ["| iter | stage | " + " | ".join(f"gen {g} (born {g * STAGE_ITERS})" for g in range(len(stages))) + " |",
             "| ---: | ---: |" + " ---: |" * len(stages)]
    for it in iters:
        k = min(it // STAGE_ITERS + 1, len(stages))
        cells = [f"{reference_wsd_lr(stages, g, k, it):.2e}" if g < k else "-" for g in range(len(stages))]
        lines.append(f"| {it} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_wsd_ladder_lr_of_every_generation(wsd_ladder):
    """Warmup from each birth, hold, old_lr_mult from each later stage on (cumulative), one cooldown at the
    end of the last stage down to each generation's min_lr."""
    phases = set()
    for k in (1, 2, 3):
        events = [e for e in read_log(wsd_ladder[k]) if "lr" in e]
        assert {step_of(e) for e in events} == set(range((k - 1) * STAGE_ITERS, k * STAGE_ITERS + 1))
        for e in events:
            it = step_of(e)
            assert sorted(map(int, e["lr"])) == list(range(k)), e
            for gen, lr in e["lr"].items():
                g = int(gen)
                assert lr == pytest.approx(reference_wsd_lr(WSD, g, k, it), rel=1e-12), (k, e["event"], it, g)
                t = it - g * STAGE_ITERS
                phases.add((g, k, "warmup" if t < WSD[g]["warmup"] else
                            "cooldown" if WSD[k - 1]["cooldown"] and it > k * STAGE_ITERS - WSD[k - 1]["cooldown"]
                            else "stable"))
    assert {(0, 1, "warmup"), (0, 1, "stable"), (1, 2, "warmup"), (1, 2, "stable"), (2, 3, "warmup"),
            (2, 3, "stable"), (0, 3, "cooldown"), (1, 3, "cooldown"), (2, 3, "cooldown")} <= phases
    assert ("cooldown" not in {p for _, k, p in phases if k < 3})
    # the literal numbers, not only the reference's: the stable phase of every generation at stage 3
    # (gen 0: 3e-3 x 0.8 x 0.5, gen 1: 2e-3 x 0.5 x 0.5, gen 2: 1e-3), and the end of the cooldown at min_lr
    log3 = {(e["event"], e["iter"]): e["lr"] for e in read_log(wsd_ladder[3]) if "lr" in e}
    assert log3["train", 15] == pytest.approx({"0": 1.2e-3, "1": 5e-4, "2": 1e-3}, rel=1e-12)  # step 14
    assert log3["train", 16] == pytest.approx({"0": 1.2e-3 - 0.25 * 1.08e-3, "1": 5e-4 - 0.25 * 4.5e-4,
                                               "2": 1e-3 - 0.25 * 9e-4}, rel=1e-12)  # step 15
    assert log3["eval", 18] == pytest.approx({"0": 3e-4 * 0.4, "1": 2e-4 * 0.25, "2": 1e-4}, rel=1e-12)


def test_wsd_lr_table_for_the_readme(wsd_ladder):
    """Prints the WSD ladder's table (pytest -s); the README shows it."""
    iters = list(range(3 * STAGE_ITERS + 1))
    table = wsd_lr_table(WSD, iters)
    print("\n" + table)
    rows = table.splitlines()
    assert len(rows) == 2 + len(iters) and all(r.count("|") == 2 + len(WSD) + 1 for r in rows)
    assert [r.count("| -") for r in rows[2:]] == [2] * STAGE_ITERS + [1] * STAGE_ITERS + [0] * (STAGE_ITERS + 1)
    # the table is what the ladder logged (to its 3 digits): the lr of every step each stage trained, and the end
    for k in (1, 2, 3):
        for e in read_log(wsd_ladder[k]):
            if "lr" in e and (step_of(e) < k * STAGE_ITERS or k == 3):
                cells = rows[2 + step_of(e)].split("|")[3:3 + k]
                assert [float(c) for c in cells] == pytest.approx([e["lr"][str(g)] for g in range(k)], rel=5e-3)


# -----------------------------------------------------------------------------
# 5. FLOPs


def counted_flops(model, B, T):
    """FlopCounterMode's count of one forward and backward. On the CPU the default SDPA kernel counts 0,
    the math one counts its two bmm's as full (non-causal) T x T products."""
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops()


def causal_discount(c, T):
    """What our count leaves out: half of the T x T attention (QK^T and AV, forward 2 + backward 4 per
    multiply-add, 2 matmuls): 6 * n_layer * n_head * head_dim * T per token. RMSNorm, softmax, SiLU and
    the loss are not matmuls; neither FlopCounterMode nor 6N counts them, so the rest is exact."""
    return 6 * c.n_layer * c.n_head * c.head_dim * T


def test_flops_per_token_agrees_with_flop_counter_mode():
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=96, n_layer=2, n_head=2, head_dim=8, ffn_hidden=24, block_size=32)
    model = GPT(c)
    # three generations: wider FFN, more heads, head_dim doubled (permuted weights), deeper, bigger vocab
    grown = GPT(c)
    grown, _ = grow_model(grown, replace(c, n_layer=3, n_head=3, head_dim=16, ffn_hidden=40, vocab_size=128),
                          vocab_init="random", head_init="zero")
    grown, _ = grow_model(grown, replace(grown.config, n_layer=4, n_head=4, ffn_hidden=64), vocab_init="random", head_init="zero")
    assert grown.generations() == [0, 1, 2] and grown.layers[0].attn.wq.row_perm is not None
    for m in (model, grown):
        for B, T in ((2, 32), (3, 7)):
            assert counted_flops(m, B, T) == B * T * (m.flops_per_token(T) + causal_discount(m.config, T))


def test_logged_flops_add_up_across_a_grow(ladder):
    """flops = flops before the stage + FlopCounterMode's per-token count (less the causal discount) of the
    stage's model x the stage's tokens; stage 2 continues from stage 1's total."""
    start_tokens = start_flops = 0
    for k in (1, 2, 3):
        ckpt = load_checkpoint(ladder[k] / "ckpt.pt")
        model, T = model_from_checkpoint(ckpt), ckpt["config"]["block_size"]
        per_token = counted_flops(model, 1, T) // T - causal_discount(model.config, T)
        log = read_log(ladder[k])
        assert log[0]["tokens"] == start_tokens and log[0]["flops"] == start_flops
        for e in log:
            assert e["tokens"] == e["iter"] * TOKENS_PER_ITER
            assert e["flops"] == start_flops + per_token * (e["tokens"] - start_tokens), (k, e)
        start_tokens, start_flops = log[-1]["tokens"], log[-1]["flops"]
        assert (ckpt["tokens"], ckpt["flops"]) == (start_tokens, start_flops)
    assert start_tokens == 3 * STAGE_ITERS * TOKENS_PER_ITER


# -----------------------------------------------------------------------------
# 6. bad inputs


def snapshot(path):
    return {p: open(os.path.join(r, p), "rb").read() for r, _, files in os.walk(path) for p in files}


def assert_one_line_error(r, message):
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr[-3000:]


def bad_inputs(data, tmp):
    """(name, train.py arguments, expected message) for each bad input; files are made in tmp."""
    (tmp / "typo.py").write_text("learning_rate = 1e-3\nlerning_rate = 1e-3\n")
    torch.save({"model": {"w": torch.randn(3)}, "iter_num": 3}, tmp / "foreign.pt")
    torch.save({"format": "growing-llama/1", "args": argparse.Namespace(lr=1)}, tmp / "code.pt")
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    (tmp / "half_prepared").mkdir()
    for split in ("train", "val"):
        shutil.copy(data / "llama2_v512" / f"{split}.bin", tmp / "half_prepared")
    v512, v1024 = f"--data_dir={data / 'llama2_v512'}", f"--data_dir={data / 'llama2_v1024'}"
    grow = ["config/tiny_stage2.py", v1024, f"--tokenizer={LLAMA2}"]
    return [
        ("unknown override", ["config/tiny_stage1.py", v512, "--no_such_key=1"], "unknown key 'no_such_key'"),
        ("unknown key in a config file", ["config/tiny_stage1.py", tmp / "typo.py", v512],
         "sets unknown keys ['lerning_rate']"),
        ("wrong type", ["config/tiny_stage1.py", v512, "--batch_size=abc"], "is a str, expected int"),
        ("tier does not match the model", ["config/tiny_stage1.py", v512, "--vocab_size=1024"],
         "has vocab 512 but the model has 1024"),
        ("no meta.json", ["config/tiny_stage1.py", f"--data_dir={tmp / 'half_prepared'}"], "no prepared data in"),
        ("grow from a missing checkpoint", [*grow, f"--grow_from={tmp / 'missing.pt'}"], "no checkpoint at"),
        ("grow from a foreign dict", [*grow, f"--grow_from={tmp / 'foreign.pt'}"],
         "is not a checkpoint of this project"),
        ("grow from a pickle with code", [*grow, f"--grow_from={tmp / 'code.pt'}"], "is not a readable checkpoint"),
        ("grow from a text file", [*grow, f"--grow_from={tmp / 'notes.txt'}"], "is not a readable checkpoint"),
        ("resume with no checkpoint", ["config/tiny_stage1.py", v512, "--init_from=resume"], "no checkpoint at"),
        ("a shape GPTConfig refuses", ["config/tiny_stage1.py", v512, "--ffn_hidden=100"],
         "ffn_hidden=100 is not allowed"),
        ("misspelt lr_mode", ["config/tiny_stage1.py", v512, "--lr_mode=globl"], "lr_mode='globl' is not one of"),
        ("float16 on the CPU", ["config/tiny_stage1.py", v512, "--dtype=float16", "--device=cpu"],
         "dtype='float16' (with a GradScaler, for GPUs without bfloat16 such as the T4) needs device=cuda"),
        ("max_iters=0", ["config/tiny_stage1.py", v512, "--max_iters=0"], "max_iters=0 trains nothing"),
        ("a negative seed", ["config/tiny_stage1.py", v512, "--seed=-1"], "seed=-1 must be >= 0"),
        ("a negative learning rate", ["config/tiny_stage1.py", v512, "--learning_rate=-1"],
         "learning_rate=-1.0 must be >= 0"),
        ("beta1 beyond 1", ["config/tiny_stage1.py", v512, "--beta1=2"], "beta1=2.0 must be in [0, 1)"),
        ("dropout beyond 1", ["config/tiny_stage1.py", v512, "--dropout=2"], "dropout=2.0 must be in [0, 1)"),
        ("an unknown device", ["config/tiny_stage1.py", v512, "--device=foo"],
         "device='foo' is not one this code runs on: pass cpu, cuda or cuda:N"),
        ("unknown parallelism", ["config/tiny_stage1.py", v512, "--parallelism=zero3"], "parallelism='zero3' is not"),
        ("zero eval_interval", ["config/tiny_stage1.py", v512, "--eval_interval=0"], "eval_interval=0 must be positive"),
        ("zero eval_windows", ["config/tiny_stage1.py", v512, "--eval_windows=0"], "eval_windows=0 must be positive"),
        ("fused kernels on the CPU", ["config/tiny_stage1.py", v512, "--fused_kernels=rope+swiglu", "--device=cpu"],
         "fused_kernels=rope+swiglu runs liger-kernel's Triton kernels, which need a CUDA device, not cpu"),
        ("an unknown fused kernel", ["config/tiny_stage1.py", v512, "--fused_kernels=rmsnorm"],
         "fused_kernels='rmsnorm': 'rmsnorm' is not one of"),
        ("a device train.py does not run on", ["config/tiny_stage1.py", v512, "--device=meta"],
         "device='meta' is not one this code runs on"),
        ("a negative lr_mult", ["config/tiny_stage1.py", v512, "--lr_mult=-1"], "lr_mult=-1.0 must be positive"),
        ("a negative warmup", ["config/tiny_stage1.py", v512, "--warmup_iters=-5"], "warmup_iters=-5 must be >= 0"),
        ("condense_upto below -1", ["config/tiny_stage1.py", v512, "--condense_upto=-5"],
         "condense_upto=-5: pass a generation"),
        ("a negative norm_eps", ["config/tiny_stage1.py", v512, "--norm_eps=-1"], "norm_eps=-1.0 must be positive"),
        ("rope_theta zero", ["config/tiny_stage1.py", v512, "--rope_theta=0"], "rope_theta=0.0 must be positive"),
        ("peak_flops zero", ["config/tiny_stage1.py", v512, "--peak_flops=0"], "peak_flops=0.0 must be positive"),
    ]


def test_bad_inputs_are_one_line_errors_that_write_nothing(data, tmp_path):
    cases = bad_inputs(data, tmp_path)
    # each case is a process that mostly waits on its imports: as many at once as this process has cores
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        results = pool.map(lambda i: run(*cases[i][1], f"--out_dir={tmp_path / f'out{i}'}"), range(len(cases)))
    for i, ((name, _, message), r) in enumerate(zip(cases, results)):
        assert_one_line_error(r, message)
        assert not (tmp_path / f"out{i}").exists(), name


def test_growths_that_cannot_be_trained_are_refused(ladder, data, tmp_path):
    stage1 = [a for a in stage_args(data, 1) if not a.startswith("--max_iters")]
    for name, args, message in [
        ("a growth that adds no weights (it would restart generation 0's schedule)",
         [*stage1, "--init_from=grow", f"--grow_from={ladder[1] / 'ckpt.pt'}"], "adds no weights"),
        ("a shorter block_size", [*stage_args(data, 2, ladder[1]), "--block_size=32"], "cannot shrink block_size"),
        ("condensing the newborn generation (its Adam steps would be its elders')",
         [*stage_args(data, 2, ladder[1]), "--condense_upto=1"], "condense_upto=1 must be below"),
        ("condensing a generation that does not exist", [*stage_args(data, 2, ladder[1]), "--condense_upto=5"],
         "condense_upto=5 must be below"),
        ("the parent's tier named wrong (its growth check would score other tokens)",
         [*stage_args(data, 2, ladder[1]), f"--parent_data_dir={data / 'llama2_v1024'}"],
         "is a v1024 tier, but the parent was trained on v512"),
        ("the parent's tier named where there is none", [*stage_args(data, 2, ladder[1]), "--parent_data_dir=nowhere"],
         "the parent's data tier is not at nowhere")]:
        out_dir = tmp_path / name[:12].replace(" ", "_")
        assert_one_line_error(run(*args, f"--out_dir={out_dir}"), message)
        assert not out_dir.exists(), name


def test_an_out_dir_holding_a_run_is_refused_and_kept(ladder, data, tmp_path):
    out_dir = tmp_path / "s1"
    shutil.copytree(ladder[1], out_dir)
    before = snapshot(out_dir)
    assert "ckpt.pt" in before and "log.jsonl" in before
    for args in (stage_args(data, 1), stage_args(data, 2, ladder[1])):  # from scratch, and growing into it
        r = run(*args, f"--out_dir={out_dir}")
        assert_one_line_error(r, "already holds a run")
        assert snapshot(out_dir) == before


def test_a_gpu_dtype_on_the_cpu_is_named_and_recorded_as_what_ran(data, tmp_path):
    r = run(*stage_args(data, 1), "--max_iters=1", "--dtype=bfloat16", "--device=cpu", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dtype=bfloat16 is for CUDA's autocast; on cpu this run trains in float32" in r.stdout
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"


def test_an_out_dir_that_cannot_be_written_is_refused_before_anything_runs(data, tmp_path):
    (tmp_path / "afile").write_text("keep me\n")
    for out_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        assert_one_line_error(run(*stage_args(data, 1), f"--out_dir={out_dir}"), "cannot be written")
    assert (tmp_path / "afile").read_text() == "keep me\n"


def test_a_finished_run_or_a_garbled_log_is_refused_on_resume_and_kept(ladder, data, tmp_path):
    out_dir = tmp_path / "s1"
    shutil.copytree(ladder[1], out_dir)
    resume = [*stage_args(data, 1), f"--out_dir={out_dir}", "--init_from=resume"]
    with open(out_dir / "log.jsonl", "a") as f:  # as a run killed after its checkpoint leaves it: a refusal keeps it
        f.write(json.dumps({"event": "train", "iter": 10**6}) + "\n")
    before = snapshot(out_dir)
    assert_one_line_error(run(*resume), "nothing to train")  # its stage's max_iters are done
    assert snapshot(out_dir) == before
    with open(out_dir / "log.jsonl", "ab") as f:
        f.write(b'{"note": "not a record"}\n\xff\xfe\n')
    before = snapshot(out_dir)
    more = [a for a in resume if not a.startswith("--max_iters")] + ["--max_iters=100"]
    assert_one_line_error(run(*more), "holds a line that is not one of train.py's records")
    assert snapshot(out_dir) == before


def test_a_resume_onto_a_tier_that_now_holds_other_text_is_refused_and_kept(ladder, data, tmp_path):
    out_dir, tier = tmp_path / "s1", tmp_path / "llama2_v512"
    shutil.copytree(ladder[1], out_dir)
    shutil.copytree(data / "llama2_v512", tier)
    meta = json.loads((tier / "meta.json").read_text())
    keep = meta["train"]["tokens"] - 1000  # the tier prepared again from other text: fewer train tokens
    np.memmap(tier / "train.bin", dtype=np.uint16, mode="r")[:keep].tofile(tier / "train.bin.new")
    os.replace(tier / "train.bin.new", tier / "train.bin")
    (tier / "meta.json").write_text(json.dumps({**meta, "train": {**meta["train"], "tokens": keep}}))
    before = snapshot(out_dir)
    args = [a for a in stage_args(data, 1) if not a.startswith(("--data_dir", "--max_iters"))]
    r = run(*args, f"--data_dir={tier}", f"--out_dir={out_dir}", "--init_from=resume", "--max_iters=100")
    assert_one_line_error(r, "holds other text than this run trained on")
    assert snapshot(out_dir) == before


def test_a_resume_that_changes_the_runs_schedule_or_optimizer_is_refused_and_kept(wsd_ladder, data, tmp_path):
    """A resume continues the run as it was set up: another optimizer or schedule key, lr_mode, or (once a
    cooldown is placed at the stage's end) max_iters is a one-line error pointing to a branch, and the
    out_dir (checkpoint, log) stays as it was."""
    for k, override, message in [(1, "--weight_decay=1e9", "weight_decay=1000000000.0 (the run's: 0.1)"),
                                 (1, "--learning_rate=0.01", "learning_rate=0.01 (the run's: 0.003)"),
                                 (1, "--lr_mode=global", "lr_mode=global (the run's: generation)"),
                                 (3, "--max_iters=8", "max_iters=8 (the run's: 6)")]:
        out_dir = tmp_path / f"s{k}"
        if not out_dir.exists():
            shutil.copytree(wsd_ladder[k], out_dir)
        before = snapshot(out_dir)
        r = run(*wsd_stage_args(data, k, wsd_ladder.get(k - 1)), f"--out_dir={out_dir}", "--init_from=resume",
                override)
        assert_one_line_error(r, f"--init_from=resume continues the run as it was set up, but {message}")
        assert f"--init_from=branch --branch_from={out_dir / 'ckpt.pt'}" in r.stderr
        assert snapshot(out_dir) == before, override


# -----------------------------------------------------------------------------
# 7. options that change how a run computes or writes, not what it learns


def test_activation_checkpointing_gives_the_same_loss_and_gradients(monkeypatch):
    torch.manual_seed(0)
    small = GPTConfig(vocab_size=64, n_layer=2, n_head=2, head_dim=8, ffn_hidden=32, block_size=16)
    model, _ = grow_model(GPT(small), replace(small, n_layer=3, n_head=3, ffn_hidden=48), vocab_init="random", head_init="zero")
    for p in model.parameters():  # the grown strips start at zero; make every gradient path non-trivial
        p.data.normal_(std=0.1)
    x = torch.randint(0, 64, (2, 16))
    calls, forward = [], Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    results = []
    for checkpoint_blocks in (False, True):
        model.checkpoint_blocks = checkpoint_blocks
        model.zero_grad()
        calls.clear()
        _, loss = model(x, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)))
    (loss_plain, grads_plain, calls_plain), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls_plain, calls_ckpt) == (3, 6)  # checkpointed: every block runs again in the backward
    assert torch.equal(loss_plain, loss_ckpt)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=0, atol=1e-7, msg=name)


def eval_only_bpb(*args):
    """The val bpb an eval-only run prints (it writes nothing)."""
    r = run(*args, "--eval_only=True")
    assert r.returncode == 0, r.stderr[-3000:]
    return float(re.search(r"val bpb (\S+)", r.stdout).group(1))


def test_eval_windows_do_not_depend_on_batch_size(data, tmp_path):
    args = ["config/tiny_stage1.py", f"--data_dir={data / 'llama2_v512'}", *TINY, f"--out_dir={tmp_path / 'eval'}"]
    bpbs = [eval_only_bpb(*args, f"--batch_size={b}") for b in (8, 5)]  # 5: a short batch
    assert bpbs[0] == pytest.approx(bpbs[1], rel=1e-6)
    assert not (tmp_path / "eval").exists()  # an eval-only run writes nothing


def test_eval_only_on_a_run_leaves_its_folder_as_it_was(ladder, data, tmp_path):
    out_dir = tmp_path / "s1"
    shutil.copytree(ladder[1], out_dir)
    last = [e for e in read_log(out_dir) if e["event"] == "eval"][-1]
    with open(out_dir / "log.jsonl", "a") as f:  # a garbled log stops a resume, not an eval that does not read it
        f.write('{"event": "ev\n')
    before = snapshot(out_dir)
    bpb = eval_only_bpb(*stage_args(data, 1), f"--out_dir={out_dir}", "--init_from=resume")
    assert bpb == pytest.approx(last["val_bpb"], abs=1e-4)  # the checkpoint's own last eval, printed to 4 places
    assert snapshot(out_dir) == before


def test_write_checkpoints_false_logs_but_writes_no_checkpoint(data, tmp_path):
    log = train(tmp_path, "config/tiny_stage1.py", f"--data_dir={data / 'llama2_v512'}", *TINY, "--max_iters=3",
                "--write_checkpoints=False")
    assert [e["iter"] for e in log if e["event"] == "eval"] == [0, 3]
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_cpu_run_prints_no_mfu_or_gpu_memory(data, tmp_path):
    r = run("config/tiny_stage1.py", f"--data_dir={data / 'llama2_v512'}", *TINY, "--max_iters=2", "--log_interval=1",
            f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tok/s" in r.stdout and not re.search(r"mfu \d|MFU against|peak mem", r.stdout), r.stdout


def test_resuming_with_another_batch_says_so(ladder, data, tmp_path):
    out_dir = tmp_path / "s1"
    shutil.copytree(ladder[1], out_dir)
    r = run(*stage_args(data, 1), f"--out_dir={out_dir}", "--init_from=resume", "--eval_only=True", "--batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: resuming with {'batch_size': '8 -> 4'}" in r.stdout
    r = run(*stage_args(data, 1), f"--out_dir={out_dir}", "--init_from=resume", "--n_layer=5")
    assert_one_line_error(r, "--init_from=resume keeps the checkpoint's shape, but n_layer=5 (checkpoint: 2)")


@pytest.mark.parametrize("copy_free_on", [False, True], ids=["in_graph", "copy_free"])
def test_compile_parts_gives_the_eager_loss_and_gradients(copy_free_on, monkeypatch):
    """Compiled with the weights assembled in the graph or copy-free (as under FSDP), against eager in the graph."""
    torch.manual_seed(0)
    small = GPTConfig(vocab_size=64, n_layer=2, n_head=2, head_dim=8, ffn_hidden=32, block_size=16)
    model, _ = grow_model(GPT(small), replace(small, n_layer=3, n_head=3, ffn_hidden=48), vocab_init="random", head_init="zero")
    for p in model.parameters():
        p.data.normal_(std=0.1)
    x = torch.randint(0, 64, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    eager = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(Growable, "copy_free", copy_free_on)  # restored after the test
    model.compile_parts()
    torch._dynamo.utils.counters.clear()
    _, loss = model(x, x)
    loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # two block structures and the head
    torch.testing.assert_close(loss.detach(), eager[0], rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_growing_a_checkpoint_from_before_eval_windows(ladder, data, tmp_path):
    ckpt = load_checkpoint(ladder[1] / "ckpt.pt")
    config = {k: v for k, v in ckpt["config"].items() if k != "eval_windows"}
    old = tmp_path / "old.pt"  # its 16 windows as eval_iters x batch_size
    save_checkpoint({**ckpt, "config": {**config, "eval_iters": 2, "batch_size": 8}}, old)
    args = stage_args(data, 2, ladder[1])
    log = train(tmp_path / "s2", *[a for a in args if not a.startswith("--grow_from")], f"--grow_from={old}")
    grow = log[0]
    assert grow["event"] == "grow" and grow["parent_tier_val_bpb"] == pytest.approx(grow["parent_val_bpb"], rel=1e-6)


def test_a_checkpoint_grown_by_grow_py_resumes_as_a_new_stage(ladder, data, tmp_path):
    out = tmp_path / "grown"
    r = subprocess.run([sys.executable, "grow.py", "--ckpt", str(ladder[1] / "ckpt.pt"), "--out", str(out / "ckpt.pt"),
                        "--n_layer=3", "--n_head=3", "--ffn_hidden=128", "--vocab_size=1024", f"--tokenizer={LLAMA2}",
                        f"--data_dir={data / 'llama2_v1024'}"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    args = [a for a in stage_args(data, 2, ladder[1]) if not a.startswith("--grow_from")]
    log = train(out, *args, "--init_from=resume")
    assert [e["iter"] for e in log if e["event"] == "train"][-1] == 2 * STAGE_ITERS  # a whole stage after stage 1's
    # the new generation follows this config's schedule (stage 2's), not a copy of its parent's
    assert load_checkpoint(out / "ckpt.pt")["generations"] == expected_table()[:2]
    assert log[0]["event"] == "grow"  # the parent-tier check ran (test_a_grow_py_checkpoint_resumed_runs_...)
    assert (log[1]["event"], log[1]["iter"]) == ("eval", STAGE_ITERS)  # the stage's start is scored, as train.py's own
    for e in log[1:]:
        assert e["lr"]["1"] == pytest.approx(reference_lr(expected_table()[1], step_of(e)), rel=1e-12), e


def test_checkpoints_grown_twice_by_grow_py_train_on_resume_and_grow(ladder, data, tmp_path):
    """grow.py's untrained output grown again (by grow.py or train.py), or resumed: every generation that no stage
    has trained takes the training stage's schedule from its birth, no traceback."""
    def grow_py(ckpt, out, *shape):
        r = subprocess.run([sys.executable, "grow.py", "--ckpt", str(ckpt), "--out", str(out), *shape], cwd=HERE,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    grow_py(ladder[1] / "ckpt.pt", tmp_path / "layers.pt", "--n_layer=3")
    grow_py(tmp_path / "layers.pt", tmp_path / "twice" / "ckpt.pt", "--n_head=3", "--ffn_hidden=128",
            "--vocab_size=1024", f"--data_dir={data / 'llama2_v1024'}")
    args = [a for a in stage_args(data, 2, ladder[1]) if not a.startswith("--grow_from")]
    resumed = train(tmp_path / "twice", *args, "--init_from=resume")
    grown = train(tmp_path / "grown", *args, f"--grow_from={tmp_path / 'layers.pt'}")
    for out, log in ((tmp_path / "twice", resumed), (tmp_path / "grown", grown)):
        table = load_checkpoint(out / "ckpt.pt")["generations"]
        assert [g["gen"] for g in table] == [0, 1, 2][:len(table)] and all("lr" in g for g in table)
        for e in log:
            if e["event"] == "train":  # every untrained generation at this stage's schedule, from its birth
                for g in table[1:]:
                    assert e["lr"][str(g["gen"])] == pytest.approx(reference_lr(g, step_of(e)), rel=1e-12), e


# -----------------------------------------------------------------------------
# 8. branches: a new run from another run's checkpoint, typically its cooldown


def branch_args(data, ladder, k, ckpt, iters, *extra):
    """Stage k of the WSD ladder's own arguments, branched from ckpt for a cooldown over `iters` iterations."""
    return [*wsd_stage_args(data, k, ladder.get(k - 1)), "--init_from=branch", f"--branch_from={ckpt}", f"--max_iters={iters}",
            f"--cooldown_iters={iters}", *extra]


def test_a_branch_takes_the_parents_next_step_then_cools_down(wsd_ladder, data, tmp_path):
    """Stage 1 (dropout 0.1, so the RNG must come back too) ran 6 iterations with a snapshot at 3; a branch
    from the snapshot takes step 3 -> 4 as the parent did (same lr, same loss), then decays to min_lr."""
    s1 = wsd_ladder[1]
    assert load_checkpoint(s1 / "ckpt_3.pt")["iter_num"] == 3  # a snapshot, kept while ckpt.pt moved on
    assert os.path.samefile(s1 / "ckpt_6.pt", s1 / "ckpt.pt")
    parent = {(e["event"], e["iter"]): e for e in read_log(s1)}
    log = train(tmp_path / "cool", *branch_args(data, wsd_ladder, 1, s1 / "ckpt_3.pt", 3))
    assert log[0]["event"] == "branch" and log[0]["iter"] == 3
    assert (log[0]["tokens"], log[0]["flops"]) == (parent["eval", 3]["tokens"], parent["eval", 3]["flops"]) != (0, 0)
    events = {(e["event"], e["iter"]): e for e in log[1:]}
    assert list(events) == [("eval", 3), ("train", 4), ("train", 5), ("train", 6), ("eval", 6)]
    assert events["eval", 3]["val_loss"] == pytest.approx(parent["eval", 3]["val_loss"], rel=1e-6)
    first = events["train", 4]
    assert first["lr"] == parent["train", 4]["lr"] == {"0": 3e-3}
    assert first["train_loss"] == pytest.approx(parent["train", 4]["train_loss"], rel=1e-6)
    for key, e in events.items():  # the counters go on from the parent's
        assert (e["tokens"], e["flops"]) == (parent[key]["tokens"], parent[key]["flops"]), key
        done = (step_of(e) - 3) / 3  # linear from the stable 3e-3 to min_lr 3e-4 over steps 3, 4, 5; 6 is the end
        assert e["lr"]["0"] == pytest.approx(3e-3 + (3e-4 - 3e-3) * done, rel=1e-12), key
    assert events["eval", 6]["lr"] == {"0": pytest.approx(3e-4, rel=1e-12)}
    # old_lr_mult scales every generation of a branch (all were born before it): the way to a lower LR
    half = train(tmp_path / "half", *branch_args(data, wsd_ladder, 1, s1 / "ckpt_3.pt", 3, "--old_lr_mult=0.5"))
    assert next(e for e in half if e["event"] == "train")["lr"] == {"0": pytest.approx(1.5e-3, rel=1e-12)}
    # a branch keeps the parent's shape
    r = run(*branch_args(data, wsd_ladder, 1, s1 / "ckpt_3.pt", 3, "--n_layer=3"), f"--out_dir={tmp_path / 'deeper'}")
    assert_one_line_error(r, "--init_from=branch keeps the checkpoint's shape, but n_layer=3 (checkpoint: 2)")
    assert not (tmp_path / "deeper").exists()


def test_a_branch_of_a_grown_stage_cools_every_generation_down_1_sqrt(wsd_ladder, data, tmp_path):
    """Stage 2's end (two generations, gen 0 at stage 2's old_lr_mult 0.8, gen 1 at lr_mult 0.5), branched
    with stage 2's own arguments for a '1-sqrt' cooldown of 4: each from its stage-2 LR to its min_lr."""
    stage2 = {e["iter"]: e for e in read_log(wsd_ladder[2]) if e["event"] == "eval"}
    log = train(tmp_path / "cool", *branch_args(data, wsd_ladder, 2, wsd_ladder[2] / "ckpt.pt", 4, "--cooldown_shape=1-sqrt",
                                                "--old_lr_mult=1.0"))  # stage 2's 0.8 would scale them again
    events = [e for e in log if "lr" in e]
    assert {step_of(e) for e in events} == {12, 13, 14, 15, 16}
    assert events[0]["lr"] == stage2[12]["lr"]  # the step the parent would have taken next
    for e in events:
        for g in (0, 1):
            stable = reference_wsd_lr(WSD, g, 2, 12)
            floor = WSD[g]["min_lr"] * stable / WSD[g]["lr"]  # min_lr at the generation's multiplier
            expected = stable + (floor - stable) * math.sqrt((step_of(e) - 12) / 4)
            assert e["lr"][str(g)] == pytest.approx(expected, rel=1e-12), (e, g)


# -----------------------------------------------------------------------------
# 9. tier ramp: after a vocabulary growth, rows come from the parent's tier with odds falling 1 -> 0


def test_tier_ramp_falls_from_the_parents_tier_and_resumes_exactly(ladder, data, tmp_path):
    """Stage 2 grows v512 -> v1024 with a ramp of 4: steps 6..9 draw a row from v512 with odds 1, 3/4, 1/2,
    1/4 (train events 7..10), none after. A resume inside the ramp (at 9) is the uninterrupted run."""
    args = [*stage_args(data, 2, ladder[1]), "--tier_ramp_iters=4"]
    whole = train(tmp_path / "whole", *args)
    train(tmp_path / "split", *args, "--max_iters=3")
    split = train(tmp_path / "split", *args, "--init_from=resume", f"--max_iters={STAGE_ITERS}")
    assert_same_run(split, whole, rel=1e-6)
    old = {e["iter"]: e.get("old_tier_rows", 0.0) for e in whole if e["event"] == "train"}
    assert old == {e["iter"]: e.get("old_tier_rows", 0.0) for e in split if e["event"] == "train"}
    assert list(old) == list(range(STAGE_ITERS + 1, 2 * STAGE_ITERS + 1))
    rows = 16  # batch_size x grad_accum_steps
    counts = {it: f * rows for it, f in old.items()}
    assert all(c == int(c) for c in counts.values()), old
    assert counts[7] == rows and counts[11] == counts[12] == 0, old  # every row at the growth, none after
    # in between, binomial(16, 3/4), (16, 1/2), (16, 1/4): 24 rows expected (sd 3.2), and falling
    assert abs(counts[8] + counts[9] + counts[10] - 24) <= 10 and counts[8] > counts[10], old
    assert first_train_loss(whole) != first_train_loss(read_log(ladder[2]))  # v512 rows, not the ladder's v1024

    # the old rows are the parent tier's: with its train.bin all one token (id 100), the first step's rows
    # are all that sequence, and its loss is the grown model's on it
    poison = tmp_path / "v512_poisoned"
    poison.mkdir()
    for f in ("meta.json", "val.bin"):
        shutil.copy(data / "llama2_v512" / f, poison)
    n = len(np.memmap(data / "llama2_v512" / "train.bin", dtype=np.uint16, mode="r"))
    np.full(n, 100, dtype=np.uint16).tofile(poison / "train.bin")
    log = train(tmp_path / "poisoned", *args, f"--parent_data_dir={poison}", "--max_iters=1")
    first = [e for e in log if e["event"] == "train"][0]
    assert first["old_tier_rows"] == 1.0
    torch.manual_seed(0)
    grown, _ = grow_model(model_from_checkpoint(load_checkpoint(ladder[1] / "ckpt.pt")),
                          GPTConfig(vocab_size=1024, n_layer=3, n_head=3, head_dim=16, ffn_hidden=128, block_size=64),
                          tokenizer=load_tokenizer(LLAMA2, 1024))
    x = torch.full((1, 64), 100)
    assert first["train_loss"] == pytest.approx(grown(x, x)[1].item(), rel=1e-5)  # (the real v512's: 6.74)


def first_train_loss(log):
    return [e for e in log if e["event"] == "train"][0]["train_loss"]


# -----------------------------------------------------------------------------
# 10. bits per byte: the split's bytes per token is what the scored windows hold


def token_bytes(data, bos_id):
    """UTF-8 bytes that each token of `data` stands for, from the SentencePiece model's pieces: a byte token
    1, a normal piece its text with '▁' as a space, BOS 0; the fallback run E2 96 81 (a space that does not
    merge at this tier) is one space, counted on its first token; after a BOS, the space that SentencePiece's
    dummy prefix adds is no text, so the first piece loses its leading space (a fallback run: all of it)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=LLAMA2)
    pieces = [sp.id_to_piece(i) for i in range(int(data.max()) + 1)]
    byte = {i: int(p[3:5], 16) for i, p in enumerate(pieces) if sp.is_byte(i)}
    counts, j = np.zeros(len(data), dtype=np.int64), 0
    while j < len(data):
        i, after_bos = int(data[j]), j > 0 and data[j - 1] == bos_id
        if [byte.get(int(t)) for t in data[j:j + 3]] == [0xE2, 0x96, 0x81]:
            counts[j], j = 0 if after_bos else 1, j + 3
            continue
        if i in byte:
            counts[j] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            counts[j] = len(pieces[i].replace("▁", " ").encode()) - (after_bos and pieces[i].startswith("▁"))
        j += 1
    return counts


@pytest.mark.parametrize("tier", [512, 1024, 4096])
def test_bits_per_byte_uses_the_bytes_the_scored_windows_hold(data, tier):
    """bpb = nats/token x tokens/bytes of the split: right only if the windows' targets hold the split's bytes
    per token. Exactly over the whole split; within 0.5% for the tiny configs' windows (128 x 64) and the
    experiment's (512 x 1024)."""
    tier_dir = data / f"llama2_v{tier}"
    with open(tier_dir / "meta.json") as f:
        meta = json.load(f)
    val = np.memmap(tier_dir / "val.bin", dtype=np.uint16, mode="r")
    counts = token_bytes(val, meta["bos_id"])
    assert len(val) == meta["val"]["tokens"] and counts.sum() == meta["val"]["bytes"]
    per_token = meta["val"]["bytes"] / meta["val"]["tokens"]
    for n, T in ((128, 64), (512, 1024)):
        scored = sum(counts[s + 1:s + 1 + T].sum() for s in eval_window_starts(len(val), n, T))  # the targets y
        assert scored / (n * T) == pytest.approx(per_token, rel=5e-3), (n, T)


# -----------------------------------------------------------------------------
# 11. faults: divergence, data that moved, a grow.py checkpoint resumed


def test_a_diverging_run_stops_in_one_line_and_keeps_the_good_checkpoint(wsd_ladder, data, tmp_path):
    """weight_decay 1e9 (a branch may change it; a resume may not) multiplies every weight by about -3e6 a
    step: the loss turns non-finite within a few steps. The run stops naming the iteration, writes no
    checkpoint, and the parent's checkpoint still loads, finite, at its iteration."""
    parent = wsd_ladder[1] / "ckpt_3.pt"
    before = open(parent, "rb").read()
    out = tmp_path / "diverged"
    r = run(*branch_args(data, wsd_ladder, 1, parent, 3, "--weight_decay=1e9"), f"--out_dir={out}")
    assert_one_line_error(r, "training diverged at iteration ")
    assert f"{parent} (iteration 3) is kept" in r.stderr and "--init_from=branch" in r.stderr
    assert not (out / "ckpt.pt").exists() and open(parent, "rb").read() == before
    ckpt = load_checkpoint(parent)  # refuses a non-finite tensor
    assert ckpt["iter_num"] == 3
    # from scratch: whatever was saved before the divergence is finite, and the message names it
    scratch = tmp_path / "scratch"
    r = run("config/tiny_stage1.py", f"--data_dir={data / 'llama2_v512'}", *TINY, "--learning_rate=1e6",
            "--grad_clip=0", "--max_iters=6", f"--out_dir={scratch}")
    assert_one_line_error(r, "training diverged at iteration ")
    bad = int(r.stderr.split("training diverged at iteration ")[1].split(":")[0])
    if (scratch / "ckpt.pt").exists():
        saved = load_checkpoint(scratch / "ckpt.pt")["iter_num"]
        assert saved <= bad and f"{scratch / 'ckpt.pt'} (iteration {saved}) is kept" in r.stderr
    else:
        assert "no checkpoint was written" in r.stderr


def test_a_checkpoint_with_nan_stops_at_its_first_step_in_one_line(ladder, data, tmp_path):
    """train.py does not scan a checkpoint on load (every rank would read it all); its first step does."""
    ckpt = load_checkpoint(ladder[1] / "ckpt.pt")
    out = tmp_path / "s1"
    out.mkdir()
    poisoned = {**ckpt["model"], "norm.g0": torch.full_like(ckpt["model"]["norm.g0"], float("nan"))}
    torch.save({**ckpt, "model": poisoned}, out / "ckpt.pt")  # past save_checkpoint's refusal, as a damaged file would be
    r = run(*stage_args(data, 1), f"--out_dir={out}", "--init_from=resume", f"--max_iters={STAGE_ITERS + 2}")
    assert_one_line_error(r, f"{out / 'ckpt.pt'} gives a non-finite loss at its first step (iteration {STAGE_ITERS})")


def test_growing_a_checkpoint_whose_data_moved(ladder, data, tmp_path):
    """The parent's tier is found where its checkpoint says (as given, then absolute); if it moved,
    --parent_data_dir names it, and without it the error says so in one line."""
    ckpt = load_checkpoint(ladder[1] / "ckpt.pt")
    moved = tmp_path / "moved.pt"
    save_checkpoint({**ckpt, "data": {**ckpt["data"], "data_dir": "gone/llama2_v512",
                                      "data_dir_abs": str(tmp_path / "gone" / "llama2_v512")}}, moved)
    args = [a for a in stage_args(data, 2, ladder[1]) if not a.startswith("--grow_from")] + [f"--grow_from={moved}"]
    assert_one_line_error(run(*args, f"--out_dir={tmp_path / 'a'}"), "pass --parent_data_dir=PATH")
    assert not (tmp_path / "a").exists()
    log = train(tmp_path / "b", *args, f"--parent_data_dir={data / 'llama2_v512'}")
    grow = log[0]
    assert grow["event"] == "grow" and grow["parent_tier_val_bpb"] == pytest.approx(grow["parent_val_bpb"], rel=1e-6)


def test_a_grow_py_checkpoint_resumed_runs_the_parent_tier_check(ladder, data, tmp_path):
    out = tmp_path / "grown"
    r = subprocess.run([sys.executable, "grow.py", "--ckpt", str(ladder[1] / "ckpt.pt"), "--out", str(out / "ckpt.pt"),
                        "--n_layer=3", "--n_head=3", "--ffn_hidden=128", "--vocab_size=1024",
                        f"--data_dir={data / 'llama2_v1024'}"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    args = [a for a in stage_args(data, 2, ladder[1]) if not a.startswith("--grow_from")] + ["--tier_ramp_iters=4"]
    log = train(out, *args, "--init_from=resume")
    grow = log[0]
    assert grow["event"] == "grow" and grow["parent_tier_val_bpb"] == pytest.approx(grow["parent_val_bpb"], rel=1e-6)
    # and it ramps from the parent's tier as train.py's own growth does (the rows depend on (seed, iter) alone)
    ramp = {e["iter"]: e.get("old_tier_rows") for e in log if e["event"] == "train"}
    own = train(tmp_path / "own", *args, f"--grow_from={ladder[1] / 'ckpt.pt'}")
    assert ramp == {e["iter"]: e.get("old_tier_rows") for e in own if e["event"] == "train"}
    assert ramp[STAGE_ITERS + 1] == 1.0 and ramp[2 * STAGE_ITERS] == 0.0
