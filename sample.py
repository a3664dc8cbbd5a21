"""
Sample from a checkpoint, decoding through the checkpoint's own vocabulary tier.

$ python sample.py --ckpt out/stage2/ckpt.pt --prompt "ROMEO:" --num_samples 3 --max_new_tokens 100
$ python sample.py --ckpt out/stage2/ckpt.pt --prompt_file prompt.txt --temperature 0     # greedy
$ python sample.py --ckpt out/stage2/ckpt.pt --no_cache      # recompute the prefix at every step
$ python sample.py --ckpt out/stage2/ckpt.pt --no_compile    # on CUDA: launch every kernel from Python

Each sample ends with its speed in tokens/s (prompt processing included); --no_cache shows what
the KV cache saves. With the cache, every token after the prompt runs one static-shape decode step
(model.StaticDecoder), compiled into a CUDA graph by default on CUDA.
"""
import argparse
import functools
import os
import time

import torch

from grow import condense
from model import StaticDecoder, load_checkpoint, model_from_checkpoint, runnable_device_type
from prepare import PrepareError, load_tokenizer


def checkpoint_tokenizer(ckpt, path=None):
    """The tokenizer tier the checkpoint was trained on; path says where its file is, if not
    where prepare.py finds it by name. The file must be the one the checkpoint names."""
    data = ckpt["data"]
    try:
        return load_tokenizer(path or data["tokenizer"], data["vocab_size"], sha256=data["tokenizer_sha256"])
    except PrepareError as e:
        raise SystemExit(f"tokenizer: {e}")


def check_args(args):
    """Refuse what generate would take silently (a negative count) or fail on deep inside (a negative scale)."""
    for flag, value, allowed in (("max_new_tokens", args.max_new_tokens, "0 or more"),
                                 ("top_k", args.top_k, "0 (every token) or more"),
                                 ("temperature", args.temperature, "0 (greedy) or more")):
        if not value >= 0:  # NaN too
            raise SystemExit(f"sample.py: --{flag}={value} is not allowed; pass {allowed}")
    if args.num_samples < 1:
        raise SystemExit(f"sample.py: --num_samples={args.num_samples} is not allowed; pass 1 or more")
    if args.device is not None:
        try:
            runnable_device_type(args.device)
        except ValueError as e:
            raise SystemExit(f"sample.py: {e}") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], allow_abbrev=False)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    ap.add_argument("--prompt_file", help="read the prompt from this file instead")
    ap.add_argument("--num_samples", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    ap.add_argument("--top_k", type=int, default=200, help="0 keeps every token")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--no_cache", action="store_true", help="run without the KV cache (slower)")
    ap.add_argument("--compile", action="store_true", default=None,
                    help="compile the decode step into a CUDA graph (the default on cuda)")
    ap.add_argument("--no_compile", dest="compile", action="store_false", help="launch every kernel from Python")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--tokenizer", help="the checkpoint's tokenizer file, if prepare.py cannot find it by name")
    args = ap.parse_args(argv)
    check_args(args)

    ckpt = load_checkpoint(args.ckpt)  # refuses a checkpoint with NaN or inf
    tok = checkpoint_tokenizer(ckpt, args.tokenizer)
    model = model_from_checkpoint(ckpt)
    del ckpt
    # one block per weight, and q, k, v (gate, up) in one storage each: no weight copied together at every token
    condense(model, max(model.generations()))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model.to(device, dtype).eval().join_stacked_weights()

    if args.prompt_file and not os.path.isfile(args.prompt_file):
        raise SystemExit(f"no prompt file {args.prompt_file}")
    try:
        prompt = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
        prompt.encode("utf-8")  # a shell can pass bytes that are not UTF-8 as lone surrogates
    except UnicodeError:
        raise SystemExit(f"sample.py: the prompt{' file' if args.prompt_file else ''} is not UTF-8 text; "
                         "pass UTF-8") from None
    ids = [tok.bos_id] + tok.encode(prompt)  # training documents start with BOS
    block_size = model.config.block_size
    if len(ids) + args.max_new_tokens > block_size:
        raise SystemExit(f"the prompt is {len(ids)} tokens (with BOS) and {args.max_new_tokens} new tokens "
                         f"do not fit block_size {block_size}; shorten the prompt or --max_new_tokens")
    x = torch.tensor([ids], device=device)

    compiled = not args.no_cache and (device.startswith("cuda") if args.compile is None else args.compile)
    if args.no_cache:
        generate = functools.partial(model.generate, use_cache=False)
    else:
        generate = StaticDecoder(model, 1, len(ids) + args.max_new_tokens, compile=compiled).generate
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    # warm-up: CUDA and cuDNN load their kernels on first use, and a compiled step compiles at its first call
    # and records its CUDA graph at the second: seconds that are not the sampling speed
    generate(x, min(3, args.max_new_tokens), args.temperature, args.top_k or None)
    torch.manual_seed(args.seed)
    for _ in range(args.num_samples):
        sync()
        t0 = time.perf_counter()
        y = generate(x, args.max_new_tokens, args.temperature, args.top_k or None)
        sync()
        dt = time.perf_counter() - t0
        print(tok.decode(y[0, 1:].tolist()))
        print(f"---------- {args.max_new_tokens} tokens in {dt:.2f}s: {args.max_new_tokens / dt:.1f} tokens/s "
              f"(KV cache {'off' if args.no_cache else 'on'}{', compiled' if compiled else ''}, {device}, "
              f"{str(dtype)[6:]})")


if __name__ == "__main__":
    main()
