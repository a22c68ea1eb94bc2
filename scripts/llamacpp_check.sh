#!/usr/bin/env bash
# strata's GGUF exports read by llama.cpp itself: merges ADAPTER into MODEL and writes it as
# GGUF in several storage types (and the base alone in f32), writes the adapter alone as a
# llama.cpp LoRA GGUF (applied to the f32 base and to MODEL as it is), then for each compares
# strata's next-token distributions on a finance passage with llama.cpp's (node-llama-cpp
# 3.21.1's prebuilt CPU build, from npm into ~/.cache/strata-llamacpp): same token ids,
# arg-max agreement, largest probability gap, and both sides' mean NLL of the passage.
#
#   scripts/llamacpp_check.sh [MODEL.gguf] [ADAPTER]
#
# Defaults: the demo's SmolLM2 GGUF and the adapter `scripts/demo.sh` trains. Needs node/npm.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
adapter=${2:-runs/smollm2-layered/adapter}
lib=${LLAMACPP_DIR:-$HOME/.cache/strata-llamacpp}
[ -f "$model" ] || { echo "no model at $model (scripts/fetch.sh fetches the default)" >&2; exit 1; }
[ -d "$adapter" ] || { echo "no adapter at $adapter (scripts/demo.sh trains the default)" >&2; exit 1; }
if [ ! -d "$lib/node_modules/node-llama-cpp" ]; then
  mkdir -p "$lib"
  # The prebuilt binaries are optional dependencies on npm; the postinstall step (a source
  # build fallback) is not needed for them.
  (cd "$lib" && npm init -y >/dev/null && npm i -E --ignore-scripts node-llama-cpp@3.21.1 >/dev/null)
fi
cargo build --release --quiet
bin=target/release/strata
work=$(mktemp -d -t strata-llamacpp.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The opening of the first held-out finance document (a fixed passage if the data is not built).
text=$(python3 -c "
import json, sys
try:
    print(json.loads(open('data/corpus/finance/heldout.jsonl').readline())['text'][:600])
except OSError:
    print('The bank reconciled the account balance at the end of the quarter, and the auditors reviewed the ledger for errors.')
")
echo "| file | size | same ids | arg-max agreement | max prob gap | NLL strata | NLL llama.cpp |"
echo "|---|---|---|---|---|---|---|"
row() { # LABEL MODEL.gguf [LORA.gguf]: strata's logits of the same model against llama.cpp's
  local label=$1 file=$2 lora=${3:-}
  if [ -n "$lora" ]; then
    "$bin" inspect "$file" --adapter "$adapter" --logits "$text" --json "$work/logits.json" >/dev/null 2>&1
  else
    "$bin" inspect "$file" --logits "$text" --json "$work/logits.json" >/dev/null 2>&1
  fi
  LLAMACPP_DIR="$lib" node scripts/llamacpp_check.mjs "$file" "$work/logits.json" $lora | python3 -c "
import json, os, sys
r = json.loads(sys.stdin.read())
size = sum(os.path.getsize(f) for f in ['$file', '$lora'] if f) / 1e6
print(f\"| $label | {size:.0f} MB | {'yes' if r['same_ids'] else 'NO'} | {100 * r['argmax_agreement']:.1f}% ({r['tokens']} tokens) | {r['max_prob_gap']:.1e} | {r['nll_strata']:.4f} | {r['nll_llamacpp']:.4f} |\")
"
}
"$bin" merge --model "$model" --out "$work/base-f32.gguf" >/dev/null
row "base f32" "$work/base-f32.gguf"
for t in f32 f16 q8_0 q4_0; do
  "$bin" merge --model "$model" --adapter "$adapter" --out "$work/merged-$t.gguf" --dtype "$t" >/dev/null
  row "merged $t" "$work/merged-$t.gguf"
done
# The adapter alone (llama.cpp's --lora), on the f32 base and on the model file as it is.
"$bin" merge --model "$model" --adapter "$adapter" --out "$work/lora.gguf" --adapter-only >/dev/null
row "base f32 + LoRA GGUF" "$work/base-f32.gguf" "$work/lora.gguf"
row "$(basename "$model") + LoRA GGUF" "$model" "$work/lora.gguf"
