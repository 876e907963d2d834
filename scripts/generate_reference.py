"""Writes transformers' greedy-generation references for one model directory as JSON.

Run with the pinned environment of scripts/python-env.sh, from the repository root:

    PY=$(scripts/python-env.sh | tail -n 1)
    # a model with tokenizer.json: prompts are line starts of a text file
    "$PY" scripts/generate_reference.py models/mini-moe-docs \
        tests/fixtures/generate/mini-moe-docs.json \
        --prompts-from models/mini-moe-docs/test.txt --keep 3 --max-new-tokens 40 --eos-case
    # a random fixture without a tokenizer: random id prompts with a fixed seed
    "$PY" scripts/generate_reference.py tests/fixtures/tiny-mixtral \
        tests/fixtures/generate/tiny-mixtral.json \
        --random-prompts --keep 2 --max-new-tokens 16 --eos-case
    (tests/fixtures/generate/README.md has the exact commands of the committed files.)

The model is loaded with AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32) and run with
model.generate(do_sample=False, use_cache=True, max_new_tokens=N) under its default generation
config, with eos_token_id set explicitly to what that config says (null when it names none). For
every candidate prompt the top-1 minus top-2 logit gap ("margin") of each generated step is
recorded; the candidates that run the full max_new_tokens and whose smallest margin is largest are
kept, so that tiny numeric differences in another implementation cannot flip a greedy choice
(--eos-case adds the longest candidate that stopped at eos; like transformers, its generated_ids end
with the eos id). Each kept case is also checked against a cache-free forward pass over the whole
sequence (cache_free_argmax_agrees, cache_free_max_abs_logit_diff), and a fixture's own
reference.safetensors logits must be reproduced first (reference_logits_max_abs_diff).
"""

import argparse
import hashlib
import json
import os
import random
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

MIN_SAFE_MARGIN = 1e-3  # a smallest top-1 / top-2 logit gap below this is reported as unsafe
REFERENCE_TOLERANCE = 1e-4  # largest |logit difference| allowed against reference.safetensors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("out_json")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--keep", type=int, default=2, help="cases kept (largest minimum margin first)")
    p.add_argument("--candidates", type=int, default=24, help="candidate prompts tried")
    p.add_argument("--name", help="model name written to the JSON (default: directory name)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a text prompt (repeatable); all are kept")
    src.add_argument("--prompts-from", help="text file whose line starts are candidate prompts")
    src.add_argument("--random-prompts", action="store_true", help="random id prompts")
    p.add_argument("--eos-case", action="store_true",
                   help="also keep the longest candidate whose generation stopped at eos")
    p.add_argument("--words", type=int, default=6, help="words per line-start prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the random id prompts")
    p.add_argument("--min-len", type=int, default=5)
    p.add_argument("--max-len", type=int, default=12)
    return p.parse_args()


def line_start_prompts(path, words, count):
    """The first `words` words of prose-like lines (capital first letter, letters and spaces)."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line[:1] in (" ", "\t") or not line[:1].isupper():
                continue
            head = line.split()[:words]
            text = " ".join(head)
            if len(head) < words or not all(w.isalpha() for w in head[:-1]) or text in prompts:
                continue
            prompts.append(text)
            if len(prompts) == count:
                break
    return prompts


def random_id_prompts(vocab_size, avoid, seed, count, min_len, max_len):
    """`count` distinct random id lists, lengths in [min_len, max_len], avoiding special ids."""
    rng = random.Random(seed)
    allowed = [i for i in range(vocab_size) if i not in avoid]
    prompts = []
    while len(prompts) < count:
        ids = [rng.choice(allowed) for _ in range(rng.randint(min_len, max_len))]
        if ids not in prompts:
            prompts.append(ids)
    return prompts


def as_id_set(value):
    """An id, a list of ids or None as a set of ids."""
    if value is None:
        return set()
    return set(value) if isinstance(value, (list, tuple)) else {value}


def greedy_case(model, prompt_ids, max_new_tokens, eos_token_id, pad_token_id):
    """Greedy generation with the KV cache, its per-step margins and a cache-free cross-check."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            use_cache=True,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        generated = out.sequences[0, len(prompt_ids):].tolist()
        step_logits = torch.stack([l[0].float() for l in out.logits])  # (steps, vocab)
        full = model(input_ids=out.sequences, use_cache=False).logits[0].float()
    if step_logits.shape[0] != len(generated):
        raise RuntimeError(f"{len(generated)} tokens but {step_logits.shape[0]} logit steps")
    top2 = step_logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    argmax = step_logits.argmax(dim=-1).tolist()
    if argmax != generated:
        raise RuntimeError(f"generated {generated} is not the argmax {argmax} of its logits")
    full_steps = full[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(generated)]
    return {
        "generated_ids": generated,
        "margins": [float(f"{m:.6g}") for m in margins],
        "min_margin": float(f"{min(margins):.6g}"),
        "stopped_at_eos": len(generated) < max_new_tokens,
        "cache_free_argmax_agrees": full_steps.argmax(dim=-1).tolist() == generated,
        "cache_free_max_abs_logit_diff": float(f"{(full_steps - step_logits).abs().max():.3g}"),
    }


