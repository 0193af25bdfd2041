#!/usr/bin/env bash
# Build the sluice image from a binary compiled on this host (no registry
# needed): the binary, the shared libraries it links and a passwd entry for
# the non-root user go into docker/rootfs/, then docker/Dockerfile.local is built.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-sluice:local}
# The production feature set: firmware hooks and cluster mode (needs protoc),
# no simulators or benches.
cargo build --release --no-default-features --features firmware,cluster
built=${CARGO_TARGET_DIR:-target}/release/sluice
root=docker/rootfs
rm -rf "$root" docker/rootfs-run
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" docker/rootfs-run/sluice
strip -o "$root/usr/local/bin/sluice" "$built"
# The dynamic loader and every library ldd lists, at the same paths.
for lib in $(ldd "$built" | grep -oE '/[^ ]+'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
echo "nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin" > "$root/etc/passwd"
echo "nonroot:x:65532:" > "$root/etc/group"
chmod 1777 "$root/tmp"
DOCKER_BUILDKIT=0 docker build -f docker/Dockerfile.local -t "$tag" .
echo "built $tag"
