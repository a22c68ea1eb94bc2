#!/usr/bin/env python3
"""Writes tests/fixtures/bnb4bit/: a tiny Llama saved by transformers + bitsandbytes in 4-bit
(NF4, with and without double quantization), exactly as `save_pretrained` writes a
`*-bnb-4bit` checkpoint (the `quant_state` tensors), plus the weights bitsandbytes itself
dequantizes them to, for strata's loader test.

    ~/.cache/strata-peer-venv/bin/python scripts/bnb_checkpoint_fixture.py

The reference values are fp32 bit patterns (hex) of `bitsandbytes.functional.dequantize_4bit`
for two projections per checkpoint; blocksize 64. Rows are kept at least one block long:
bitsandbytes 0.50's AVX-512 CPU dequantize reads the wrong scale when a block spans two rows
(columns < blocksize) and at blocksize 128 (see tests/fixtures/nf4_bnb.json); real models have
rows of hundreds of blocks.
"""
import json
import pathlib
import shutil
import struct
import tempfile

import bitsandbytes.functional as F
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "bnb4bit"


def hexf(t):
    return "".join(struct.pack("<f", v).hex() for v in t.flatten().tolist())


torch.manual_seed(0)
cfg = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    head_dim=16,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
with tempfile.TemporaryDirectory() as tmp:
    src = pathlib.Path(tmp) / "bf16"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    shutil.rmtree(OUT, ignore_errors=True)
    for name, dq in [("nf4", False), ("nf4-dq", True)]:
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=dq,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        m = LlamaForCausalLM.from_pretrained(src, quantization_config=qc, device_map="cpu")
        out = OUT / name
        m.save_pretrained(out)
        ref = {}
        for mod in ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"]:
            w = m.get_submodule(mod).weight
            qs = w.quant_state
            qs.dtype = torch.float32
            ref[mod] = {"shape": list(qs.shape), "values": hexf(F.dequantize_4bit(w.data, qs))}
        (out / "reference.json").write_text(json.dumps(ref, indent=1))
        for f in out.iterdir():
            if f.name not in ("model.safetensors", "config.json", "reference.json"):
                f.unlink()
print("wrote", OUT)
