"""
The invariants of growth (GROWTH.md sections 1-2), on the CPU, in float64, on tiny random models:

    function     a grown model gives the old logits on the old vocabulary, to float64 round-off
    gradients    the first backward pass gives every old block the gradient it had before growth, times
                 the known factors (RMSNorm gains, and wq at a head_dim doubling): every growth here and
                 every doubling of test_head_dim.py
    trainable    two AdamW steps move every row and every column of every new block
    Adam state   old blocks keep theirs bit for bit, keyed by name; new blocks start at step 0
    condense     merging generations keeps the logits and glues the Adam moments like the weights
    linear       the linear op over a grown weight's blocks (and several weights, as q/k/v) has plain
                 autograd's values and gradients, and F.linear's under autocast
    compile      torch.compile(fullgraph=True) gives the eager logits and gradients, grown or not, with the
                 weights assembled in the graph or copy-free (as under FSDP)
    errors       every bad request is a clear one-line error, and the CLI writes nothing

    python -m pytest -q test_grow.py
"""

import copy
import json
import math
import os
import random
from dataclasses import asdict, replace

import pytest
import torch

import grow
from grow import GrowError, condense, grow_model
from model import CHECKPOINT_FORMAT, GPT, GPTConfig, Growable, block_generation, linear, load_checkpoint, \
    model_from_checkpoint, save_checkpoint
from prepare import load_tokenizer
from test_prepare import small_rank_table

SEEDS = range(3)


# -----------------------------------------------------------------------------
# tiny models, growth requests, inputs


def tiny_config(rng):
    return GPTConfig(vocab_size=rng.randint(50, 120), n_layer=rng.randint(1, 3), n_head=rng.randint(1, 3),
                     head_dim=rng.choice([4, 6, 8]), ffn_hidden=8 * rng.randint(1, 4),
                     block_size=rng.randint(8, 16), rope_theta=10000.0, norm_eps=1e-5, dropout=0.0)


def tiny_model(config, seed):
    """A float64 model with O(1) activations and logits (so that eps matters and round-off is
    the only difference left to see) and norm gains other than 1 (so the sqrt(d_old/d_new)
    factor is tested on something)."""
    torch.manual_seed(seed)
    model = GPT(config).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=p.shape[1] ** -0.5)
    return model


class FakeTokenizer:
    """prepare.load_tokenizer's interface: ids below the old tier are themselves; a new token
    is spelled by one to four older ids (a fixed function of the token, so tests can ask again)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def old_tier_pieces(self, token_id, old_vocab_size):
        if token_id < old_vocab_size:
            return [token_id]
        r = random.Random(token_id)
        return [r.randrange(old_vocab_size) for _ in range(r.randint(1, 4))]


GROWTHS = {  # name: (axes that grow, grow_model options)
    "depth_top": (("n_layer",), dict(layer_place="top")),
    "depth_interleave": (("n_layer",), dict(layer_place="interleave")),
    "heads": (("n_head",), {}),
    "ffn_hidden": (("ffn_hidden",), {}),
    "vocab": (("vocab_size",), {}),
    "block_size": (("block_size",), {}),
    "all": (("n_layer", "n_head", "ffn_hidden", "vocab_size"), dict(layer_place="interleave")),
}
ADDS_WEIGHTS = [g for g in GROWTHS if g != "block_size"]


def repeats(growth):
    """'all' is applied twice in a row: three generations, and growth of a grown model."""
    return 2 if growth == "all" else 1


def bigger(config, axes, rng):
    step = dict(n_layer=rng.randint(1, 3), n_head=rng.randint(1, 2), ffn_hidden=8 * rng.randint(1, 3),
                vocab_size=rng.randint(1, 30), block_size=rng.randint(1, 8))
    return replace(config, **{a: getattr(config, a) + step[a] for a in axes})


def grow_by(model, growth, rng, optim_state=None, **options):
    """Apply growth `repeats(growth)` times, in place; return the name-keyed Adam state."""
    axes, defaults = GROWTHS[growth]
    for _ in range(repeats(growth)):
        new = bigger(model.config, axes, rng)
        model, optim_state = grow_model(model, new, optim_state, tokenizer=FakeTokenizer(new.vocab_size),
                                        **{**defaults, **options})
    return optim_state


DOUBLINGS = {  # head_dim growths (test_head_dim.py): name: the axes of each step, in order ("head_dim" doubles it)
    "head_dim": [("head_dim",)],
    "all": [("head_dim", "n_layer", "n_head", "ffn_hidden", "vocab_size"),  # three generations: doubling with
            ("n_layer", "n_head", "ffn_hidden", "vocab_size")],               # every axis, then the rest again
    "twice": [("head_dim", "n_head", "vocab_size"), ("head_dim", "n_layer", "ffn_hidden")],  # permutations compose
    "late": [("n_head", "ffn_hidden", "vocab_size"), ("head_dim", "n_layer")],  # doubling a weight of several blocks
}


def grow_step(model, axes, rng, optim_state=None):
    """Grow `axes` once, in place; return the name-keyed Adam state."""
    new = bigger(model.config, [a for a in axes if a != "head_dim"], rng)
    if "head_dim" in axes:
        new = replace(new, head_dim=2 * new.head_dim)
    return grow_model(model, new, optim_state, tokenizer=FakeTokenizer(new.vocab_size),
                      layer_place=rng.choice(["top", "interleave"]))[1]


def grow_steps(model, doubling, rng, optim_state=None):
    """Apply the steps of DOUBLINGS[doubling], in place; return the name-keyed Adam state."""
    for axes in DOUBLINGS[doubling]:
        optim_state = grow_step(model, axes, rng, optim_state)
    return optim_state


def tokens(vocab_size, B, T, seed):
    return torch.randint(vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def every_token_batch(vocab_size, T, seed):
    """Random (idx, targets) in which every id occurs as input, so every embedding row gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randperm(vocab_size, generator=g), torch.randint(vocab_size, (-vocab_size % T,), generator=g)])
    idx = ids[torch.randperm(len(ids), generator=g)].view(-1, T)
    return idx, torch.randint(vocab_size, idx.shape, generator=g)


