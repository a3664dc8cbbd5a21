"""
Does growing pay? The study: named runs of train.py, a scratch frontier from cooldown branches, and
every ladder measured against it.

    python experiment.py list [REGIME]                       # the runs, with their train.py commands
    python experiment.py run c/scratch_lr c/ref --seeds=1337 # runs (and what they grow or branch from)
    python experiment.py report                              # -> assets/study_results.json, assets/study_<regime>.png
    python experiment.py todo                                # what the protocol still asks for, and its FLOPs

A run name is regime/variant/s<seed>/<part>; `run` takes whole names or prefixes (c/ref, c/ref/s1337).
Runs go JOBS at a time (fewer where the regime's max_jobs caps a shape) on one GPU (small models leave it idle between
kernels; more GPUs: one `run` per GPU with CUDA_VISIBLE_DEVICES), each as soon as the run it grows from
is done, or the snapshot it branches from is written.
A finished run's log.jsonl is copied to assets/study/, and the report reads only those copies, so it
rebuilds from the repository alone; a run logged there runs again only as the parent of one that is not.

Scratch: a stable WSD run (no cooldown) at each peak LR, with snapshots at 1/4, 2/4, 3/4 and all of
its budget (halves for the tiny regime); from each, a branch cools down for 20% more iterations. The branches' final evals are the
frontier. A ladder's FLOPs ratio is its FLOPs over the FLOPs at which the frontier reaches its final
bpb (linear in log FLOPs between branches; beyond the last branch, the last two extended, and said).
The ratio is the product of two factors the report also gives: the ladder's cost per token (its FLOPs
over its tokens at the final shape's FLOPs per token: what the small stages save, fixed by the ladder's
shapes and timing) and its token ratio (its tokens over the tokens scratch needs for the same bpb: what
growing costs in learning, 1 if a grown model learned as much per token as scratch).
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

OUT, LOGS = "out/study", "assets/study"  # relative to the folder it runs in (which holds data/)
RULED_OUT = 0.05  # val bpb: a peak LR whose stable run ends this far above another's needs no cooldown branches
SEEDS = (1337, 2024, 7)  # the study's seeds, in the order candidates take them
HERE = os.path.dirname(os.path.abspath(__file__))
COOLDOWN = 0.2  # of the iterations before it

# A regime: the final shape's config, the small one (and a mid one), scratch's budget, branches and peak LRs, the
# shapes with a scratch frontier (the final one's is the study's; another's, a check), stage 1's iterations, how
# many runs fit the GPU at once, and its own ladders if not LADDERS below.
GROW = ["--init_from=grow", "--lr_mult=1.0"]  # the reference: every generation at the stage's peak
NEW2X = [*GROW, "--lr_mult=2.0"]  # the best recipe: the new generation at 2x (the later --lr_mult wins)
REGIMES = {
    "c": dict(  # compute-bound: the final shape sees its training text about once
        final="config/exp_stage2.py", small="config/exp_stage1.py", scratch_iters=800, branches=4,
        lrs=(1e-3, 2e-3, 4e-3), scratch_shapes=("final", "small"),  # a frontier of the 24.6M shape too
        text_iters={"small": 1060},  # the regime's text budget, one pass, over the small tier's text (69.5M tokens)
        s1_iters=400, common=["--eval_interval=100"],  # ladders: LADDERS and MORE_STAGES
        seeds=3, within=0.1, seeded=("ref",)),  # the protocol: seeds for scratch, ref and the ladders near the best
    "tiny": dict(  # the CPU ladder, for the tests and a first look
        final="config/tiny_stage2.py", small="config/tiny_stage1.py", scratch_iters=40, branches=2, lrs=(3e-3,),
        scratch_shapes=("final", "small"),
        s1_iters=20, common=["--eval_interval=10", "--eval_windows=16", "--log_interval=5"]),
    "t": dict(  # as the earlier experiment: 134.1M final, scratch sees the text about 2.4 times
        final="config/exp_stage3.py", mid="config/exp_stage2.py", small="config/exp_stage1.py", scratch_iters=1984,
        branches=4, lrs=(5e-4, 1e-3, 2e-3), s1_iters=1500, common=["--eval_interval=100"],
        scratch_shapes=("final", "mid"),  # the 51.1M shape's frontier too: even3 ends where it may do as well
        # the regime's text budget, as many passes as the 134.1M scratch reads (2,381 iterations, 2.88 over the
        # v32000 training text), over the v8192 text: 2,381 x 64.73M / 55.25M (the tiers' tokens, prepare.py)
        text_iters={"mid": 2789},
        seeds=2, within=0.0, seeded=(),  # 2 seeds for scratch and the best ladder
        max_jobs={"final": 2},  # a 134.1M run holds 36-53 GiB on the H200 (140): four at once ran out of memory
        ladders={"ref": [("small", [], 1), ("mid", GROW, 1300 / 1500), ("final", GROW, None)],
                 "new2x": [("small", [], 1), ("mid", NEW2X, 1300 / 1500), ("final", NEW2X, None)],
                 # regime c's two best timings: every shape the same iterations (800 each: cost per token 0.55), and
                 # short small stages before the final shape on the rest of the budget (500, 500, 1661: 0.75)
                 "even3": [("small", [], 800 / 1500), ("mid", NEW2X, 800 / 1500), ("final", NEW2X, 800 / 1500)],
                 # even3 won its screen (0.90) but spent two thirds of scratch's FLOPs: its timing on all of
                 # scratch's FLOPs (1200 iterations for each small shape, the final shape the rest: 1209)
                 "even3_long": [("small", [], 1200 / 1500), ("mid", NEW2X, 1200 / 1500), ("final", NEW2X, None)],
                 # and with every generation at the stage's peak (2x did not help the reference here: 1.06 to 1.00)
                 "even3_1x": [("small", [], 800 / 1500), ("mid", GROW, 800 / 1500), ("final", GROW, 800 / 1500)],
                 "steps3": [("small", [], 500 / 1500), ("mid", NEW2X, 500 / 1500), ("final", NEW2X, None)],
                 # new2x's last growth also takes the vocabulary from 8192 to 32000, and its 134.1M stage needs 300 of
                 # its 1101 iterations to get back to the parent's bpb (1.9988 after growth, 1.3924 at 300): the tier
                 # change one growth earlier, on the mid shape
                 "tiers_mid": [("small", [], 1), ("mid", [*NEW2X, "--vocab_size={v_final}", "--data_dir={tier_final}"],
                                                  1300 / 1500), ("final", NEW2X, None)],
                 # steps3 lost the same way (2.0910 bpb after its last growth, 1.5052 before): both together
                 "steps3_tiers_mid": [("small", [], 500 / 1500),
                                      ("mid", [*NEW2X, "--vocab_size={v_final}", "--data_dir={tier_final}"], 500 / 1500),
                                      ("final", NEW2X, None)]}),
}
# Ladder variants: each a list of stages (small or final shape, overrides, iterations as a multiple of the
# regime's s1_iters, or None: what is left of scratch's budget in FLOPs); the last stage trains the final
# shape and cools down. A variant's first stages that equal the reference's are the reference's runs, shared.
LADDERS = {
    "ref": [("small", [], 1), ("final", GROW, None)],
    "cosine": [("small", ["--schedule=cosine", "--decay_iters={iters}"], 1),
               ("final", [*GROW, "--schedule=cosine", "--decay_iters={iters}"], None)],
    "head_zero": [("small", [], 1), ("final", [*GROW, "--head_init=zero"], None)],
    "ramp100": [("small", [], 1), ("final", [*GROW, "--tier_ramp_iters=100"], None)],
    "ramp300": [("small", [], 1), ("final", [*GROW, "--tier_ramp_iters=300"], None)],
    "copy": [("small", [], 1), ("final", [*GROW, "--layer_init=copy", "--layer_place=interleave"], None)],
    "stack": [("small", [], 1), ("final", [*GROW, "--layer_init=stack"], None)],
    "old0.5": [("small", [], 1), ("final", [*GROW, "--old_lr_mult=0.5"], None)],
    "old0.25": [("small", [], 1), ("final", [*GROW, "--old_lr_mult=0.25"], None)],
    "new2x": [("small", [], 1), ("final", NEW2X, None)],
    "reset_adam": [("small", [], 1), ("final", [*GROW, "--reset_optimizer=True"], None)],
    # the two learning-rate levers that helped most when screened, together
    "new2x_old0.5": [("small", [], 1), ("final", [*NEW2X, "--old_lr_mult=0.5"], None)],
    # stage 1 at scratch's best peak LR (2e-3, not the configs' 1e-3): is it the ladder's LR that was untuned?
    "lr2": [("small", ["--learning_rate=2e-3"], 1), ("final", [*GROW, "--learning_rate=2e-3"], None)],
    "lr2_new2x": [("small", ["--learning_rate=2e-3"], 1),
                  ("final", [*GROW, "--learning_rate=2e-3", "--lr_mult=2.0"], None)],
    "lr2_old0.5": [("small", ["--learning_rate=2e-3"], 1),
                   ("final", [*GROW, "--learning_rate=2e-3", "--old_lr_mult=0.5"], None)],
    "short_s1": [("small", [], 0.5), ("final", GROW, None)],
    "late": [("small", [], 2), ("final", GROW, None)],
    "no_tiers": [("small", ["--vocab_size={v_final}", "--data_dir={tier_final}"], 1), ("final", GROW, None)],
    # every tier change on the small model: half of stage 1 at the small tier, half at the final one
    "tiers_small": [("small", [], 0.5), ("small", [*GROW, "--vocab_size={v_final}", "--data_dir={tier_final}"], 0.5),
                    ("final", GROW, None)],
}


# Regime c's ladders through smaller shapes first. A ladder's FLOPs ratio is its cost per token times its token
# ratio (see the docstring); the two-stage ladders' cost per token is 0.80 whatever their recipe, since stage 1
# (0.50 of the final shape's FLOPs per token) takes 400 of their 1,000 iterations, and 1,000 iterations are about
# one pass over the text (0.99 for the reference). These lower it: `steps4` spends scratch's FLOPs through 4 shapes
# (cost 0.75, 1,064 iterations, 1.07 passes); `even4` gives each shape 250 iterations (cost 0.46, 0.97 passes,
# 0.58 of scratch's stable FLOPs), and its ratio is measured at whatever bpb it reaches. Stages this short warm
# up (a new generation too) for 25 iterations: the configs' 100 would be most of them.
SHORT = ["--warmup_iters=25"]
TINY_C = ["--n_layer=4", "--n_head=2", "--ffn_hidden=768", *SHORT]  # 0.11 of the final shape's FLOPs per token
MID_C = ["--n_layer=5", "--n_head=3", "--ffn_hidden=1024", *SHORT]  # 0.24


def four_shapes(tiny, mid, small, last, last_args=(*NEW2X, *SHORT)):
    """5.5M, 12.0M and 24.6M for these multiples of s1_iters, each new generation at 2x, then the final shape for
    `last` (None: the rest of scratch's FLOPs). Ladders with the same first stages share their runs."""
    return [("small", TINY_C, tiny), ("small", [*NEW2X, *MID_C], mid), ("small", [*NEW2X, *SHORT], small),
            ("final", list(last_args), last)]


MORE_STAGES = {
    "steps4": four_shapes(0.25, 0.25, 0.5, None, last_args=NEW2X),  # a long last stage: the configs' warmup
    "even4": four_shapes(0.625, 0.625, 0.625, 0.625),
    # between the two (measured: even4 0.46 x 1.50, steps4 0.75 x 1.04): a longer last stage after even4's
    # three (cost 0.49, 1.02 passes), and 200 iterations of each small shape before 400 of the last (0.57, 0.98)
    "even4_300": four_shapes(0.625, 0.625, 0.625, 0.75),
    "tilt4": four_shapes(0.5, 0.5, 0.5, 1),
}

REGIMES["c"]["ladders"] = {**LADDERS, **MORE_STAGES}


def repo_path(path):
    """A path in this repository, as seen from where experiment.py runs."""
    return os.path.relpath(os.path.join(HERE, path))


def config_values(path, args=()):
    """A config file's settings with --key=value overrides, as train.py would see them (shape keys only)."""
    values = {}
    exec(open(repo_path(path)).read(), {}, values)
    for a in args:
        k, v = a[2:].split("=", 1)
        values[k] = v
    return values


def flops_per_iter(path, args=()):
    import torch
    from model import GPT, GPTConfig
    v = config_values(path, args)
    shape = {k: int(v[k]) for k in ("vocab_size", "n_layer", "n_head", "head_dim", "ffn_hidden", "block_size")}
    with torch.device("meta"):
        model = GPT(GPTConfig(**shape))
    tokens = int(v.get("batch_size", 16)) * int(v.get("grad_accum_steps", 1)) * shape["block_size"]
    return model.flops_per_token(shape["block_size"]) * tokens


def branch_iters(regime):
    """The iterations of scratch's stable run that its cooldown branches start from."""
    every = regime["scratch_iters"] // regime["branches"]
    return list(range(every, regime["scratch_iters"] + 1, every))


def train_args(name, config, args):
    return [repo_path(config), f"--out_dir={OUT}/{name}", *args]


def scratch_variant(shape):
    """'scratch' for the final shape, the study's frontier; 'scratch_small' for another shape's, a check."""
    return "scratch" if shape == "final" else f"scratch_{shape}"


def runs(regime, seeds):
    """{name: (train.py arguments, the run it starts from or None)} for every run of a regime."""
    r = REGIMES[regime]
    out, final = {}, r["final"]
    n, common, every = r["scratch_iters"], r["common"], branch_iters(r)[0]
    target = n * flops_per_iter(final)  # every ladder spends scratch's stable budget
    final_values = config_values(final)
    tier_final, v_final = final_values["data_dir"], final_values["vocab_size"]
    for seed in seeds:
        s = [f"--seed={seed}", *common]
        for shape, lr in ((shape, lr) for shape in r["scratch_shapes"] for lr in r["lrs"]):
            config, run = r[shape], f"{regime}/{scratch_variant(shape)}_lr{lr:g}/s{seed}"
            out[f"{run}/stable"] = (train_args(f"{run}/stable", config, [
                *s, "--init_from=scratch", f"--learning_rate={lr}", "--lr_mult=1.0", f"--max_iters={n}",
                "--cooldown_iters=0", f"--snapshot_interval={every}"]), None)
            for k in branch_iters(r):
                cd = round(COOLDOWN * k)
                out[f"{run}/cd{k}"] = (train_args(f"{run}/cd{k}", config, [
                    *s, "--init_from=branch", f"--learning_rate={lr}", "--lr_mult=1.0",
                    f"--branch_from={OUT}/{run}/stable/ckpt_{k}.pt", f"--max_iters={cd}", f"--cooldown_iters={cd}"]),
                    f"{run}/stable")
        made = {}  # stage spec (with the specs before it) -> run name: shared stages run once
        for variant, stages in r.get("ladders", LADDERS).items():
            parent, spent, prefix = None, 0, ()
            for k, (shape, args, scale) in enumerate(stages, 1):
                config = r[shape]
                last = k == len(stages)
                fill = dict(v_final=v_final, tier_final=tier_final, iters=0)
                per_iter = flops_per_iter(config, [a.format(**fill) for a in args])  # the shape, not {iters}
                iters = round((target - spent) / per_iter) if scale is None else round(scale * r["s1_iters"])
                fill["iters"] = iters
                args = [a.format(**fill) for a in args]
                prefix += ((config, tuple(args), iters),)
                name = made.get(prefix) or f"{regime}/{variant}/s{seed}/s{k}"
                made.setdefault(prefix, name)
                spent += iters * per_iter
                if name not in out:
                    cooldown = round(COOLDOWN * iters) if last else 0
                    start = [f"--grow_from={OUT}/{parent}/ckpt.pt"] if parent else ["--init_from=scratch"]
                    out[name] = (train_args(name, config, [*s, *start, f"--max_iters={iters}",
                                                           f"--cooldown_iters={cooldown}", *args]), parent)
                parent = name
    return out


def job_limit(chosen, jobs):
    """How many of these runs ({name: (train.py arguments, parent)}) may go at once: jobs, or fewer where a
    regime caps the runs of a shape that would not fit the GPU together (one such run among them caps them all)."""
    caps = []
    for name, (args, _) in chosen.items():
        r = REGIMES[parse(name)[0]]
        caps += [cap for shape, cap in r.get("max_jobs", {}).items() if args[0] == repo_path(r[shape])]  # its config
    return min([jobs] + caps)


def with_parents(names, everything):
    """names and every run they grow or branch from, however far back (checkpoints do not travel: they run again)."""
    chosen = set(names)
    while parents := {everything[n][1] for n in chosen if everything[n][1]} - chosen:
        chosen |= parents
    return chosen


def to_run(names, everything):
    """Of names, those the study has no log of, and every run they grow or branch from, logged or not (its checkpoint
    did not travel: it runs again, and its new log goes to the reruns)."""
    return with_parents({n for n in names if not os.path.exists(log_copy(n))}, everything)


def log_copy(name):
    return os.path.join(LOGS, name.replace("/", "__") + ".jsonl")


def rerun_stem(name):
    """A run done again keeps its logs as this plus __rerunK.jsonl."""
    return os.path.join(LOGS.rstrip("/") + "_reruns", os.path.basename(log_copy(name))[:-len(".jsonl")])


def keep_log(name):
    """Copy a finished run's log to LOGS. A run done again (a later call needs it as a parent, and
    checkpoints do not travel) keeps the first log as the study's; the new one goes to LOGS_reruns,
    numbered, as a measure of run-to-run noise."""
    dest = log_copy(name)
    if os.path.exists(dest):
        stem = rerun_stem(name)
        dest = next(f"{stem}__rerun{k}.jsonl" for k in range(1, 1000) if not os.path.exists(f"{stem}__rerun{k}.jsonl"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy(f"{OUT}/{name}/log.jsonl", dest)


def finished(name, args):
    """A run is done when its log ends with the eval at its last iteration (a branch or grow counts from its parent)."""
    path = f"{OUT}/{name}/log.jsonl"
    if not os.path.exists(path):
        return False
    events = read_log(path)
    return any(e["event"] == "eval" for e in events) and os.path.exists(f"{OUT}/{name}/ckpt.pt") and \
        f"--max_iters={events[-1]['iter'] - start_iter(events)}" in args


def start_iter(events):
    first = events[0]
    return first["iter"] if first["event"] in ("grow", "branch") else 0


def can_start(args, parent, waiting, running):
    """Once the run it starts from is done; a branch as soon as the snapshot it branches from is on disk (its stable
    run writes it atomically and goes on, and clears its folder when it starts: a snapshot there is this run's)."""
    snapshot = next((a.split("=", 1)[1] for a in args if a.startswith("--branch_from=")), None)
    return parent not in waiting and (parent not in running or snapshot is not None and os.path.exists(snapshot))


def run(names, extra, jobs):
    """Run the named runs (and what they start from), `jobs` at a time, each once its parent is done (a branch:
    once its snapshot is written)."""
    todo = dict(names)
    waiting, running, failed = dict(todo), {}, []
    while waiting or running:
        for name, (args, parent) in list(waiting.items()):
            if len(running) >= jobs:
                break
            if parent in failed:
                failed.append(name)
                del waiting[name]
                continue
            if not can_start(args, parent, waiting, running):
                continue
            del waiting[name]
            if finished(name, args):
                print(f"done already: {name}", flush=True)
                if not os.path.exists(log_copy(name)):
                    keep_log(name)
                continue
            # an unfinished run goes on from its checkpoint (a killed one's work is kept); without one it starts again
            resume = ["--init_from=resume"] if os.path.exists(f"{OUT}/{name}/ckpt.pt") else []
            if not resume:
                shutil.rmtree(f"{OUT}/{name}", ignore_errors=True)
                os.makedirs(f"{OUT}/{name}")
            log = open(f"{OUT}/{name}/stdout.log", "a")
            cmd = [sys.executable, repo_path("train.py"), *args, *extra, *resume]
            print(f"{'resume' if resume else 'start'} {name}: {' '.join(cmd[1:])}", flush=True)
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time())
        for name, (proc, t) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode:
                failed.append(name)
                print(f"FAILED {name} (exit {proc.returncode}): see {OUT}/{name}/stdout.log", flush=True)
            else:
                keep_log(name)
                print(f"finished {name} in {time.time() - t:.0f} s", flush=True)
        time.sleep(0.5)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed or were skipped: {', '.join(failed)}")


# ---- report -------------------------------------------------------------------

def read_log(path):
    """A log's records; a last line cut short (a killed run) is not one."""
    return [json.loads(line) for line in open(path) if line.endswith("\n")] if os.path.exists(path) else []


def read_evals(path):
    return [e for e in read_log(path) if e["event"] == "eval"]


def final_eval(name, *keys):
    """(flops, val_bpb), or the keys asked for, of a run's last eval; None before it has one."""
    evals = read_evals(log_copy(name))
    return tuple(evals[-1][k] for k in keys or ("flops", "val_bpb")) if evals else None


def frontier_flops(frontier, bpb):
    """FLOPs at which the frontier (points by FLOPs, bpb falling) reaches bpb, linear in log FLOPs between
    points; outside them, the nearest two extended. (flops, 'inside' | 'extrapolated')."""
    f, b = np.log(frontier[:, 0]), frontier[:, 1]
    i = next((j for j in range(1, len(b)) if b[j] <= bpb), None)
    inside = i is not None and b[0] >= bpb
    i = min(max(i or len(b) - 1, 1), len(b) - 1)
    x = f[i - 1] + (bpb - b[i - 1]) / (b[i] - b[i - 1]) * (f[i] - f[i - 1])
    return float(np.exp(x)), "inside" if inside else "extrapolated"


def frontier_bpb(frontier, flops):
    """The frontier's bpb at these FLOPs, linear in log FLOPs (the nearest two extended outside)."""
    f, b = np.log(frontier[:, 0]), frontier[:, 1]
    x = math.log(flops)
    i = min(max(int(np.searchsorted(f, x)), 1), len(f) - 1)
    inside = f[0] <= x <= f[-1]
    return float(b[i - 1] + (x - f[i - 1]) / (f[i] - f[i - 1]) * (b[i] - b[i - 1])), \
        "inside" if inside else "extrapolated"


def seed_frontiers(points):
    """{seed: frontier} from {budget: [(seed, flops, bpb), ...]}, for the seeds that have every budget."""
    seeds = set.intersection(*({s for s, _, _ in pts} for pts in points.values()))
    return {seed: np.array([(f, b) for _, pts in sorted(points.items()) for s, f, b in pts if s == seed])
            for seed in sorted(seeds)}


def best_frontier(sweeps):
    """(the best LR's variant, its frontier, every LR's frontier) from {variant: {budget: [(seed, flops, bpb)]}}, or
    None: each frontier the mean over the seeds that have every branch, two at least (the seeds and LRs left out
    are printed). The best reads the lowest bpb at the most FLOPs every frontier reaches: an LR is not judged by
    another's longer run, so one with fewer branches limits where all are judged."""
    frontiers = {}
    for variant, points in sorted(sweeps.items()):
        complete = seed_frontiers(points)
        partial = sorted({s for pts in points.values() for s, _, _ in pts} - set(complete))
        if partial or len(points) < 2:
            print(f"{variant}: seeds {', '.join(map(str, partial or complete))} lack some of the branches at "
                  f"{', '.join(map(str, sorted(points)))} or have one: left out of its frontier")
        if complete and len(points) >= 2:
            frontiers[variant] = np.mean(list(complete.values()), axis=0)
    if not frontiers:
        return None
    judged_at = min(fr[-1, 0] for fr in frontiers.values())
    best = min(frontiers, key=lambda v: frontier_bpb(frontiers[v], judged_at)[0])
    return best, frontiers[best], {v: fr.tolist() for v, fr in frontiers.items()}


def parse(name):
    regime, variant, seed, part = name.split("/")
    return regime, variant, int(seed[1:]), part


def spread(values):
    return dict(mean=float(np.mean(values)), min=float(np.min(values)), max=float(np.max(values)), n=len(values))


def logged_runs():
    """The names of the runs whose logs are in LOGS."""
    files = sorted(f for f in os.listdir(LOGS) if f.endswith(".jsonl")) if os.path.isdir(LOGS) else []
    names = []
    for f in files:
        parts = f[:-len(".jsonl")].split("__")  # REGIME__VARIANT__sSEED__PART
        if len(parts) == 4 and parts[2][1:].isdigit() and parts[2][0] == "s":
            names.append("/".join(parts))
        else:
            print(f"skipping {LOGS}/{f}: not a study log's name (REGIME__VARIANT__sSEED__PART.jsonl)", file=sys.stderr)
    if not names:
        raise SystemExit(f"no study logs in {LOGS}; run `python experiment.py run ...` first")
    return sorted(names)


def report(png_prefix):
    results = study_results(logged_runs())
    for regime in results["regimes"]:
        plot(regime, results, f"{png_prefix}_{regime}.png")
    os.makedirs(os.path.dirname(png_prefix) or ".", exist_ok=True)
    with open(f"{png_prefix}_results.json", "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)


def study_results(names):
    """Every regime's scratch frontier, every ladder's ratios against it, and each candidate's mean and range."""
    results = {"regimes": {}, "runs": [], "candidates": {}}
    for regime in sorted({parse(n)[0] for n in names}):
        mine = [n for n in names if parse(n)[0] == regime]
        # scratch: the frontier of each shape and peak LR (its branches' final evals, mean over seeds)
        sweeps = {}
        for n in mine:
            _, variant, seed, part = parse(n)
            if variant.startswith("scratch") and part.startswith("cd") and final_eval(n):
                sweeps.setdefault(variant, {}).setdefault(int(part[2:]), []).append((seed, *final_eval(n)))
        spec = REGIMES[regime]
        shapes = {shape: best_frontier({v: p for v, p in sweeps.items()
                                        if v.startswith(f"{scratch_variant(shape)}_lr")})
                  for shape in spec["scratch_shapes"]}
        if not shapes["final"]:
            continue
        best, frontier, lr_frontiers = shapes.pop("final")
        # each other shape's best LR's frontier, and the FLOPs up to which it may be extended: the regime's text
        # budget over its tier's text (its last branch reads its budget plus the cooldown), or its last branch
        others = {}
        for shape, found in shapes.items():
            if found:
                other_best, fr, _ = found
                budget = max(sweeps[other_best])
                its_iters = budget + round(COOLDOWN * budget)
                others[other_best] = fr, fr[-1, 0] * spec.get("text_iters", {}).get(shape, its_iters) / its_iters
        results["regimes"][regime] = dict(
            scratch_best=best, frontier=frontier.tolist(),
            frontier_seeds={str(k): [dict(seed=s, flops=f, bpb=b) for s, f, b in pts]
                            for k, pts in sorted(sweeps[best].items())},
            lr_frontiers=lr_frontiers, other_shapes={v: fr.tolist() for v, (fr, _) in others.items()},
            mixed_stable_runs=[dict(variant=v, seed=s, branched_from=logs) for (v, s), logs
                               in sorted(stable_logs([n for n in mine if parse(n)[1] in sweeps]).items())])
        branch = next(n for n in mine if parse(n)[1] == best and parse(n)[3].startswith("cd"))
        flops_per_token = np.divide(*final_eval(branch, "flops", "tokens"))  # the final shape's
        for n in mine:
            _, variant, seed, part = parse(n)
            if variant.startswith("scratch") or part != f"s{len(REGIMES[regime].get('ladders', LADDERS)[variant])}" \
                    or not final_eval(n):
                continue  # only a ladder's last stage, once it has run
            flops, bpb, tokens = final_eval(n, "flops", "val_bpb", "tokens")
            cost = flops / (tokens * flops_per_token)
            equal, where = frontier_flops(frontier, bpb)
            # against each scratch seed's own frontier: how much scratch's seed alone moves the ratio
            by_seed = [flops / frontier_flops(f, bpb)[0] for f in seed_frontiers(sweeps[best]).values()]
            gap_ref, where_gap = frontier_bpb(frontier, flops)
            # against the cheapest scratch shape at this bpb: another shape counts where its frontier reaches it
            # within the regime's text budget (extended past its last branch, and said, as the final shape's may be)
            reach = [(equal, where)]
            for fr, most in others.values():
                f, w = frontier_flops(fr, bpb)
                if f <= most:
                    reach.append((f, w))
            least, least_is = min(reach)
            results["runs"].append(dict(regime=regime, variant=variant, seed=seed, run=n, flops=flops, val_bpb=bpb,
                                        flops_ratio=flops / equal, ratio_is=where, bpb_gap=bpb - gap_ref,
                                        tokens=tokens, cost_per_token=cost, token_ratio=flops / equal / cost,
                                        flops_ratio_per_scratch_seed=by_seed,
                                        gap_is=where_gap, flops_ratio_any_shape=flops / least,
                                        any_shape_is=least_is))
        for variant in sorted({r["variant"] for r in results["runs"] if r["regime"] == regime}):
            rs = [r for r in results["runs"] if r["regime"] == regime and r["variant"] == variant]
            results["candidates"][f"{regime}/{variant}"] = dict(
                flops_ratio=spread([r["flops_ratio"] for r in rs]), bpb_gap=spread([r["bpb_gap"] for r in rs]),
                cost_per_token=spread([r["cost_per_token"] for r in rs]),
                token_ratio=spread([r["token_ratio"] for r in rs]),
                flops_ratio_per_scratch_seed=spread([x for r in rs for x in r["flops_ratio_per_scratch_seed"]]),
                val_bpb=spread([r["val_bpb"] for r in rs]), seeds=sorted(r["seed"] for r in rs),
                flops_ratio_any_shape=spread([r["flops_ratio_any_shape"] for r in rs]),
                extrapolated=any("extrapolated" in (r["ratio_is"], r["gap_is"]) for r in rs),
                any_shape_extrapolated=any(r["any_shape_is"] == "extrapolated" for r in rs))
    return results


def todo(results, names):
    """{regime: run prefixes} the protocol still asks for: every peak LR and ladder screened with the first seed;
    then the regime's `seeds` seeds for each scratch shape's best LR, for the ladders in `seeded` and for every
    ladder within `within` of the best mean FLOPs ratio against any scratch shape (a ladder that only beats the
    final shape is no candidate for the recipe)."""
    wanted = {}
    for regime, r in REGIMES.items():
        if "seeds" not in r:
            continue  # no protocol (tiny)
        ladders, seeds, first = r.get("ladders", LADDERS), SEEDS[:r["seeds"]], SEEDS[0]
        branches, want, unscreened = [f"cd{k}" for k in branch_iters(r)], [], []
        for shape in r["scratch_shapes"]:
            # a screen: the first seed's stable run and every branch (cooldowns rank the LRs), but no branches for an
            # LR whose stable run ends more than RULED_OUT above another's (they would not change the pick)
            screens = [f"{regime}/{scratch_variant(shape)}_lr{lr:g}/s{first}/" for lr in r["lrs"]]
            ends = {p: end[0] for p in screens if (end := final_eval(p + "stable", "val_bpb"))}
            ruled_out = {p for p, bpb in ends.items() if bpb > min(ends.values()) + RULED_OUT}
            missing = [p for p in screens
                       if p not in ruled_out and any(p + part not in names for part in ["stable", *branches])]
            want += missing
            unscreened += [scratch_variant(shape)] if missing else []
        want += [f"{regime}/{v}/s{first}/" for v, stages in ladders.items()
                 if f"{regime}/{v}/s{first}/s{len(stages)}" not in names]
        done = results["regimes"].get(regime, {})  # each scratch shape's best LR gets the seeds, once all are screened
        for best in [done["scratch_best"], *done.get("other_shapes", {})] if done else []:
            if any(best.startswith(f"{v}_lr") for v in unscreened):
                continue
            want += [f"{regime}/{best}/s{s}/" for s in seeds
                     if any(f"{regime}/{best}/s{s}/{b}" not in names for b in branches)]
        ratios = {k.split("/", 1)[1]: c["flops_ratio_any_shape"]["mean"] for k, c in results["candidates"].items()
                  if k.startswith(f"{regime}/")}
        near = {v for v, x in ratios.items() if x <= min(ratios.values()) + r["within"]} if ratios else set()
        for v in sorted(near | set(r["seeded"])):
            want += [f"{regime}/{v}/s{s}/" for s in seeds if f"{regime}/{v}/s{s}/s{len(ladders[v])}" not in names]
        wanted[regime] = list(dict.fromkeys(want))
    return wanted


def print_todo(wanted):
    for regime, prefixes in wanted.items():
        r = REGIMES[regime]
        everything = runs(regime, SEEDS[:r["seeds"]])
        chosen = to_run({n for n in everything if any(n.startswith(p) for p in prefixes)}, everything)
        flops = sum(int(next(a for a in args if a.startswith("--max_iters="))[len("--max_iters="):])
                    * flops_per_iter(args[0], args[1:]) for args, _ in (everything[n] for n in chosen))
        budget = r["scratch_iters"] * flops_per_iter(r["final"])
        print(f"regime {regime}: {len(prefixes)} to run, {len(chosen)} runs with the ones they start from, "
              f"{flops / budget:.1f} x scratch's stable budget ({budget:.3g} FLOPs)")
        if prefixes:
            print(f"python experiment.py run {' '.join(prefixes)} --seeds={','.join(map(str, SEEDS[:r['seeds']]))}")


def print_table(results):
    for regime, r in results["regimes"].items():
        print(f"regime {regime}: scratch {r['scratch_best']}, frontier (FLOPs, bpb) "
              + ", ".join(f"({f:.3g}, {b:.4f})" for f, b in r["frontier"]))
        for variant, fr in r["other_shapes"].items():
            print(f"  another scratch shape, {variant}: " + ", ".join(f"({f:.3g}, {b:.4f})" for f, b in fr))
        for m in r["mixed_stable_runs"]:
            print(f"  {m['variant']} seed {m['seed']}: its branches came from different runs of its stable phase, "
                  "a frontier with the reruns' noise: "
                  + ", ".join(f"{k} from {v}" for k, v in m["branched_from"].items()))
        shapes = bool(r["other_shapes"])
        print("| candidate | seeds | val bpb | FLOPs ratio at equal quality | against each scratch seed "
              "| bpb gap at equal FLOPs | = cost per token x token ratio |" + (" against any scratch shape |" * shapes))
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" * shapes))
        rows = sorted((c for c in results["candidates"].items() if c[0].startswith(f"{regime}/")),
                      key=lambda kv: kv[1]["flops_ratio"]["mean"])
        for name, c in rows:
            ratio, gap, bpb, each = c["flops_ratio"], c["bpb_gap"], c["val_bpb"], c["flops_ratio_per_scratch_seed"]
            anywhere = c["flops_ratio_any_shape"]
            print(f"| {name.split('/', 1)[1]} | {len(c['seeds'])} | {bpb['mean']:.4f} | {ratio['mean']:.3f} "
                  f"({ratio['min']:.3f}-{ratio['max']:.3f}){' *' if c['extrapolated'] else ''} "
                  f"| {each['min']:.3f}-{each['max']:.3f} | {gap['mean']:+.4f} ({gap['min']:+.4f} to {gap['max']:+.4f}) "
                  f"| {c['cost_per_token']['mean']:.3f} x {c['token_ratio']['mean']:.3f} |"
                  + (f" {anywhere['mean']:.3f} ({anywhere['min']:.3f}-{anywhere['max']:.3f})"
                     f"{' *' if c['any_shape_extrapolated'] else ''} |" * shapes))
        print("(ratio: mean (range) over the ladder's seeds against the seed-mean frontier; * somewhere beyond "
              "the frontier's last branch, extended. Cost per token: the ladder's FLOPs per token over the final "
              "shape's; token ratio: its tokens over scratch's at the same bpb" + ("; against any scratch shape: "
              "FLOPs over the least at which a scratch shape's frontier reaches its bpb, another shape's within the "
              "regime's text budget)"
              if shapes else ")"))


def curve(logs):
    pts = sorted((e["flops"], e["val_bpb"]) for p in logs for e in read_evals(p))
    return np.array(pts).reshape(-1, 2)


def plot(regime, results, png):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = results["regimes"][regime]
    fig, ax = plt.subplots(figsize=(8, 5))
    fr = np.array(r["frontier"])
    ax.plot(fr[:, 0], fr[:, 1], "k-o", label=f"scratch frontier ({r['scratch_best']}, cooldown branches)")
    for variant, other in r["lr_frontiers"].items():
        if variant != r["scratch_best"]:
            other = np.array(other)
            ax.plot(other[:, 0], other[:, 1], ":o", color="0.6", markersize=4,
                    label=f"{variant} frontier (another peak LR)")
    for pts in r["frontier_seeds"].values():
        ax.plot([p["flops"] for p in pts], [p["bpb"] for p in pts], "k.", alpha=0.4)
    for (variant, other), style in zip(r["other_shapes"].items(), ("s-", "^-")):
        other = np.array(other)
        ax.plot(other[:, 0], other[:, 1], style, color="0.5", label=f"{variant} frontier (another scratch shape)")
    stable = curve([log_copy(f"{regime}/{r['scratch_best']}/s{SEEDS[0]}/stable")])  # what the branches cool down from
    ax.plot(stable[:, 0], stable[:, 1], "k--", alpha=0.4, label=f"its stable run (no cooldown), seed {SEEDS[0]}")
    cands = {k.split("/", 1)[1]: v for k, v in results["candidates"].items() if k.startswith(f"{regime}/")}
    # the reference, the best of the most-seeded candidates (one seed's lead is within the seed range) against any
    # scratch shape and against the final one's, and the best screened so far against the final one's, where they
    # differ
    most_seeded = [min(cands, key=lambda v: (-len(cands[v]["seeds"]), cands[v][key]["mean"]))
                   for key in ("flops_ratio_any_shape", "flops_ratio")] if cands else []
    screened = [min(cands, key=lambda v: cands[v]["flops_ratio"]["mean"])] if cands else []
    shown = list(dict.fromkeys(["ref", *most_seeded, *screened]))
    for variant, color in zip(shown, ("C0", "C3", "C2", "C1")):
        if variant not in cands:
            continue
        drawn = next(x for x in results["runs"] if x["regime"] == regime and x["variant"] == variant)
        c = curve(stage_chain(drawn["run"]))
        ax.plot(c[:, 0], c[:, 1], color=color, marker=".",
                label=f"ladder {variant} (FLOPs ratio {cands[variant]['flops_ratio']['mean']:.2f}"
                      + (f", against any scratch shape {cands[variant]['flops_ratio_any_shape']['mean']:.2f}"
                         if r["other_shapes"] else "")
                      + f"; seeds {','.join(map(str, cands[variant]['seeds']))}, drawn {drawn['seed']})")
    lows = [fr[:, 1].min()] + [c["val_bpb"]["min"] for c in cands.values()]
    ax.set_ylim(min(lows) - 0.03, fr[:, 1].max() + 0.25)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("val bits per byte (held-out books)")
    ax.set_title(f"regime {regime}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="small")  # below: the curves fill the axes
    ax.grid(alpha=0.3)
    fig.savefig(png, dpi=110, bbox_inches="tight")


def run_of(ckpt_path):
    """The name of the run that wrote a checkpoint under OUT."""
    return os.path.relpath(os.path.dirname(ckpt_path), OUT)


def parent_log(ckpt_path, val_bpb, at_iter=None):
    """Of the logs of the run that wrote ckpt_path (the study's, its reruns'), the one whose eval at at_iter (None:
    its last) is val_bpb; None if none is."""
    parent = run_of(ckpt_path)
    for path in [log_copy(parent), *sorted(glob.glob(f"{rerun_stem(parent)}__rerun*.jsonl"))]:
        evals = read_evals(path)
        at = evals[-1:] if at_iter is None else [e for e in evals if e["iter"] == at_iter]
        if any(e["val_bpb"] == val_bpb for e in at):
            return path
    return None


def stage_chain(name):
    """A ladder's stages' logs, from stage 1's to `name`'s, read off each log's grow event: grow_from names the
    parent, and of its logs (the study's, a rerun's) the one whose last eval is the bpb the child grew from."""
    chain = [log_copy(name)]
    while (grow := next((e for e in read_log(chain[-1]) if e["event"] == "grow"), None)) is not None:
        found = parent_log(grow["grow_from"], grow["parent_val_bpb"])
        chain.append(found or log_copy(run_of(grow["grow_from"])))
    return chain[::-1]


def stable_logs(names):
    """{(variant, seed): {branch iteration: the log of the stable run it branched from}} for the scratch frontiers
    whose branches came from different runs of their stable phase (rerun as the parent of a missing branch): the
    frontier then holds the reruns' noise."""
    found = {}
    for n in names:
        _, variant, seed, _ = parse(n)
        branch = next((e for e in read_log(log_copy(n)) if e["event"] == "branch"), None)
        if branch is not None and "parent_val_bpb" in branch:
            log = parent_log(branch["branch_from"], branch["parent_val_bpb"], branch["iter"])
            found.setdefault((variant, seed), {})[branch["iter"]] = os.path.basename(log or "not found")
    return {k: v for k, v in found.items() if len(set(v.values())) > 1}


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["help"]
    words, flags = [a for a in rest if not a.startswith("--")], [a for a in rest if a.startswith("--")]
    mine = ("--seeds", "--jobs", "--out", "--logs")
    ours = dict(f[2:].split("=", 1) for f in flags if f.split("=")[0] in mine)
    extra = [f for f in flags if f.split("=")[0] not in mine]  # passed on to train.py
    OUT, LOGS = ours.get("out", OUT), ours.get("logs", LOGS)
    try:
        seeds, jobs = [int(s) for s in ours.get("seeds", "1337").split(",")], int(ours.get("jobs", 1))
    except ValueError:
        raise SystemExit(f"--seeds={ours.get('seeds', '')} --jobs={ours.get('jobs', 1)}: pass whole numbers, "
                         "such as --seeds=1337,2024 --jobs=2") from None
    if jobs < 1 or min(seeds) < 0:
        raise SystemExit(f"--jobs={jobs} --seeds={','.join(map(str, seeds))}: pass --jobs of 1 or more and seeds >= 0")
    everything = {n: v for regime in REGIMES for n, v in runs(regime, seeds).items()}
    if cmd == "list":
        listed = [n for n in everything if not words or any(n.startswith(w) for w in words)]
        if not listed:
            raise SystemExit(f"no run is named or starts with {words}; regimes: {', '.join(REGIMES)}")
        for name in listed:
            print(f"{name}: python train.py {' '.join(everything[name][0])}")
    elif cmd == "run" and words:
        chosen = {n: v for n, v in everything.items() if any(n.startswith(w) for w in words)}
        if not chosen:
            raise SystemExit(f"no run is named or starts with {words}; see `python experiment.py list`")
        needed = to_run(chosen, everything)
        for name in sorted(set(chosen) - needed):
            print(f"done already: {name} (its log is in {LOGS})")
        planned = {n: everything[n] for n in everything if n in needed}
        run(planned, extra, job_limit(planned, jobs))
    elif cmd == "report":
        report(os.path.join(os.path.dirname(LOGS.rstrip("/")), "study"))  # beside the logs' folder
    elif cmd == "todo":
        names = logged_runs()
        print_todo(todo(study_results(names), set(names)))
    else:
        raise SystemExit("usage: python experiment.py list [PREFIX...] | run NAME_OR_PREFIX... [--seeds=1337,2024] "
                         "[--jobs=4] [--train_key=value ...] | report | todo  (all take --out=DIR --logs=DIR)")
