# Builds tiny DeepSeek-V2/V3 checkpoints with yarn rope scaling and their transformers 5.17 reference
# outputs (tests/fixtures/tiny-deepseek_v{2,3}-yarn). Run from the repository root on a machine with
# torch + transformers: OUT=tests/fixtures python scripts/make-yarn-fixtures.py
import json, os, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from safetensors.torch import save_file
out = os.environ["OUT"]
torch.manual_seed(0)
for family in ["deepseek_v2", "deepseek_v3"]:
    base = json.load(open(f"tests/fixtures/tiny-{family}/config.json"))
    base["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 0.707, "mscale_all_dim": 0.707}
    base.pop("transformers_version", None)
    config = AutoConfig.for_model(**base)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.2)
    d = f"{out}/tiny-{family}-yarn"
    model.save_pretrained(d)
    ids = torch.randint(0, base["vocab_size"], (2, 48))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, f"{d}/reference.safetensors")
    print(family, json.load(open(f"{d}/config.json")).get("rope_parameters"), logits.shape)
    for name, mod in model.named_modules():
        if name.endswith("layers.0.self_attn"):
            print("  scaling", getattr(mod, "scaling", None))
            break
    print("  rotary attention_scaling", model.model.rotary_emb.attention_scaling)
