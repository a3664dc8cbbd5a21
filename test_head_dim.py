"""
Growing head_dim by doubling (grow.py), on the CPU, in float64, on tiny random models:

    function     doubling alone, and with every other axis over three generations, keeps the
                 old-vocabulary logits to round-off
    gradients    (in test_grow.py, for every growth) the first backward pass gives every old block
                 its old gradient, times the known factors (RMSNorm gains sqrt(d_new/d_old), wq 1/sqrt(2))
    trainable    two AdamW steps move every row and column of every new block
    RoPE         the grown model's cos/sin are a fresh model's at the new head_dim
    condense     folds the permutation into the merged blocks (and the Adam moments); logits kept
    checkpoint   the permutation is saved with the blocks: save/load and the CLI keep the logits
    export       a head_dim-grown model in the Hugging Face format gives transformers' logits

    python -m pytest -q test_head_dim.py
"""

import math
import random
from dataclasses import asdict, replace

import pytest
import torch

import grow
from grow import GrowError, condense, grow_model, head_dim_places
from model import CHECKPOINT_FORMAT, GPT, GPTConfig, Growable, block_generation, load_checkpoint, model_from_checkpoint
from test_grow import DOUBLINGS, adamw, assert_every_row_and_column_moved, assert_round_off, grow_step, grow_steps, \
    named_state, tiny_config, tiny_model, tokens, train, write_checkpoint

SEEDS = range(3)


def grown_model(growth, seed):
    """(model before growth as its logits on idx, grown model, idx)"""
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    idx = tokens(model.config.vocab_size, 3, model.config.block_size, seed)
    before, _ = model(idx)
    grow_steps(model, growth, rng)
    return before, model, idx


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("growth", DOUBLINGS)
def test_doubling_preserves_logits(growth, seed):
    before, model, idx = grown_model(growth, seed)
    after, _ = model(idx)
    assert_round_off(after[..., :before.shape[-1]], before, growth)
    assert model.generations() == list(range(len(DOUBLINGS[growth]) + 1))
    assert all(layer.attn.head_dim == model.config.head_dim for layer in model.layers)


