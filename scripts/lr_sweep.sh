#!/usr/bin/env bash
# The training-side rate sweep behind the forgetting regime (README, "Learning vs forgetting"):
# trains RECIPE for STEPS steps at each rate (constant after the recipe's warm-up) and tabulates
# the training cross-entropy only; no evaluation set is read. The regime's rate is the one with
# the lowest final training loss (mean of the last 5 steps): the rate a user tuning on their
# training loss would pick.
#
#   scripts/lr_sweep.sh recipes/forgetting/lora.toml 40 1e-4 3e-4 1e-3 3e-3
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: scripts/lr_sweep.sh RECIPE STEPS LR [LR ...]" >&2; exit 2; }
recipe=$1; steps=$2; shift 2
bin=${STRATA:-target/release/strata}
[ -x "$bin" ] || { echo "lr_sweep: $bin not built; run cargo build --release (or set STRATA)" >&2; exit 1; }
name=$(basename "$recipe" .toml)
out=${SWEEP_OUT:-runs/sweep}/$name
mkdir -p "$out"
table="$out/table.md"
printf '| rate | first-step CE | final CE (last 5 steps) | worst rise over the run start | tok/s |\n|---|---|---|---|---|\n' > "$table"
for lr in "$@"; do
  dir="$out/lr-$lr"
  "$bin" train "$recipe" --set "train.steps=$steps" --set "train.lr=$lr" --set 'train.schedule="constant"' \
    --set "train.out=\"$dir\"" --set train.eval_every=0 > "$dir.log" 2>&1 \
    || { echo "lr_sweep: rate $lr failed; see $dir.log" >&2; printf '| %s | failed | | | |\n' "$lr" >> "$table"; continue; }
  python3 - "$dir/metrics.jsonl" "$lr" >> "$table" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ce = [r["ce"] for r in rows if isinstance(r.get("ce"), (int, float))]
tps = [r["tok_per_s"] for r in rows if "tok_per_s" in r]
tail = ce[-5:]
print(f"| {sys.argv[2]} | {ce[0]:.4f} | {sum(tail) / len(tail):.4f} | {max(c - ce[0] for c in ce):+.4f} | {tps[-1]:.0f} |")
PY
done
cat "$table"
