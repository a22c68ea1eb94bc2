"""The peer benchmark (../shared/peer/peft_bench.py) with PyTorch's bf16 mixed precision:
f32 weights, gradients and AdamW state, the forward (and so the backward) under
`torch.autocast("cpu", dtype=torch.bfloat16)`. The peer's own `--dtype bfloat16` keeps the
weights, gradients and AdamW moments themselves in bf16, which is another method (updates
smaller than a bf16 step of the weight are lost); this is the one strata's `train.precision =
"bf16"` matches. Same arguments as peft_bench.py (its `--dtype` is forced to float32).

    python scripts/peer_autocast.py --preset smollm2 --mode full -b 4 -s 256 -w 1 -n 3
"""
import os
import sys

PEER = os.environ.get("STRATA_PEER", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peer"))
sys.path.insert(0, os.path.abspath(PEER))

import peft_bench  # noqa: E402

_build = peft_bench.build_model


def build_model(args, torch, dtype):
    model, info = _build(args, torch, torch.float32)
    forward = model.forward

    def autocast_forward(*a, **k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*a, **k)

    model.forward = autocast_forward
    info["autocast"] = "bfloat16"
    return model, info


peft_bench.build_model = build_model

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:]]
    if "--dtype" in argv:
        i = argv.index("--dtype")
        del argv[i : i + 2]
    sys.argv = [sys.argv[0]] + argv + ["--dtype", "float32"]
    peft_bench.main()
