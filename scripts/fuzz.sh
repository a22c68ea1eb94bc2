#!/usr/bin/env bash
# Fuzzes every parser of untrusted input: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Each target (fuzz/fuzz_targets/, bodies in src/testing/fuzz.rs) runs for SECONDS (default 60)
# under libFuzzer through cargo-fuzz, on stable Rust with `--sanitizer none`, seeded from valid
# files the test suite's helpers make (fuzz/examples/seeds.rs), every execution limited to
# 2 GB of RSS and 10 s. Targets run two at a time (PARALLEL=1 for one). Each sitting's figures
# are appended to fuzz/results.tsv and the totals per target printed as the README's table;
# anything libFuzzer saves (crash-, timeout-, oom-) is copied to tests/fixtures/fuzz/TARGET/,
# where tests/fuzz_regressions.rs replays it: a finding becomes a regression test.
#
# Installs cargo-fuzz (cargo install) when it is missing. The first build takes several minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${1:-60}
shift || true
ALL=(gguf hf_dir gguf_tokenizer recipe data adapter checkpoint)
TARGETS=("${@:-${ALL[@]}}")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL[@]}")
PARALLEL=${PARALLEL:-2}

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd fuzz
cargo fuzz build --sanitizer none --release
[ -d corpus ] || cargo run --quiet --release --example seeds -- corpus

# The binaries run directly (not through `cargo fuzz run`), so that editing the sources while
# a long sitting runs does not rebuild under it; each row records the commit fuzzed.
BIN=target/x86_64-unknown-linux-gnu/release
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- ../src ../Cargo.toml Cargo.toml fuzz_targets examples || echo "-dirty")
LOGS=$(mktemp -d)
run_one() {
    local t=$1
    mkdir -p "artifacts/$t"
    local before
    before=$(ls "artifacts/$t" | wc -l)
    # libFuzzer exits non-zero when it saves a finding; the figures are read from its log.
    "$BIN/$t" "corpus/$t" \
        -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$LOGS/$t.log" 2>&1 || true
    local execs rss found
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$LOGS/$t.log" | grep -o '[0-9]*$' || echo 0)
    rss=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$LOGS/$t.log" | grep -o '[0-9]*$' || echo 0)
    found=$(( $(ls "artifacts/$t" | wc -l) - before ))
    if [ "$found" -gt 0 ]; then
        mkdir -p "$ROOT/tests/fixtures/fuzz/$t"
        cp "artifacts/$t"/* "$ROOT/tests/fixtures/fuzz/$t/"
        echo "$t: $found finding(s), saved under tests/fixtures/fuzz/$t/ (log: $LOGS/$t.log)" >&2
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$COMMIT" "$t" "$SECS" "${execs:-0}" "$found" "${rss:-0}" >>results.tsv
}

[ -f results.tsv ] || printf 'date\tcommit\ttarget\tseconds\texecutions\tfindings\tpeak_rss_mb\n' >results.tsv
running=0
for t in "${TARGETS[@]}"; do
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$PARALLEL" ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait

echo "| target | executions (all sittings) | seconds | findings | peak RSS of a sitting |"
echo "|---|---|---|---|---|"
awk -F'\t' 'NR > 1 { n[$3] += $5; s[$3] += $4; f[$3] += $6; if ($7 > r[$3]) r[$3] = $7 }
    END { for (t in n) printf "| %s | %d | %d | %d | %d MB |\n", t, n[t], s[t], f[t], r[t] }' results.tsv | sort
