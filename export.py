"""
Write a checkpoint as a Hugging Face Llama model folder: config.json for LlamaForCausalLM,
model.safetensors, and the tokenizer of the checkpoint's vocabulary tier.

$ python export.py --ckpt out/stage2/ckpt.pt --out_dir hf/stage2
$ python -c "from transformers import LlamaForCausalLM; LlamaForCausalLM.from_pretrained('hf/stage2')"

A grown model is an ordinary Llama once its generation blocks are glued together. The layouts
already agree, so no weight is permuted: our RoPE pairs (x[j], x[j + head_dim/2]) as Hugging
Face's rotate_half does (Meta's original checkpoints pair neighbours, and their converter
permutes wq and wk; ours need not), and our RMSNorm, like LlamaRMSNorm, normalises in float32,
casts back, then multiplies by the gain.

The tokenizer is the tier's SentencePiece model (the Llama 2 model cut to its first N pieces),
exact for sentencepiece and for converters that read tokenizer.model. transformers 5 rebuilds it
as a BPE whose merges need every lone character in the vocabulary; below tier 29871 those are
cut, so its fast tokenizer spells such text in byte tokens: valid ids, but not ours.
"""
import argparse
import json
import os
import shutil
import tempfile

from model import load_checkpoint, model_from_checkpoint

# ours -> Hugging Face's, within layer i
LAYER_NAMES = {
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
    "ffn.w2": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_state_dict(model):
    """Full weights (the generation blocks assembled) under Hugging Face's names."""
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        for ours, theirs in LAYER_NAMES.items():
            sd[f"model.layers.{i}.{theirs}.weight"] = layer.get_submodule(ours).weight
    return {k: v.detach().contiguous() for k, v in sd.items()}


def hf_config(c, bos_id, eos_id, dtype):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.ffn_hidden,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head,
        "head_dim": c.head_dim, "max_position_embeddings": c.block_size, "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,  # growth scales eps with d_old/d_new: take the grown one
        "rope_theta": c.rope_theta, "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype,
    }


def document_ids(tok):
    """(bos, eos) for the exported config: Llama 2's <s> and </s> (1 and 2 in every tier); a GPT-2 tier has one
    separator, <|endoftext|>, before each document, which also ends the one before."""
    if tok is None or hasattr(tok, "truncated"):
        return (tok.bos_id if tok else 1), 2
    return tok.bos_id, tok.bos_id


def write_tokenizer(tok, out_dir, block_size):
    """tokenizer.model of the tier (ids < N only) and the config that names it a Llama tokenizer."""
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(tok.truncated(tok.vocab_size, dummy_prefix=True).serialized_model_proto())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "model_max_length": block_size,
              "legacy": True}  # legacy: encode exactly as sentencepiece does, as training did
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export(ckpt, out_dir, tok=None):
    """Write ckpt (a checkpoint dict) as a Hugging Face Llama folder; tok: its tier's tokenizer, or None. The
    folder is written beside out_dir (out_dir.part-XXXX) and renamed into place when whole, so a killed export
    leaves no folder of weights and config that disagree; out_dir must not exist or be empty."""
    from safetensors.torch import save_file
    model = model_from_checkpoint(ckpt)
    sd = hf_state_dict(model)
    dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    parent = os.path.dirname(os.path.abspath(out_dir))
    part = None
    try:
        os.makedirs(parent, exist_ok=True)
        part = tempfile.mkdtemp(dir=parent, prefix=f"{os.path.basename(os.path.abspath(out_dir))}.part-")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(part, 0o777 & ~umask)  # not mkdtemp's 0700: the folder goes into place as makedirs would make it
        save_file(sd, os.path.join(part, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(part, "config.json"), "w") as f:
            json.dump(hf_config(model.config, *document_ids(tok), dtype), f, indent=2)
        if tok is not None and not hasattr(tok, "truncated"):
            print(f"{tok.name} is not a SentencePiece tokenizer: no tokenizer files written")
        elif tok is not None:
            write_tokenizer(tok, part, model.config.block_size)
        os.replace(part, out_dir)  # onto a missing or empty folder
    except OSError as e:
        if part:
            shutil.rmtree(part, ignore_errors=True)
        raise SystemExit(f"export.py: cannot write {out_dir}: {e.strerror}; pass another --out_dir") from None


def main(argv=None):
    from sample import checkpoint_tokenizer
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], allow_abbrev=False)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--tokenizer", help="the checkpoint's tokenizer file, if prepare.py cannot find it by name")
    args = ap.parse_args(argv)
    out = args.out_dir
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out) or os.path.samefile(out, os.getcwd())):
        what = "a file" if not os.path.isdir(out) else "not empty" if os.listdir(out) else "the current folder"
        raise SystemExit(f"export.py: --out_dir {out} is {what}; an export is a folder of its own: pass a new one")
    ckpt = load_checkpoint(args.ckpt)  # refuses a checkpoint with NaN or inf: nothing is written
    export(ckpt, args.out_dir, checkpoint_tokenizer(ckpt, args.tokenizer))
    print(f"wrote {args.out_dir}: {', '.join(sorted(os.listdir(args.out_dir)))}")


if __name__ == "__main__":
    main()
