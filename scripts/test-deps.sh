#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, when it is missing: Debian's Chromium (the
# browser test of `strata board`, tests/board.rs) and the tensorboard Python package (TensorBoard's
# own reader checks strata's event files, tests/train_e2e.rs). Idempotent; run as root (CI is).
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  echo "test-deps: installing chromium (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
if ! python3 -c "import tensorboard" 2>/dev/null; then
  echo "test-deps: installing tensorboard (PyPI)"
  python3 -m pip install --quiet tensorboard 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages tensorboard
fi
