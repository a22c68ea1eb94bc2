#!/usr/bin/env python3
"""Independent numpy reference for strata's GGUF decoder.

Reads a Llama, Qwen2, Qwen3 or Gemma 3 GGUF with the `gguf` PyPI package (its own
dequantization), runs the forward pass in float64 numpy the way llama.cpp does it (Q/K rows as
stored; RoPE on adjacent pairs for Llama, on halves (NeoX) for Qwen and Gemma; Qwen2's q/k/v
biases; Qwen3's per-head q/k norms; Llama 3's `rope_freqs`; Gemma 3's scaled embedding, norms
after attention and MLP (stored as 1 + w), tanh-GELU gate, and its five windowed layers of six
on a RoPE base of 10,000, as llama.cpp fixes them), and compares the logits with strata's:

    strata inspect MODEL.gguf --logits "some text" --json strata.json
    python3 scripts/reference_logits.py MODEL.gguf strata.json

Nothing here is shared with strata's code: a different reader, a different RoPE layout (strata
un-permutes Q/K on load and rotates halves), a different precision. Exits non-zero when the
maximum relative difference exceeds the tolerance.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def main():
    path, strata_json = sys.argv[1], sys.argv[2]
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-3
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml")}
    arch = meta["general.architecture"]
    assert arch in ("llama", "qwen2", "qwen3", "gemma3"), f"this reference implements llama, qwen2, qwen3 and gemma3, not {arch}"
    gemma = arch == "gemma3"
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    assert scaling == "none", f"this reference does not implement rope scaling type {scaling}"
    n_layer = meta[f"{arch}.block_count"]
    n_head = meta[f"{arch}.attention.head_count"]
    n_kv = meta[f"{arch}.attention.head_count_kv"]
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = meta[f"{arch}.rope.freq_base"]
    W = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        W[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if a.ndim == 1 and len(t.shape) > 1 else a
    emb = W["token_embd.weight"]
    d_model = emb.shape[1]
    hd = meta.get(f"{arch}.attention.key_length", d_model // n_head)

    s = json.load(open(strata_json))
    ids = s["ids"]
    T = len(ids)
    x = emb[ids]
    if gemma:
        x = x * np.sqrt(d_model)
    window = meta.get(f"{arch}.attention.sliding_window") if gemma else None

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    pos = np.arange(T)[:, None]

    def tables(theta):
        inv = theta ** (-np.arange(0, hd, 2) / hd)
        if "rope_freqs.weight" in W:
            inv = inv / W["rope_freqs.weight"]
        ang = pos * inv[None, :]
        return np.cos(ang), np.sin(ang)

    global_tables = tables(base)
    local_tables = tables(10000.0) if gemma else global_tables
    cos, sin = global_tables

    def rope_pairs(v):  # v [T, heads, hd], rotate (v[2i], v[2i+1])
        a, b = v[..., 0::2], v[..., 1::2]
        c, s_ = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(v)
        out[..., 0::2] = a * c - b * s_
        out[..., 1::2] = a * s_ + b * c
        return out

    def rope_halves(v):  # NeoX: rotate (v[i], v[i + hd/2])
        a, b = v[..., : hd // 2], v[..., hd // 2:]
        c, s_ = cos[:, None, :], sin[:, None, :]
        return np.concatenate([a * c - b * s_, a * s_ + b * c], axis=-1)

    rope = rope_pairs if arch == "llama" else rope_halves

    def proj(h, name):
        y = h @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    causal = np.triu(np.full((T, T), -np.inf), 1)
    # llama.cpp's Gemma 3 query scale: the head size, hidden / heads for the 27B (62 layers).
    qscale = 1 / np.sqrt(d_model / n_head if gemma and n_layer == 62 else hd)
    for i in range(n_layer):
        p = f"blk.{i}."
        windowed = gemma and window and i % 6 < 5
        mask = causal
        if windowed:
            mask = causal + np.tril(np.full((T, T), -np.inf), -window)
        cos, sin = local_tables if windowed else global_tables
        h = rms(x, W[p + "attn_norm.weight"])
        q = proj(h, p + "attn_q").reshape(T, n_head, hd)
        k = proj(h, p + "attn_k").reshape(T, n_kv, hd)
        v = proj(h, p + "attn_v").reshape(T, n_kv, hd)
        if p + "attn_q_norm.weight" in W:
            q, k = rms(q, W[p + "attn_q_norm.weight"]), rms(k, W[p + "attn_k_norm.weight"])
        q, k = rope(q), rope(k)
        rep = n_head // n_kv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) * qscale + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, n_head * hd)
        o = o @ W[p + "attn_output.weight"].T
        if gemma:
            o = rms(o, W[p + "post_attention_norm.weight"])
        x = x + o
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        u = h @ W[p + "ffn_up.weight"].T
        if gemma:
            act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
        else:
            act = g / (1 + np.exp(-g))
        y = (act * u) @ W[p + "ffn_down.weight"].T
        if gemma:
            y = rms(y, W[p + "post_ffw_norm.weight"])
        x = x + y
    x = rms(x, W["output_norm.weight"])
    head = W.get("output.weight", emb)
    logits = x @ head.T
    if "logits_f32" in s:  # large vocabularies: raw f32 beside the JSON
        import os
        raw = os.path.join(os.path.dirname(os.path.abspath(strata_json)), s["logits_f32"])
        got = np.fromfile(raw, dtype="<f4").reshape(T, s["vocab"]).astype(np.float64)
    else:
        got = np.array(s["logits"], dtype=np.float64)
    rel = np.abs(got - logits).max() / np.abs(logits).max()
    agree = (got.argmax(-1) == logits.argmax(-1)).mean()
    print(f"{T} tokens, vocab {logits.shape[1]}: max |strata - reference| / max |reference| = {rel:.2e}; "
          f"arg-max agreement {agree:.0%}")
    if rel > tol:
        print(f"FAIL: relative difference above {tol}")
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
