"""FSDP2 on the CPU (gloo): same losses as one process, checkpoints that resume on another number
of ranks, growth of a checkpoint written under FSDP, and no weight-sized copy kept from forward to
backward (run as a script under torchrun, this file is that test's worker)."""

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from grow import grow_model
from model import GPT, GPTConfig, Growable
from prepare import DATASETS, LLAMA2_PATH, prepare

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--max_iters=12", "--grad_accum_steps=2", "--log_interval=3", "--eval_interval=6", "--compile=False"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(DATASETS["tinyshakespeare"]["path"], LLAMA2_PATH, [512, 1024], str(out), workers=1)
    return out


def workers_stderr(r):
    """What the ranks printed, without torchrun's report of their failure (which would push it out of view)."""
    return r.stderr.split("torch/distributed/elastic/multiprocessing/api.py")[0][-3000:]


def train(out_dir, data_dir, *args, ranks=1, config="config/tiny_stage1.py"):
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = launcher + ["train.py", config, f"--out_dir={out_dir}", f"--data_dir={data_dir}", *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env=env)
    assert r.returncode == 0, workers_stderr(r)
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


def test_no_weight_sized_copy_is_saved_for_backward_under_fsdp():
    """Under fully_shard (reshard after forward) a weight assembled in the forward and saved for the backward
    would stay alive, whole, per layer: every saved tensor of a weight's shape must be a gathered parameter."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, workers_stderr(r)
    saved = json.loads(r.stdout.splitlines()[-1])
    assert {name: s["copies"] for name, s in saved.items()} == {"fresh": [], "grown": [], "grown, compiled": []}
    assert all(s["params"] > 0 for s in saved.values()), saved  # the hook sees what the linears save


def weight_shapes(model):
    """Every assembled 2-D weight's shape and each layer's q/k/v and gate/up concatenations', and their transposes."""
    shapes = {g.shape for g in model.modules() if isinstance(g, Growable) and len(g.shape) == 2}
    for layer in model.layers:
        shapes |= {torch.Size([3 * layer.attn.wq.shape[0], layer.attn.wq.shape[1]]),
                   torch.Size([2 * layer.ffn.w1.shape[0], layer.ffn.w1.shape[1]])}
    return shapes | {torch.Size(s[::-1]) for s in shapes}


def saved_for_backward(model, idx):
    """Shard model, run a forward and backward; return the shapes of the weight-sized tensors autograd saved
    that are not a parameter's storage, and how many saved tensors were parameters (or views of them)."""
    shapes = weight_shapes(model)  # before sharding: blocks are then DTensors
    model.shard(torch.bfloat16)  # as train.py: bf16 blocks, an fp32 root, under autocast
    saved = {"copies": [], "params": 0}

    def pack(t):
        # during a block's forward its parameters are the gathered (unsharded) ones; the others are DTensor shards
        gathered = {p.untyped_storage().data_ptr() for p in model.parameters() if not isinstance(p, DTensor)}
        if t.untyped_storage().data_ptr() in gathered:
            saved["params"] += 1
        elif t.shape in shapes:
            saved["copies"].append(list(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    return saved


if __name__ == "__main__":  # the worker of test_no_weight_sized_copy_is_saved_for_backward_under_fsdp
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    small = GPTConfig(vocab_size=64, n_layer=2, n_head=2, head_dim=8, ffn_hidden=32, block_size=16)
    grown = GPT(small)  # three generations of every weight, a head_dim doubling among them (no new layers: they
    for c in (replace(small, n_head=3, head_dim=16, ffn_hidden=40, vocab_size=80),  # are fresh ones; one structure
              replace(small, n_head=4, head_dim=16, ffn_hidden=48, vocab_size=96)):  # to compile)
        grow_model(grown, c, vocab_init="random", head_init="zero")
    idx = torch.randint(0, 64, (1, 7))  # B * T = 7: no activation's 2-D view has a weight's shape
    compiled = copy.deepcopy(grown)  # what a compiled graph saves is its partitioner's choice: inductor's, without
    compiled.compile_parts(backend="aot_eager_decomp_partition")  # its C++ compile
    saved = {name: saved_for_backward(model, idx)
             for name, model in (("fresh", GPT(small)), ("grown", grown), ("grown, compiled", compiled))}
    if dist.get_rank() == 0:
        print(json.dumps(saved), flush=True)
    dist.destroy_process_group()
    os._exit(0)  # as train.py: a gloo rank can abort in the interpreter's teardown
