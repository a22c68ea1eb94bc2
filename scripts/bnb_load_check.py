#!/usr/bin/env python3
"""Loads a bitsandbytes 4-bit checkpoint written by strata (`strata merge --dtype nf4-dq`) with
transformers + bitsandbytes, and compares its logits with strata's on the same text.

    strata merge --model MODEL.gguf --dtype nf4-dq --out /tmp/s-nf4
    strata inspect /tmp/s-nf4 --logits "TEXT" --json /tmp/s-nf4-logits.json
    strata merge --model /tmp/s-nf4 --dtype f32 --out /tmp/s-nf4-f32
    ~/.cache/strata-peer-venv/bin/python scripts/bnb_load_check.py /tmp/s-nf4 /tmp/s-nf4-logits.json /tmp/s-nf4-f32

transformers computes in bf16 (bnb_4bit_compute_dtype) and strata in f32 on the same dequantized
weights, so the logits agree to bf16 precision, not bit for bit.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, logits_json = sys.argv[1], sys.argv[2]
ref = json.load(open(logits_json))
model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
tok = AutoTokenizer.from_pretrained(model_dir)
n4 = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
ids = tok(ref["text"], add_special_tokens=False)["input_ids"]
assert ids == ref["ids"], f"token ids differ: {ids} vs {ref['ids']}"
# Checked before any forward: bitsandbytes' CPU backend repacks the codes for its kernel on the
# first forward.
# Every 4-bit weight as bitsandbytes' reference implementation dequantizes it
# (`backends.default.ops._dequantize_4bit_compute`, nested scales through `dequantize_blockwise`)
# against the f32 weights strata exports from the same model (`strata merge --model DIR --dtype
# f32 --out F32DIR`): equal bit for bit when the file is read the same way by both.
if len(sys.argv) > 3:
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from safetensors import safe_open

    f32 = safe_open(f"{sys.argv[3]}/model.safetensors", "pt")
    worst, count = 0.0, 0
    for name, mod in model.named_modules():
        if type(mod).__name__ != "Linear4bit":
            continue
        qs = mod.weight.quant_state
        absmax = qs.absmax
        if qs.nested:
            absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        w = _dequantize_4bit_compute(
            mod.weight.data.reshape(-1), absmax.float(), qs.code, qs.blocksize, qs.shape, torch.float32
        )
        worst = max(worst, (w - f32.get_tensor(name + ".weight")).abs().max().item())
        count += 1
    print(f"{count} weights: bitsandbytes' dequantization vs strata's, max |diff| = {worst:.1e}")

with torch.no_grad():
    out = model(torch.tensor([ids])).logits[0].float()
ours = torch.tensor(ref["logits"])
rel = ((out - ours).abs().max() / ours.abs().max()).item()
agree = (out.argmax(-1) == ours.argmax(-1)).float().mean().item()
print(f"{n4} Linear4bit modules; max |diff| / max |logit| = {rel:.2e}; arg-max agreement {100 * agree:.0f}%")

