# The verification steps of scripts/fetch.sh, in their own file so that tests/fetch.rs can run
# them on fixtures without a network.

# need COMMAND WHY: fail with a clear message when a client is missing.
need() {
  command -v "$1" >/dev/null 2>&1 || { echo "fetch: '$1' is required ($2) but not installed" >&2; exit 1; }
}

# check FILE SHA256: fail, saying what to do, unless FILE has that checksum.
check() {
  local got
  [ -f "$1" ] || { echo "fetch: $1 is missing after download" >&2; exit 1; }
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    echo "fetch: checksum mismatch for $1: expected $2, got $got; remove it and run again" >&2
    exit 1
  fi
}

# verified FILE SHA256: true when FILE is present with that checksum (so it is not fetched again).
verified() {
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}
