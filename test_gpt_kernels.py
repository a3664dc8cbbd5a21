"""gpt_kernels.py's Triton kernels against float64 references of the model's own torch code: on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: Triton reads it when a kernel is defined, and model.py
has imported gpt_kernels.py by then), on CUDA in bf16 (eager and compiled) and float16, and in a model's training
step."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, apply_rope, rope_cache

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (requirements.txt installs it on Linux x86-64)")


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def assert_kernels_match_float64(device, dtype, compiled, tolerance):
    """SwiGLU's gradient and RotaryQKV's values and gradient at shapes whose widths are not powers of two (masked
    lanes), against the model's torch code in float64; AssertionError names the first that is off."""
    import gpt_kernels
    torch.manual_seed(0)
    swiglu, rotary = gpt_kernels.SwiGLU.apply, gpt_kernels.RotaryQKV.apply
    if compiled:
        swiglu, rotary = torch.compile(swiglu), torch.compile(rotary)
    for rows, width in [(7, 100), (3, 1100)]:  # one masked block of columns; two, the second masked
        gate_up = torch.randn(rows, 2 * width, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(rows, width, device=device, dtype=dtype)
        want_x = gate_up.detach().double().requires_grad_()
        gate, up = want_x.chunk(2, dim=-1)
        want = F.silu(gate) * up
        want.backward(grad.double())
        swiglu(gate_up).backward(grad)  # the forward is torch's; the backward is the kernel
        error = relative_error(gate_up.grad, want_x.grad)
        assert error < tolerance, f"SwiGLU {rows}x{width}: gradient off by {error:.2e}"
    for B, T, n_head, head_dim in [(2, 5, 3, 6), (1, 9, 2, 8)]:
        qkv = torch.randn(B, T, 3, n_head, head_dim, device=device, dtype=dtype, requires_grad=True)
        cos, sin = (t[:T].to(device) for t in rope_cache(head_dim, 16, 10000.0))
        want_x = qkv.detach().double().requires_grad_()
        q, k, v = want_x.permute(2, 0, 3, 1, 4)  # as Attention, (B, n_head, T, head_dim)
        want = apply_rope(q, cos.double(), sin.double()), apply_rope(k, cos.double(), sin.double()), v
        # the incoming gradients (B, n_head, T, head_dim) at three layouts: the kernel reads each at its own strides
        grads = [torch.randn(B, n_head, T, head_dim, device=device, dtype=dtype),
                 torch.randn(B, T, n_head, head_dim, device=device, dtype=dtype).transpose(1, 2),
                 torch.randn(B, T, 3, n_head, head_dim, device=device, dtype=dtype)[:, :, 1].transpose(1, 2)]
        sum((w * g.double()).sum() for w, g in zip(want, grads)).backward()
        got = [t.transpose(1, 2) for t in rotary(qkv, cos, sin)]
        torch.autograd.backward(got, grads)
        for name, o, w in zip("qkv", got, want):
            assert relative_error(o, w) < tolerance, f"RoPE {(B, T, n_head, head_dim)}: {name} off"
        error = relative_error(qkv.grad, want_x.grad)
        assert error < tolerance, f"RoPE {(B, T, n_head, head_dim)}: qkv's gradient off by {error:.2e}"


def test_kernels_match_torch_under_triton_interpreter():
    code = ("import torch, test_gpt_kernels; "
            "test_gpt_kernels.assert_kernels_match_float64('cpu', torch.float32, False, 1e-5)")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


cuda = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                          reason="needs a GPU that Triton supports (CUDA, compute capability 8.0 or more)")


@cuda
@pytest.mark.parametrize("dtype, compiled", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)])
def test_kernels_match_torch_on_cuda(dtype, compiled):
    assert_kernels_match_float64("cuda", dtype, compiled, 1e-2)


@cuda
def test_a_training_step_with_triton_kernels_matches_torch_code(monkeypatch):
    config = GPTConfig(vocab_size=256, n_layer=2, n_head=3, head_dim=16, ffn_hidden=96, block_size=32)
    torch.manual_seed(0)
    model = GPT(config).cuda()
    x = torch.randint(0, 256, (4, 32), device="cuda")
    grads = {}
    for on in (True, False):
        assert model.use_triton_kernels(on) == on
        import gpt_kernels
        calls = []
        for name in ("SwiGLU", "RotaryQKV"):  # count the Functions' calls: the kernels ran, or did not
            function = getattr(gpt_kernels, name)
            monkeypatch.setattr(function, "apply", lambda *a, f=function.apply, n=name: calls.append(n) or f(*a))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        assert len(calls) == (2 * config.n_layer if on else 0), calls
        monkeypatch.undo()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    for name, want in grads[False].items():
        assert relative_error(grads[True][name], want.double()) < 0.02, name
