#!/usr/bin/env bash
# A bounded run of every fuzz target on the stable toolchain: each target
# gets SECONDS (default 30) from the seeds in seeds/, new inputs go to a
# scratch corpus. Exits non-zero on the first crash or panic (libFuzzer
# writes the input under fuzz/artifacts/). Used by CI; for hours, see README.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
for t in $(cargo fuzz list); do
  mkdir -p "$corpus/$t"
  echo "-- fuzz $t for ${secs}s"
  rc=0
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "$corpus/$t" "seeds/$t" -- -max_total_time="$secs" >"$corpus/$t.log" 2>&1 || rc=$?
  grep -E "^Done|ERROR|panicked|SUMMARY|crash-" "$corpus/$t.log" || true
  if [ "$rc" -ne 0 ]; then
    tail -40 "$corpus/$t.log"
    echo "fuzz target $t failed (exit $rc)"
    exit 1
  fi
done
