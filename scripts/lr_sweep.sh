#!/usr/bin/env bash
# The training-side rate sweep behind the forgetting regime (README, "Learning vs forgetting"):
# trains RECIPE for STEPS steps at each rate (constant after the recipe's warm-up) and tabulates
# the training cross-entropy only; no evaluation set is read. Every rate sees the same rows in
# the same order (one seed), so its per-step CE is compared with the first (smallest) rate's,
# step by step. The regime's rate is the one with the lowest final training loss (mean of the
# last 5 steps) that never runs above the smallest rate's CE by more than 0.1 nats on any step
# after the first three (the recipes' warm-up): the rate a user tuning on their training loss would pick.
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
printf '| rate | final CE (last 5 steps) | vs the smallest rate | worst step vs the smallest rate |\n|---|---|---|---|\n' > "$table"
first="$out/lr-$1"
for lr in "$@"; do
  dir="$out/lr-$lr"
  # A rate whose run finished (at these steps) is read again, not retrained.
  if [ -f "$dir/summary.json" ] && [ "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["steps"])' "$dir/summary.json" 2>/dev/null)" = "$steps" ]; then
    echo "lr_sweep: rate $lr done before; reading $dir" >&2
  else
    rm -rf "$dir"
    "$bin" train "$recipe" --set "train.steps=$steps" --set "train.lr=$lr" --set 'train.schedule="constant"' \
      --set "train.out=\"$dir\"" --set train.eval_every=0 > "$dir.log" 2>&1 \
      || { echo "lr_sweep: rate $lr failed; see $dir.log" >&2; printf '| %s | failed | | |\n' "$lr" >> "$table"; continue; }
  fi
  python3 - "$dir/metrics.jsonl" "$first/metrics.jsonl" "$lr" >> "$table" <<'PY'
import json, sys
def ce(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    return [r["ce"] for r in rows if isinstance(r.get("ce"), (int, float))]
mine, ref = ce(sys.argv[1]), ce(sys.argv[2])
final = lambda c: sum(c[-5:]) / len(c[-5:])
worst = max(a - b for a, b in zip(mine[3:], ref[3:]))
print(f"| {sys.argv[3]} | {final(mine):.4f} | {final(mine) - final(ref):+.4f} | {worst:+.4f} |")
PY
done
cat "$table"
