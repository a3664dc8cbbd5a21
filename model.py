"""
A Llama-2-style GPT whose weights can grow.

Architecture (Llama 2): RMSNorm pre-norm, SwiGLU FFN, RoPE, causal attention through
F.scaled_dot_product_attention, no biases, untied embedding and lm_head. On CUDA, use_triton_kernels runs
RoPE and SwiGLU's backward in our Triton kernels while training (gpt_kernels.py; train.py and bench.py turn
them on), and use_fused_kernels the norms, RoPE, SwiGLU and the head's loss in liger-kernel's (optional).

Growth (see grow.py and GROWTH.md sections 1-2): every weight is a `Growable`, which keeps
one nn.Parameter per *generation block*: the rectangle it was born with, then for every
growth the strip of new input columns (`g<k>_cols`) and the strip of new output rows
(`g<k>_rows`). The forward assembles the full weight (a no-op when there is one block), so
every block is an ordinary parameter: its own optimizer param group, its own Adam step
count, and nothing to change for DDP/FSDP. A linear layer (`linear`, also q/k/v and gate/up
stacked into one GEMM) assembles it in the graph (torch.cat, then F.linear), unless sharded under
FSDP (`Growable.copy_free`, set by `GPT.shard`): there the copy-free GrowableLinear assembles it
inside its op, in the forward and again in the backward, and saves only the input and the blocks,
where a saved weight would stay whole from forward to backward in every layer.

Doubling head_dim interleaves new dims with old ones inside every head (grow.py), while the
blocks keep their storage order (old rows, then appended strips). A grown wq/wk/wv then holds
a fixed row permutation (`row_perm`, wo a `col_perm`: a persistent buffer, saved with the
blocks) that the forward applies after assembly: weight = assembled[row_perm]. Condensing every
block into one folds it in and drops it.
"""

import errno
import functools
import importlib.util
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

gpt_kernels = None  # our Triton kernels, imported by GPT.use_triton_kernels: Triton takes a second to import

# -----------------------------------------------------------------------------
# growable weights

BLOCK_NAME = re.compile(r"g(\d+)(_cols|_rows)?$")


def block_generation(name):
    """'layers.3.attn.wq.g2_rows' -> 2"""
    return int(BLOCK_NAME.search(name).group(1))


def block_order(name):
    """Assembly order of a block: by generation, then base, cols, rows."""
    gen, kind = BLOCK_NAME.search(name).groups()
    return int(gen), ("", "_cols", "_rows").index(kind or "")


def assemble(blocks):
    """Glue (name, tensor) blocks, in growth order, into the full tensor.
    Used for weights and, with the same names, for their Adam moments."""
    blocks = iter(blocks)
    _, full = next(blocks)
    for name, block in blocks:
        full = torch.cat([full, block], dim=1 if name.endswith("_cols") else 0)
    return full


def parts_shape(names, tensors):
    """The shape of the weight (or gain) that a Growable's parts() assemble into."""
    blocks = [(n, t) for n, t in zip(names, tensors) if n not in Growable.PERMS]
    rows = sum(t.shape[0] for n, t in blocks if not n.endswith("_cols"))
    if blocks[0][1].dim() == 1:
        return torch.Size([rows])
    cols = sum(t.shape[1] for n, t in blocks if not n.endswith("_rows"))
    return torch.Size([rows, cols])


def weight_from_parts(names, tensors):
    """A Growable's weight from its parts(): the blocks assembled, then permuted (weight = assembled[row_perm])."""
    parts = dict(zip(names, tensors))
    w = assemble((n, t) for n, t in parts.items() if n not in Growable.PERMS)
    for dim, perm in enumerate(Growable.PERMS):
        if perm in parts:
            w = w.index_select(dim, parts[perm])
    return w


@functools.lru_cache(maxsize=None)
def stacking(layout, shapes):
    """Where stacked_weight puts the parts of a layout ('g0,g1_cols,row_perm;g0': each Growable's part names, ';'
    between them) of these shapes: ((rows, cols) of the stack, one (rows in the stack, blocks, perms) per Growable),
    a block (part index, rows, cols) in its weight, perms {dim: part index}. Growth's rule: a `_cols` strip to the
    right of the rows so far, a `_rows` strip below them across every column. Cached: a model has few layouts."""
    weights, index, top = [], 0, 0
    for names in layout.split(";"):
        blocks, perms, rows, cols = [], {}, 0, 0
        for name in names.split(","):
            height, width = shapes[index] if len(shapes[index]) == 2 else (0, 0)  # a permutation is 1-D
            if name in Growable.PERMS:
                perms[Growable.PERMS.index(name)] = index
            elif name.endswith("_cols"):
                blocks.append((index, slice(0, height), slice(cols, cols + width)))
                cols += width
            elif name.endswith("_rows"):
                blocks.append((index, slice(rows, rows + height), slice(0, width)))
                rows += height
            else:
                blocks.append((index, slice(0, height), slice(0, width)))
                rows, cols = height, width
            index += 1
        weights.append((slice(top, top + rows), blocks, perms))
        top += rows
    return (top, cols), weights


