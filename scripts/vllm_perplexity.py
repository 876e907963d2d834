"""Perplexity of a compressed-tensors output in vLLM and in rfid-moe on the same token windows.

Usage (in the environment scripts/vllm-env.sh prints):
    python scripts/vllm_perplexity.py --model DIR --text FILE [--windows 16] [--seq-len 512]
        [--rfid-moe BIN]

The text is tokenised with DIR/tokenizer.json (documents joined, as one stream) and cut into
the first WINDOWS non-overlapping windows of SEQ_LEN tokens. vLLM scores them by prompt
log-probabilities (bfloat16 where its kernels need it, else float32); rfid-moe by `rfid-moe
logits` (f32) on the same ids. Both count every token after the first of each window. Prints
one markdown row: model, expert schemes, vLLM dtype, both perplexities and their relative
difference.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from ct_vllm import score  # noqa: E402  (the opt-in test's own scorer)


def windows_of(model, text, count, seq_len):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    with open(text) as f:
        ids = tokenizer.encode(f.read()).ids
    if len(ids) < count * seq_len:
        sys.exit(f"{text}: {len(ids)} tokens, fewer than {count} windows of {seq_len}")
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(count)]


def rfid_moe_perplexity(binary, model, windows):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    with tempfile.TemporaryDirectory() as work:
        tokens = os.path.join(work, "tokens.safetensors")
        out = os.path.join(work, "logits.safetensors")
        save_file({"input_ids": np.array(windows, dtype=np.int64)}, tokens)
        subprocess.run(
            [binary, "logits", "--model", model, "--tokens", tokens, "--out", out], check=True
        )
        logits = load_file(out)["logits"].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nll, tokens = 0.0, 0
    for w, window in enumerate(windows):
        for t in range(1, len(window)):
            nll -= logp[w, t - 1, window[t]]
            tokens += 1
    return math.exp(nll / tokens)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rfid-moe", default="rfid-moe")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    windows = windows_of(args.model, args.text, args.windows, args.seq_len)
    ours = rfid_moe_perplexity(args.rfid_moe, args.model, windows)
    theirs, dtype = None, None
    for dtype in ("float32", "bfloat16"):
        try:
            theirs = score(args.model, dtype, windows)["perplexity"]
            break
        except Exception as error:  # the next dtype is tried
            print(f"vLLM refused {dtype}: {error}", file=sys.stderr)
    if theirs is None:
        sys.exit(f"vLLM loaded {args.model} in no dtype")
    config = json.load(open(os.path.join(args.model, "config.json")))
    groups = config.get("quantization_config", {}).get("config_groups", {})
    schemes = sorted(
        {f"int{g['weights']['num_bits']}-g{g['weights']['group_size']}" for g in groups.values()}
    )
    print(
        f"| {os.path.basename(os.path.normpath(args.model))} | {','.join(schemes) or 'none'} "
        f"| {dtype} | {theirs:.4f} | {ours:.4f} | {(theirs - ours) / ours:+.2e} |"
    )


if __name__ == "__main__":
    main()
