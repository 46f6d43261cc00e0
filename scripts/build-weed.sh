#!/usr/bin/env bash
# Build SeaweedFS's `weed` (the S3-compatible server the tests and the demo run on 127.0.0.1) once,
# into a cache folder outside the repo, and print the binary's path on stdout. Idempotent: when the
# binary is already there, only its path is printed.
#
#   scripts/build-weed.sh               # -> ~/.cache/mergeit-spark/weed-<version>/weed
#   MERGEIT_WEED_DIR=/opt/weed scripts/build-weed.sh
#
# `go install module@version` refuses this module (its go.mod has replace directives), so the
# module is downloaded into Go's (read-only) module cache, copied to a writable temp folder and
# built there. An existing GOFLAGS / GOPATH / GOPROXY is honoured. Needs Go >= the module's go line.
set -euo pipefail

WEED_MODULE=github.com/seaweedfs/seaweedfs
WEED_VERSION=v0.0.0-20261109003541-7506e5f91cd6   # Apache-2.0; tests/s3server.py reads this line

dir="${MERGEIT_WEED_DIR:-$HOME/.cache/mergeit-spark/weed-$WEED_VERSION}"
bin="$dir/weed"
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
command -v go >/dev/null || { echo "build-weed.sh: go is not on PATH (https://go.dev/dl/)" >&2; exit 1; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/mergeit-weed.XXXXXX")"
partial="$dir/.weed.$$.tmp"
# The copy keeps the module cache's read-only modes until chmod: make it removable first.
trap 'chmod -R u+w "$tmp" 2>/dev/null || true; rm -rf "$tmp" "$partial"' EXIT

echo "build-weed.sh: downloading $WEED_MODULE@$WEED_VERSION" >&2
# Run outside any go.mod so that only the requested module is resolved.
src="$(cd "$tmp" && go mod download -json "$WEED_MODULE@$WEED_VERSION" \
      | python3 -c 'import json, sys; d = json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error", "no Dir")))')"

cp -R "$src/." "$tmp/src"
chmod -R u+w "$tmp/src"
mkdir -p "$dir"
echo "build-weed.sh: building $bin (downloads ~300 modules, then compiles: several minutes)" >&2
(cd "$tmp/src" && go build -trimpath -ldflags='-s -w' -o "$partial" ./weed)
mv -f "$partial" "$bin"   # same folder: an atomic rename, so a half-built binary is never seen
echo "$bin"
