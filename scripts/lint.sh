#!/usr/bin/env bash
# lint.sh: gofmt, go vet and staticcheck on every module. Fails on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "lint: gofmt would change:" >&2; echo "$unformatted" >&2; exit 1
fi
go vet ./...
bin="${KEYBROKER_CACHE:-$HOME/.cache/keybroker}/bin"
if [ -x "$bin/staticcheck" ]; then
  "$bin/staticcheck" ./...
else
  echo "lint: staticcheck missing: run make deps" >&2; exit 1
fi
