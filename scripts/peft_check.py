#!/usr/bin/env python3
"""Checks that a strata adapter loads in Hugging Face PEFT and gives strata's logits.

    strata merge --model MODEL.gguf --out BASE_HF              # the base, exported by strata
    strata inspect MODEL.gguf --adapter ADAPTER --logits "text" --json strata.json
    python peft_check.py BASE_HF ADAPTER strata.json

Loads BASE_HF with transformers, applies ADAPTER with `PeftModel.from_pretrained`, requires no
missing and no unexpected adapter keys, and compares the logits on strata's token ids. Needs
torch, transformers and peft (the peer venv of ../shared/peer has them).
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    base_dir, adapter_dir, strata_json = sys.argv[1:4]
    tol = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
    s = json.load(open(strata_json))
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    # Load the same files a second time under another name to read PEFT's own key report.
    res = model.load_adapter(adapter_dir, adapter_name="check")
    missing = [k for k in res.missing_keys if "lora_" in k and ".check." in k]
    unexpected = list(res.unexpected_keys)
    model.set_adapter("default")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([s["ids"]])).logits[0].double()
    if "logits_f32" in s:  # large vocabularies: raw f32 [tokens, vocab] beside the JSON
        import os
        import numpy as np
        raw = os.path.join(os.path.dirname(os.path.abspath(strata_json)), s["logits_f32"])
        got = torch.from_numpy(np.fromfile(raw, dtype="<f4").reshape(len(s["ids"]), s["vocab"]).astype("float64"))
    else:
        got = torch.tensor(s["logits"], dtype=torch.float64)
    rel = ((got - logits).abs().max() / logits.abs().max()).item()
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_A.default" in n)
    text = s.get("text")
    tok_ok = text is None or tok(text, add_special_tokens=False)["input_ids"] == s["ids"]
    print(f"PEFT loaded {n_lora} LoRA modules; missing keys: {len(missing)}, unexpected keys: {len(unexpected)}")
    print(f"max |strata - peft| / max |peft| = {rel:.2e} over {len(s['ids'])} tokens; "
          f"tokenizer ids {'match' if tok_ok else 'DIFFER'}")
    if missing or unexpected or rel > tol or not tok_ok:
        print("FAIL", missing[:3], unexpected[:3])
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
