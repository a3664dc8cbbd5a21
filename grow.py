"""
Grow a model, and its AdamW state, to a larger GPTConfig while it computes the same function.

The rule (GROWTH.md section 1): in every new path zero exactly one side, the side that
*writes* into something the old model already reads, and draw the other side, so the
function is kept and every new weight gets a gradient at the first step.

    growth        new parts                                 init
    depth         a whole block                             wo, w2 zero; wq wk wv w1 w3 drawn; norms 1
    heads         rows of wq wk wv, columns of wo           rows drawn; wo columns zero
    FFN hidden    rows of w1 w3, columns of w2              rows drawn; w2 columns zero
    model dim d   embedding columns, rows of wo w2          zero (the new dims start at 0)
                  input columns of wq wk wv w1 w3 lm_head   drawn
                  RMSNorm gains                             old * sqrt(d_old/d_new), new entries
                                                            sqrt(d_old/d_new), eps * d_old/d_new
    vocabulary    embedding rows                            mean of the token's old-tier pieces
                  lm_head rows                              mean of the pieces' rows (or zero); old
                                                            logits unchanged either way
    head_dim x2   rows of wq wk wv, columns of wo, inter-   wq rows drawn, wk rows zero (new q.k terms
                  leaved in each head: old RoPE pair j      are 0); wv rows drawn, wo columns zero;
                  becomes pair 2j, the new pairs odd        old wq * sqrt(2) (softmax 1/sqrt(h) -> 1/sqrt(2h))

Old blocks keep their values (except the RMSNorm and wq factors) and their Adam state bit for bit;
new blocks are a new generation and start with no Adam state (step 0).

Doubling head_dim is exact (GROWTH.md section 1 says why: old dim j goes to 2j, j + h/2 to 2j + h;
old head n stays head n, new heads come after). The interleaving is a fixed permutation applied
after assembly (Growable.place), so each generation keeps its own blocks, schedule and Adam
state; condense folds it away. (Condensing at the doubling instead would still need the
permutation for the new generation's strip, and would merge the old generations' schedules.) The old wq blocks keep their Adam moments, like
the gains: their gradients are now 1/sqrt(2) of the old, which would rescale m by 1/sqrt(2) and
v by 1/2, leaving Adam's step m/sqrt(v) as it was; the kept moments only weigh the first new
gradients a little less, for about 1/(1 - beta2) steps.

As a library:  model, optim_state = grow_model(model, new_config, optim_state, tokenizer=tok)
               model, optim_state, generations = grow_checkpoint(ckpt, new_config, tokenizer="llama2")
As a CLI:      python grow.py --ckpt out/stage1/ckpt.pt --out out/grown/ckpt.pt --n_layer=12 --n_head=6
"""

import argparse
import math
import os
from dataclasses import asdict, replace
from functools import partial

import torch
import torch.nn as nn

from model import Block, GPTConfig, Growable, block_generation, checkpoint_params, load_checkpoint, \
    model_from_checkpoint, save_checkpoint, weight_from_parts

INIT_STD = 0.02  # drawn parts use the fresh model's init
zero = nn.init.zeros_
draw = partial(nn.init.normal_, std=INIT_STD)

# (new rows, new columns) of each weight in a layer, as in the table above
LAYER_RULES = {
    "attn.wq": (draw, draw), "attn.wk": (draw, draw), "attn.wv": (draw, draw), "attn.wo": (zero, zero),
    "ffn.w1": (draw, draw), "ffn.w3": (draw, draw), "ffn.w2": (zero, zero),
}


class GrowError(ValueError):
    pass


OPTIONS = {"layer_place": ("top", "interleave"), "layer_init": ("zero", "copy", "stack"),
           "vocab_init": ("mean", "random"), "head_init": ("mean", "zero")}  # the first is the default