def select_cases(cases, keep, eos_case):
    """The `keep` full-length cases with the largest minimum margin (in candidate order), plus with
    `eos_case` the longest case that stopped at eos with a minimum margin above MIN_SAFE_MARGIN."""
    full = [i for i, c in enumerate(cases) if not c["stopped_at_eos"]]
    chosen = sorted(full, key=lambda i: -cases[i]["min_margin"])[:keep]
    stopped = [i for i, c in enumerate(cases) if c["stopped_at_eos"]]
    safe_stopped = [i for i in stopped if cases[i]["min_margin"] > MIN_SAFE_MARGIN]
    if eos_case and safe_stopped:
        length_then_margin = lambda i: (len(cases[i]["generated_ids"]), cases[i]["min_margin"])
        chosen.append(max(safe_stopped, key=length_then_margin))
    return [cases[i] for i in sorted(chosen)]


def reference_logits_diff(model, model_dir):
    """Largest |logit difference| against the fixture's reference.safetensors (None without one):
    a check that this load reproduces the outputs the Rust forward-pass tests compare with."""
    path = os.path.join(model_dir, "reference.safetensors")
    if not os.path.exists(path):
        return None
    reference = load_file(path)
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"].long(), use_cache=False).logits.float()
    diff = (logits - reference["logits"].float()).abs().max().item()
    if diff > REFERENCE_TOLERANCE:
        raise RuntimeError(f"{path}: logits differ by {diff:.3g} > {REFERENCE_TOLERANCE}")
    return float(f"{diff:.3g}")


def weight_digests(model_dir):
    """sha256 of each *.safetensors weight file (reference outputs excluded)."""
    digests = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors") and name != "reference.safetensors":
            with open(os.path.join(model_dir, name), "rb") as f:
                digests[name] = hashlib.sha256(f.read()).hexdigest()
    return digests


def write_json(path, doc):
    """JSON with one key per line and every id / margin list on a single line."""
    lines = ["{"]
    top = [(k, v) for k, v in doc.items() if k != "cases"]
    for k, v in top:
        lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
    lines.append('  "cases": [')
    for i, case in enumerate(doc["cases"]):
        fields = [
            f"    {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in case.items()
        ]
        comma = "," if i + 1 < len(doc["cases"]) else ""
        lines.append("   {\n" + ",\n".join(fields) + "\n   }" + comma)
    lines.append("  ]")
    lines.append("}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    json.loads(open(path, encoding="utf-8").read())  # it must parse back


def candidate_prompts(args, model, eos, pad):
    """(candidates, tokenizer): (text or None, prompt ids, special tokens added or None) triples,
    and the tokenizer of text prompts (None for random id prompts)."""
    if args.random_prompts:
        bos = model.generation_config.bos_token_id
        avoid = as_id_set(eos) | as_id_set(bos) | as_id_set(pad)
        ids_list = random_id_prompts(
            model.config.vocab_size, avoid, args.seed, args.candidates, args.min_len, args.max_len
        )
        return [(None, ids, None) for ids in ids_list], None
    tokenizer_file = os.path.join(args.model_dir, "tokenizer.json")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
    texts = args.prompt or line_start_prompts(args.prompts_from, args.words, args.candidates)
    candidates = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        candidates.append((text, ids, ids != plain))
    return candidates, tokenizer


def run_candidates(model, candidates, tokenizer, max_new_tokens, eos, pad):
    """One case per candidate prompt, logged to stderr."""
    cases = []
    for text, ids, special_added in candidates:
        case = {"prompt": text, "prompt_ids": ids}
        if text is not None:
            case["add_special_tokens"] = True
            case["special_tokens_added"] = special_added
        case["eos_token_id"] = eos
        case["max_new_tokens"] = max_new_tokens
        case.update(greedy_case(model, ids, max_new_tokens, eos, pad))
        if tokenizer is not None:
            case["generated_text"] = tokenizer.decode(case["generated_ids"])
        cases.append(case)
        shown = text if text is not None else ids
        print(f"  candidate min_margin {case['min_margin']:.4g} prompt length {len(ids)} "
              f"generated {len(case['generated_ids'])} eos_stop {case['stopped_at_eos']}: {shown}",
              file=sys.stderr)
    return cases


def main():
    args = parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    reference_diff = reference_logits_diff(model, args.model_dir)
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    pad = eos if pad is None else pad
    candidates, tokenizer = candidate_prompts(args, model, eos, pad)
    cases = run_candidates(model, candidates, tokenizer, args.max_new_tokens, eos, pad)
    if args.prompt is None:
        cases = select_cases(cases, args.keep, args.eos_case)
    doc = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": args.name or os.path.basename(os.path.normpath(args.model_dir)),
        "model_type": model.config.model_type,
        "weights_sha256": weight_digests(args.model_dir),
        "dtype": "float32",
        "decoding": "greedy (do_sample=False), use_cache=True, batch 1, default generation config",
        "eos_token_id": eos,
        "pad_token_id": pad,
        "candidates_tried": len(candidates),
        "reference_logits_max_abs_diff": reference_diff,
        "cases": cases,
    }
    write_json(args.out_json, doc)
    unsafe = [c["prompt_ids"] for c in cases if c["min_margin"] <= MIN_SAFE_MARGIN]
    if unsafe:
        print(f"WARNING: min margin <= {MIN_SAFE_MARGIN} for prompts {unsafe}", file=sys.stderr)
    margins = [c["min_margin"] for c in cases]
    print(f"{args.out_json}: {len(cases)} cases, min margins {margins}", file=sys.stderr)


if __name__ == "__main__":
    main()
