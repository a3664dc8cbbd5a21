"""FSDP2 on the CPU (gloo): same losses as one process, checkpoints that resume on another number
of ranks, and growth of a checkpoint written under FSDP."""

import json
import os
import subprocess
import sys

import pytest

from prepare import DATASETS, LLAMA2_PATH, prepare

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--max_iters=12", "--grad_accum_steps=2", "--log_interval=3", "--eval_interval=6", "--compile=False"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(DATASETS["tinyshakespeare"]["path"], LLAMA2_PATH, [512, 1024], str(out), workers=1)
    return out


def train(out_dir, data_dir, *args, ranks=1, config="config/tiny_stage1.py"):
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = launcher + ["train.py", config, f"--out_dir={out_dir}", f"--data_dir={data_dir}", *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def losses(log, after=-1):
    return [(e["event"], e["iter"], e.get("train_loss", e.get("val_loss"))) for e in log if e["iter"] > after]


def assert_same(a, b):
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-5)


def test_fsdp_matches_one_process_and_resumes_on_another_number_of_ranks(data, tmp_path):
    v512 = data / "llama2_v512"
    one = train(tmp_path / "one", v512)
    sharded = train(tmp_path / "fsdp", v512, "--parallelism=fsdp", ranks=2)
    assert_same(losses(sharded), losses(one))
    # stop after 6 iterations on 2 ranks, resume on 1 for the other 6: the same run
    train(tmp_path / "split", v512, "--parallelism=fsdp", "--max_iters=6", ranks=2)
    resumed = train(tmp_path / "split", v512, "--init_from=resume")
    assert_same(losses(resumed, after=6), losses(one, after=6))


def test_growing_an_fsdp_checkpoint_under_fsdp_keeps_the_function(data, tmp_path):
    train(tmp_path / "s1", data / "llama2_v512", "--parallelism=fsdp", ranks=2)
    log = train(tmp_path / "s2", data / "llama2_v1024", "--parallelism=fsdp", "--max_iters=2",
                f"--grow_from={tmp_path / 's1' / 'ckpt.pt'}", "--vocab_init=random", "--head_init=zero", ranks=2,
                config="config/tiny_stage2.py")
    grow = next(e for e in log if e["event"] == "grow")
    assert grow["parent_tier_val_bpb"] == pytest.approx(grow["parent_val_bpb"], abs=1e-5)