def check_growth(old, new, tokenizer=None, layer_place="top", layer_init="zero", vocab_init="mean", head_init="mean"):
    """Refuse a bad request before anything is touched (growth works in place)."""
    for axis in ("vocab_size", "n_layer", "n_head", "ffn_hidden", "block_size"):
        if getattr(new, axis) < getattr(old, axis):
            raise GrowError(f"cannot shrink {axis} from {getattr(old, axis)} to {getattr(new, axis)}; "
                            f"growth only adds (pass {axis} >= {getattr(old, axis)})")
    if new.head_dim not in (old.head_dim, 2 * old.head_dim):
        raise GrowError(f"head_dim must stay {old.head_dim} or double to {2 * old.head_dim} (asked {new.head_dim}): "
                        "only an exact doubling keeps every RoPE frequency")
    if new.rope_theta != old.rope_theta:
        raise GrowError(f"rope_theta must stay {old.rope_theta}: changing it changes the function")
    if tokenizer is not None and new.vocab_size > tokenizer.vocab_size:
        raise GrowError(f"vocab_size {new.vocab_size} is larger than the tokenizer's "
                        f"{tokenizer.vocab_size}; pass vocab_size <= {tokenizer.vocab_size}")
    chosen = dict(layer_place=layer_place, layer_init=layer_init, vocab_init=vocab_init, head_init=head_init)
    for name, allowed in OPTIONS.items():
        if chosen[name] not in allowed:
            raise GrowError(f"{name} must be one of {allowed}, not {chosen[name]!r}")
    if layer_init == "stack" and layer_place != "top":
        raise GrowError("layer_init='stack' puts the copied stack on top: pass layer_place='top'")
    if new.vocab_size > old.vocab_size and needs_tokenizer(vocab_init, head_init) and tokenizer is None:
        raise GrowError("new rows at the mean of their old pieces (vocab_init or head_init 'mean') needs --tokenizer "
                        "(the tokenizer.model) to find the pieces; or use vocab_init='random' and head_init='zero'")


def needs_tokenizer(vocab_init, head_init):
    return vocab_init == "mean" or head_init == "mean"


def grow_norm(norm, d_new, gen):
    """Scale the old gains by sqrt(d_old/d_new): the zero new dims lower the RMS by exactly that."""
    scale = math.sqrt(norm.shape[0] / d_new)
    with torch.no_grad():
        for block in norm.parameters():
            block.mul_(scale)
    norm.grow((d_new,), gen, rows=partial(nn.init.constant_, val=scale), cols=None)


