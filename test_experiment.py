"""
experiment.py end to end on the CPU: the tiny regime's scratch frontier (a stable run, two cooldown
branches) and the reference ladder, run as the study runs them, then the report's FLOPs ratio.

    python -m pytest -q test_experiment.py          (about a minute on 2 cores)
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_train import LLAMA2, data  # noqa: F401 (the fixture)

HERE = os.path.dirname(os.path.abspath(__file__))


def experiment(cwd, *args):
    r = subprocess.run([sys.executable, os.path.join(HERE, "experiment.py"), *args], cwd=cwd, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def study(data, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("study")
    (root / "data").mkdir()
    os.symlink(data, root / "data" / "tinyshakespeare")  # where the tiny configs look
    experiment(root, "run", "tiny/scratch", "tiny/ref", "--jobs=2", f"--tokenizer={LLAMA2}", "--compile=False")
    return root


def test_report_gives_a_flops_ratio_against_a_two_branch_frontier(study):
    out = experiment(study, "report")
    results = json.loads((study / "assets" / "study_results.json").read_text())
    frontier = np.array(results["regimes"]["tiny"]["frontier"])
    assert frontier.shape == (2, 2) and frontier[0, 0] < frontier[1, 0]
    # the branches cooled down for 20% more: 10 + 2 and 20 + 4 iterations of the stable run's FLOPs per iteration
    stable = [json.loads(line) for line in open(study / "assets" / "study" / "tiny__scratch_lr0.003__s1337__stable.jsonl")]
    per_iter = stable[-1]["flops"] / stable[-1]["iter"]
    assert frontier[:, 0] == pytest.approx([24 * per_iter, 48 * per_iter])
    (run,) = results["runs"]
    assert run["variant"] == "ref" and run["flops"] == pytest.approx(40 * per_iter, rel=0.02)  # scratch's budget
    # the ratio: the ladder's FLOPs over the frontier's FLOPs at the ladder's bpb (log-linear between branches)
    (f0, b0), (f1, b1) = frontier
    reach = np.exp(np.log(f0) + (run["val_bpb"] - b0) / (b1 - b0) * (np.log(f1) - np.log(f0)))
    assert run["flops_ratio"] == pytest.approx(run["flops"] / reach, rel=1e-9)
    assert run["ratio_is"] == ("inside" if b1 <= run["val_bpb"] <= b0 else "extrapolated")
    # the two factors: what the small stage saves per token (its tokens at its own FLOPs per token), and the
    # tokens the ladder needed over scratch's for its bpb
    s1 = [json.loads(line) for line in open(study / "assets" / "study" / "tiny__ref__s1337__s1.jsonl")][-1]
    per_token, small_per_token = stable[-1]["flops"] / stable[-1]["tokens"], s1["flops"] / s1["tokens"]
    small_share = s1["tokens"] / run["tokens"]
    assert 0 < small_per_token < per_token and 0 < small_share < 1
    assert run["cost_per_token"] == pytest.approx(small_share * small_per_token / per_token + 1 - small_share)
    assert run["token_ratio"] == pytest.approx(run["tokens"] / (reach / per_token))
    # against any scratch shape: the small shape's frontier (its own stable run and branches) counts where its
    # branches reach the ladder's bpb
    (small,) = map(np.array, results["regimes"]["tiny"]["other_shapes"].values())  # scratch_small's best LR
    assert small.shape == (2, 2) and small[0, 0] < small[1, 0] < frontier[1, 0]  # a cheaper shape, same iterations
    (s0, c0), (s1, c1) = small
    reach_small = np.exp(np.log(s0) + (run["val_bpb"] - c0) / (c1 - c0) * (np.log(s1) - np.log(s0)))
    cheapest = min(reach, reach_small) if c1 <= run["val_bpb"] <= c0 else reach
    assert run["flops_ratio_any_shape"] == pytest.approx(run["flops"] / cheapest, rel=1e-9)
    assert f"| ref | 1 | {run['val_bpb']:.4f} | {run['flops_ratio']:.3f}" in out
    anywhere, star = run["flops_ratio_any_shape"], " *" if run["any_shape_is"] == "extrapolated" else ""
    assert f"| {anywhere:.3f} ({anywhere:.3f}-{anywhere:.3f}){star} |" in out  # one ladder seed: mean, range
    assert (study / "assets" / "study_tiny.png").exists()


def test_a_finished_run_is_not_run_again(study):
    out = experiment(study, "run", "tiny/ref", "--jobs=2", f"--tokenizer={LLAMA2}", "--compile=False")
    assert out.count("done already") == 2 and "start" not in out


def test_a_logged_run_runs_again_only_as_the_parent_of_one_that_is_not(study):
    # a later device call: no checkpoint travelled. A logged run that nothing needs is not run again; the parent
    # of a missing run is, and the study keeps the log its children grew from, the new one filed as a rerun
    import shutil
    for part in ("s1", "s2"):
        shutil.rmtree(study / "out" / "study" / "tiny" / "ref" / "s1337" / part)
    args = ("--jobs=1", f"--tokenizer={LLAMA2}", "--compile=False")
    out = experiment(study, "run", "tiny/ref/s1337/s1", *args)
    assert "done already: tiny/ref/s1337/s1" in out and "start" not in out
    logs = study / "assets" / "study"
    first = (logs / "tiny__ref__s1337__s1.jsonl").read_text()
    (logs / "tiny__ref__s1337__s2.jsonl").unlink()
    out = experiment(study, "run", "tiny/ref/s1337/s2", *args)
    assert "start tiny/ref/s1337/s1:" in out and "start tiny/ref/s1337/s2:" in out
    assert (logs / "tiny__ref__s1337__s1.jsonl").read_text() == first
    rerun = study / "assets" / "study_reruns" / "tiny__ref__s1337__s1__rerun1.jsonl"
    assert rerun.exists() and json.loads(rerun.read_text().splitlines()[-1])["event"] == "eval"
    assert json.loads((logs / "tiny__ref__s1337__s2.jsonl").read_text().splitlines()[-1])["event"] == "eval"


def test_todo_asks_for_what_the_protocol_lacks(tmp_path, monkeypatch):
    """Screening with the first seed for every peak LR and ladder; three seeds for scratch's best LR, the
    reference and the ladders within 0.1 of the best ratio against any scratch shape; none for one beyond it
    (even4 beats the final shape's frontier only), or for what has run."""
    import experiment
    monkeypatch.setattr(experiment, "LOGS", str(tmp_path))  # the stable runs' logs, written below where needed
    c = experiment.REGIMES["c"]
    every = [200, 400, 600, 800]
    names = {f"c/{shape}_lr{lr:g}/s1337/{part}" for lr in c["lrs"] for shape in ("scratch", "scratch_small")
             for part in ["stable", *(f"cd{k}" for k in every)]}
    names |= {f"c/scratch_lr0.002/s{s}/cd{k}" for s in (1337, 2024) for k in every}
    names |= {f"c/{v}/s1337/s{len(stages)}" for v, stages in experiment.LADDERS.items()}  # each one's last stage
    names |= {"c/new2x/s2024/s2", "c/new2x/s7/s2"}
    results = {"regimes": {"c": {"scratch_best": "scratch_lr0.002"}},
               "candidates": {f"c/{v}": {"flops_ratio": {"mean": x}, "flops_ratio_any_shape": {"mean": y}}
                              for v, x, y in (("new2x", 0.86, 0.86), ("ref", 0.91, 0.91), ("old0.5", 0.95, 0.95),
                                              ("late", 0.97, 0.97), ("cosine", 1.1, 1.7), ("even4", 0.70, 1.01))}}
    want = experiment.todo(results, names)["c"]
    assert set(want) == {*(f"c/{v}/s1337/" for v in experiment.MORE_STAGES), "c/scratch_lr0.002/s7/",
                         *(f"c/{v}/s{s}/" for v in ("ref", "old0.5") for s in (2024, 7))}
    assert experiment.todo(results, names)["t"][:3] == [f"t/scratch_lr{lr:g}/s1337/" for lr in (5e-4, 1e-3, 2e-3)]
    # another scratch shape is screened at every LR with the first seed too, and its best LR gets the seeds
    results["regimes"]["c"]["other_shapes"] = {"scratch_small_lr0.002": []}
    assert {"c/scratch_small_lr0.002/s2024/", "c/scratch_small_lr0.002/s7/"} <= set(experiment.todo(results, names)["c"])
    del results["regimes"]["c"]["other_shapes"]
    assert experiment.todo(results, names - {"c/scratch_small_lr0.004/s1337/stable"})["c"][0] == \
        "c/scratch_small_lr0.004/s1337/"
    # a screen whose stable run is in but a cooldown branch is not is unfinished (a call cut short); and the
    # shape's best LR, judged without it, gets no seeds until it is in
    results["regimes"]["c"]["other_shapes"] = {"scratch_small_lr0.002": []}
    want = experiment.todo(results, names - {"c/scratch_small_lr0.004/s1337/cd800"})["c"]
    assert want[0] == "c/scratch_small_lr0.004/s1337/" and not any(w.startswith("c/scratch_small_lr0.002/") for w in want)
    assert "c/scratch_lr0.002/s7/" in want  # the other shape's screens are complete: its seeds go on
    # an LR whose stable run ended more than RULED_OUT above another's needs no branches; one closer does
    results["regimes"]["c"]["other_shapes"] = {}
    for lr, end in ((1e-3, 1.50), (2e-3, 1.49), (4e-3, 1.49 + experiment.RULED_OUT + 0.01)):
        name = f"c/scratch_small_lr{lr:g}/s1337/stable"
        with open(experiment.log_copy(name), "w") as f:
            f.write(json.dumps({"event": "eval", "iter": 800, "flops": 1e16, "val_bpb": end}) + "\n")
    names -= {f"c/scratch_small_lr{lr:g}/s1337/cd800" for lr in (1e-3, 4e-3)}
    want = experiment.todo(results, names)["c"]
    assert "c/scratch_small_lr0.001/s1337/" in want and "c/scratch_small_lr0.004/s1337/" not in want


def test_a_regime_of_large_runs_caps_how_many_go_at_once(tmp_path, monkeypatch):
    import experiment
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the commands name the configs by relative path
    everything = {n: v for regime in ("c", "t") for n, v in experiment.runs(regime, [1337]).items()}

    def limit(names, jobs):
        return experiment.job_limit({n: everything[n] for n in names}, jobs)
    assert limit({"c/ref/s1337/s1", "c/ref/s1337/s2"}, 5) == 5
    assert limit({"c/ref/s1337/s1", "t/ref/s1337/s3"}, 5) == experiment.REGIMES["t"]["max_jobs"]["final"] == 2
    assert limit({"t/ref/s1337/s3"}, 1) == 1
    # t's 51.1M runs (its scratch check, a ladder's middle stage) fit four at once; one 134.1M run among them caps all
    assert limit({"t/scratch_mid_lr0.001/s1337/stable", "t/ref/s1337/s2"}, 4) == 4
    assert limit({"t/scratch_mid_lr0.001/s1337/stable", "t/scratch_lr0.001/s1337/cd496"}, 4) == 2


def test_a_branch_starts_once_its_snapshot_is_written_while_its_stable_run_goes_on(tmp_path):
    import experiment
    snapshot = tmp_path / "ckpt_200.pt"
    branch, grown = [f"--branch_from={snapshot}", "--max_iters=40"], [f"--grow_from={tmp_path}/ckpt.pt"]
    assert not experiment.can_start(branch, "stable", {}, {"stable": None})  # running, snapshot not yet written
    assert not experiment.can_start(grown, "s1", {}, {"s1": None})
    snapshot.write_bytes(b"")
    assert experiment.can_start(branch, "stable", {}, {"stable": None})
    assert not experiment.can_start(grown, "s1", {}, {"s1": None})  # a growth waits for its parent's end
    assert not experiment.can_start(branch, "stable", {"stable": None}, {})  # not started: an older run's file
    assert experiment.can_start(branch, "stable", {}, {}) and experiment.can_start(grown, None, {}, {})


def test_a_cheaper_scratch_shape_sets_the_ratio_against_any_shape_where_its_branches_reach(tmp_path, monkeypatch):
    import experiment
    monkeypatch.setattr(experiment, "LOGS", str(tmp_path))

    def last_eval(name, flops, bpb):
        line = json.dumps(dict(event="eval", iter=1, flops=flops, val_bpb=bpb, tokens=flops / 100))
        (tmp_path / (name.replace("/", "__") + ".jsonl")).write_text(line + "\n")

    last_eval("tiny/scratch_lr0.003/s1337/cd20", 1e10, 4.0)
    last_eval("tiny/scratch_lr0.003/s1337/cd40", 4e10, 3.0)
    last_eval("tiny/scratch_small_lr0.003/s1337/cd20", 5e9, 3.8)
    last_eval("tiny/scratch_small_lr0.003/s1337/cd40", 2e10, 3.2)
    last_eval("tiny/ref/s1337/s2", 2e10, 3.5)
    (run,) = experiment.study_results(experiment.logged_runs())["runs"]
    # 3.5 is halfway (in log FLOPs) along both frontiers: the final shape's at 2e10, the small one's at 1e10
    assert run["flops_ratio"] == pytest.approx(1.0) and run["flops_ratio_any_shape"] == pytest.approx(2.0)
    # the small shape stops at 3.2: past its last branch it does not count where the regime says nothing of the text
    last_eval("tiny/ref/s1337/s2", 3e10, 3.1)
    (run,) = experiment.study_results(experiment.logged_runs())["runs"]
    assert run["flops_ratio_any_shape"] == pytest.approx(run["flops_ratio"]) and run["any_shape_is"] == "inside"
    # with a text budget of twice its last branch's 48 iterations, its last segment extends to 3.1 (2.52e10)
    monkeypatch.setitem(experiment.REGIMES["tiny"], "text_iters", {"small": 96})
    (run,) = experiment.study_results(experiment.logged_runs())["runs"]
    assert run["flops_ratio_any_shape"] == pytest.approx(3e10 / (5e9 * 4 ** (0.7 / 0.6)))
    assert run["any_shape_is"] == "extrapolated"


def test_scratch_lrs_are_ranked_at_the_most_flops_they_all_reach(capsys):
    import experiment
    # 1e-3 is better at both budgets they share; 2e-3 has two later branches, lower than 1e-3's last one
    sweeps = {"scratch_lr0.001": {496: [(1337, 1.0, 1.47)], 1488: [(1337, 3.0, 1.33)]},
              "scratch_lr0.002": {496: [(1337, 1.0, 1.49)], 992: [(1337, 2.0, 1.38)], 1488: [(1337, 3.0, 1.34)],
                                  1984: [(1337, 4.0, 1.31)]}}
    best, frontier, lr_frontiers = experiment.best_frontier(sweeps)
    assert best == "scratch_lr0.001" and frontier.tolist() == [[1.0, 1.47], [3.0, 1.33]]
    assert lr_frontiers["scratch_lr0.002"] == [[1.0, 1.49], [2.0, 1.38], [3.0, 1.34], [4.0, 1.31]]
    sweeps["scratch_lr0.001"][1488] = [(1337, 3.0, 1.35)]  # now worse where both branched
    assert experiment.best_frontier(sweeps)[0] == "scratch_lr0.002"
    # no budget in common: judged at 3.0 FLOPs, where both reach (2e-3 read between its branches: 1.362 > 1.35)
    sweeps["scratch_lr0.002"] = {992: [(1337, 2.0, 1.45)], 1984: [(1337, 4.0, 1.30)]}
    assert experiment.best_frontier(sweeps)[0] == "scratch_lr0.001"
    # a seed without every branch is left out, and said: the frontier is the other seed's, its rows in budget order
    sweeps["scratch_lr0.002"] = {1984: [(1337, 4.0, 1.30), (2024, 4.0, 1.20)], 992: [(1337, 2.0, 1.40)]}
    capsys.readouterr()
    assert experiment.best_frontier(sweeps)[2]["scratch_lr0.002"] == [[2.0, 1.40], [4.0, 1.30]]
    assert "scratch_lr0.002: seeds 2024 lack some of the branches at 992, 1984" in capsys.readouterr().out


def test_a_ladders_curve_follows_the_parent_it_grew_from_a_rerun_included(tmp_path, monkeypatch):
    import experiment
    monkeypatch.setattr(experiment, "LOGS", str(tmp_path / "study"))

    def log(path, *events):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e) + "\n" for e in events))

    def evals(bpb):
        return {"event": "eval", "flops": 1.0, "val_bpb": bpb}
    log(tmp_path / "study" / "t__ref__s1337__s1.jsonl", evals(1.50))
    log(tmp_path / "study_reruns" / "t__ref__s1337__s1__rerun1.jsonl", evals(1.47))
    log(tmp_path / "study_reruns" / "t__ref__s1337__s1__rerun2.jsonl", evals(1.49))
    grow = {"event": "grow", "grow_from": f"{experiment.OUT}/t/ref/s1337/s1/ckpt.pt"}
    log(tmp_path / "study" / "t__ref__s1337__s2.jsonl", {**grow, "parent_val_bpb": 1.47}, evals(1.40))
    first, second = experiment.stage_chain("t/ref/s1337/s2")
    assert first.endswith("t__ref__s1337__s1__rerun1.jsonl") and second == experiment.log_copy("t/ref/s1337/s2")
    log(tmp_path / "study" / "t__ref__s1337__s2.jsonl", {**grow, "parent_val_bpb": 1.50}, evals(1.40))
    assert experiment.stage_chain("t/ref/s1337/s2")[0] == experiment.log_copy("t/ref/s1337/s1")


