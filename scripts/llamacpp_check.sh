#!/usr/bin/env bash
# strata's GGUF exports read by llama.cpp itself: merges ADAPTER into MODEL and writes it as
# GGUF in several storage types (and the base alone in f32), then for each file compares
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
for spec in "base f32" "merged f32" "merged f16" "merged q8_0" "merged q4_0"; do
  set -- $spec
  out="$work/$1-$2.gguf"
  if [ "$1" = base ]; then
    "$bin" merge --model "$model" --out "$out" --dtype "$2" >/dev/null
  else
    "$bin" merge --model "$model" --adapter "$adapter" --out "$out" --dtype "$2" >/dev/null
  fi
  "$bin" inspect "$out" --logits "$text" --json "$work/logits.json" >/dev/null 2>&1
  LLAMACPP_DIR="$lib" node scripts/llamacpp_check.mjs "$out" "$work/logits.json" | python3 -c "
import json, os, sys
r = json.loads(sys.stdin.read())
size = os.path.getsize('$out') / 1e6
print(f\"| $1 {'$2'} | {size:.0f} MB | {'yes' if r['same_ids'] else 'NO'} | {100 * r['argmax_agreement']:.1f}% ({r['tokens']} tokens) | {r['max_prob_gap']:.1e} | {r['nll_strata']:.4f} | {r['nll_llamacpp']:.4f} |\")
"
done