def assert_round_off(actual, expected, what=""):
    """Equal to float64 round-off: 1e-12 of the values' scale. (float64 eps is 2e-16; an
    RMSNorm eps left unscaled would already be off by about 1e-5.)"""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12 * expected.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def adamw(model, state=None):
    """A fresh AdamW over the model's generation groups, loaded with name-keyed state."""
    opt = torch.optim.AdamW(model.param_groups(weight_decay=0.0), lr=1e-2)
    for name, p in model.named_parameters():
        if name in (state or {}):
            opt.state[p] = state[name]
    return opt


def train(model, opt, steps, seed):
    for i in range(steps):
        idx, targets = every_token_batch(model.config.vocab_size, model.config.block_size, seed + i)
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def named_state(model, opt):
    return {n: opt.state[p] for n, p in model.named_parameters() if p in opt.state}


# -----------------------------------------------------------------------------
# function preservation


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("growth", GROWTHS)
def test_growth_preserves_logits(growth, seed):
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    old = model.config
    idx = tokens(old.vocab_size, 3, old.block_size, seed)
    before, _ = model(idx)

    grow_by(model, growth, rng)
    # a longer context than the old model could take: its first block_size positions are the old ones
    longer = torch.cat([idx, tokens(old.vocab_size, 3, model.config.block_size - old.block_size, seed + 1)], 1)
    after, _ = model(longer)
    assert_round_off(after[:, :old.block_size, :old.vocab_size], before, growth)
    if growth == "all":
        assert model.generations() == [0, 1, 2]


def test_growth_gives_old_layers_the_new_dropout():
    """Every layer trains with the grown config's dropout, as a checkpoint of it loads (model_from_checkpoint):
    old layers kept their own, and a resumed grown stage was another run."""
    model = tiny_model(replace(tiny_config(random.Random(0)), dropout=0.0), seed=0)
    new = replace(bigger(model.config, ["n_layer", "ffn_hidden"], random.Random(1)), dropout=0.1)
    grown, _ = grow_model(model, new, None, tokenizer=FakeTokenizer(new.vocab_size))
    assert [(b.attn.dropout, b.ffn.dropout.p) for b in grown.layers] == [(0.1, 0.1)] * new.n_layer


@pytest.mark.parametrize("seed", SEEDS)
def test_copied_layers_change_the_function(seed):
    """The ablation layer_init='copy' is real: a copy of a layer is not the identity."""
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    idx = tokens(model.config.vocab_size, 3, model.config.block_size, seed)
    before, _ = model(idx)
    grow_by(model, "depth_top", rng, layer_init="copy")
    after, _ = model(idx)
    assert (after - before).abs().max() > 1e-3 * before.abs().max()


