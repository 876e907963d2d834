"""Driver of tests/compressed_tensors.rs: loads compressed-tensors checkpoints with transformers
(no remote code) in one process and writes what it saw.

Usage: python tests/ct_transformers.py JOB.json
(Not named after the package: a script's directory comes first on sys.path.)
JOB.json: {"input_ids": FILE, "tensors_out": FILE, "results_out": FILE,
           "cases": [{"name", "dir"}]}
Per case, results_out gets the loaded class, the quantisation method transformers read from the
config, the load report (missing, unexpected and mismatched keys) and the versions used, or the
error raised; tensors_out gets the f32 logits as `NAME/logits` and every routed-expert tensor of
the model's state dict (transformers' fused, decompressed experts) as `NAME/KEY`.
"""

import importlib.metadata
import json
import sys
import traceback

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def run(case, input_ids, tensors):
    model, info = AutoModelForCausalLM.from_pretrained(
        case["dir"], dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    tensors[f"{case['name']}/logits"] = logits.float().contiguous()
    for key, value in model.state_dict().items():
        if ".experts." in key:
            tensors[f"{case['name']}/{key}"] = value.float().contiguous()
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return {
        "class": type(model).__name__,
        "quant_method": (quantization or {}).get("quant_method"),
        "report": {k: sorted(map(str, v)) for k, v in info.items() if v},
    }


def main():
    with open(sys.argv[1]) as f:
        job = json.load(f)
    input_ids = load_file(job["input_ids"])["input_ids"]
    tensors, results = {}, {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "compressed_tensors": importlib.metadata.version("compressed-tensors"),
        }
    }
    for case in job["cases"]:
        try:
            results[case["name"]] = run(case, input_ids, tensors)
        except Exception:  # reported per case, checked by the Rust side
            results[case["name"]] = {"error": traceback.format_exc()}
    save_file(tensors, job["tensors_out"])
    with open(job["results_out"], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