def stored_back_to_back(weights):
    """Do these contiguous weights follow one another, by rows, in one storage (GPT.join_stacked_weights)?"""
    first, offset = weights[0], weights[0].storage_offset()
    for w in weights:
        if not (w.is_contiguous() and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                and w.storage_offset() == offset):
            return False
        offset += w.numel()
    return True


def stacked_weight(layout, parts, dtype):
    """The Growables' weights stacked by rows, (sum of out, in), in dtype. A weight of one block is used where it
    lies (cast if need be), and several as a view where they follow one another in one storage; otherwise every
    block is cast as it is copied into its place: one pass over the weights, whatever the number of blocks (two
    for a permuted one: weight = assembled[row_perm])."""
    shape, weights = stacking(layout, tuple(p.shape for p in parts))
    if all(len(blocks) == 1 and not perms for _, blocks, perms in weights):
        singles = [parts[blocks[0][0]] for _, blocks, _ in weights]
        if len(singles) == 1:
            return singles[0].to(dtype)
        if all(w.dtype == dtype for w in singles):  # nothing to cast
            return singles[0].as_strided(shape, (shape[1], 1)) if stored_back_to_back(singles) else torch.cat(singles)
    out = torch.empty(shape, dtype=dtype, device=parts[0].device)
    for rows, blocks, perms in weights:
        assembled = torch.empty_like(out[rows]) if perms else out[rows]
        for i, block_rows, block_cols in blocks:
            assembled[block_rows, block_cols].copy_(parts[i])
        for dim, i in perms.items():
            assembled = assembled.index_select(dim, parts[i])
        if perms:
            out[rows] = assembled
    return out


def stacked_grads(layout, parts, grad_w):
    """The inverse of stacked_weight for its gradient (out, in): one per part (views of grad_w unless permuted),
    None for the permutations."""
    grads = [None] * len(parts)
    plan = stacking.__wrapped__ if torch.compiler.is_compiling() else stacking  # dynamo warns of a traced cache
    for rows, blocks, perms in plan(layout, tuple(p.shape for p in parts))[1]:
        grad = grad_w[rows]
        for dim, i in perms.items():  # weight[i] = assembled[perm[i]], so assembled[j] = weight[argsort(perm)[j]]
            grad = grad.index_select(dim, parts[i].argsort())
        for i, block_rows, block_cols in blocks:
            grads[i] = grad[block_rows, block_cols]
    return grads


def weight_matmul_impl(a: torch.Tensor, parts: list[torch.Tensor], layout: str, transposed: bool) -> torch.Tensor:
    """a @ W.T (transposed: a linear layer) or a @ W (its input gradient), in a's dtype, W = stacked_weight."""
    w = stacked_weight(layout, parts, a.dtype)
    return F.linear(a, w) if transposed else a @ w


# an op torch.compile cannot see into, so W exists only while it runs: a graph that assembled W itself would save
# it for the backward (the partitioner does not recompute a cat, and merges the backward's with the forward's)
weight_matmul_op = torch.library.custom_op("growing_llama::weight_matmul", weight_matmul_impl, mutates_args=())


@weight_matmul_op.register_fake
def weight_matmul_shape(a, parts, layout, transposed):
    """The output's shape and dtype, for torch.compile's tracing (reading a fake tensor's data_ptr, as
    stored_back_to_back does, is an error)."""
    rows, cols = stacking.__wrapped__(layout, tuple(p.shape for p in parts))[0]  # symbolic sizes do not hash
    return a.new_empty(*a.shape[:-1], rows if transposed else cols)


def weight_matmul(a, parts, layout, transposed):
    # eager runs the op's body: its dispatch would cost more than the body at small sizes
    op = weight_matmul_op if torch.compiler.is_compiling() else weight_matmul_impl
    return op(a, list(parts), layout, transposed)


