#!/usr/bin/env bash
# strata against PyTorch + PEFT (+ bitsandbytes) on the SmolLM2-135M shape, batch 4 x 256:
# every configuration in its own process (so each peak RSS is its own), ROUNDS interleaved
# rounds, medians printed as the README's table. This VM's speed drifts by up to 2x within
# minutes, so only rows measured in the same rounds are compared.
#
#   scripts/bench_vs_peft.sh [ROUNDS] [PYTHON] [WHICH]
#
# WHICH: `adapters` (LoRA and QLoRA rows), `full` (full fine-tuning rows: PyTorch f32 and
# bf16 against strata's f32 and bf16 mixed precision) or `all` (the default).
# PYTHON is the interpreter of the peer environment (../shared/peer; default
# ~/.cache/strata-peer-venv/bin/python). Raw results go to runs/bench-vs-peft.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
py=${2:-$HOME/.cache/strata-peer-venv/bin/python}
which=${3:-all}
case $which in adapters|full|all) ;; *) echo "WHICH must be adapters, full or all" >&2; exit 1 ;; esac
peer_specs=(); strata_dtypes=()
if [ "$which" != full ]; then
  peer_specs+=("lora bfloat16 no" "lora bfloat16 yes" "qlora bfloat16 no" "qlora bfloat16 yes" "lora float32 no")
  strata_dtypes+=(bf16 nf4-dq f32)
fi
if [ "$which" != adapters ]; then
  # `autocast`: PyTorch's mixed precision (f32 weights and AdamW state, bf16 compute), what
  # strata's bf16 rows do; `bfloat16` keeps weights, gradients and AdamW state in bf16.
  peer_specs+=("full autocast no" "full autocast yes" "full bfloat16 no" "full float32 no" "full float32 yes")
fi
peer=../shared/peer/peft_bench.py
[ -x "$py" ] || { echo "no peer python at $py (see ../shared/peer/README)" >&2; exit 1; }
[ -f "$peer" ] || { echo "no peer benchmark at $peer" >&2; exit 1; }
cargo build --release --quiet
# A copy, so that a rebuild during the rounds cannot change the binary under test.
exe=$(mktemp -t strata-bench.XXXXXX)
cp target/release/strata "$exe"
chmod +x "$exe"
trap 'rm -f "$exe"' EXIT
mkdir -p runs
log=runs/bench-vs-peft.jsonl
: >"$log"

for round in $(seq 1 "$rounds"); do
  for spec in "${peer_specs[@]}"; do
    set -- $spec
    ckpt=(); [ "$3" = yes ] && ckpt=(--grad-ckpt)
    if [ "$2" = autocast ]; then
      line=$("$py" scripts/peer_autocast.py --preset smollm2 --mode "$1" "${ckpt[@]}" -b 4 -s 256 -w 1 -n 3 2>/dev/null | tail -1)
    else
      line=$("$py" "$peer" --preset smollm2 --mode "$1" --dtype "$2" "${ckpt[@]}" -b 4 -s 256 -w 1 -n 3 2>/dev/null | tail -1)
    fi
    echo "{\"round\": $round, \"who\": \"peft\", \"mode\": \"$1\", \"dtype\": \"$2\", \"ckpt\": \"$3\", \"r\": $line}" >>"$log"
    echo "round $round: peft $spec done" >&2
  done
  for dtype in "${strata_dtypes[@]}"; do
    # One variant per process (the hidden --variant is what `bench train` runs per variant).
    for v in strata-no-recompute strata strata-selective; do
      line=$("$exe" bench train --variant "$v" --base-dtype "$dtype" --steps 3 2>/dev/null | tail -1)
      echo "{\"round\": $round, \"who\": \"strata\", \"mode\": \"lora\", \"dtype\": \"$dtype\", \"variant\": \"$v\", \"r\": $line}" >>"$log"
      echo "round $round: strata $dtype $v done" >&2
    done
  done
  if [ "$which" != adapters ]; then
    for prec in bf16 f32; do
      variants=(strata-no-recompute strata); [ "$prec" = bf16 ] && variants+=(strata-selective)
      for v in "${variants[@]}"; do
        line=$("$exe" bench train --mode full --precision "$prec" --variant "$v" --steps 3 2>/dev/null | tail -1)
        echo "{\"round\": $round, \"who\": \"strata\", \"mode\": \"full\", \"dtype\": \"$prec\", \"variant\": \"$v\", \"r\": $line}" >>"$log"
        echo "round $round: strata full $prec $v done" >&2
      done
    done
    line=$("$exe" bench train --mode full --precision bf16 --optimizer adamw8bit --variant strata --steps 3 2>/dev/null | tail -1)
    echo "{\"round\": $round, \"who\": \"strata\", \"mode\": \"full\", \"dtype\": \"bf16-adam8\", \"variant\": \"strata\", \"r\": $line}" >>"$log"
    echo "round $round: strata full bf16 adamw8bit done" >&2
  fi
