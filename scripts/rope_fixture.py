"""Writes the RoPE-scaling reference fixture strata's tests read (tests/fixtures/rope/): one tiny
Llama 3.2-shaped model (GQA, tied embeddings) and, for each `rope_scaling` transformers defines
that strata runs (linear, dynamic, llama3, yarn two ways) and the unscaled control, its
config.json and transformers' own logits, computed in float64 on 48 positions, past the
original context of 16, so every scaling's long-context path is the one compared.

The weights are stored in bf16 (exact in f32 and f64), so strata loads the very numbers the
reference ran on; the logits are stored in f32 (the reference's rounding is far below what the
test allows).

    ~/.cache/strata-peer-venv/bin/python scripts/rope_fixture.py   # torch + transformers
"""
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "rope"
OUT.mkdir(parents=True, exist_ok=True)

SHAPE = dict(
    vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    tie_word_embeddings=True, rope_theta=10000.0, hidden_act="silu",
    attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
)
ORIGINAL = 16
T = 48

# name -> (max_position_embeddings, rope_scaling)
CASES = {
    "default": (64, None),
    "linear": (64, {"rope_type": "linear", "factor": 4.0}),
    "dynamic": (ORIGINAL, {"rope_type": "dynamic", "factor": 4.0}),
    "llama3": (64, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": ORIGINAL}),
    # Qwen2.5's form: factor and original context, everything else transformers' defaults.
    "yarn": (64, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    # DeepSeek's form: the attention factor from mscale / mscale_all_dim, other betas, no rounding.
    "yarn_mscale": (64, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                         "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0,
                         "truncate": False}),
}


def main():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(max_position_embeddings=64, **SHAPE))
    # Larger than the initialiser's 0.02 so that positions matter to the logits.
    state = {k: (torch.randn_like(v) * (0.3 if v.dim() > 1 else 0.1) + (1.0 if "norm" in k else 0.0)).to(torch.bfloat16)
             for k, v in base.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(OUT / "model.safetensors"))
    ids = torch.tensor([[(i * 37 + 5) % SHAPE["vocab_size"] for i in range(T)]])
    logits = {"ids": ids[0].to(torch.int64)}
    for name, (max_pos, scaling) in CASES.items():
        cfg = LlamaConfig(max_position_embeddings=max_pos, rope_scaling=scaling, **SHAPE)
        model = LlamaForCausalLM(cfg).to(torch.float64)
        missing, unexpected = model.load_state_dict({k: v.to(torch.float64) for k, v in state.items()}, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        model.tie_weights()
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids).logits[0]
        logits[name] = out.to(torch.float32).contiguous()
        conf = json.loads(cfg.to_json_string())
        conf["model_type"] = "llama"
        (OUT / f"{name}.json").write_text(json.dumps(conf, indent=1, sort_keys=True) + "\n")
    save_file(logits, str(OUT / "logits.safetensors"))
    import transformers
    (OUT / "README.md").write_text(
        "Written by `scripts/rope_fixture.py` with transformers "
        f"{transformers.__version__} and torch {torch.__version__} (float64 forward).\n"
    )


if __name__ == "__main__":
    main()