class GrowableLinear(torch.autograd.Function):
    """x @ W.T for W the Growables' weights stacked by rows, saving only x and the parts (parameters, which FSDP
    gathers again for the backward anyway): W is assembled in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x, layout, *parts):
        ctx.layout = layout
        ctx.save_for_backward(x, *parts)
        return weight_matmul(x, parts, layout, True)

    @staticmethod
    def backward(ctx, grad):  # grad: (..., out)
        x, *parts = ctx.saved_tensors
        grad_x = weight_matmul(grad, parts, ctx.layout, False) if ctx.needs_input_grad[0] else None
        if not any(ctx.needs_input_grad[2:]):  # frozen weights: no weight GEMM
            return grad_x, None, *(None for _ in parts)
        grad_w = grad.flatten(0, -2).t() @ x.flatten(0, -2)  # (out, in), like W
        grads = stacked_grads(ctx.layout, parts, grad_w)
        return grad_x, None, *(g if g is None else g.to(p.dtype) for g, p in zip(grads, parts))


def linear(x, *weights):
    """x @ W.T for the Growables' weights W stacked by rows (one GEMM for q, k, v), in autocast's dtype when it is
    on, as F.linear. Under FSDP nothing weight-sized is kept for the backward but the parameters (GrowableLinear,
    if any of the weights is copy_free: GPT.shard sets them all); unsharded, W is assembled in the graph, where
    inductor fuses the cast and copy and saves W (bf16: 0.5 GB at 239M) instead of assembling it again in the
    backward: +1.2% tokens/s at stage 3 and +2.6% at stage 1 against the copy-free op (H200, compiled, micro-batch
    32: README, Speed)."""
    if torch.is_grad_enabled() and not any(g.copy_free for g in weights):
        return F.linear(x, torch.cat([g.weight for g in weights]) if len(weights) > 1 else weights[0].weight)
    names, parts = zip(*(g.parts() for g in weights))
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    flat = [t for p in parts for t in p]
    if len(flat) == 1 and flat[0].dtype == x.dtype:  # one block in x's dtype: F.linear saves the parameter itself
        return F.linear(x, flat[0])
    layout = ";".join(",".join(n) for n in names)
    if not torch.is_grad_enabled():  # nothing to save (sampling, eval); dynamo cannot trace the Function here
        return weight_matmul(x, flat, layout, True)
    return GrowableLinear.apply(x, layout, *flat)


class Growable(nn.Module):
    """A weight of shape (out, in) or (n,) stored as generation blocks, with an optional fixed
    permutation of its rows or columns: logical index i is assembled index perm[i]."""

    PERMS = ("row_perm", "col_perm")  # a permutation of dim 0, of dim 1
    copy_free = False  # GPT.shard sets it: no assembled weight saved for the backward (linear)

    def __init__(self, *shape, gen=0):
        super().__init__()
        self.register_parameter(f"g{gen}", nn.Parameter(torch.empty(shape)))
        for name in self.PERMS:
            self.register_buffer(name, None)

    @property
    def weight(self):
        return weight_from_parts(*self.parts())

    def parts(self):
        """(names, tensors): the blocks in growth order, then the permutations this weight has."""
        parts = {**self._parameters, **{k: v for k, v in self._buffers.items() if v is not None}}  # buffers: PERMS
        return tuple(parts), list(parts.values())

    @property
    def shape(self):
        return parts_shape(*self.parts())

    def add_block(self, name, tensor):
        self.register_parameter(name, nn.Parameter(tensor))

    def grow(self, shape, gen, *, rows, cols):
        """Append generation `gen`'s strips so the weight gets `shape`: first the new input
        columns of the existing rows, then the new output rows across all columns.
        rows / cols fill a new strip in place (rows runs after the columns are in). New rows
        and columns go last."""
        old, ref = self.shape, next(iter(self._parameters.values()))
        strips = []
        if len(shape) == 2 and shape[1] > old[1]:
            strips.append((f"g{gen}_cols", (old[0], shape[1] - old[1]), cols))
        if shape[0] > old[0]:
            strips.append((f"g{gen}_rows", (shape[0] - old[0], *shape[1:]), rows))
        for name, strip_shape, init in strips:
            strip = torch.empty(strip_shape, dtype=ref.dtype, device=ref.device)
            with torch.no_grad():
                init(strip)
            self.add_block(name, strip)
        for dim, name in enumerate(self.PERMS):  # the appended indices sit where they are stored: last
            perm = getattr(self, name)
            if perm is not None and len(perm) < shape[dim]:
                setattr(self, name, torch.cat([perm, torch.arange(len(perm), shape[dim], device=perm.device)]))

    def place(self, dim, where):
        """After a growth, move logical index i of dim (0 rows, 1 columns) to where[i], i < len(where);
        the indices that the growth appended fill the free places in order. Composes with an
        earlier permutation."""
        n, perm_name = self.shape[dim], self.PERMS[dim]
        stored = getattr(self, perm_name)  # assembled index of each logical index, the new ones last
        stored = torch.arange(n, device=where.device) if stored is None else stored
        free = torch.ones(n, dtype=torch.bool, device=where.device)
        free[where] = False
        perm = torch.empty_like(stored)
        perm[where], perm[free] = stored[:len(where)], stored[len(where):]
        setattr(self, perm_name, None if torch.equal(perm, torch.arange(n, device=perm.device)) else perm)

    def set_blocks(self, named_tensors):
        """Replace the blocks and permutations (loading a grown checkpoint into a freshly built model)."""
        self._parameters.clear()
        blocks = {k: v for k, v in named_tensors.items() if k not in self.PERMS}
        for name, t in sorted(blocks.items(), key=lambda kv: block_order(kv[0])):
            self.add_block(name, t)
        for name in self.PERMS:
            setattr(self, name, named_tensors.get(name))


def runnable_device_type(device):
    """device's type, 'cpu' or 'cuda' (the two this code runs on), or a ValueError that says what to pass."""
    try:
        kind = torch.device(device).type
    except RuntimeError:  # a name torch does not know
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not one this code runs on: pass cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this torch has no usable CUDA: pass cpu")
    return kind