@pytest.mark.parametrize("seed", SEEDS)
def test_stacked_layers_copy_the_old_stack_in_order_and_train(seed):
    """layer_init='stack' (G_stack): new layer j on top is a copy of old layer j mod n_old; not the
    identity, and every new block still moves within two AdamW steps."""
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    n_old = model.config.n_layer
    old = [{n: g.weight.detach().clone() for n, g in block.named_modules() if isinstance(g, Growable)}
           for block in model.layers]
    idx = tokens(model.config.vocab_size, 3, model.config.block_size, seed)
    before, _ = model(idx)
    grow_model(model, replace(model.config, n_layer=n_old + rng.randint(1, 2 * n_old)), layer_init="stack")
    for j, block in enumerate(model.layers[n_old:]):
        for name, weight in old[j % n_old].items():
            assert torch.equal(block.get_submodule(name).weight, weight), f"new layer {n_old + j}.{name}"
    after, _ = model(idx)
    assert (after - before).abs().max() > 1e-3 * before.abs().max()
    new = {n: p.detach().clone() for n, p in model.named_parameters() if block_generation(n) > 0}
    train(model, adamw(model), 2, seed)
    assert_every_row_and_column_moved(model, new)


FAKE_SHA256 = "f" * 64  # the tokenizer file a FakeTokenizer stands for


def write_checkpoint(model, path, optimizer=None):
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": asdict(model.config),
                     "optimizer": optimizer or {}, "generations": [], "iter_num": 0,
                     "data": {"tokenizer": "fake", "tokenizer_sha256": FAKE_SHA256,
                              "vocab_size": model.config.vocab_size}}, path)


def cli_shape(config):
    return [f"--{k}={getattr(config, k)}" for k in ("n_layer", "n_head", "ffn_hidden", "vocab_size", "block_size")]


def write_tier(path, vocab_size, tokenizer, sha256=FAKE_SHA256):
    """A prepared tier, as far as grow.py looks: its meta.json (tokenizer: the FakeTokenizer's size)."""
    os.makedirs(path)
    split = {"documents": 1, "tokens": 9, "bytes": 9}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"tokenizer": tokenizer, "tokenizer_sha256": sha256, "vocab_size": vocab_size, "bos_id": 1,
                   "source": "fake", "train": split, "val": split}, f)


@pytest.fixture
def fake_prepare(monkeypatch, tmp_path):
    """grow.py takes prepare.load_tokenizer for the new tokens: serve a FakeTokenizer whose size is
    the tokenizer's name (--tokenizer=70, or the tier's record), so the test does not depend on a
    tokenizer file; and tiers of 60 and 80 ids (v80_t70: of a 70-token tokenizer, v80_other: of
    another tokenizer file) for a checkpoint of 60."""
    import prepare
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "load_tokenizer", lambda path, vocab_size, sha256=None: FakeTokenizer(int(path)))
    write_tier("v60", 60, "100")
    write_tier("v80", 80, "100")
    write_tier("v80_t70", 80, "70")
    write_tier("v80_other", 80, "100", sha256="e" * 64)
    write_tier("v80_broken", 80, "100")
    with open("v80_broken/meta.json", "a") as f:
        f.write("}")


@pytest.mark.parametrize("seed", SEEDS)
def test_cli_round_trip_preserves_logits(tmp_path, fake_prepare, seed):
    """Grow a checkpoint twice through grow.py's CLI; the file's model keeps the function."""
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    idx = tokens(model.config.vocab_size, 3, model.config.block_size, seed)
    opt = adamw(model)
    train(model, opt, 1, seed)  # the checkpoint carries Adam state, as a trained one does
    before, _ = model(idx)
    path, config = tmp_path / "gen0.pt", model.config
    write_checkpoint(model, path, named_state(model, opt))
    for gen in (1, 2):
        config = bigger(config, GROWTHS["all"][0], rng)
        out, tier = tmp_path / f"gen{gen}.pt", f"gen{gen}_v{config.vocab_size}"
        write_tier(tier, config.vocab_size, str(config.vocab_size))  # no --tokenizer: the tier's record serves
        grow.main(["--ckpt", str(path), "--out", str(out), f"--data_dir={tier}",
                   f"--layer_place={rng.choice(['top', 'interleave'])}", *cli_shape(config)])
        path = out

    ckpt = load_checkpoint(path)
    grown = model_from_checkpoint(ckpt)
    assert replace(grown.config, norm_eps=config.norm_eps) == config
    assert ckpt["data"] == {"tokenizer": str(config.vocab_size), "tokenizer_sha256": FAKE_SHA256,
                            "vocab_size": config.vocab_size, "data_dir": tier}
    assert grown.generations() == [0, 1, 2]
    assert set(ckpt["optimizer"]) == {n for n, _ in grown.named_parameters() if block_generation(n) == 0}
    after, _ = grown(idx)
    assert_round_off(after[..., :model.config.vocab_size], before, "after grow.py twice")


