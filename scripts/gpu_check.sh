#!/usr/bin/env bash
# The device check, for a session lent a GPU machine (shared/gpu/README.md). Here (NCCL to link
# against from PyPI, beside the toolkit build-cuda.sh installs):
#   T=~/.cache/strata-cuda-tc; ../shared/gpu/build-cuda.sh true
#   $T/venv/bin/pip install -q nvidia-nccl-cu13==2.32.3
#   ln -sf $T/venv/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2 $T/link/lib/libnccl.so
#   CARGO_TARGET_DIR=/work/target-cuda ../shared/gpu/build-cuda.sh cargo build --release --features nccl
#   mkdir -p gpu-bin && strip -o /tmp/strata-cuda /work/target-cuda/release/strata
#   xz -T2 -6 -c /tmp/strata-cuda > gpu-bin/strata.xz     # 66 MB stripped -> 8 MB (carry limit 64 MiB)
# then, with the device tool: run(command="scripts/gpu_check.sh", carry=["gpu-bin"], timeout_s=540).
# It runs the checks of the quantized projections against the CPU ops and the per-block
# benchmark (projections, then LoRA / QLoRA / layered training steps with peak device memory),
# on SmolLM2's shape first, then Qwen2-7B's; results land in $OUT. Give it timeout_s=540.
set -euo pipefail
BIN=${STRATA_BIN:-gpu-bin/strata}
OUT=${OUT:-/tmp/strata-gpu}
mkdir -p "$OUT"
if [ ! -x "$BIN" ] && [ -f gpu-bin/strata.xz ]; then
  # The carried binary is xz-compressed; python's lzma unpacks it without an xz binary.
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('gpu-bin/strata.xz'), open('/tmp/strata-cuda', 'wb'))"
  chmod +x /tmp/strata-cuda
  BIN=/tmp/strata-cuda
fi
LIB=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null || true)
if [ -n "$LIB" ] && [ -d "$LIB" ]; then
  export LD_LIBRARY_PATH="$LIB:${LD_LIBRARY_PATH:-}"
  # PyTorch's NCCL (the `nccl` feature's device sum) lives in a folder of its own.
  NCCL=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'nccl', 'lib'))" 2>/dev/null || true)
  [ -n "$NCCL" ] && [ -d "$NCCL" ] && export LD_LIBRARY_PATH="$NCCL:$LD_LIBRARY_PATH"
else
  echo "no cu13 folder in python's nvidia package; libraries found:" | tee "$OUT/libs.txt"
  find / -name 'libcublas.so*' 2>/dev/null | head | tee -a "$OUT/libs.txt"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
# Each part under its own limit, so a slow one still leaves the others' results in $OUT.
timeout 180 "$BIN" bench gpu --shape smollm2 --batch 4 --seq-len 512 --steps 3 2>&1 | tee "$OUT/bench-gpu-smollm2.txt" || true
timeout 300 "$BIN" bench gpu --shape qwen2-7b --batch 1 --seq-len 512 --steps 2 --rounds 2 --policies qlora,layered,lora 2>&1 | tee "$OUT/bench-gpu-qwen2-7b.txt" || true