def test_a_branch_logs_the_bpb_of_the_checkpoint_it_branched_from(study):
    logs = study / "assets" / "study"
    stable = {e["iter"]: e["val_bpb"] for e in map(json.loads, open(logs / "tiny__scratch_lr0.003__s1337__stable.jsonl"))
              if e["event"] == "eval"}
    branches = sorted(logs.glob("tiny__scratch_lr0.003__s1337__cd*.jsonl"))
    assert len(branches) == 2
    for path in branches:
        event = json.loads(path.read_text().splitlines()[0])
        assert event["event"] == "branch" and event["parent_val_bpb"] == stable[event["iter"]]


def test_a_frontier_whose_branches_came_from_different_stable_runs_is_named(tmp_path, monkeypatch, capsys):
    import experiment
    monkeypatch.setattr(experiment, "LOGS", str(tmp_path / "study"))

    def log(path, *events):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e) + "\n" for e in events))

    def evals(*bpbs):
        return [{"event": "eval", "iter": 4 * (k + 1), "flops": 4.0 * (k + 1), "val_bpb": b} for k, b in enumerate(bpbs)]
    log(tmp_path / "study" / "t__scratch_lr0.001__s1337__stable.jsonl", *evals(1.60, 1.50))
    log(tmp_path / "study_reruns" / "t__scratch_lr0.001__s1337__stable__rerun1.jsonl", *evals(1.59, 1.49))
    names = ["t/scratch_lr0.001/s1337/stable", "t/scratch_lr0.001/s1337/cd4", "t/scratch_lr0.001/s1337/cd8"]

    def branches(bpb4, bpb8):
        for part, it, bpb in (("cd4", 4, bpb4), ("cd8", 8, bpb8)):
            event = {"event": "branch", "iter": it, "parent_val_bpb": bpb,
                     "branch_from": f"{experiment.OUT}/t/scratch_lr0.001/s1337/stable/ckpt_{it}.pt"}
            log(tmp_path / "study" / f"t__scratch_lr0.001__s1337__{part}.jsonl", event, *evals(bpb - 0.1))
    branches(1.60, 1.50)  # both from the study's stable run
    assert experiment.stable_logs(names) == {}
    branches(1.60, 1.49)  # the second from its rerun
    assert experiment.stable_logs(names) == {("scratch_lr0.001", 1337): {
        4: "t__scratch_lr0.001__s1337__stable.jsonl", 8: "t__scratch_lr0.001__s1337__stable__rerun1.jsonl"}}