# -----------------------------------------------------------------------------
# fused kernels, optional: liger-kernel's Triton versions of the elementwise ops, on CUDA

FUSABLE = ("rms_norm", "rope", "swiglu", "linear_cross_entropy")
LIGER = {}  # op -> liger-kernel's autograd Function, filled by load_fused_kernels


def fused_kernel_names(spec):
    """The ops a fused_kernels setting names: '' or 'none', 'all', or names of FUSABLE joined by '+'."""
    if spec in ("", "none"):
        return frozenset()
    names = FUSABLE if spec == "all" else spec.split("+")
    unknown = [n for n in names if n not in FUSABLE]
    if unknown:
        raise ValueError(f"fused_kernels={spec!r}: {unknown[0]!r} is not one of {', '.join(FUSABLE)} "
                         "(join several with '+'; 'all' or 'none')")
    return frozenset(names)


def load_fused_kernels(names, device):
    """Import liger-kernel's Functions to run names on device; a one-line SystemExit where they cannot run
    (liger-kernel is an optional dependency, and Triton's kernels need CUDA)."""
    if not names:
        return
    asked = "+".join(n for n in FUSABLE if n in names)
    if device.type != "cuda":
        raise SystemExit(f"fused_kernels={asked} runs liger-kernel's Triton kernels, which need a CUDA device, "
                         f"not {device.type}: leave fused_kernels empty there")
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction
    except Exception as e:  # not installed, or no Triton that it can use: say which
        raise SystemExit(f"fused_kernels={asked} needs liger-kernel, an optional dependency (pip install "
                         f"liger-kernel): importing it failed with {type(e).__name__}: {e}") from None
    LIGER.update(rms_norm=LigerRMSNormFunction, rope=LigerRopeFunction, swiglu=LigerFusedGateUpSiLUMulFunction,
                 linear_cross_entropy=LigerFusedLinearCrossEntropyFunction)


@torch.compiler.disable  # it syncs on .item() and runs its own chunked GEMMs: nothing for inductor to fuse
def fused_linear_cross_entropy(x, weight, targets):
    """Mean cross-entropy of x @ weight.T against targets, a chunk of rows at a time: the logits are never
    held whole, and the gradients are computed in the forward (liger-kernel)."""
    loss, *_ = LIGER["linear_cross_entropy"].apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1))
    return loss


# -----------------------------------------------------------------------------
# the model


@dataclass
class GPTConfig:  # the defaults are the ladder's stage 1 (config/stage1.py, 56M)
    vocab_size: int = 4096
    n_layer: int = 10
    n_head: int = 5
    head_dim: int = 128
    ffn_hidden: int = 1792
    block_size: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0

    @property
    def n_embd(self):
        return self.n_head * self.head_dim

    def __post_init__(self):
        for k in ("vocab_size", "n_layer", "n_head", "head_dim", "block_size", "rope_theta", "norm_eps"):
            if not getattr(self, k) > 0:  # (also refuses nan)
                raise ValueError(f"GPTConfig: {k}={getattr(self, k)} must be positive")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig: head_dim={self.head_dim} must be even for RoPE")
        if self.ffn_hidden <= 0 or self.ffn_hidden % 8:
            raise ValueError(f"GPTConfig: ffn_hidden={self.ffn_hidden} is not allowed; "
                             "use a positive multiple of 8 (Llama's: 8d/3 rounded up to a multiple of 256)")


