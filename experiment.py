"""
Does growing pay? Runs the growth ladder, the same final shape from scratch, and the ablations,
one lane per GPU in parallel, then reports val bits per byte against cumulative training FLOPs.

    python experiment.py run ladder scratch          # lane 1 on GPU 0, lane 2 on GPU 1
    python experiment.py run ablations late          # the ablations branch from ladder_s2
    python experiment.py report                      # -> assets/growth.png, assets/growth_results.json

Every run is train.py with a config/exp_*.py file and a few overrides; a lane's runs go one
after another because each grows the previous one's checkpoint.
"""

import json
import os
import subprocess
import sys

import numpy as np

OUT = "out/exp"
S3 = "config/exp_stage3.py"
grow_s2 = ["--grow_from=out/exp/ladder_s2/ckpt.pt"]
RUNS = {  # name: (config, overrides)
    "ladder_s1": ("config/exp_stage1.py", []),
    "ladder_s2": ("config/exp_stage2.py", []),
    "ladder_s3": (S3, []),
    "scratch": ("config/exp_scratch.py", []),
    # ablations of the last growth, on its schedule but shorter, compared with ladder_s3 at equal FLOPs
    "reset_adam": (S3, grow_s2 + ["--reset_optimizer=True", "--max_iters=700"]),
    "copy_layers": (S3, grow_s2 + ["--layer_init=copy", "--layer_place=interleave", "--max_iters=700"]),
    "global_lr": (S3, grow_s2 + ["--lr_mode=global", "--max_iters=700"]),
    # one late growth: stage 1 trained as long as the ladder's stages 1 and 2 (equal FLOPs), then stage 3
    "late_s1": ("config/exp_stage1.py", ["--max_iters=4200", "--decay_iters=4200"]),
    "late_s3": (S3, ["--grow_from=out/exp/late_s1/ckpt.pt"]),
}
LANES = {"ladder": ["ladder_s1", "ladder_s2", "ladder_s3"], "scratch": ["scratch"],
         "ablations": ["reset_adam", "copy_layers", "global_lr"], "late": ["late_s1", "late_s3"]}
ABLATIONS = ["reset_adam", "copy_layers", "global_lr", "late_s3"]


def lane_command(runs, extra):
    cmds = [f"{sys.executable} train.py {RUNS[r][0]} --out_dir={OUT}/{r} {' '.join(RUNS[r][1] + extra)}"
            for r in runs]
    return " && ".join(cmds)


def run(lanes, extra):
    """Start each lane on its own GPU, wait for all, fail loudly if one fails."""
    procs = []
    for gpu, lane in enumerate(lanes):
        os.makedirs(OUT, exist_ok=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        log = open(f"{OUT}/lane_{lane}.log", "w")
        procs.append((lane, subprocess.Popen(lane_command(LANES[lane], extra), shell=True, env=env,
                                             stdout=log, stderr=subprocess.STDOUT)))
    failed = [lane for lane, p in procs if p.wait() != 0]
    if failed:
        raise SystemExit(f"lanes {failed} failed: see {OUT}/lane_<name>.log")


def read_log(name):
    path = f"{OUT}/{name}/log.jsonl"
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def curve(names):
    """(flops, val_bpb) of every eval of these runs, in order of FLOPs."""
    pts = sorted((e["flops"], e["val_bpb"]) for n in names for e in read_log(n) if e["event"] == "eval")
    return np.array(pts).reshape(-1, 2)


def flops_to_reach(c, bpb):
    """FLOPs at which a curve first reaches bpb (linear between evals); None if it never does."""
    hit = np.nonzero(c[:, 1] <= bpb)[0]
    if len(hit) == 0:
        return None
    i = hit[0]
    if i == 0:
        return float(c[0, 0])
    (f0, b0), (f1, b1) = c[i - 1], c[i]
    return float(f0 + (b0 - bpb) / (b0 - b1) * (f1 - f0))


def bpb_at(c, flops):
    """A curve's bpb at given FLOPs (linear between evals); None outside its range."""
    return float(np.interp(flops, c[:, 0], c[:, 1])) if len(c) and c[0, 0] <= flops <= c[-1, 0] else None


def report(png):
    if not any(len(curve([n])) for n in RUNS):  # nothing to plot: matplotlib fails on empty axes
        raise SystemExit(f"no runs with evals in {OUT}; run `python experiment.py run ladder scratch` first")
    ladder, scratch = curve(LANES["ladder"]), curve(["scratch"])
    res = {"runs": {n: read_log(n) for n in RUNS if read_log(n)}}
    if len(ladder) and len(scratch):
        target = scratch[-1, 1]
        reach = flops_to_reach(ladder, target)
        res["headline"] = dict(
            scratch_final_bpb=target, scratch_flops=scratch[-1, 0], ladder_final_bpb=ladder[-1, 1],
            ladder_flops=ladder[-1, 0], ladder_flops_to_reach_scratch_final=reach,
            fraction_of_scratch_flops=reach / scratch[-1, 0] if reach else None,
            scratch_bpb_at_ladder_final_flops=bpb_at(scratch, ladder[-1, 0]))
    res["ablations"] = {}
    for name in ABLATIONS:
        c = curve([name])
        if len(c) and len(ladder):
            res["ablations"][name] = dict(flops=c[-1, 0], bpb=c[-1, 1], ladder_bpb_at_equal_flops=bpb_at(ladder, c[-1, 0]))
    res["growth"] = []
    for name in RUNS:
        log = read_log(name)
        for g in (e for e in log if e["event"] == "grow"):
            after = [e for e in log if e["event"] == "eval" and e["iter"] > g["iter"]]
            back = next((e["iter"] - g["iter"] for e in after if e["val_bpb"] <= g["parent_val_bpb"]), None)
            res["growth"].append(dict(run=name, iter=g["iter"], bpb_before=g["parent_val_bpb"],
                                      bpb_after_parent_tier=g["parent_tier_val_bpb"], bpb_after=g["val_bpb"],
                                      iters_to_recover=back))
    with open(png.rsplit(".", 1)[0] + "_results.json", "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    plot(png)


def plot(png):
    import matplotlib  # optional: only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    lines = {"ladder (3 stages)": LANES["ladder"], "scratch": ["scratch"], "reset Adam at growth": ["reset_adam"],
             "copied layers": ["copy_layers"], "one global LR schedule": ["global_lr"],
             "one late growth": ["late_s1", "late_s3"]}
    lowest = np.inf
    for label, names in lines.items():
        c = curve(names)
        if len(c):
            ax.plot(c[:, 0], c[:, 1], marker=".", label=label)
            lowest = min(lowest, c[:, 1].min())
    ax.set_ylim(lowest - 0.03, 2.0)  # the spikes are vocabulary tier changes; their tops are in results.json
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("val bits per byte (held-out Gutenberg books)")
    ax.legend()
    ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["help"]
    lanes, extra = [a for a in rest if not a.startswith("--")], [a for a in rest if a.startswith("--")]
    if cmd == "run" and lanes and all(lane in LANES for lane in lanes):
        run(lanes, extra)
    elif cmd == "report":
        report(extra[0].split("=", 1)[1] if extra else "assets/growth.png")
    else:
        raise SystemExit(f"usage: python experiment.py run LANE... [--train_key=value] | report [--png=PATH]; "
                         f"lanes: {', '.join(LANES)}")