def head_dim_places(n_head, h, device=None):
    """Where dim j of head n goes when head_dim doubles from h. Half-split RoPE pairs j and
    j + h/2: old pair j becomes pair 2j at (2j, 2j + h), so new pair 2j rotates at
    theta^(-4j/2h), the old frequency; the new dims fill the odd pairs."""
    j = torch.arange(h, device=device)
    within = 2 * (j % (h // 2)) + h * (j >= h // 2)
    return (torch.arange(n_head, device=device)[:, None] * 2 * h + within).flatten()


def grow_layer(block, c, gen):
    """Widen an existing layer to config c (heads, head_dim, FFN hidden, model dim)."""
    d, hd = c.n_embd, c.n_head * c.head_dim
    shapes = {"attn.wq": (hd, d), "attn.wk": (hd, d), "attn.wv": (hd, d), "attn.wo": (d, hd),
              "ffn.w1": (c.ffn_hidden, d), "ffn.w3": (c.ffn_hidden, d), "ffn.w2": (d, c.ffn_hidden)}
    rules = dict(LAYER_RULES)
    n_old, h_old = block.attn.n_head, block.attn.head_dim
    doubling = c.head_dim == 2 * h_old
    if doubling:
        # wk's new rows for the old heads' new dims zero, so their q.k terms start at 0 while wq's drawn rows give
        # wk a gradient; the new heads' rows drawn as for any new head
        rules["attn.wk"] = (lambda rows: draw(rows)[:n_old * h_old].zero_(), draw)
        for p in block.attn.wq.parameters():  # q.k / sqrt(2h) with q * sqrt(2) is the old q.k / sqrt(h)
            p.mul_(math.sqrt(2))
    for name, (init_rows, init_cols) in rules.items():
        block.get_submodule(name).grow(shapes[name], gen, rows=init_rows, cols=init_cols)
    if doubling:  # interleave: the new dims of each old head sit between its old ones
        where = head_dim_places(n_old, h_old, device=next(block.parameters()).device)
        for w in (block.attn.wq, block.attn.wk, block.attn.wv):
            w.place(0, where)
        block.attn.wo.place(1, where)
    grow_norm(block.attn_norm, d, gen)
    grow_norm(block.ffn_norm, d, gen)
    block.attn.n_head, block.attn.head_dim = c.n_head, c.head_dim
    block.attn.dropout = block.ffn.dropout.p = c.dropout  # the config's, as a checkpoint loads it everywhere


def new_layer(c, gen, init, source):
    """A layer of generation `gen`: the identity (`zero`), or a copy of `source` (`copy`, `stack`)."""
    ref = next(source.parameters())
    block = Block(c, gen).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, g in block.named_modules():
            if not isinstance(g, Growable):
                continue
            (p,) = g.parameters()
            if init in ("copy", "stack"):
                p.copy_(source.get_submodule(name).weight)
            elif p.dim() == 1:
                nn.init.ones_(p)
            else:
                LAYER_RULES[name][0](p)  # a new layer is all "new rows": writers zero, readers drawn
    return block


def insertion_points(n_old, n_new, place):
    """Old-layer index after which each new layer goes (-1: none; n_old - 1: on top)."""
    n_add = n_new - n_old
    if place == "top":
        return [n_old - 1] * n_add
    # interleave: spread evenly through the stack
    return [max((j + 1) * n_old // n_add - 1, 0) for j in range(n_add)]


def add_layers(layers, n_new, c, gen, place, init):
    """The grown stack. `zero` and `copy` insert each new layer after its place (`copy` duplicates
    the layer below it); `stack` (G_stack's operator, not function-preserving) puts copies of the
    old stack on top, in order: layers 0, 1, ... (cycling if more are added than there are)."""
    layers, n_old = list(layers), len(layers)
    if init == "stack":
        return layers + [new_layer(c, gen, init, source=layers[j % n_old]) for j in range(n_new - n_old)]
    for after in reversed(insertion_points(n_old, n_new, place)):
        layers.insert(after + 1, new_layer(c, gen, init, source=layers[after]))
    return layers


def vocab_rows_init(weight, tokenizer, how):
    """Init of a vocabulary weight's new rows: `mean` of the rows of each new token's old-tier pieces,
    `zero` or `random` (drawn). The rows are read when the strip is filled, after the new columns are in."""
    if how != "mean":
        return zero if how == "zero" else draw
    v_old = weight.shape[0]

    def init(rows):  # rows: (v_new - v_old, d_new)
        old = weight.weight.detach()  # (v_old, d_new)
        for i in range(rows.shape[0]):
            pieces = tokenizer.old_tier_pieces(v_old + i, v_old)
            # a token the old tier cannot spell (a special token with no text) starts as the average old
            # token: finite, at the scale of the other rows (the mean of no pieces would be NaN)
            rows[i] = old[pieces].mean(0) if pieces else old.mean(0)
    return init


@torch.no_grad()
def grow_model(model, new_config, optim_state=None, *, tokenizer=None,
               layer_place="top", layer_init="zero", vocab_init="mean", head_init="mean"):
    """Grow model in place (no second copy at 7B) and return (model, optim_state keyed by the
    grown model's parameter names). optim_state maps parameter name -> AdamW state; the old
    tensors are kept as they are, and new blocks get no entry (they start at step 0)."""
    old = model.config
    check_growth(old, new_config, tokenizer, layer_place, layer_init, vocab_init, head_init)
    old_names = {id(p): n for n, p in model.named_parameters()}
    gen = max(model.generations()) + 1
    # with eps scaled like the squares' mean, the zero new dims leave every RMSNorm exact
    c = replace(new_config, norm_eps=old.norm_eps * old.n_embd / new_config.n_embd)
    d = c.n_embd

    for block in model.layers:
        grow_layer(block, c, gen)
        block.eps = c.norm_eps
    grow_norm(model.norm, d, gen)
    model.tok_emb.grow((c.vocab_size, d), gen, rows=vocab_rows_init(model.tok_emb, tokenizer, vocab_init), cols=zero)
    model.lm_head.grow((c.vocab_size, d), gen, rows=vocab_rows_init(model.lm_head, tokenizer, head_init), cols=draw)
    if c.n_layer > old.n_layer:
        model.layers = nn.ModuleList(add_layers(model.layers, c.n_layer, c, gen, layer_place, layer_init))

    model.config = c
    model.init_rope()  # block_size may have changed
    optim_state = optim_state or {}  # re-keyed by name: inserted layers shift the old names
    return model, {name: optim_state[old_names[id(p)]] for name, p in model.named_parameters()
                   if old_names.get(id(p)) in optim_state}


def grow_checkpoint(ckpt, new_config, *, tokenizer=None, schedule=None, reset_optimizer=False, condense_upto=-1,
                    **options):
    """Grow a checkpoint's model and AdamW state: (model, optim_state, generations). The new generation's
    record is `schedule` with its gen and birth (the checkpoint's iteration); without one, train.py gives
    it the schedule of the config that resumes it. tokenizer: a path or name for load_tokenizer, loaded
    only when new vocabulary rows need their pieces. Raises GrowError for a growth that adds no weights."""
    model = model_from_checkpoint(ckpt)
    old_newest = max(model.generations())
    tok = None
    if new_config.vocab_size > model.config.vocab_size and tokenizer is not None and \
            needs_tokenizer(options.get("vocab_init", "mean"), options.get("head_init", "mean")):
        from prepare import PrepareError, load_tokenizer
        try:
            tok = load_tokenizer(tokenizer, new_config.vocab_size, sha256=ckpt.get("data", {}).get("tokenizer_sha256"))
        except PrepareError as e:
            raise GrowError(f"tokenizer: {e}") from None
    model, optim_state = grow_model(model, new_config, ckpt.get("optimizer"), tokenizer=tok, **options)
    newest = max(model.generations())
    if newest == old_newest:
        raise GrowError("this growth adds no weights (a longer block_size alone adds none): change the shape, "
                        "or train the checkpoint on with --init_from=resume")
    if reset_optimizer:
        optim_state = {}
    if condense_upto >= 0:
        if condense_upto >= newest:  # the newborn has no Adam steps: merged, it would inherit old step counts
            raise GrowError(f"condense_upto={condense_upto} must be below the new generation {newest} "
                            f"(0..{newest - 1}, or -1 for off)")
        model, optim_state = condense(model, condense_upto, optim_state)
    generations = ckpt.get("generations", []) + [{**(schedule or {}), "gen": newest, "birth": ckpt.get("iter_num", 0)}]
    return model, optim_state, generations


@torch.no_grad()
def condense(model, upto, optim_state=None):
    """In place, merge every block of generation <= upto into one block of generation `upto`, so a
    long-grown model runs as fast as a fresh one. Their schedules should have met (for
    example all at min LR): the merged block follows generation `upto`'s schedule.
    Adam moments are glued like the weights; the merged step count is the smallest. A weight
    left with one block takes in its head_dim permutation (weights and moments), which is dropped."""
    optim_state = dict(optim_state or {})
    for mname, g in model.named_modules():
        if not isinstance(g, Growable):
            continue
        blocks = list(g._parameters.items())
        merged = [(n, p) for n, p in blocks if block_generation(n) <= upto]
        rest = {n: p.data for n, p in blocks if block_generation(n) > upto}
        perms = {k: getattr(g, k) for k in g.PERMS if getattr(g, k) is not None}
        fold = {} if rest else perms  # the permutation goes into a weight's only block

        def glue(parts):
            return weight_from_parts(*zip(*parts, *fold.items()))

        if not merged or (len(merged) == 1 and merged[0][0] == f"g{upto}" and not fold):
            continue  # nothing to merge
        names = [f"{mname}.{n}" for n, _ in merged]
        states = [optim_state.pop(n, None) for n in names]
        if any(states):
            moments = {k: glue((n, s[k] if s else torch.zeros_like(p)) for (n, p), s in zip(merged, states))
                       for k in ("exp_avg", "exp_avg_sq")}
            step = min(s["step"] for s in states if s)
            optim_state[f"{mname}.g{upto}"] = {"step": step.clone(), **moments}
        g.set_blocks({f"g{upto}": glue(merged).clone(), **rest,
                      **{k: v for k, v in perms.items() if k not in fold}})
    return model, optim_state


# -----------------------------------------------------------------------------
# CLI: grow a checkpoint into a new checkpoint

def describe(c, n_params):
    return (f"n_layer={c.n_layer} n_head={c.n_head} head_dim={c.head_dim} d={c.n_embd} "
            f"ffn_hidden={c.ffn_hidden} vocab={c.vocab_size}: {n_params:,} params")


def new_tier(data_dir, vocab_size, data, ckpt_path):
    """meta.json of --data_dir, if it is the tier the grown model trains on: vocab_size ids of the tokenizer the
    checkpoint was trained with (a checkpoint on another tier is one nothing can use). prepare.py makes tiers
    only within the tokenizer, so this also refuses a vocab_size beyond it, whatever vocab_init."""
    from prepare import PrepareError, read_meta
    try:
        meta = read_meta(data_dir)
    except PrepareError as e:
        raise SystemExit(f"grow.py: {e}")
    if meta["tokenizer_sha256"] != data["tokenizer_sha256"]:
        raise SystemExit(f"grow.py: --data_dir {data_dir} was made with tokenizer {meta['tokenizer']} "
                         f"({meta['tokenizer_sha256'][:12]}) but {ckpt_path} with {data['tokenizer']} "
                         f"({data['tokenizer_sha256'][:12]}); pass a tier prepared with the checkpoint's tokenizer")
    if meta["vocab_size"] != vocab_size:
        raise SystemExit(f"grow.py: --data_dir {data_dir} is tier {meta['vocab_size']}, but the grown vocab_size is "
                         f"{vocab_size}; pass the v{vocab_size} tier (prepare.py --tiers {vocab_size} makes it)")
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], allow_abbrev=False)
    ap.add_argument("--ckpt", required=True, help="checkpoint to grow")
    ap.add_argument("--out", required=True, help="where to write the grown checkpoint")
    for axis in ("n_layer", "n_head", "head_dim", "ffn_hidden", "vocab_size", "block_size"):
        ap.add_argument(f"--{axis}", type=int, help="default: unchanged")
    for name, allowed in OPTIONS.items():
        ap.add_argument(f"--{name}", default=allowed[0], choices=allowed)
    ap.add_argument("--tokenizer", help="tokenizer.model for vocab_init/head_init=mean, if not where --data_dir's "
                    "meta.json says it is")
    ap.add_argument("--reset_optimizer", action="store_true", help="drop all AdamW state (ablation)")
    ap.add_argument("--data_dir", help="the data tier of the new vocabulary (needed when it grows)")
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        raise SystemExit(f"grow.py: {args.out} exists; pass another --out (a checkpoint is never overwritten)")

    ckpt = load_checkpoint(args.ckpt)
    old = GPTConfig(**ckpt["model_config"])
    vocab_size = args.vocab_size or old.vocab_size
    if vocab_size > old.vocab_size and not args.data_dir:
        raise SystemExit("grow.py: a larger vocabulary needs --data_dir, the tier it will train and sample on")
    meta = new_tier(args.data_dir, vocab_size, ckpt["data"], args.ckpt) if args.data_dir else None
    old_params = checkpoint_params(ckpt)
    try:
        new = replace(old, **{k: v for k, v in vars(args).items() if v is not None and hasattr(old, k)})
        grown, optim_state, generations = grow_checkpoint(
            ckpt, new, tokenizer=args.tokenizer or (meta or {}).get("tokenizer"), reset_optimizer=args.reset_optimizer,
            **{name: getattr(args, name) for name in OPTIONS})
    except ValueError as e:  # GrowError, or GPTConfig refusing a shape
        raise SystemExit(f"grow.py: {e}")
    data = dict(ckpt["data"], vocab_size=grown.config.vocab_size)  # sample.py decodes with this tier
    data.pop("text", None)  # the parent's tier's; train.py records the new one at its first save
    if meta:  # the tier's record of the same tokenizer file names it by path, when prepare.py was given one
        data.update(data_dir=args.data_dir, tokenizer=meta["tokenizer"])
    try:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    except OSError as e:
        raise SystemExit(f"grow.py: cannot make the folder of {args.out}: {e.strerror}; pass another --out") from None
    save_checkpoint({**ckpt, "data": data, "model": grown.state_dict(), "model_config": asdict(grown.config),
                     "optimizer": optim_state, "generations": generations,
                     "parent_data": ckpt["data"],  # train.py's growth check scores the parent's tier
                     "stage_start": ckpt.get("iter_num", 0)}, args.out)  # a resume trains a new stage from here
    print(f"old: {describe(old, old_params)}\nnew: {describe(grown.config, grown.get_num_params())}\n"
          f"generation {max(grown.generations())} added; wrote {args.out}")


if __name__ == "__main__":
    main()