@pytest.mark.parametrize("args, message", [(["run", "tiny/ref", "--jobs=0"], "--jobs=0 --seeds=1337: pass --jobs of 1"),
                                           (["run", "tiny/ref", "--seeds=1337,x"], "--seeds=1337,x --jobs=1: pass whole"),
                                           (["list", "zz"], "no run is named or starts with ['zz']")])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    r = subprocess.run([sys.executable, os.path.join(HERE, "experiment.py"), *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_a_killed_runs_cut_line_and_a_stray_log_are_not_read_as_records(study, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(study / "assets" / "study", logs)
    (logs / "notes.jsonl").write_text('{"a": 1}\n')  # not a study log's name: skipped, with a word
    ref = sorted(logs.glob("tiny__ref__*"))[-1]
    with open(ref, "a") as f:
        f.write('{"event": "eval", "iter"')  # what a kill mid-write leaves
    r = subprocess.run([sys.executable, os.path.join(HERE, "experiment.py"), "report", f"--logs={logs}"],
                       cwd=study, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "skipping" in r.stderr and "notes.jsonl" in r.stderr, r.stderr[-2000:]
    assert json.loads((tmp_path / "study_results.json").read_text())["regimes"]["tiny"]["frontier"]


def test_a_killed_run_goes_on_from_its_checkpoint(study, tmp_path):
    """A run killed mid-way (here: its stable phase at the first snapshot) resumes, keeping what it had done."""
    (tmp_path / "data").mkdir()
    os.symlink(os.readlink(study / "data" / "tinyshakespeare"), tmp_path / "data" / "tinyshakespeare")
    name = "tiny/scratch_lr0.003/s1337/stable"
    run_dir = tmp_path / "out" / "study" / name
    shutil.copytree(study / "out" / "study" / name, run_dir)
    os.replace(run_dir / "ckpt_20.pt", run_dir / "ckpt.pt")  # where the kill left it: iteration 20 of 40
    events = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    with open(run_dir / "log.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in events if e["iter"] <= 25)  # it had logged a little past 20
    out = experiment(tmp_path, "run", name, f"--tokenizer={LLAMA2}", "--compile=False")
    assert f"resume {name}:" in out and f"finished {name}" in out, out
    evals = [e["iter"] for e in map(json.loads, open(tmp_path / "assets" / "study" / f"{name.replace('/', '__')}.jsonl"))
             if e["event"] == "eval"]
    assert evals == sorted(set(evals)) and evals[-1] == 40, evals
