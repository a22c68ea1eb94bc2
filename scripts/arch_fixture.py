"""Writes the architecture reference fixture strata's tests read (tests/fixtures/arch/): for each
decoder family strata runs (Llama, Qwen2 with its q/k/v biases, Qwen3 with its per-head q/k
norms and a head size that is not hidden / heads, Gemma 3 with its scaled embedding, (1 + w)
norms around attention and MLP, GeGLU, query scale, sliding-window layers with their own RoPE base
and a scaled global RoPE), a tiny random model as a Hugging Face
directory's config.json + model.safetensors, and transformers' own logits on 40 tokens computed
in float64.

The weights are stored in bf16 (exact in f32 and f64), so strata loads the very numbers the
reference ran on; the logits are stored in f32.

    ~/.cache/strata-peer-venv/bin/python scripts/arch_fixture.py   # torch + transformers
"""
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "arch"
T = 40
COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128, bos_token_id=1,
              eos_token_id=2)

CASES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False, rope_theta=1e6)),
    # Qwen3-8B's form: untied head, per-head norms, head_dim 32 against hidden / heads = 16.
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=False, rope_theta=1e6, head_dim=32)),
    # Gemma 3's form on three layers: two windowed (a window of 8 on 40 tokens, so it binds)
    # with their own RoPE base, one global with a linearly scaled RoPE; a query scale that is
    # not the head size.
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
               dict(num_hidden_layers=3, tie_word_embeddings=True, head_dim=32, query_pre_attn_scalar=24,
                    sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}


def main():
    logits = {}
    for seed, (name, (conf_cls, model_cls, extra)) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        cfg = conf_cls(**{**COMMON, **extra})
        # Gemma's norms multiply by (1 + w): centre its weights on 0 where the others centre on 1.
        centre = 0.0 if name == "gemma3" else 1.0
        model = model_cls(cfg)
        # Larger than the initialiser's 0.02 so that every part of the block shows in the logits.
        state = {}
        for k, v in model.state_dict().items():
            if cfg.tie_word_embeddings and k == "lm_head.weight":
                continue
            w = torch.randn_like(v) * (0.3 if v.dim() > 1 else 0.1) + (centre if "norm" in k else 0.0)
            state[k] = w.to(torch.bfloat16).contiguous()
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        save_file(state, str(d / "model.safetensors"))
        model = model.to(torch.float64)
        missing, unexpected = model.load_state_dict({k: v.to(torch.float64) for k, v in state.items()}, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        model.eval()
        ids = torch.tensor([[(i * 29 + 3 + seed) % COMMON["vocab_size"] for i in range(T)]])
        with torch.no_grad():
            out = model(input_ids=ids).logits[0]
        logits[f"{name}.ids"] = ids[0].to(torch.int64)
        logits[name] = out.to(torch.float32).contiguous()
        (d / "config.json").write_text(json.dumps(json.loads(cfg.to_json_string()), indent=1, sort_keys=True) + "\n")
    save_file(logits, str(OUT / "logits.safetensors"))
    import transformers
    (OUT / "README.md").write_text(
        "Written by `scripts/arch_fixture.py` with transformers "
        f"{transformers.__version__} and torch {torch.__version__} (float64 forward).\n"
    )


if __name__ == "__main__":
    main()