def test_cli_reports_the_old_parameter_count(tmp_path, fake_prepare, capsys):
    model = tiny_model(tiny_config(random.Random(0)), 0)
    write_checkpoint(model, tmp_path / "in.pt")
    grow.main(["--ckpt", str(tmp_path / "in.pt"), "--out", str(tmp_path / "out.pt"),
               f"--n_layer={model.config.n_layer + 1}", "--vocab_init=random"])
    old_line = capsys.readouterr().out.splitlines()[0]
    assert old_line.endswith(f": {model.get_num_params():,} params"), old_line


# -----------------------------------------------------------------------------
# training after growth: gradients, trainability, Adam state


def probe_gradients(model, idx, weights):
    """Gradients of a loss of the old-vocabulary logits only (new tokens change the softmax, not
    these logits), keyed by Parameter identity: growth keeps every old block's Parameter object,
    while inserting layers shifts the names."""
    model.zero_grad(set_to_none=True)
    logits, _ = model(idx)
    (logits[..., :weights.shape[-1]] * weights).sum().backward()
    return {id(p): (n, p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("grow, growth", [(grow_by, g) for g in GROWTHS] + [(grow_steps, d) for d in DOUBLINGS],
                         ids=[*GROWTHS, *(f"head_dim_{d}" for d in DOUBLINGS)])
def test_first_gradients_of_old_blocks_are_unchanged(grow, growth, seed):
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    old = model.config
    idx = tokens(old.vocab_size, 3, old.block_size, seed)
    weights = torch.randn(3, old.block_size, old.vocab_size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(seed))
    before = probe_gradients(model, idx, weights)
    grow(model, growth, rng)
    after = probe_gradients(model, idx, weights)
    # L(w) is the old function of w / factor for a block scaled by factor at growth, so its gradient is divided
    # by factor: an RMSNorm gain's by sqrt(d_old/d_new) (the rms it divides by shrank as much), wq's by sqrt(2)
    # per head_dim doubling; every other block's is kept
    gain_factor = math.sqrt(model.config.n_embd / old.n_embd)
    wq_factor = math.sqrt(old.head_dim / model.config.head_dim)
    assert set(before) <= set(after), "an old block left the model"
    for key, (name, grad) in before.items():
        factor = gain_factor if grad.dim() == 1 else wq_factor if ".attn.wq." in name else 1
        assert_round_off(after[key][1], grad * factor, f"{name} -> {after[key][0]}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("growth", ADDS_WEIGHTS)
def test_two_adamw_steps_move_every_row_and_column_of_new_blocks(growth, seed):
    """Where one side of a new path is zero, the other side gets its gradient at the second step:
    after two steps nothing new may still sit exactly at its init (a dead unit never would move)."""
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    grow_by(model, growth, rng)
    new = {n: p.detach().clone() for n, p in model.named_parameters() if block_generation(n) > 0}
    assert new
    train(model, adamw(model), 2, seed)
    assert_every_row_and_column_moved(model, new)


def assert_every_row_and_column_moved(model, init):
    """Every entry of a gain, every row and every column of a matrix in `init` ({name: value}) has left it."""
    for name, before in init.items():
        moved = model.get_parameter(name) != before
        if moved.dim() == 1:
            assert moved.all(), f"{name}: entries {(~moved).nonzero().flatten().tolist()} did not move"
        else:
            assert moved.any(1).all(), f"{name}: rows {(~moved.any(1)).nonzero().flatten().tolist()} did not move"
            assert moved.any(0).all(), f"{name}: columns {(~moved.any(0)).nonzero().flatten().tolist()} did not move"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("growth", GROWTHS)
def test_adam_state_of_old_blocks_is_kept_bit_for_bit(growth, seed):
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    opt = adamw(model)
    train(model, opt, 2, seed)
    state = named_state(model, opt)
    saved = copy.deepcopy(state)
    old = {id(p): (n, p.detach().clone()) for n, p in model.named_parameters()}

    state = grow_by(model, growth, rng, state)
    renamed = {n: old[id(p)] for n, p in model.named_parameters() if id(p) in old}
    assert len(renamed) == len(old)
    assert set(state) == set(renamed), "exactly the old blocks have Adam state, under their new names"
    for name, (old_name, value) in renamed.items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name][k], saved[old_name][k]), f"{old_name} -> {name}: {k}"
        if value.dim() == 2:  # RMSNorm gains are the one exception: scaled, tested by the logits
            assert torch.equal(model.get_parameter(name), value), f"{old_name} -> {name}: value"

    opt = adamw(model, state)
    train(model, opt, 1, seed + 2)
    steps = {n: opt.state[p]["step"].item() for n, p in model.named_parameters()}
    assert steps == {n: 3 if n in renamed else 1 for n in steps}


# -----------------------------------------------------------------------------
# condensing generations


@pytest.mark.parametrize("upto", [0, 1, 2])
def test_condense_keeps_logits_and_glues_adam_moments(upto):
    rng = random.Random(upto)
    model = tiny_model(tiny_config(rng), upto)
    grow_by(model, "all", rng)
    idx = tokens(model.config.vocab_size, 3, model.config.block_size, upto)
    before, _ = model(idx)
    # moments laid out like the weights, so a merged moment must be torch.cat of its parts exactly
    # as the merged weight is; the latest generation has taken the fewest steps
    state = {n: {"step": torch.tensor(10.0 - block_generation(n)), "exp_avg": p.detach().clone(),
                 "exp_avg_sq": p.detach() ** 2} for n, p in model.named_parameters()}

    model, state = condense(model, upto, state)
    after, _ = model(idx)
    assert_round_off(after, before, f"condensed up to generation {upto}")
    assert model.generations() == list(range(upto, 3))
    assert set(state) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(state[name]["exp_avg"], p), name
        assert torch.equal(state[name]["exp_avg_sq"], p ** 2), name
        assert state[name]["step"].item() == 10 - block_generation(name), f"{name}: merged step is the smallest"
    if upto == 2:
        weights = [m for m in model.modules() if isinstance(m, Growable)]
        assert all([n for n, _ in m.named_parameters()] == ["g2"] for m in weights)
    train(model, adamw(model, state), 1, upto)  # the merged state loads and steps


# -----------------------------------------------------------------------------
# linear layers: one op assembles the blocks in the forward and again in the backward (under FSDP), or the graph
# assembles them once


def three_generation_weight(seed, permuted=True):
    """A float64 (6, 5) Growable of three generations (base, columns and rows twice), with both permutations
    or with none (blocks copied straight into their places)."""
    torch.manual_seed(seed)
    g = Growable(3, 2).double()
    torch.nn.init.normal_(g.g0)
    g.grow((4, 3), 1, rows=torch.nn.init.normal_, cols=torch.nn.init.normal_)
    if permuted:
        g.place(0, torch.tensor([1, 3, 0]))  # the new row goes to place 2
    g.grow((6, 5), 2, rows=torch.nn.init.normal_, cols=torch.nn.init.normal_)
    if permuted:
        g.place(1, torch.tensor([4, 0, 2]))  # the new columns go to places 1 and 3
    assert [n for n, _ in g.named_parameters()] == ["g0", "g1_cols", "g1_rows", "g2_cols", "g2_rows"]
    assert (g.row_perm is not None and g.col_perm is not None) == permuted
    return g


def copy_free(weights, on):
    """The Growables, set to assemble their weight in the op (as under FSDP) or in the graph."""
    for g in weights:
        g.copy_free = on
    return weights


@pytest.mark.parametrize("on", [True, False])
def test_linear_gradients_are_plain_autograds(on):
    plain = Growable(4, 5).double()  # stacked with grown ones, as wq, wk, wv
    torch.nn.init.normal_(plain.g0)
    for weights in [(three_generation_weight(0),), (three_generation_weight(1, permuted=False),),
                    (three_generation_weight(2), plain, three_generation_weight(3, permuted=False))]:
        weights = copy_free(weights, on)
        x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
        blocks = [p for g in weights for p in g.parameters()]
        assert torch.autograd.gradcheck(lambda x, *_: linear(x, *weights), (x, *blocks))
        y = linear(x, *weights)
        expected = torch.nn.functional.linear(x, torch.cat([g.weight for g in weights]))
        assert torch.equal(y, expected)
        probe = torch.randn_like(y)
        grads = torch.autograd.grad((y * probe).sum(), (x, *blocks))
        for got, want in zip(grads, torch.autograd.grad((expected * probe).sum(), (x, *blocks))):
            assert_round_off(got, want, "gradients")


@pytest.mark.parametrize("on", [True, False])
def test_linear_under_autocast_is_f_linear(on):
    """bfloat16 products of the float32 input and blocks, float32 gradients: what autocast makes of F.linear, which
    is F.linear of both cast to bfloat16 by hand (the reference, outside autocast)."""
    weights = copy_free([three_generation_weight(seed, permuted).float() for seed, permuted in ((3, True), (4, False))],
                        on)
    x = torch.randn(2, 3, 5, requires_grad=True)
    blocks = [p for g in weights for p in g.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, *weights)
    expected = torch.nn.functional.linear(x.bfloat16(), torch.cat([g.weight for g in weights]).bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    grads = torch.autograd.grad(y.float().sum(), (x, *blocks))
    for got, want in zip(grads, torch.autograd.grad(expected.float().sum(), (x, *blocks))):
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)


# -----------------------------------------------------------------------------
# torch.compile


def logits_and_gradients(run, model, idx):
    """run(idx)'s logits (run: the model, or the model compiled) and the gradient of a fixed random weighting of them
    for every parameter, by name."""
    logits, _ = run(idx)
    probe = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(0))
    names, params = zip(*model.named_parameters())
    return logits.detach(), dict(zip(names, torch.autograd.grad((logits * probe).sum(), params)))


