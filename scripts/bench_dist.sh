#!/usr/bin/env bash
# Data-parallel training measured on this machine: SmolLM2-135M LoRA and full fine-tuning, one
# process against `mpirun -np 2` at the same effective batch (4 rows x 256 tokens a step), the
# rounds interleaved; then the bytes each rank reduces a step, the time the reduction takes, and
# a projection (stated as such) for 8 and 64 ranks on separate machines.
#   scripts/bench_dist.sh [STEPS] [ROUNDS]      (after scripts/fetch.sh and `strata data build`)
# Needs a release build with the `mpi` feature (built here when missing) and Open MPI
# (scripts/test-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-8}
ROUNDS=${2:-2}
OUT=runs/bench-dist
cargo build --release --features mpi -q
B=target/release/strata
rm -rf "$OUT"
mkdir -p "$OUT"
for round in $(seq 1 "$ROUNDS"); do
  for mode in lora full; do
    for np in 1 2; do
      run="$OUT/$mode-np$np-r$round"
      args=(train "recipes/smollm2-$mode.toml" --set "train.steps=$STEPS" --set "train.out=$run"
        --set train.eval_rows=4 --set 'data.general_eval=[]' --set train.memory_monitor=false)
      echo "bench_dist: $mode, $np process(es), round $round" >&2
      if [ "$np" = 1 ]; then
        "$B" "${args[@]}" 2> "$run.log"
      else
        mpirun --allow-run-as-root -np "$np" "$B" "${args[@]}" 2> "$run.log"
      fi
    done
  done
done
python3 - "$OUT" "$STEPS" <<'EOF'
import json, statistics, sys, glob, os
out, steps = sys.argv[1], int(sys.argv[2])
rows = {}
for d in sorted(glob.glob(f"{out}/*-np*-r*")):
    if not os.path.isdir(d):
        continue
    mode, np_, _ = os.path.basename(d).split("-")
    lines = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"ce"' in l]
    # The first step pays for warm-up (page faults, packs): timed from the second on.
    dt = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(lines, lines[1:])]
    tok = [b["tokens"] - a["tokens"] for a, b in zip(lines, lines[1:])]
    r = rows.setdefault((mode, int(np_[2:])), {"step": [], "tps": [], "bytes": [], "red": []})
    r["step"] += dt
    r["tps"] += [t / s for t, s in zip(tok, dt)]
    r["bytes"] += [l.get("reduce_bytes", 0) for l in lines]
    r["red"] += [l.get("reduce_s", 0.0) for l in lines[1:]]
med = statistics.median
print("| run | processes | step (s, median) | tok/s | vs 1 process | bytes reduced a step, each rank | reduction (s, median) |")
print("|---|---|---|---|---|---|---|")
for mode in ["lora", "full"]:
    base = med(rows[(mode, 1)]["tps"])
    for n in [1, 2]:
        r = rows[(mode, n)]
        b = max(r["bytes"])
        print(f"| {mode} | {n} | {med(r['step']):.2f} | {med(r['tps']):.0f} | {med(r['tps'])/base:.2f}x | "
              f"{b/1e6:.1f} MB | {med(r['red']) if n > 1 else 0:.3f} |")
# Projection: N machines like this one, each running one rank on all its cores at the measured
# one-process step time with its own 4 rows (the global batch grows with N), plus a ring
# all-reduce of the measured bytes: 2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency.
print()
print("Projection (not measured): N machines like this one, one rank each with 4 rows a step, ring all-reduce")
print("| run | network | 1 | 8 ranks: tok/s | efficiency | 64 ranks: tok/s | efficiency |")
print("|---|---|---|---|---|---|---|")
for mode in ["lora", "full"]:
    t1 = med(rows[(mode, 1)]["step"])
    tokens = med(rows[(mode, 1)]["tps"]) * t1
    b = max(rows[(mode, 2)]["bytes"])
    for net, bw, lat in [("10 Gb/s Ethernet, 50 us", 1.25e9, 50e-6), ("100 Gb/s InfiniBand, 2 us", 12.5e9, 2e-6)]:
        cells = []
        for n in [8, 64]:
            ring = 2 * (n - 1) / n * b / bw + 2 * (n - 1) * lat
            tps = n * tokens / (t1 + ring)
            cells.append(f"{tps:.0f} | {tps / (n * tokens / t1):.0%}")
        print(f"| {mode} | {net} | {tokens / t1:.0f} | " + " | ".join(cells) + " |")
EOF
