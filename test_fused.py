"""
The switch to liger-kernel's fused kernels (model.py; fused_kernels in train.py and bench.py), on the CPU:

    names     a fused_kernels setting names its ops: '' and 'none' none, 'all' every one of FUSABLE, or
              some joined by '+'; an unknown op is an error that lists them
    refused   asking for them on the CPU, or without liger-kernel, is a one-line SystemExit that changes
              nothing; train.py says so before it reads or writes anything (test_train.py's bad inputs)
    default   a model runs today's code unless asked: no module is fused, asking for none changes no
              bit of the loss or the gradients, and liger-kernel is never imported

Whether the fused kernels compute today's model is checked where they can run, on a GPU: bench.py compares
the loss and every gradient with today's code before it times them (check_fused).

    python -m pytest -q test_fused.py
"""

import sys

import pytest
import torch

import model as M
from model import FUSABLE, GPT, GPTConfig, fused_kernel_names, load_fused_kernels


def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, head_dim=8, ffn_hidden=32, block_size=16))


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    _, loss = model(x, x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def fused_modules(model):
    return {name: m.fused for name, m in model.named_modules() if getattr(m, "fused", None)}


def assert_one_line_exit(excinfo, message):
    text = str(excinfo.value)
    assert message in text and "\n" not in text, text


def test_a_setting_names_its_ops():
    assert fused_kernel_names("") == fused_kernel_names("none") == frozenset()
    assert fused_kernel_names("all") == frozenset(FUSABLE)
    assert fused_kernel_names("rope+swiglu") == {"rope", "swiglu"}
    with pytest.raises(ValueError, match="'rmsnorm' is not one of rms_norm, rope, swiglu, linear_cross_entropy"):
        fused_kernel_names("rope+rmsnorm")


def test_fused_kernels_on_the_cpu_are_a_one_line_error_that_changes_nothing():
    model = small_model()
    with pytest.raises(SystemExit) as excinfo:
        model.use_fused_kernels(fused_kernel_names("all"))
    assert_one_line_exit(excinfo, "fused_kernels=rms_norm+rope+swiglu+linear_cross_entropy runs liger-kernel's "
                                  "Triton kernels, which need a CUDA device, not cpu")
    assert fused_modules(model) == {} and M.LIGER == {}


def test_fused_kernels_without_liger_kernel_are_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed, whether it is or not
    with pytest.raises(SystemExit) as excinfo:
        load_fused_kernels(frozenset({"rope"}), torch.device("cuda"))  # a device object needs no GPU
    assert_one_line_exit(excinfo, "fused_kernels=rope needs liger-kernel, an optional dependency "
                                  "(pip install liger-kernel): importing it failed with ModuleNotFoundError")
    assert M.LIGER == {}


def test_without_fused_kernels_the_model_runs_todays_code():
    model = small_model()
    x = torch.randint(0, 64, (2, 16))
    before = loss_and_grads(model, x)
    model.use_fused_kernels(frozenset())
    after = loss_and_grads(model, x)
    assert fused_modules(model) == {}
    assert torch.equal(before[0], after[0]) and all(torch.equal(g, after[1][n]) for n, g in before[1].items())
    assert "liger_kernel" not in sys.modules
