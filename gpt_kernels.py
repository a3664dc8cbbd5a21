"""
Triton kernels for the two places where inductor's code runs well below memory bandwidth: SwiGLU's backward
(it writes the gradients of gate and up, the two halves of one GEMM output, at half the rate of a copy) and
RoPE on q and k (forward and backward; the backward took two passes). Each reads and writes every byte once.
model.py uses them on CUDA while training once GPT.use_triton_kernels turned them on (train.py and bench.py do);
elsewhere, and for the reference they are tested against, the model's own torch code runs. Measured on one
H200 (README, Speed).
Triton's interpreter (TRITON_INTERPRET=1) runs them on the CPU, which is how test_gpt_kernels.py checks them
without a GPU.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def launch(kernel, grid):
    """kernel[grid], wrapped so that torch.compile traces the launch; under Triton's interpreter (TRITON_INTERPRET=1:
    test_gpt_kernels.py on the CPU) as it is, as torch 2.11's wrap_triton refuses an interpreted kernel."""
    return (kernel if isinstance(kernel, InterpretedFunction) else torch.library.wrap_triton(kernel))[grid]


@triton.jit
def gpt_swiglu_backward(gate_up, grad, grad_gate_up, n_cols, BLOCK: tl.constexpr):
    # one program per row and BLOCK columns; float32 inside, rounded once
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_at = row * 2 * n_cols + cols
    g = tl.load(gate_up + gate_at, mask=mask).to(tl.float32)
    u = tl.load(gate_up + gate_at + n_cols, mask=mask).to(tl.float32)
    dh = tl.load(grad + row * n_cols + cols, mask=mask).to(tl.float32)
    s = tl.sigmoid(g)
    out_type = grad_gate_up.dtype.element_ty
    tl.store(grad_gate_up + gate_at, (dh * u * s * (1 + g * (1 - s))).to(out_type), mask=mask)  # d silu(g) * u
    tl.store(grad_gate_up + gate_at + n_cols, (dh * g * s).to(out_type), mask=mask)


@torch.library.triton_op("gpt::swiglu_backward", mutates_args=())
def swiglu_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    gate_up, grad = gate_up.contiguous(), grad.contiguous()
    n_cols = grad.size(-1)
    grad_gate_up = torch.empty_like(gate_up)
    block = min(1024, triton.next_power_of_2(n_cols))
    grid = (grad.numel() // n_cols, triton.cdiv(n_cols, block))
    launch(gpt_swiglu_backward, grid)(gate_up, grad, grad_gate_up, n_cols, BLOCK=block)
    return grad_gate_up


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up for gate_up = [gate | up] on its last dimension. The forward is torch's (inductor fuses
    it well); the backward writes both halves' gradients in one kernel."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.unflatten(-1, (2, -1)).unbind(-2)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate_up, = ctx.saved_tensors
        return swiglu_backward(gate_up, grad)


