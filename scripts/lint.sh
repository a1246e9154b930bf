#!/usr/bin/env bash
# lint.sh: gofmt, go vet and staticcheck on every module, govulncheck on the root, bench and e2e
# modules. Fails on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/toolchain.sh
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "lint: gofmt would change:" >&2; echo "$unformatted" >&2; exit 1
fi
bin="${KEYBROKER_CACHE:-$HOME/.cache/keybroker}/bin"
[ -x "$bin/staticcheck" ] || { echo "lint: staticcheck missing: run make deps" >&2; exit 1; }
for mod in . bench e2e; do
  (cd "$mod" && go vet ./... && "$bin/staticcheck" ./...) || { echo "lint: go vet or staticcheck failed in module $mod" >&2; exit 1; }
done
# govulncheck against the offline database scripts/deps.sh indexed; it reports only
# vulnerabilities whose code is reachable from ours (with -test, from the tests too).
cache="${KEYBROKER_CACHE:-$HOME/.cache/keybroker}"
if [ -x "$bin/govulncheck" ] && [ -f "$cache/vulndb/index/db.json" ]; then
  for mod in . bench e2e; do
    (cd "$mod" && "$bin/govulncheck" -test -db "file://$cache/vulndb" ./... >/dev/null) ||
      { echo "lint: govulncheck found vulnerabilities in module $mod; details: (cd $mod && $bin/govulncheck -test -db file://$cache/vulndb ./...)" >&2; exit 1; }
  done
else
  echo "lint: govulncheck or its database missing: run make deps" >&2; exit 1
fi