def rms_norm(x, weight, eps, fused=False):
    if fused:  # 'llama' casting is ours (float32 statistics, the weight after casting back); in place: only it reads dY
        return LIGER["rms_norm"].apply(x, weight, eps, 0.0, "llama", True)
    # normalise in float32 even under bf16 autocast
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_cache(head_dim, block_size, theta):
    """cos, sin of shape (block_size, head_dim // 2): pair j rotates at theta^(-2j/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate pairs in the half-split layout (Hugging Face's rotate_half): pair j is
    (x[j], x[j + head_dim/2]). x: (B, n_head, T, head_dim); cos, sin: (T, head_dim/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    fused = frozenset()  # set by GPT.use_fused_kernels
    triton_kernels = False  # gpt_kernels.py on CUDA while training: GPT.use_triton_kernels

    def __init__(self, config, gen=0):
        super().__init__()
        d, hd = config.n_embd, config.n_head * config.head_dim
        self.wq, self.wk, self.wv = (Growable(hd, d, gen=gen) for _ in range(3))
        self.wo = Growable(d, hd, gen=gen)
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        B, T, _ = x.shape
        # one GEMM for q, k and v: copying the weights together costs less than the two GEMMs it saves
        qkv = linear(x, self.wq, self.wk, self.wv).view(B, T, 3, self.n_head, self.head_dim)
        ours = self.triton_kernels and "rope" not in self.fused and cache is None and torch.is_grad_enabled()
        if ours and qkv.is_cuda:  # one pass over q and k each way, where inductor's backward took two (README, Speed)
            q, k, v = (t.transpose(1, 2) for t in gpt_kernels.RotaryQKV.apply(qkv, cos, sin))
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, n_head, T, head_dim)
            if "rope" in self.fused:  # liger: one kernel rotates both; cos, sin cover half a head: rotary_dim says so
                q, k = LIGER["rope"].apply(q, k, cos, sin, None, 1, self.head_dim)
            else:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None and isinstance(start_pos, torch.Tensor):  # positions as a tensor: the whole cache, masked
            cache_k, cache_v = cache  # (B, n_head, max_len, head_dim)
            cache_k.index_copy_(2, start_pos, k), cache_v.index_copy_(2, start_pos, v)
            k, v = cache_k, cache_v
            mask = torch.arange(cache_k.size(2), device=x.device) <= start_pos[:, None]  # (T, max_len)
        elif cache is not None:  # keep this step's keys and values, attend over the whole prefix
            cache_k, cache_v = cache
            cache_k[:, :, start_pos:start_pos + T], cache_v[:, :, start_pos:start_pos + T] = k, v
            k, v = cache_k[:, :, :start_pos + T], cache_v[:, :, :start_pos + T]
            if start_pos > 0 and T > 1:  # query i sits at start_pos + i; is_causal would align it to key i
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)
        # GPT.generate's one query sees every key: no mask (a mask costs milliseconds per call in CPU attention)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and (cache is None or T > 1),
                                           dropout_p=self.dropout if self.training else 0.0)
        return linear(y.transpose(1, 2).reshape(B, T, -1), self.wo)


class FeedForward(nn.Module):
    fused = frozenset()  # set by GPT.use_fused_kernels
    triton_kernels = False  # gpt_kernels.py on CUDA while training: GPT.use_triton_kernels

    def __init__(self, config, gen=0):
        super().__init__()
        d, h = config.n_embd, config.ffn_hidden
        self.w1, self.w3 = Growable(h, d, gen=gen), Growable(h, d, gen=gen)  # gate, up
        self.w2 = Growable(d, h, gen=gen)  # down
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate_up = linear(x, self.w1, self.w3)  # one GEMM, as qkv
        if "swiglu" in self.fused:  # reads gate and up where the GEMM wrote them; its backward wants 2-D rows
            hidden = LIGER["swiglu"].apply(gate_up.flatten(0, -2)).view(*gate_up.shape[:-1], -1)
        elif self.triton_kernels and gate_up.is_cuda and torch.is_grad_enabled():  # a one-pass backward
            hidden = gpt_kernels.SwiGLU.apply(gate_up)
        else:
            gate, up = gate_up.unflatten(-1, (2, -1)).unbind(-2)
            hidden = F.silu(gate) * up
        return self.dropout(linear(hidden, self.w2))


class Block(nn.Module):
    fused = frozenset()  # set by GPT.use_fused_kernels

    def __init__(self, config, gen=0):
        super().__init__()
        self.attn_norm, self.ffn_norm = Growable(config.n_embd, gen=gen), Growable(config.n_embd, gen=gen)
        self.attn, self.ffn = Attention(config, gen), FeedForward(config, gen)
        self.eps = config.norm_eps

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        fused_norm = "rms_norm" in self.fused
        x = x + self.attn(rms_norm(x, self.attn_norm.weight, self.eps, fused_norm), cos, sin, cache, start_pos)
        return x + self.ffn(rms_norm(x, self.ffn_norm.weight, self.eps, fused_norm))


class GPT(nn.Module):
    fused = frozenset()  # the ops of FUSABLE run through liger-kernel, here and in every block (use_fused_kernels)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = Growable(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = Growable(config.n_embd)
        self.lm_head = Growable(config.vocab_size, config.n_embd)
        self.checkpoint_blocks = False  # recompute each block in backward: memory for time, at 1B+
        self.head_fn = GPT.head  # compile_parts swaps in a compiled one
        self.init_rope()
        # GPT-2 style: N(0, 0.02), the projections that write into the residual stream
        # scaled by 1/sqrt(2 n_layer) so the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                is_writer = re.search(r"\.(wo|w2)\.", name)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if is_writer else 0.02)

    def init_rope(self):
        cos, sin = rope_cache(self.config.head_dim, self.config.block_size, self.config.rope_theta)
        device = next(self.tok_emb.parameters()).device  # after growth: where the model already is
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, idx, targets=None, kv_cache=None, start_pos=0):
        """kv_cache: None, or one (k, v) pair per layer from new_kv_cache, holding positions
        < start_pos; idx then holds the tokens at start_pos.. (generation feeds only new tokens).
        start_pos may also be a tensor of idx's T positions (decode_step): the step then attends over the
        whole cache through a mask, so its shapes and Python values do not change from one position to the next."""
        B, T = idx.shape
        if isinstance(start_pos, torch.Tensor):  # not checked against block_size: that would read it back to Python
            cos, sin = self.rope_cos[start_pos], self.rope_sin[start_pos]
        else:
            if start_pos + T > self.config.block_size:
                raise ValueError(f"sequence length {start_pos + T} exceeds block_size {self.config.block_size}")
            cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = F.embedding(idx, self.tok_emb.weight)  # (B, T, d)
        for block, cache in zip(self.layers, kv_cache or [None] * len(self.layers)):
            if self.checkpoint_blocks and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, start_pos)
        return self.head_fn(self, x, targets)

    def head(self, x, targets=None):
        """Final norm, logits and loss; its own function so compile_parts can fuse the fp32 log-softmax
        over the vocabulary, which eager runs as several passes over a (B*T, vocab) matrix."""
        x = rms_norm(x, self.norm.weight, self.config.norm_eps, "rms_norm" in self.fused)
        if targets is not None and "linear_cross_entropy" in self.fused:  # no logits: they are never held whole
            return None, fused_linear_cross_entropy(x, self.lm_head.weight, targets)
        logits = linear(x, self.lm_head)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def use_fused_kernels(self, names):
        """Run the ops in names (of FUSABLE) through liger-kernel on this model's device, from the next forward;
        a grown model's new blocks start without them. An empty set is today's code."""
        load_fused_kernels(names, next(self.tok_emb.parameters()).device)
        for m in self.modules():
            if isinstance(m, (GPT, Block, Attention, FeedForward)):
                m.fused = frozenset(names)

    def use_triton_kernels(self, on):
        """Run RoPE and SwiGLU's backward in gpt_kernels.py's Triton kernels while training, from the next forward,
        if on and this model is on a GPU that Triton supports (CUDA, compute capability 8.0 or more: not a T4) and
        Triton is installed, or torch's code only. Returns whether they run. Call it after growing: new blocks
        start without them."""
        global gpt_kernels
        device = next(self.tok_emb.parameters()).device
        on = (on and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
              and importlib.util.find_spec("triton") is not None)
        if on:
            import gpt_kernels
        for m in self.modules():
            if isinstance(m, (Attention, FeedForward)):
                m.triton_kernels = on
        return on

    def compile_parts(self, backend="inductor"):
        """torch.compile every block and the head, not the whole model: growth changes the depth, and
        blocks of one structure share a graph. Static shapes: a grown model is one fixed shape per process,
        and dynamic-shape kernels are slower. Call it once, after growing."""
        for block in self.layers:
            block.compile(dynamic=False, backend=backend)
        # unbound: a copy of the model uses its own weights
        self.head_fn = torch.compile(GPT.head, dynamic=False, backend=backend)
        # graphs: (block structures, one per generation) x (train, eval, a short last eval batch); the
        # limit's old name, an alias of recompile_limit since torch 2.7, works on every torch we support
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def shard(self, param_dtype):
        """FSDP2 over the ranks of the process group, in place: parameters become DTensors, names unchanged. Blocks
        gather param_dtype weights but leave their input alone, and the root (embedding, lm_head) stays fp32, so the
        residual stream is fp32 as under DDP with autocast."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # here: sampling needs no distributed
        for m in self.modules():
            if isinstance(m, Growable):
                m.copy_free = True
        for block in self.layers:
            fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                                              cast_forward_inputs=False))
        fully_shard(self, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))

    @torch.no_grad()
    def join_stacked_weights(self):
        """For sampling, after condense and .to() (which would part them again): move each layer's q, k, v rows,
        and its gate, up rows, into one storage, so the GEMM that stacks them reads them where they lie instead of
        copying them together for every token (stacked_weight). Values, names and state dict stay the same."""
        for layer in self.layers:
            for stack in ((layer.attn.wq, layer.attn.wk, layer.attn.wv), (layer.ffn.w1, layer.ffn.w3)):
                if any(len(g._parameters) > 1 or g.row_perm is not None or g.col_perm is not None for g in stack):
                    raise ValueError("join_stacked_weights needs one block per weight: condense the model first")
                blocks = [next(iter(g._parameters.values())) for g in stack]
                joined = torch.cat(blocks)
                for p, rows in zip(blocks, joined.split([len(p) for p in blocks])):
                    p.data = rows
        return self

    def new_kv_cache(self, batch_size, max_len):
        """Per layer, preallocated keys and values: (B, n_head, max_len, head_dim) each."""
        c, p = self.config, next(self.parameters())
        return [tuple(torch.zeros(batch_size, c.n_head, max_len, c.head_dim, dtype=p.dtype, device=p.device)
                      for _ in "kv") for _ in self.layers]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Continue idx (B, T) by max_new_tokens sampled tokens; temperature 0 is greedy. With the
        cache every step runs only the new token; without it, the whole sequence again."""
        if idx.size(1) + max_new_tokens > self.config.block_size:
            raise ValueError(f"{idx.size(1)} prompt + {max_new_tokens} new tokens exceed "
                             f"block_size {self.config.block_size}")
        cache = self.new_kv_cache(idx.size(0), idx.size(1) + max_new_tokens) if use_cache else None
        pos = 0  # tokens already in the cache
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, pos:], kv_cache=cache, start_pos=pos)
            pos = idx.size(1) if use_cache else 0
            idx = torch.cat((idx, sample_next(logits[:, -1], temperature, top_k)), dim=1)
        return idx

    def decode_step(self, tok, cache, pos, temperature, top_k):
        """The tokens (B, 1) that follow tok (B, 1) at position pos (a tensor (1,)), the cache holding every
        earlier position: the same shapes and kernels at every position, so one CUDA graph can replay it."""
        logits, _ = self(tok, kv_cache=cache, start_pos=pos)
        return sample_next(logits[:, -1], temperature, top_k)

    def get_num_params(self, non_embedding=False):
        """Parameter count; non_embedding drops the token embedding (a lookup, no FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.shape.numel() if non_embedding else n

    def generations(self):
        return sorted({block_generation(n) for n, _ in self.named_parameters()})

    def param_groups(self, weight_decay):
        """One AdamW param group per (generation, decay or not): matrices decay, norm gains do not."""
        groups = {}
        for name, p in self.named_parameters():
            decay = p.dim() >= 2
            key = (block_generation(name), decay)
            groups.setdefault(key, {"params": [], "names": [], "gen": key[0],
                                    "weight_decay": weight_decay if decay else 0.0})
            groups[key]["params"].append(p)
            groups[key]["names"].append(name)
        return [groups[k] for k in sorted(groups)]

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4), plus
        attention's QK^T and AV with the causal discount (half the T x T scores are computed)."""
        c = self.config
        n_matmul = self.get_num_params(non_embedding=True) - sum(
            g.shape.numel() for g in self.modules() if isinstance(g, Growable) and len(g.shape) == 1)
        return 6 * n_matmul + 6 * c.n_layer * c.n_head * c.head_dim * seq_len

    @classmethod
    def from_state_dict(cls, config, state_dict):
        """Build a model whose block structure (generations) is the one in state_dict."""
        with torch.device("meta"):
            model = cls(config)
        for mname, module in model.named_modules():
            if isinstance(module, Growable):
                prefix = mname + "."
                blocks = {k[len(prefix):]: v for k, v in state_dict.items()
                          if k.startswith(prefix) and "." not in k[len(prefix):]}
                module.set_blocks({k: v.clone() for k, v in blocks.items()})
        mismatch = {n for n, _ in model.named_parameters()} ^ {k for k in state_dict if not k.endswith("_perm")}
        if mismatch:
            raise ValueError(f"state dict does not match GPTConfig {config}: {sorted(mismatch)[:4]}...")
        model.init_rope()
        return model


