#!/usr/bin/env bash
# The test suite, as CI runs it: the outside tools first (scripts/test-deps.sh), then every test
# with those tools required (a missing one fails its test instead of skipping it), built with
# the `mpi` feature so that data-parallel training runs under a real `mpirun` (tests/dist.rs).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh
STRATA_REQUIRE_TOOLS=1 cargo test --features mpi "$@"
