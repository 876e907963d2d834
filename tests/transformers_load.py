"""Driver of tests/transformers_load.rs: loads every case of a job file with transformers in one
process (importing torch is the slow part) and writes what it saw.

Usage: python tests/transformers_load.py JOB.json
JOB.json: {"input_ids": FILE, "logits_out": FILE, "results_out": FILE,
           "cases": [{"name", "dir", "trust_remote_code"}], "snippet": {"code", "stdout"} | null}
Per case, results_out gets the loaded class, the non-empty parts of transformers' load report,
the number of stored values (unique parameters and persistent buffers: what the safetensors
files hold, int8 scales left out as storage) and their bytes, or the error raised; logits_out
gets f32 logits keyed by case name. A checkpoint with int8 factors is loaded a second time in
its own dtype (`dtype="auto"`), for `resident`: the dtypes of its int8 parameters and the bytes
of its routed experts' tensors (codes and scales included).
The snippet (the README's example) is run with `exec`, its stdout captured.
"""

import contextlib
import io
import json
import sys
import traceback

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def int8_scales(model):
    """State-dict names of the row-block scales of int8 parameters (storage, not values)."""
    return {
        f"{prefix}.{name}_scale"
        for prefix, module in model.named_modules()
        for name in getattr(module, "int8_parameters", ())
    }


def stored_values(model):
    """Unique tensors of the state dict (tied weights once), int8 scales left out: count and
    bytes."""
    scales = int8_scales(model)
    unique = {
        t.data_ptr(): t for name, t in model.state_dict().items() if name not in scales
    }.values()
    return sum(t.numel() for t in unique), sum(t.numel() * t.element_size() for t in unique)


def resident(case):
    """An int8 checkpoint loaded in its own dtype: its int8 parameters' dtypes (by count) and
    the bytes of the routed experts' unique tensors."""
    model = AutoModelForCausalLM.from_pretrained(
        case["dir"], trust_remote_code=case["trust_remote_code"], dtype="auto"
    )
    dtypes = {}
    for module in model.modules():
        for name in getattr(module, "int8_parameters", ()):
            dtype = str(getattr(module, name).dtype)
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
    routed = {
        t.data_ptr(): t
        for name, t in model.state_dict().items()
        if ".experts." in name or ".expert_groups." in name
    }.values()
    return {
        "int8_parameters": dtypes,
        "routed_bytes": sum(t.numel() * t.element_size() for t in routed),
    }


def load_case(case, input_ids):
    model, info = AutoModelForCausalLM.from_pretrained(
        case["dir"],
        trust_remote_code=case["trust_remote_code"],
        dtype=torch.float32,
        output_loading_info=True,
    )
    count, nbytes = stored_values(model)
    with torch.no_grad():
        logits = model(input_ids).logits.float().contiguous()
    report = {key: sorted(map(str, value)) for key, value in info.items() if value}
    entry = {"class": type(model).__name__, "load_report": report}
    entry.update(stored_values=count, bytes=nbytes)
    if (getattr(model.config, "compression", None) or {}).get("factor_storage"):
        entry["resident"] = resident(case)
    return entry, logits


def main():
    job = json.load(open(sys.argv[1]))
    input_ids = load_file(job["input_ids"])["input_ids"]
    results, logits = {}, {}
    for case in job["cases"]:
        try:
            results[case["name"]], logits[case["name"]] = load_case(case, input_ids)
        except Exception as error:  # the test decides whether an error was expected
            results[case["name"]] = {"error": f"{type(error).__name__}: {error}"}
    if job.get("snippet"):
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                exec(job["snippet"]["code"], {"__name__": "__snippet__"})
            results["snippet"] = {"stdout": captured.getvalue()}
        except Exception:
            results["snippet"] = {"error": traceback.format_exc()}
    save_file(logits, job["logits_out"])
    json.dump(results, open(job["results_out"], "w"), indent=1)


if __name__ == "__main__":
    main()
