"""Tests for the KV cache, sample.py and export.py, on a three-generation grown tiny model."""
import copy
import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import export
import prepare
import sample
from grow import condense, grow_model
from model import (CHECKPOINT_FORMAT, GPT, GPTConfig, StaticDecoder, load_checkpoint, model_from_checkpoint,
                   save_checkpoint, stacked_weight)
from prepare import LLAMA2_PATH as LLAMA2, load_tokenizer

TIER = 1024


def test_no_file_of_ours_shadows_an_installed_package():
    """Our folder comes first on sys.path, so a file named as an installed package replaces it for every library:
    transformers 5 imports the `kernels` package (Hugging Face's, which it installs), and our kernels.py, since
    renamed gpt_kernels.py, broke export with 'cannot import name CUDAProperties from kernels'."""
    ours = {path.stem for path in Path(__file__).parent.glob("*.py")}
    shadowed = ours & importlib.metadata.packages_distributions().keys()
    assert not shadowed, f"rename {sorted(shadowed)}: installed packages of that name would import our file instead"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(LLAMA2, TIER)


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory, tok):
    """Three generations (512 -> 768 -> 1024 tokens, wider and deeper each time), every weight
    moved off its init so the zero writers of the grown blocks take part."""
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=512, n_layer=2, n_head=2, head_dim=8, ffn_hidden=32, block_size=64, rope_theta=500.0)
    model = GPT(c)
    for grown in (replace(c, vocab_size=768, n_layer=3, n_head=3, ffn_hidden=48),
                  replace(c, vocab_size=TIER, n_layer=4, n_head=4, ffn_hidden=64)):
        model, _ = grow_model(model, grown, vocab_init="random", head_init="zero")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert model.generations() == [0, 1, 2] and model.config.norm_eps != c.norm_eps
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": asdict(model.config),
                     "optimizer": {}, "generations": [], "iter_num": 0,
                     "data": {"tokenizer": "llama2", "tokenizer_sha256": tok.sha256, "vocab_size": TIER,
                              "data_dir": ""}}, path)
    return str(path)


@pytest.fixture(scope="module")
def model(ckpt_path):
    return model_from_checkpoint(load_checkpoint(ckpt_path)).eval()