def test_places_follow_the_rope_pairs():
    """Head 0 of h=8 (pairs (0,4) (1,5) (2,6) (3,7)) -> pairs (0,8) (2,10) (4,12) (6,14) of 2h=16."""
    assert head_dim_places(2, 8).tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]
    assert head_dim_places(1, 6).tolist() == [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize("growth", DOUBLINGS)
def test_rope_is_a_fresh_models_at_the_new_head_dim(growth):
    _, model, _ = grown_model(growth, 0)
    fresh = GPT(model.config)
    assert torch.equal(model.rope_cos, fresh.rope_cos) and torch.equal(model.rope_sin, fresh.rope_sin)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("growth", DOUBLINGS)
def test_two_adamw_steps_move_every_row_and_column_of_new_blocks(growth, seed):
    """New wk rows are zero and new wq rows drawn: wk moves at the first step, wq at the second.
    Each generation trains two steps before the next growth, as a stage does: grown twice with no
    training between, a new head's zero wo would cut the score gradient of its doubled dims for a step."""
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    for gen, axes in enumerate(DOUBLINGS[growth], 1):
        grow_step(model, axes, rng)
        born = {n: p.detach().clone() for n, p in model.named_parameters() if block_generation(n) == gen}
        train(model, adamw(model), 2, seed + 2 * gen)
        assert_every_row_and_column_moved(model, born)


@pytest.mark.parametrize("seed", SEEDS)
def test_adam_state_of_old_blocks_is_kept(seed):
    """Old blocks keep their Adam state bit for bit; their values too, but for wq (* sqrt(2)) and the gains."""
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    opt = adamw(model)
    train(model, opt, 2, seed)
    saved = {n: {k: v.clone() for k, v in s.items()} for n, s in named_state(model, opt).items()}
    values = {id(p): (n, p.detach().clone()) for n, p in model.named_parameters()}
    state = grow_steps(model, "all", rng, named_state(model, opt))
    for name, p in model.named_parameters():
        if id(p) not in values:
            assert name not in state, f"{name} is new and starts at step 0"
            continue
        old_name, value = values[id(p)]
        assert all(torch.equal(state[name][k], saved[old_name][k]) for k in saved[old_name]), old_name
        factor = math.sqrt(2) if ".attn.wq." in old_name else 1
        if value.dim() == 2:
            assert torch.equal(p, value * factor), old_name
    train(model, adamw(model, state), 1, seed + 2)


@pytest.mark.parametrize("growth", DOUBLINGS)
@pytest.mark.parametrize("upto", [0, 1, 2])
def test_condense_folds_the_permutation_and_keeps_logits(growth, upto):
    _, model, idx = grown_model(growth, upto)
    last = max(model.generations())
    upto = min(upto, last)
    before, _ = model(idx)
    state = {n: {"step": torch.tensor(10.0 - block_generation(n)), "exp_avg": p.detach().clone(),
                 "exp_avg_sq": p.detach() ** 2} for n, p in model.named_parameters()}
    model, state = condense(model, upto, state)
    after, _ = model(idx)
    assert_round_off(after, before, f"condensed up to generation {upto}")
    for name, p in model.named_parameters():  # moments glued and permuted exactly as the weights
        assert torch.equal(state[name]["exp_avg"], p) and torch.equal(state[name]["exp_avg_sq"], p ** 2), name
    weights = [m for m in model.modules() if isinstance(m, Growable)]
    if upto == last:  # one block per weight: a fresh model's layout, no permutation left
        assert all(m.row_perm is None and m.col_perm is None for m in weights)
        assert all(len(m._parameters) == 1 for m in weights)
    else:
        assert any(m.row_perm is not None for m in weights)
    train(model, adamw(model, state), 1, upto)


@pytest.mark.parametrize("growth", DOUBLINGS)
def test_checkpoint_round_trip_keeps_the_permutation(tmp_path, growth):
    _, model, idx = grown_model(growth, 1)
    assert any(k.endswith("attn.wq.row_perm") for k in model.state_dict())
    assert any(k.endswith("attn.wo.col_perm") for k in model.state_dict())
    assert not any(k.endswith("_perm") for k, _ in model.named_parameters())  # the optimizer never sees them
    write_checkpoint(model, tmp_path / "ckpt.pt")
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "ckpt.pt"))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_cli_doubles_head_dim(tmp_path):
    rng = random.Random(0)
    model = tiny_model(tiny_config(rng), 0)
    idx = tokens(model.config.vocab_size, 3, model.config.block_size, 0)
    before, _ = model(idx)
    write_checkpoint(model, tmp_path / "in.pt")
    c = model.config
    grow.main(["--ckpt", str(tmp_path / "in.pt"), "--out", str(tmp_path / "out.pt"), f"--head_dim={2 * c.head_dim}",
               f"--n_head={c.n_head + 1}", f"--n_layer={c.n_layer + 1}"])
    grown = model_from_checkpoint(load_checkpoint(tmp_path / "out.pt"))
    assert grown.config.head_dim == 2 * c.head_dim
    assert_round_off(grown(idx)[0], before, "after grow.py --head_dim")


@pytest.mark.parametrize("head_dim", [6, 12, 16])
def test_head_dim_grows_only_by_doubling(head_dim):
    model = tiny_model(GPTConfig(vocab_size=60, n_layer=1, n_head=2, head_dim=4, ffn_hidden=16, block_size=8), 0)
    with pytest.raises(GrowError, match="head_dim must stay 4 or double to 8") as e:
        grow_model(model, replace(model.config, head_dim=head_dim))
    assert "\n" not in str(e.value) and model.config.head_dim == 4


def test_compiled_grown_model_gives_eager_logits():
    _, model, idx = grown_model("head_dim", 0)
    torch._dynamo.reset()
    assert_round_off(torch.compile(model, fullgraph=True)(idx)[0], model(idx)[0], "compiled")


def test_export_logits_match_transformers(tmp_path):
    """A head_dim-grown model is a standard Llama: transformers' LlamaForCausalLM gives its logits."""
    transformers = pytest.importorskip("transformers")
    import export
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=96, n_layer=2, n_head=2, head_dim=8, ffn_hidden=32, block_size=32, rope_theta=500.0)
    model = GPT(c)
    for grown in (replace(c, vocab_size=128, n_layer=3, n_head=3, head_dim=16, ffn_hidden=48),
                  replace(c, vocab_size=160, n_layer=4, n_head=4, head_dim=16, ffn_hidden=64)):
        model, _ = grow_model(model, grown, vocab_init="random", head_init="zero")
    with torch.no_grad():  # move every weight off its init, so the zero parts take part
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ckpt = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": asdict(model.config)}
    export.export(ckpt, str(tmp_path))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = tokens(160, 2, 32, 1)
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