def assert_compiled_gives_eager(compiled, model, idx, copy_free_on, monkeypatch, what="compiled"):
    """The compiled model gives the eager logits and gradients, its linear layers copy-free (as under FSDP) or not;
    the eager reference assembles the weights in the graph (plain autograd)."""
    monkeypatch.setattr(Growable, "copy_free", False)  # monkeypatch restores the class's own value after the test
    eager = logits_and_gradients(model, model, idx)
    monkeypatch.setattr(Growable, "copy_free", copy_free_on)
    compiled = logits_and_gradients(compiled, model, idx)
    assert_round_off(compiled[0], eager[0], f"{what}: logits")
    for name, grad in eager[1].items():
        assert_round_off(compiled[1][name], grad, f"{what}: {name}'s gradient")


@pytest.mark.parametrize("copy_free_on", [False, True], ids=["in_graph", "copy_free"])
@pytest.mark.parametrize("growths", [0, 2])
def test_compiled_model_gives_eager_logits_and_gradients(growths, copy_free_on, monkeypatch):
    rng = random.Random(growths)
    model = tiny_model(tiny_config(rng), growths)
    if growths:
        grow_by(model, "all", rng)
        assert len(model.generations()) == 3
    torch._dynamo.reset()  # a fresh compile: the shapes of an earlier test's model would make dims dynamic
    idx = tokens(model.config.vocab_size, 2, model.config.block_size, growths)
    assert_compiled_gives_eager(torch.compile(model, fullgraph=True), model, idx, copy_free_on, monkeypatch)


