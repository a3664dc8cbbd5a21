"""Tests for model.py's checkpoints: never a non-finite one written or used, a full disk and a dict
that only looks like a checkpoint each in one line, the previous checkpoint kept."""
import errno
import os
from dataclasses import asdict

import pytest
import torch

import model
from model import (CHECKPOINT_FORMAT, CHECKPOINT_KEYS, GPT, GPTConfig, NonFiniteCheckpoint, load_checkpoint,
                   model_from_checkpoint, save_checkpoint)


def tiny_checkpoint(seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, head_dim=4, ffn_hidden=16, block_size=8))
    optimizer = {name: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.ones_like(p)}
                 for name, p in m.named_parameters()}
    return {"model": m.state_dict(), "model_config": asdict(m.config), "optimizer": optimizer, "iter_num": 7,
            "rng": {"torch": torch.get_rng_state()}, "generations": [{"gen": 0, "birth": 0}],
            "data": {"tokenizer": "llama2", "tokenizer_sha256": "0" * 64, "vocab_size": 64}}


@pytest.fixture
def good(tmp_path):
    """A good checkpoint on disk, and its bytes."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(tiny_checkpoint(), path)
    return path, path.read_bytes()


def assert_kept(path, data):
    assert path.read_bytes() == data, "the previous checkpoint is untouched"
    assert sorted(os.listdir(path.parent)) == [path.name], "no temporary file beside it"


BAD_TENSORS = [  # (where the bad value goes, the key the message names)
    (lambda c: c["model"]["layers.1.attn.wq.g0"].view(-1)[5].fill_(float("nan")), "model.layers.1.attn.wq.g0"),
    (lambda c: c["optimizer"]["lm_head.g0"]["exp_avg_sq"].view(-1)[-1].fill_(float("inf")),
     "optimizer.lm_head.g0.exp_avg_sq"),
    (lambda c: c["model"]["norm.g0"].fill_(-float("inf")), "model.norm.g0"),
    (lambda c: c.update(extra=[torch.ones(2), {"t": torch.tensor([1.0, float("nan")]).bfloat16()}]), "extra.1.t"),
]


@pytest.mark.parametrize("poison, key", BAD_TENSORS)
def test_a_non_finite_checkpoint_is_not_written(good, poison, key):
    path, data = good
    ckpt = tiny_checkpoint(seed=1)
    poison(ckpt)
    with pytest.raises(NonFiniteCheckpoint, match=f"{path}: {key} holds NaN or inf .*not written, the previous "
                                                  "checkpoint is kept") as e:
        save_checkpoint(ckpt, path)
    assert "\n" not in str(e.value)
    assert_kept(path, data)


@pytest.mark.parametrize("poison, key", BAD_TENSORS[:2])
def test_a_non_finite_checkpoint_is_refused_at_load(tmp_path, poison, key):
    ckpt = tiny_checkpoint()
    poison(ckpt)
    torch.save({**ckpt, "format": CHECKPOINT_FORMAT}, tmp_path / "nan.pt")  # as an older version wrote it
    with pytest.raises(SystemExit, match=f"{key} holds NaN or inf .*pass an earlier checkpoint") as e:
        load_checkpoint(tmp_path / "nan.pt")
    assert "\n" not in e.value.code


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_in_torch_writer(*args, **kwargs):
    """What torch.save does on a full disk: its zip writer's RuntimeErrors chained to the OSError."""
    try:
        full_disk()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("save", [full_disk, full_disk_in_torch_writer])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(good, monkeypatch, save):
    path, data = good
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):  # a part of the file is on disk when the disk fills up
        f.write(b"PK\x03\x04 half a zip")
        save()
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(SystemExit) as e:
        save_checkpoint(tiny_checkpoint(seed=1), path)
    assert e.value.code == (f"cannot write {path}: no space left on device; free space on that disk and run again "
                            "(the previous checkpoint is kept)")
    assert_kept(path, data)
    monkeypatch.setattr(torch, "save", real_save)
    assert model_from_checkpoint(load_checkpoint(path)) is not None


def test_a_full_disk_at_the_first_save_says_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"no space left on device; .*\(no checkpoint was written\)"):
        save_checkpoint(tiny_checkpoint(), tmp_path / "ckpt.pt")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_a_save_stays_an_interrupt(good, monkeypatch):
    path, data = good
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_checkpoint(seed=1), path)
    assert_kept(path, data)


@pytest.mark.parametrize("key", [*CHECKPOINT_KEYS, "data.tokenizer_sha256", "data.vocab_size"])
def test_a_checkpoint_without_a_required_key_is_one_line(tmp_path, key):
    ckpt = tiny_checkpoint()
    outer, _, inner = key.partition(".")
    (ckpt[outer] if inner else ckpt).pop(inner or outer)
    torch.save({**ckpt, "format": CHECKPOINT_FORMAT}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        load_checkpoint(tmp_path / "ckpt.pt")
    assert e.value.code.startswith(f"{tmp_path / 'ckpt.pt'} has the checkpoint format but no '{key}'")
    assert "\n" not in e.value.code and e.value.code.endswith("pass another")


def test_resume_keys_are_what_train_py_reads(tmp_path):
    """load_checkpoint(path, CHECKPOINT_KEYS + RESUME_KEYS) asks for more: a resume's keys."""
    ckpt = tiny_checkpoint()
    save_checkpoint(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="but no 'stage_start'"):
        load_checkpoint(tmp_path / "ckpt.pt", model.CHECKPOINT_KEYS + model.RESUME_KEYS)
    save_checkpoint({**ckpt, **{k: 0 for k in model.RESUME_KEYS if k not in ckpt}}, tmp_path / "ckpt.pt")
    assert load_checkpoint(tmp_path / "ckpt.pt", model.CHECKPOINT_KEYS + model.RESUME_KEYS)["iter_num"] == 7