def test_export_logits_match_transformers(ckpt_path, model, tmp_path):
    from transformers import LlamaForCausalLM
    export.main(["--ckpt", ckpt_path, "--out_dir", str(tmp_path), "--tokenizer", LLAMA2])  # an empty folder
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rms_norm_eps"] == model.config.norm_eps and config["vocab_size"] == TIER
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, TIER, (2, model.config.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_export_names_each_tokenizer_familys_document_tokens(tok, tmp_path):
    """Llama 2's <s> and </s>; a GPT-2 tier's one separator, <|endoftext|> (its last id), for both: id 2 there is an
    ordinary token, where transformers' generate would stop."""
    from test_prepare import small_rank_table
    small_rank_table(tmp_path / "ranks.tiktoken")
    gpt2 = load_tokenizer("gpt2", 300, gpt2_ranks=str(tmp_path / "ranks.tiktoken"))
    assert export.document_ids(tok) == (1, 2) and export.document_ids(gpt2) == (299, 299)


def test_export_tokenizer_is_the_tier(ckpt_path, tok, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    export.main(["--ckpt", ckpt_path, "--out_dir", str(tmp_path), "--tokenizer", LLAMA2])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    text = "  To be, or not to be: that is the question. Café 日本 🦙"
    assert sp.get_piece_size() == TIER and sp.encode(text) == tok.encode(text)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = hf_tok(text)["input_ids"]
    assert len(hf_tok) == TIER and ids[0] == tok.bos_id and max(ids) < TIER  # see export.py on transformers 5


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_with_cache_equals_without(model, cache):
    """Token for token, two rows of a 7-token prompt. "static" is StaticDecoder's step (a position tensor, the
    whole cache behind a mask: what the CUDA graph replays), eager."""
    idx = torch.randint(0, TIER, (2, 7), generator=torch.Generator().manual_seed(2))
    if cache == "static":
        cached = StaticDecoder(model, 2, 47).generate(idx, 40, temperature=0)
    else:
        cached = model.generate(idx, 40, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(idx, 40, temperature=0, use_cache=False))


def test_static_steps_equal_full_forward(model):
    """Positions as a tensor: a 9-token prompt, then one token a step. The cache is longer than the sequence,
    so the positions not written yet must be masked out."""
    idx = torch.randint(0, TIER, (2, 40), generator=torch.Generator().manual_seed(4))
    cache = model.new_kv_cache(2, 48)
    with torch.no_grad():
        chunks = [model(idx[:, :9], kv_cache=cache, start_pos=torch.arange(9))[0]]
        chunks += [model(idx[:, t:t + 1], kv_cache=cache, start_pos=torch.tensor([t]))[0] for t in range(9, 40)]
        full = model(idx)[0]
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("temperature, top_k", [(0, None), (0.8, 20)])
def test_decode_step_compiles_to_one_graph(model, temperature, top_k):
    """fullgraph=True raises at a graph break (a read back to Python, a shape that follows the position), which
    would leave CUDA graphs nothing to capture; the eager backend keeps the eager random stream."""
    idx = torch.randint(0, TIER, (2, 7), generator=torch.Generator().manual_seed(5))
    compiled = StaticDecoder(model, 2, 20)
    compiled.step = torch.compile(GPT.decode_step, backend="eager", fullgraph=True, dynamic=False)
    outputs = []
    for decoder in (StaticDecoder(model, 2, 20), compiled):
        torch.manual_seed(0)
        outputs.append(decoder.generate(idx, 13, temperature, top_k))
    assert torch.equal(*outputs)


def test_joined_weights_are_read_in_place_and_keep_the_logits(model):
    """sample.py's model: condensed, then q, k, v (gate, up) moved into one storage each, which the stacked GEMM
    reads as a view instead of copying them together for every token."""
    joined = condense(copy.deepcopy(model), 2)[0]
    idx = torch.randint(0, TIER, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = joined(idx)[0]
        joined.join_stacked_weights()
        assert torch.equal(joined(idx)[0], before)
    for stack in ((layer.attn.wq, layer.attn.wk, layer.attn.wv) for layer in joined.layers):
        names, parts = zip(*(g.parts() for g in stack))
        w = stacked_weight(";".join(",".join(n) for n in names), [t for p in parts for t in p], torch.float32)
        assert w.data_ptr() == stack[0].g2.data_ptr() and torch.equal(w, torch.cat([g.weight for g in stack]))
    prompt = torch.randint(0, TIER, (2, 7), generator=torch.Generator().manual_seed(7))  # sample.py's path, greedy
    assert torch.equal(StaticDecoder(joined, 2, 27).generate(prompt, 20, temperature=0),
                       model.generate(prompt, 20, temperature=0, use_cache=False))
    with pytest.raises(ValueError, match="condense the model first"):
        copy.deepcopy(model).join_stacked_weights()


def test_cache_in_chunks_equals_full_forward(model):
    """Several tokens at start_pos > 0 is the case where is_causal alone would be wrong."""
    idx = torch.randint(0, TIER, (2, 40), generator=torch.Generator().manual_seed(3))
    cache = model.new_kv_cache(2, 40)
    with torch.no_grad():
        chunks = [model(idx[:, a:b], kv_cache=cache, start_pos=a)[0] for a, b in ((0, 9), (9, 10), (10, 40))]
        full = model(idx)[0]
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() < 1e-5


def test_bench_samples_on_the_cpu():
    """bench.py --sample=True with stage 3's config file, shrunk: every decoder but the compiled one."""
    shrink = ["--n_layer=2", "--n_head=2", "--head_dim=16", "--ffn_hidden=64", "--vocab_size=256"]
    out = subprocess.run([sys.executable, "bench.py", "config/stage3.py", "--sample=True", "--max_new_tokens=4",
                          "--sample_modes=none,dynamic,static", *shrink], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [
        [mode, weights] for mode in ("none", "dynamic", "static") for weights in ("joined", "copied")]
    assert out.count(" tokens/s ") == 6 and "16 prompt + 4 new tokens, cpu, float32" in out



def test_bench_refuses_an_unknown_attention_backend_in_one_line():
    r = subprocess.run([sys.executable, "bench.py", "config/stage1.py", "--attention=flash,fa3"], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 1 and r.stderr.strip() == "bench.py: --attention=flash,fa3: pick from default,flash,cudnn"

def test_sample_cli(ckpt_path, capsys):
    sample.main(["--ckpt", ckpt_path, "--tokenizer", LLAMA2, "--prompt", "ROMEO:", "--num_samples", "2",
                 "--max_new_tokens", "10", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and out.count("tokens/s (KV cache on") == 2
    with pytest.raises(SystemExit, match="do not fit block_size 64"):
        sample.main(["--ckpt", ckpt_path, "--tokenizer", LLAMA2, "--prompt", "word " * 60, "--device", "cpu"])
    with pytest.raises(SystemExit, match="not a SentencePiece BPE model"):
        sample.main(["--ckpt", ckpt_path, "--tokenizer", ckpt_path])


def test_the_recorded_tokenizer_needs_no_flag(ckpt_path, tmp_path, monkeypatch, capsys):
    """prepare.py records a tokenizer given by path as its absolute path, and train.py copies meta.json's
    record into the checkpoint: sample.py and export.py find it from any folder, offline, without --tokenizer."""
    monkeypatch.setattr(prepare, "CACHE", str(tmp_path / "empty_cache"))
    (tmp_path / "in.txt").write_text("one\n\ntwo")
    monkeypatch.chdir(os.path.dirname(os.path.abspath(LLAMA2)))
    prepare.prepare(str(tmp_path / "in.txt"), os.path.basename(LLAMA2), [TIER], str(tmp_path), val_fraction=0.5,
                    workers=1)
    meta = json.loads((tmp_path / f"llama2_v{TIER}" / "meta.json").read_text())
    ckpt, path = load_checkpoint(ckpt_path), tmp_path / "ckpt.pt"
    save_checkpoint({**ckpt, "data": {**ckpt["data"], "tokenizer": meta["tokenizer"]}}, path)  # as train.py does
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    sample.main(["--ckpt", str(path), "--prompt", "ROMEO:", "--num_samples", "1", "--max_new_tokens", "3",
                 "--device", "cpu"])
    assert capsys.readouterr().out.startswith("ROMEO:")
    export.main(["--ckpt", str(path), "--out_dir", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "tokenizer.model").is_file()


@pytest.mark.parametrize("flag, value", [("max_new_tokens", "-1"), ("top_k", "-5"), ("temperature", "-0.5"),
                                         ("temperature", "nan")])
def test_sample_refuses_a_negative_setting_in_one_line(ckpt_path, flag, value):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", ckpt_path, "--tokenizer", LLAMA2, f"--{flag}={value}", "--device", "cpu"])
    assert e.value.code.startswith(f"sample.py: --{flag}={value} is not allowed; pass 0 ") and "\n" not in e.value.code


@pytest.mark.parametrize("args, message", [
    (["--num_samples=0"], "--num_samples=0 is not allowed; pass 1 or more"),
    (["--device=gpu"], "device='gpu' is not one this code runs on: pass cpu, cuda or cuda:N"),
    (["--device=meta"], "device='meta' is not one this code runs on"),
    *([] if torch.cuda.is_available() else [(["--device=cuda:0"], "device='cuda:0' but this torch has no usable CUDA")]),
    (["--prompt=\udcff\udcfe"], "the prompt is not UTF-8 text"),  # how Python passes argv bytes that are not UTF-8
    (["--prompt_file={tmp}/latin1.txt"], "the prompt file is not UTF-8 text")])
def test_sample_refuses_bad_arguments_in_one_line(ckpt_path, tmp_path, args, message):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", ckpt_path, "--tokenizer", LLAMA2, *[a.format(tmp=tmp_path) for a in args]])
    assert e.value.code.startswith(f"sample.py: {message}") and "\n" not in e.value.code


def test_sample_allows_greedy_and_every_token(ckpt_path, capsys):
    """temperature 0 is greedy and top_k 0 keeps every token: both are settings, not errors."""
    for _ in range(2):
        sample.main(["--ckpt", ckpt_path, "--tokenizer", LLAMA2, "--temperature=0", "--top_k=0", "--num_samples=1",
                     "--max_new_tokens=5", "--device", "cpu"])
    first, second = capsys.readouterr().out.split("\n")[0::2][:2]
    assert first == second, "greedy is deterministic"


def test_export_keeps_an_existing_folder_and_leaves_no_partial_one(ckpt_path, tmp_path, monkeypatch):
    run = tmp_path / "run"  # a training run's folder: its config.json is not Hugging Face's
    run.mkdir()
    (run / "config.json").write_text('{"learning_rate": 0.001}')
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # empty, but a folder cannot be renamed onto the current one
    for out_dir, what in ((run, "not empty"), (tmp_path / "afile", "a file"), (".", "the current folder")):
        with pytest.raises(SystemExit) as e:
            export.main(["--ckpt", ckpt_path, "--out_dir", str(out_dir), "--tokenizer", LLAMA2])
        assert e.value.code == (f"export.py: --out_dir {out_dir} is {what}; an export is a folder of its own: "
                                "pass a new one")
    assert (run / "config.json").read_text() == '{"learning_rate": 0.001}' and os.listdir(run) == ["config.json"]
    assert (tmp_path / "afile").read_text() == "keep me"
    (tmp_path / "hf.part").mkdir()  # a folder of the user's that happens to bear the name: kept
    export.main(["--ckpt", ckpt_path, "--out_dir", str(tmp_path / "hf"), "--tokenizer", LLAMA2])
    assert sorted(os.listdir(tmp_path)) == ["afile", "here", "hf", "hf.part", "run"], "no .part folder left beside it"
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~current_umask()


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_sample_and_export_refuse_a_non_finite_checkpoint(ckpt_path, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    bad = {k: v.clone() for k, v in ckpt["model"].items()}
    bad["layers.0.ffn.w2.g1_cols"].view(-1)[0] = float("nan")
    torch.save({**ckpt, "model": bad}, tmp_path / "nan.pt")  # save_checkpoint would refuse it: torch.save does not
    for main, args in ((sample.main, ["--tokenizer", LLAMA2, "--device", "cpu"]),
                       (export.main, ["--tokenizer", LLAMA2, "--out_dir", str(tmp_path / "hf")])):
        with pytest.raises(SystemExit) as e:
            main(["--ckpt", str(tmp_path / "nan.pt"), *args])
        assert e.value.code == (f"{tmp_path / 'nan.pt'}: model.layers.0.ffn.w2.g1_cols holds NaN or inf (the run "
                                "diverged); pass an earlier checkpoint")
    assert not (tmp_path / "hf").exists()