def sample_next(logits, temperature, top_k):
    """Next tokens (B, 1) from logits (B, vocab); temperature 0 is greedy. The draw is the exponential race
    torch.multinomial runs for one sample (argmax of p / Exp(1)), without the validity check that reads the
    probabilities back to the host: no sync, so a CUDA graph can hold it."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    probs = F.softmax(logits, dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)


class StaticDecoder:
    """Generation with static shapes: one KV cache for (batch_size, max_len), kept from call to call (what an
    earlier call left past the position is masked out), and GPT.decode_step for every token after the prompt.
    compile=True compiles the step with CUDA graphs, so on CUDA a token costs one graph replay instead of
    hundreds of kernel launches from Python."""

    def __init__(self, model, batch_size, max_len, compile=False):
        if max_len > model.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {model.config.block_size}")
        self.model, self.cache = model, model.new_kv_cache(batch_size, max_len)
        self.step = GPT.decode_step
        if compile:
            for t in (t for kv in self.cache for t in kv):  # written in place: CUDA graphs need it at a fixed address
                torch._dynamo.mark_static_address(t)
            # dynamic=False: temperature and top_k are constants of the graph, not inputs on the host
            self.step = torch.compile(GPT.decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """As GPT.generate: idx (B, T) continued by max_new_tokens tokens. The prompt fills the cache in one
        forward (shapes vary there, once per call); then one decode_step per token."""
        B, T = idx.shape
        batch_size, _, max_len, _ = self.cache[0][0].shape
        if B != batch_size or T + max_new_tokens > max_len:
            raise ValueError(f"{B} rows of {T} prompt + {max_new_tokens} new tokens do not fit the cache's "
                             f"{batch_size} rows of {max_len}")
        if max_new_tokens == 0:
            return idx
        logits, _ = self.model(idx, kv_cache=self.cache)
        tokens = [sample_next(logits[:, -1], temperature, top_k)]
        pos = torch.tensor([T], device=idx.device)
        for _ in range(max_new_tokens - 1):
            # cloned: a CUDA graph overwrites its output at the next replay
            tokens.append(self.step(self.model, tokens[-1], self.cache, pos, temperature, top_k).clone())
            pos += 1
        return torch.cat([idx, *tokens], dim=1)


# -----------------------------------------------------------------------------
# checkpoints: one dict of plain types, written atomically, read as data only

CHECKPOINT_FORMAT = "growing-llama/1"
# what every reader may count on (grow.py, sample.py, export.py); ckpt["data"] holds DATA_KEYS, and a resume
# needs RESUME_KEYS too (train.py writes them all; grow.py copies them from the parent)
CHECKPOINT_KEYS = ("model", "model_config", "data")
DATA_KEYS = ("tokenizer", "tokenizer_sha256", "vocab_size")
RESUME_KEYS = ("optimizer", "generations", "iter_num", "stage_start", "tokens", "flops", "best_val_bpb", "config",
               "rng")


class NonFiniteCheckpoint(ValueError):
    """A checkpoint tensor holds NaN or inf: the run diverged. Such a checkpoint is never written nor used."""


def first_non_finite(tree, prefix=""):
    """Key ('optimizer.layers.0.attn.wq.g0.exp_avg') of the first floating tensor in nested dicts and lists
    that holds NaN or inf, or None. aminmax is one pass with no tensor-sized temporary, and NaN propagates."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.numel() and not all(torch.isfinite(m) for m in torch.aminmax(v)):
                return key
        elif (bad := first_non_finite(v, key + ".")) is not None:
            return bad
    return None


