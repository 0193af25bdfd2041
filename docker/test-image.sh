#!/usr/bin/env bash
# Build the image and run it for real: --network host, against sim-pool and
# sim-fleet on this machine's loopback. Skips (exit 0) with a clear message
# when no Docker daemon answers. Bounded: it stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! docker info >/dev/null 2>&1; then
  echo "test-image: SKIPPED: no Docker daemon answers (start one with 'dockerd &')"
  exit 0
fi
# The simulators run on the host from a default build (feature `sim`); the
# image holds the production build, which has none of them.
cargo build --release
bin=$(mktemp -d)/sluice-sim
cp "${CARGO_TARGET_DIR:-target}/release/sluice" "$bin"
bash docker/build-local.sh sluice:test >/dev/null
if docker run --rm --network none --entrypoint /usr/local/bin/sluice sluice:test sim-pool --help >/dev/null 2>&1; then
  echo "test-image: FAILED: the image's binary carries the simulators" >&2
  exit 1
fi
name=sluice-image-test-$$
pool_pid=""
fleet_pid=""
cleanup() {
  docker rm -f "$name" >/dev/null 2>&1 || true
  [ -n "$pool_pid" ] && kill "$pool_pid" 2>/dev/null || true
  [ -n "$fleet_pid" ] && kill "$fleet_pid" 2>/dev/null || true
}
trap cleanup EXIT

"$bin" sim-pool --listen 127.0.0.1:23334 --difficulty 0.00002 </dev/null >/dev/null 2>&1 &
pool_pid=$!
docker run -d --name "$name" --network host \
  -e SLUICE_LISTEN=127.0.0.1:23333 \
  -e SLUICE_METRICS__LISTEN=127.0.0.1:29333 \
  -e SLUICE_UPSTREAM='["stratum+tcp://image-test:x@127.0.0.1:23334"]' \
  -e SLUICE_DIFFICULTY__START=0.000002 -e SLUICE_DIFFICULTY__MIN=0.000001 \
  sluice:test >/dev/null

user=$(docker inspect --format '{{.Config.User}}' "$name")
[ "$user" = "65532:65532" ] || { echo "test-image: FAILED: runs as '$user', not non-root"; exit 1; }

# The fleet stays connected through the checks and the stop (it ends by
# itself after 90 s at most).
"$bin" sim-fleet --target 127.0.0.1:23333 --miners 20 --share-interval-ms 200 --duration-s 90 --quiet \
  </dev/null >/dev/null 2>&1 &
fleet_pid=$!

metric() {
  python3 - "$1" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:29333/metrics", timeout=3).read().decode()
for line in text.splitlines():
    if line.startswith(sys.argv[1] + " ") or line.startswith(sys.argv[1] + "{"):
        print(line.rsplit(" ", 1)[1]); break
else:
    print(0)
PY
}
for _ in $(seq 1 60); do
  accepted=$(metric 'sluice_shares_total{result="accepted",reason=""}')
  forwarded=$(metric sluice_shares_forwarded_total)
  python3 -c "import sys; sys.exit(0 if float('$accepted') > 50 and float('$forwarded') > 0 else 1)" && break
  sleep 1
done
echo "test-image: sluice in the container validated $accepted shares and forwarded $forwarded"
python3 -c "import sys; sys.exit(0 if float('$accepted') > 50 and float('$forwarded') > 0 else 1)" \
  || { echo "test-image: FAILED: too few shares"; docker logs "$name" | tail -20; exit 1; }

for _ in $(seq 1 30); do
  health=$(docker inspect --format '{{.State.Health.Status}}' "$name")
  [ "$health" = healthy ] && break
  sleep 1
done
[ "$health" = healthy ] || { echo "test-image: FAILED: health is '$health'"; exit 1; }
echo "test-image: HEALTHCHECK reports $health"

# The control socket, found from the image's environment with no flag.
status=$(docker exec "$name" /usr/local/bin/sluice ctl status) \
  || { echo "test-image: FAILED: docker exec sluice ctl status"; exit 1; }
echo "$status" | grep -q "^site: 20 connected" \
  || { echo "test-image: FAILED: ctl status says: $status"; exit 1; }
echo "test-image: docker exec sluice ctl status: $(echo "$status" | head -1)"

# Stopped with the fleet still connected: the drain sends every miner away.
docker stop -t 20 "$name" >/dev/null
report=$(docker logs "$name" 2>&1 | grep 'sluice stopped in' || true)
[ -n "$report" ] || { echo "test-image: FAILED: no graceful-shutdown report"; docker logs "$name" | tail -20; exit 1; }
echo "$report" | grep -qE ': 20 miners sent away' \
  || { echo "test-image: FAILED: the drain did not send the 20 connected miners away: $report"; exit 1; }
echo "test-image: graceful shutdown: $report"
echo "test-image: PASSED"