@triton.jit
def rotate_heads(src, dst, src_head_stride, dst_head_stride, c, s, sign, heads, j, mask, HALF: tl.constexpr):
    # pairs (x[j], x[j + HALF]) of every head of one token: (x1 c - sign x2 s, x2 c + sign x1 s)
    x1 = tl.load(src + heads * src_head_stride + j, mask=mask).to(tl.float32)
    x2 = tl.load(src + heads * src_head_stride + j + HALF, mask=mask).to(tl.float32)
    tl.store(dst + heads * dst_head_stride + j, (x1 * c - sign * x2 * s).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + heads * dst_head_stride + j + HALF, (x2 * c + sign * x1 * s).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def gpt_rope_forward(qkv, cos, sin, q, k, seq_len, n_head, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    # one program per token: its q and k heads, from qkv (tokens, 3, n_head, 2 HALF) into q, k (tokens, n_head, 2 HALF)
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_P)[None, :]
    mask = (heads < n_head) & (j < HALF)
    at = (token % seq_len) * HALF + j
    c = tl.load(cos + at, mask=j < HALF)
    s = tl.load(sin + at, mask=j < HALF)
    width = n_head * 2 * HALF
    src = qkv + token * 3 * width
    rotate_heads(src, q + token * width, 2 * HALF, 2 * HALF, c, s, 1.0, heads, j, mask, HALF)
    rotate_heads(src + width, k + token * width, 2 * HALF, 2 * HALF, c, s, 1.0, heads, j, mask, HALF)


@triton.jit
def gpt_rope_backward(grad_q, grad_k, grad_v, cos, sin, grad_qkv, seq_len, n_head,
                      gq_b, gq_t, gq_h, gk_b, gk_t, gk_h, gv_b, gv_t, gv_h,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    # one program per token: q's and k's gradients rotated back, v's copied, into grad_qkv (tokens, 3, n_head, 2 HALF);
    # the incoming gradients are (batch, seq, n_head, 2 HALF) at any strides (the last one 1)
    token = tl.program_id(0).to(tl.int64)
    b, t = token // seq_len, token % seq_len
    heads = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_P)[None, :]
    mask = (heads < n_head) & (j < HALF)
    c = tl.load(cos + t * HALF + j, mask=j < HALF)
    s = tl.load(sin + t * HALF + j, mask=j < HALF)
    width = n_head * 2 * HALF
    dst = grad_qkv + token * 3 * width
    rotate_heads(grad_q + b * gq_b + t * gq_t, dst, gq_h, 2 * HALF, c, s, -1.0, heads, j, mask, HALF)
    rotate_heads(grad_k + b * gk_b + t * gk_t, dst + width, gk_h, 2 * HALF, c, s, -1.0, heads, j, mask, HALF)
    v_at = grad_v + b * gv_b + t * gv_t + heads * gv_h + j
    tl.store(dst + 2 * width + heads * 2 * HALF + j, tl.load(v_at, mask=mask), mask=mask)
    tl.store(dst + 2 * width + heads * 2 * HALF + j + HALF, tl.load(v_at + HALF, mask=mask), mask=mask)


def rope_constants(n_head, head_dim, cos, sin, seq_len):
    """The kernels' compile-time constants; refuses the shapes they would read wrongly."""
    if head_dim % 2 or not tuple(cos.shape) == tuple(sin.shape) == (seq_len, head_dim // 2):
        raise ValueError(f"RoPE needs an even head_dim and cos, sin of (seq_len, head_dim/2): head_dim {head_dim}, "
                         f"seq_len {seq_len}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    half = head_dim // 2
    return dict(HALF=half, BLOCK_H=triton.next_power_of_2(n_head), BLOCK_P=triton.next_power_of_2(half))


@torch.library.triton_op("gpt::rope_forward", mutates_args=())
def rope_forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, _, n_head, head_dim = qkv.shape
    qkv, cos, sin = qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous()
    q = qkv.new_empty(B, T, n_head, head_dim)
    k = torch.empty_like(q)
    constants = rope_constants(n_head, head_dim, cos, sin, T)
    launch(gpt_rope_forward, (B * T,))(qkv, cos, sin, q, k, T, n_head, **constants)
    return q, k


@torch.library.triton_op("gpt::rope_backward", mutates_args=())
def rope_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    B, T, n_head, head_dim = grad_q.shape
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k, grad_v)]
    strides = [st for g in grads for st in g.stride()[:3]]
    grad_qkv = grad_q.new_empty(B, T, 3, n_head, head_dim)
    launch(gpt_rope_backward, (B * T,))(
        *grads, cos.float().contiguous(), sin.float().contiguous(), grad_qkv, T, n_head, *strides,
        **rope_constants(n_head, head_dim, cos, sin, T))
    return grad_qkv


class RotaryQKV(torch.autograd.Function):
    """q, k, v from the qkv GEMM's output (B, T, 3, n_head, head_dim), q and k rotated (RoPE, half-split pairs as
    model.apply_rope; cos, sin: (T, head_dim/2)), each (B, T, n_head, head_dim): q and k new, v a view of qkv.
    One kernel each way; the backward writes qkv's whole gradient, v's part too."""

    @staticmethod
    def forward(ctx, qkv, cos, sin):
        ctx.save_for_backward(cos, sin)
        q, k = rope_forward(qkv, cos, sin)
        return q, k, qkv[:, :, 2]

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        return rope_backward(grad_q, grad_k, grad_v, cos, sin), None, None