done

python3 - "$log" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(sel, key):
    v = [r["r"][key] for r in rows if sel(r)]
    return statistics.median(v) if v else None
def peft(mode, dtype, ckpt):
    s = lambda r: r["who"] == "peft" and (r["mode"], r["dtype"], r["ckpt"]) == (mode, dtype, ckpt)
    return med(s, "tokens_per_s"), med(s, "peak_rss_mb") * 1e6
def strata(dtype, v, mode="lora"):
    s = lambda r: r["who"] == "strata" and (r.get("mode", "lora"), r["dtype"], r["variant"]) == (mode, dtype, v)
    return med(s, "tok_per_s"), med(s, "peak_rss")
rc_name = {"strata-no-recompute": "no", "strata": "per block (default)", "strata-selective": "selective"}
print(f"medians of {max(r['round'] for r in rows)} interleaved rounds\n")
if any(r["who"] == "peft" and r["mode"] == "full" for r in rows):
    print("Full fine-tuning (every weight, AdamW); ratios against PyTorch's mixed precision (autocast) at the same recomputation:\n")
    print("| trainer | precision | recomputation | tok/s | peak RSS | speed vs PyTorch autocast | memory vs PyTorch autocast |")
    print("|---|---|---|---|---|---|---|")
    peer_rows = (("autocast", "bf16 autocast (f32 weights and AdamW state)"), ("bfloat16", "bf16 weights, grads and AdamW state"), ("float32", "f32"))
    strata_rows = {"no": [("bf16", "strata-no-recompute")], "yes": [("bf16", "strata"), ("bf16", "strata-selective"), ("bf16-adam8", "strata")]}
    for ckpt in ("no", "yes"):
        ref = peft("full", "autocast", ckpt)
        label = "gradient checkpointing" if ckpt == "yes" else "no"
        for pdt, plabel in peer_rows:
            if not any(r["who"] == "peft" and (r["mode"], r["dtype"], r["ckpt"]) == ("full", pdt, ckpt) for r in rows):
                continue
            t, m = peft("full", pdt, ckpt)
            print(f"| PyTorch | {plabel} | {label} | {t:.0f} | {m / 1e9:.2f} GB | {t / ref[0]:.2f}x | {m / ref[1]:.2f}x |")
        for prec, v in strata_rows[ckpt] + [("f32", "strata-no-recompute" if ckpt == "no" else "strata")]:
            t, m = strata(prec, v, "full")
            slabel = {"bf16": "bf16 mixed (f32 weights and AdamW state)", "bf16-adam8": "bf16 mixed, 8-bit AdamW state", "f32": "f32"}[prec]
            print(f"| **strata** | {slabel} | {rc_name[v]} | {t:.0f} | {m / 1e9:.2f} GB | {t / ref[0]:.2f}x | {m / ref[1]:.2f}x |")
    print()
if not any(r["who"] == "peft" and r["mode"] != "full" for r in rows):
    sys.exit(0)
print("| trainer | frozen base | recomputation | tok/s | peak RSS | speed vs PyTorch | memory vs PyTorch |")
print("|---|---|---|---|---|---|---|")
groups = [
    ("bf16", "lora", "bfloat16", "PyTorch + PEFT", "bf16"),
    ("nf4-dq", "qlora", "bfloat16", "PyTorch + PEFT + bitsandbytes", "NF4 + double quant"),
    ("f32", "lora", "float32", "PyTorch + PEFT", "f32"),
]
for dtype, mode, pdt, who, base in groups:
    for ckpt, variants in (("no", ["strata-no-recompute"]), ("yes", ["strata", "strata-selective"])):
        if (mode, pdt) == ("lora", "float32") and ckpt == "yes":
            ref = peft(mode, pdt, "no")
            tag = " (vs f32, no checkpointing)"
        else:
            ref = peft(mode, pdt, ckpt)
            tag = ""
            label = "gradient checkpointing" if ckpt == "yes" else "no"
            print(f"| {who} | {base} | {label} | {ref[0]:.0f} | {ref[1] / 1e9:.2f} GB | 1.00x | 1.00x |")
        for v in variants:
            t, m = strata(dtype, v)
            rc = rc_name[v]
            print(f"| **strata** | {base if dtype != 'nf4-dq' else 'NF4 + double quant'} | {rc} | {t:.0f} | {m / 1e9:.2f} GB "
                  f"| {t / ref[0]:.2f}x{tag} | {m / ref[1]:.2f}x{tag} |")
EOF