@pytest.mark.parametrize("copy_free_on", [False, True], ids=["in_graph", "copy_free"])
def test_compiled_model_takes_a_second_sequence_length(copy_free_on, monkeypatch):
    model = tiny_model(GPTConfig(vocab_size=60, n_layer=1, n_head=2, head_dim=4, ffn_hidden=16, block_size=12), 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for T in (12, 7):  # training then evaluating at another length, or sampling
        idx = tokens(model.config.vocab_size, 2, T, T)
        assert_compiled_gives_eager(compiled, model, idx, copy_free_on, monkeypatch, f"compiled, T={T}")


# -----------------------------------------------------------------------------
# mean-of-pieces embedding init


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("head_init", ["mean", "zero"])
def test_new_vocabulary_rows_are_the_mean_of_their_old_pieces(seed, head_init):
    """Embedding rows: the mean of the pieces' rows (the new dims 0). lm_head rows: the mean of the
    pieces' rows over the grown width (old rows' new input columns are drawn), or zero: logit 0."""
    rng = random.Random(seed)
    model = tiny_model(tiny_config(rng), seed)
    old = model.config
    emb = model.tok_emb.weight.detach().clone()
    tok = FakeTokenizer(old.vocab_size + 20)
    grow_model(model, replace(old, vocab_size=tok.vocab_size, n_head=old.n_head + 1), tokenizer=tok,
               vocab_init="mean", head_init=head_init)
    grown, head = model.tok_emb.weight, model.lm_head.weight
    for t in range(old.vocab_size, tok.vocab_size):
        pieces = tok.old_tier_pieces(t, old.vocab_size)
        assert_round_off(grown[t, :old.n_embd], emb[pieces].mean(0), f"token {t}")
        if head_init == "mean":
            assert_round_off(head[t], head[pieces].mean(0), f"lm_head row {t}")
    assert (grown[old.vocab_size:, old.n_embd:] == 0).all(), "the new dims start at 0"
    if head_init == "zero":
        assert (head[old.vocab_size:] == 0).all(), "new tokens start at logit 0"
    else:
        assert (head[old.vocab_size:] != 0).any(dim=1).all()


def test_a_new_token_without_old_pieces_starts_as_the_mean_old_row():
    class NoPieces(FakeTokenizer):  # every new token is a special token with no text
        def old_tier_pieces(self, token_id, old_vocab_size):
            return [token_id] if token_id < old_vocab_size else []

    model = tiny_model(GPTConfig(vocab_size=60, n_layer=1, n_head=2, head_dim=4, ffn_hidden=16, block_size=8), 0)
    emb = model.tok_emb.weight.detach().clone()
    grow_model(model, replace(model.config, vocab_size=70), tokenizer=NoPieces(70))
    assert_round_off(model.tok_emb.weight[60:], emb.mean(0).expand(10, -1), "tokens 60..69")


def test_gpt2_tier_growth_is_finite_and_the_bos_starts_from_the_old_bos(tmp_path):
    """A gpt2 tier's BOS is its last id, so each tier has a new one: it has no bytes to split into old pieces."""
    small_rank_table(tmp_path / "ranks.tiktoken", merges=60)  # ids 0..316 at the full tier 317
    model = tiny_model(GPTConfig(vocab_size=280, n_layer=1, n_head=2, head_dim=4, ffn_hidden=16, block_size=8), 0)
    emb = model.tok_emb.weight.detach().clone()
    tok = load_tokenizer("gpt2", 317, str(tmp_path / "ranks.tiktoken"))
    grow_model(model, replace(model.config, vocab_size=317, n_head=3), tokenizer=tok, vocab_init="mean")
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is not finite"
    assert_round_off(model.tok_emb.weight[tok.bos_id, :emb.shape[1]], emb[279], "the new BOS row")


# -----------------------------------------------------------------------------
# bad requests



BAD_GROWTHS = [  # (id, change to the config, grow_model options, tokenizer size beyond the new vocab, message)
    *[(f"shrink_{a}", {a: -8 if a == "ffn_hidden" else -1}, {}, 0, f"cannot shrink {a}")
      for a in ("vocab_size", "n_layer", "n_head", "ffn_hidden")],
    ("head_dim", {"head_dim": 2}, {}, 0, "head_dim must stay"),
    ("rope_theta", {"rope_theta": 1.0}, {}, 0, "rope_theta must stay"),
    ("vocab_beyond_tokenizer", {"vocab_size": 10}, {}, -5, "larger than the tokenizer"),
    ("layer_place", {"n_layer": 1, "n_head": 1}, {"layer_place": "middle"}, 0, "layer_place"),
    ("layer_init", {"n_layer": 1, "n_head": 1}, {"layer_init": "random"}, 0, "layer_init"),
    ("vocab_init", {"vocab_size": 10, "n_head": 1}, {"vocab_init": "copy"}, 0, "vocab_init"),
    ("stack_interleaved", {"n_layer": 1}, {"layer_init": "stack", "layer_place": "interleave"}, 0, "stack"),
]


@pytest.mark.parametrize("name, change, options, tokenizer_extra, message", BAD_GROWTHS)
def test_bad_growth_is_refused_and_changes_nothing(name, change, options, tokenizer_extra, message):
    model = tiny_model(GPTConfig(vocab_size=60, n_layer=2, n_head=2, head_dim=4, ffn_hidden=16, block_size=8), 0)
    old = model.config
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = replace(old, **{k: getattr(old, k) + v for k, v in change.items()})
    with pytest.raises(GrowError, match=message) as e:
        grow_model(model, new, tokenizer=FakeTokenizer(new.vocab_size + tokenizer_extra), **options)
    assert "\n" not in str(e.value)
    assert model.config == old
    after = {n: p.detach() for n, p in model.named_parameters()}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("ffn_hidden", [0, -8, 12, 100])
def test_ffn_hidden_must_be_a_positive_multiple_of_8(ffn_hidden):
    with pytest.raises(ValueError, match=f"ffn_hidden={ffn_hidden} is not allowed"):
        GPTConfig(ffn_hidden=ffn_hidden)


def test_growth_without_new_vocabulary_needs_no_tokenizer():
    model = tiny_model(GPTConfig(vocab_size=60, n_layer=1, n_head=2, head_dim=4, ffn_hidden=16, block_size=8), 0)
    grow_model(model, replace(model.config, n_layer=2, n_head=3))
    assert model.generations() == [0, 1]


def checkpoint_at(tmp_path, kind):
    """A checkpoint of ours, or one of the things that are not."""
    path = tmp_path / f"{kind}.pt"
    if kind == "ours":
        write_checkpoint(tiny_model(GPTConfig(vocab_size=60, n_layer=2, n_head=2, head_dim=4, ffn_hidden=16,
                                              block_size=8), 0), path)
    elif kind == "foreign":
        torch.save({"model": {"w": torch.zeros(2)}, "iter_num": 3}, path)
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    return path  # "missing": nothing there



BAD_CLI = [  # (checkpoint kind, arguments, words of the message)
    *[("ours", [f"--{a}={v}"], f"cannot shrink {a}")
      for a, v in (("n_layer", 1), ("n_head", 1), ("ffn_hidden", 8), ("vocab_size", 50))],
    ("ours", ["--head_dim=6"], "head_dim must stay"),  # 4 -> 8 is a doubling, allowed
    ("ours", ["--vocab_size=80", "--tokenizer=70", "--data_dir=v80"], "larger than the tokenizer's 70"),
    # beyond the tokenizer the tier records, with either init
    *[("ours", ["--vocab_size=80", "--data_dir=v80_t70", f"--vocab_init={init}"], "larger than the tokenizer's 70")
      for init in ("mean", "random")],
    # no tokenizer loaded: the tier, which prepare.py makes only within its tokenizer, bounds the vocabulary
    ("ours", ["--vocab_size=90", "--vocab_init=random", "--head_init=zero", "--data_dir=v80"],
     "--data_dir v80 is tier 80, but the grown vocab_size is 90; pass the v90 tier (prepare.py --tiers 90 makes it)"),
    ("ours", ["--n_layer=3", "--data_dir=v80"], "--data_dir v80 is tier 80, but the grown vocab_size is 60"),
    ("ours", ["--vocab_size=80", "--data_dir=v80_other"], "ours.pt with fake (ffffffffffff); pass a tier prepared "
     "with the checkpoint's tokenizer"),
    ("ours", ["--vocab_size=80", "--data_dir=v80_broken"], "v80_broken/meta.json is broken"),
    ("ours", ["--vocab_size=80", "--tokenizer=80"], "needs --data_dir"),
    ("ours", ["--vocab_size=80", "--data_dir=no_such_tier"], "no prepared data in no_such_tier"),
    ("ours", ["--block_size=4"], "cannot shrink block_size"),
    pytest.param("ours", ["--ffn_hidden=20"], "ffn_hidden=20 is not allowed"),
    ("foreign", ["--n_layer=3"], "not a checkpoint of this project"),
    ("text", ["--n_layer=3"], "not a readable checkpoint"),
    ("missing", ["--n_layer=3"], "no checkpoint at"),
]


@pytest.mark.parametrize("kind, args, message", BAD_CLI)
def test_bad_cli_request_exits_with_one_line_and_writes_nothing(tmp_path, fake_prepare, kind, args, message):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as e:
        grow.main(["--ckpt", str(checkpoint_at(tmp_path, kind)), "--out", str(out / "ckpt.pt"), *args])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    assert message in e.value.code
    assert not any(out.iterdir())


def test_an_out_under_a_file_is_one_line(tmp_path, fake_prepare):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        grow.main(["--ckpt", str(checkpoint_at(tmp_path, "ours")), "--out", str(tmp_path / "afile" / "ckpt.pt"),
                   "--n_layer=3"])
    assert e.value.code.startswith("grow.py: cannot make the folder of") and "\n" not in e.value.code
    assert (tmp_path / "afile").read_text() == "keep me"
