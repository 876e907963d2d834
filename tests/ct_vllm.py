"""Driver of the opt-in vLLM check of tests/compressed_tensors.rs (RFID_MOE_VLLM=1): scores
token windows with vLLM on the CPU and writes their prompt-logprob perplexity.

Usage: python tests/ct_vllm.py JOB.json
JOB.json: {"dir": MODEL, "windows": [[token, ...], ...], "dtypes": ["float32", ...],
           "results_out": FILE}
The model is loaded in the first of `dtypes` that vLLM accepts for it; results_out gets that
dtype, the perplexity over every token after the first of each window, the token count, the
errors of the dtypes refused, and the device vLLM ran on ("cuda" or "cpu").
"""

import json
import math
import os
import sys
import traceback


def score(model, dtype, windows):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # Room for the longest window and the one token generated after it.
    max_model_len = max(len(w) for w in windows) + 1
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=max_model_len, seed=0)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=w) for w in windows]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    nll, tokens = 0.0, 0
    for output, window in zip(outputs, windows):
        for token, logprobs in zip(window[1:], output.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob
            tokens += 1
    return {"perplexity": math.exp(nll / tokens), "tokens": tokens}


def main():
    with open(sys.argv[1]) as f:
        job = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    result = {"refused": {}, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    for dtype in job["dtypes"]:
        try:
            result.update(score(job["dir"], dtype, job["windows"]), dtype=dtype)
            break
        except Exception:  # the next dtype is tried; all refusals are reported
            result["refused"][dtype] = traceback.format_exc()[-3000:]
    with open(job["results_out"], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
