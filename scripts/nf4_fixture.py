#!/usr/bin/env python3
"""Writes tests/fixtures/nf4_bnb.json: NF4 codes and absmax (with and without double
quantization) produced by bitsandbytes itself on CPU, for strata's bit-exactness test.

    ~/.cache/strata-peer-venv/bin/python scripts/nf4_fixture.py

Inputs are seeded normal values (scaled like weights, some blocks with outliers, a short last
block), rounded to bf16 as a checkpoint would hold them. Everything is written as exact bit
patterns (hex of the fp32 values, the packed bytes) so the comparison is bit for bit.
"""
import json
import struct

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch


def hexf(t):
    return [struct.pack("<f", float(v)).hex() for v in t.flatten().tolist()]


def hexbf16(t):
    return t.flatten().view(torch.int16).numpy().astype("<i2").tobytes().hex()


torch.manual_seed(0)
cases = []
# The last case has more than 256 blocks, so double quantization spans several nested blocks.
for shape, blocksize in [((24, 40), 64), ((8, 33), 64), ((16, 96), 128), ((80, 260), 64)]:
    x = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    x.view(-1)[5] = 0.9  # an outlier block
    x.view(-1)[-1] = -0.7
    for dq in ([True] if x.numel() > 4096 else [False, True]):
        q, st = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
        case = {
            "shape": list(shape),
            "blocksize": blocksize,
            "double_quant": dq,
            "input_bf16_hex": hexbf16(x),
            "packed_hex": bytes(q.flatten().tolist()).hex(),
        }
        if dq:
            case["qabsmax_hex"] = bytes(st.absmax.flatten().tolist()).hex()
            case["offset_hex"] = hexf(st.offset.reshape(1))[0]
            case["absmax2_hex"] = hexf(st.state2.absmax)
            case["code8_hex"] = hexf(st.state2.code)
            case["nested_blocksize"] = st.state2.blocksize
        else:
            case["absmax_hex"] = hexf(st.absmax)
        # bitsandbytes 0.50's CPU dequantize is only consistent with its own quantize (and with
        # the CUDA kernel's `code[q] * absmax[i // blocksize]`) at blocksize 64: at 128 it reads
        # the wrong block's scale. Dequantized vectors are kept for blocksize 64 only.
        if x.numel() < 4096 and blocksize == 64:
            case["dequant_f32_hex"] = hexf(F.dequantize_4bit(q, st).float())
        cases.append(case)
json.dump({"bitsandbytes": bnb.__version__, "torch": torch.__version__, "cases": cases},
          open("tests/fixtures/nf4_bnb.json", "w"))
print("wrote tests/fixtures/nf4_bnb.json with", len(cases), "cases; bitsandbytes", bnb.__version__)
