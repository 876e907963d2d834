"""Driver of tests/transformers_load.rs: loads every case of a job file with transformers in one
process (importing torch is the slow part) and writes what it saw.

Usage: python tests/transformers_load.py JOB.json
JOB.json: {"input_ids": FILE, "logits_out": FILE, "results_out": FILE,
           "cases": [{"name", "dir", "trust_remote_code"}], "snippet": {"code", "stdout"} | null}
Per case, results_out gets the loaded class, the non-empty parts of transformers' load report,
the number of stored values (unique parameters and persistent buffers: what the safetensors
files hold, int8 scales left out as storage; a packed matrix's blocks count as their bytes)
and their bytes, or the error raised; logits_out gets f32 logits keyed by case name. A
checkpoint with int8 factors or packed members is loaded a second time in its own dtype
(`dtype="auto"`), for `resident`: the dtypes of its int8 parameters and of its packed blocks,
and the bytes of its routed experts' tensors (codes, scales and blocks included).
The snippet (the README's example) is run with `exec`, its stdout captured.

Or, with JOB.json {"dequantise": {"modeling": FILE, "blocks": FILE, "names": [...]},
"results_out": FILE}: the modelling file's dequantiser on every packed matrix of `blocks`
(`SOURCE.SCHEME`, uint8 [rows, row_bytes]) against each expectation beside it
(`SOURCE.SCHEME.READER`, f32 [rows, cols]); results_out gets, per expectation, the number of
values whose bits differ (both NaN counts as equal) and the first of them, and, per entry of
`names`, the block format the modelling file reads it as (null for none).
"""

import contextlib
import importlib.util
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


def packed_blocks(model):
    """The packed members' blocks (modules with a `scheme` and `blocks()`)."""
    return [m.blocks() for m in model.modules() if hasattr(m, "scheme") and hasattr(m, "blocks")]


def resident(case):
    """An int8 or packed checkpoint loaded in its own dtype: its int8 parameters' and packed
    blocks' dtypes (by count) and the bytes of the routed experts' unique tensors."""
    model = AutoModelForCausalLM.from_pretrained(
        case["dir"], trust_remote_code=case["trust_remote_code"], dtype="auto"
    )
    dtypes, packed = {}, {}
    for module in model.modules():
        for name in getattr(module, "int8_parameters", ()):
            dtype = str(getattr(module, name).dtype)
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
    for blocks in packed_blocks(model):
        packed[str(blocks.dtype)] = packed.get(str(blocks.dtype), 0) + 1
    routed = {
        t.data_ptr(): t
        for name, t in model.state_dict().items()
        if ".experts." in name or ".expert_groups." in name
    }.values()
    return {
        "int8_parameters": dtypes,
        "packed_blocks": packed,
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
    compression = getattr(model.config, "compression", None) or {}
    if compression.get("factor_storage") or packed_blocks(model):
        entry["resident"] = resident(case)
    return entry, logits


def same_bits(got, want):
    """Whether f32 tensors hold the same bits, elementwise (NaN matching any NaN)."""
    nan = torch.isnan(got) & torch.isnan(want)
    return (got.view(torch.int32) == want.view(torch.int32)) | nan


def dequantise(job):
    """The modelling file's dequantiser against the expectations of `job` (module docstring)."""
    spec = importlib.util.spec_from_file_location("modeling_rfid_moe", job["modeling"])
    modeling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modeling)
    tensors = load_file(job["blocks"])
    checks, names = {}, {}
    for key, want in tensors.items():
        if key.count(".") != 2:
            continue
        source, scheme_name, _ = key.split(".")
        scheme = modeling.PackedScheme(scheme_name)
        got = scheme.dequantise(tensors[f"{source}.{scheme_name}"])
        if got.shape != want.shape or got.dtype != torch.float32:
            checks[key] = {"error": f"got {got.dtype} {list(got.shape)}, want {list(want.shape)}"}
            continue
        same = same_bits(got, want)
        first = None
        if not same.all():
            row, col = map(int, torch.nonzero(~same)[0])
            first = {"row": row, "col": col, "got": float(got[row, col]),
                     "want": float(want[row, col])}
        checks[key] = {"mismatches": int((~same).sum()), "first": first}
    for name in job["names"]:
        scheme = modeling.packed_scheme(name)
        names[name] = scheme.name if scheme is not None else None
    return {"checks": checks, "names": names}


def main():
    job = json.load(open(sys.argv[1]))
    if "dequantise" in job:
        json.dump(dequantise(job["dequantise"]), open(job["results_out"], "w"), indent=1)
        return
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