def assert_finite(tree, path, fix):
    """Refuse a checkpoint (dict) with NaN or inf anywhere; fix says what to do instead."""
    key = first_non_finite(tree)
    if key is not None:
        raise NonFiniteCheckpoint(f"{path}: {key} holds NaN or inf (the run diverged); {fix}")


def save_checkpoint(ckpt, path):
    """Write to a temporary file and rename it, so a kill never leaves a broken checkpoint. A checkpoint
    with NaN or inf raises NonFiniteCheckpoint and is not written: it would replace the last good one."""
    assert_finite(ckpt, path, f"not written, {kept(path)}")
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({**ckpt, "format": CHECKPOINT_FORMAT}, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, or a crash can leave an empty ckpt.pt
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, Ctrl-C: the last good checkpoint stays, and no half-written file
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch's zip writer chains its C++ errors to the OSError of a full disk: one line says all of it
        os_error = next((c for c in exception_chain(e) if isinstance(c, OSError) and c.errno), None)
        if not isinstance(e, Exception) or os_error is None:
            raise
        fix = "free space on that disk" if os_error.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise SystemExit(f"cannot write {path}: {os.strerror(os_error.errno).lower()}; {fix} and run again "
                         f"({kept(path)})") from None


def kept(path):
    return "the previous checkpoint is kept" if os.path.exists(path) else "no checkpoint was written"


def exception_chain(e):
    """e, then the exceptions it was raised from or during."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def load_checkpoint(path, keys=CHECKPOINT_KEYS, finite=True):
    """A checkpoint of this project that holds keys (and ckpt['data'] DATA_KEYS), all finite (unless
    finite=False: the check reads the whole file); else one line."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}: train that stage first or fix the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # ranks share the pages
    except Exception as e:  # pickle errors vary: say what the file is not
        raise SystemExit(f"{path} is not a readable checkpoint ({type(e).__name__}); "
                         "pass a ckpt.pt written by train.py or grow.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT}); "
                         "pass a ckpt.pt written by train.py or grow.py")
    missing = [k for k in keys if k not in ckpt]
    if not missing and "data" in keys:
        missing = [f"data.{k}" for k in DATA_KEYS if k not in ckpt["data"]]
    if missing:
        raise SystemExit(f"{path} has the checkpoint format but no {missing[0]!r} (a checkpoint holds "
                         f"{', '.join(keys)}); it is damaged or was not written by train.py or grow.py: pass another")
    try:
        if finite:
            assert_finite(ckpt, path, "pass an earlier checkpoint")
    except NonFiniteCheckpoint as e:
        raise SystemExit(str(e)) from None
    return ckpt


def checkpoint_params(ckpt):
    """The parameter count of a checkpoint's model, without building it (the permutations are buffers)."""
    return sum(v.numel() for k, v in ckpt["model"].items() if not k.endswith("_perm"))


def model_from_checkpoint(ckpt):
    return GPT.from_state_dict(GPTConfig(**ckpt["model_config"]), ckpt["model"])


if __name__ == "__main__":
    # python model.py config/stage*.py: the ladder's shapes, parameters and FLOPs per token
    import sys
    print("| config | n_layer | n_head x head_dim = d | ffn_hidden | vocab | parameters | GFLOPs/token |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for path in sys.argv[1:]:
        cfg = {}
        exec(open(path).read(), cfg)
        c = GPTConfig(**{k: cfg[k] for k in ("vocab_size", "n_layer", "n_head", "head_dim", "ffn_hidden",
                                             "block_size") if k in cfg})
        with torch.device("meta"):
            m = GPT(c)
        print(f"| {os.path.basename(path)} | {c.n_layer} | {c.n_head} x {c.head_dim} = {c.n_embd} | {c.ffn_hidden} "
              f"| {c.vocab_size} | {m.get_num_params() / 1e6:,.1f}M | {m.flops_per_token(c.block_size) / 1e9:.2f} |")
