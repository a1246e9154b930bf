#!/usr/bin/env bash
# deps.sh installs and caches everything the test suite needs, once per machine:
# PostgreSQL server binaries and PgBouncer (Debian packages), a Vault server and local-kms built from
# the Go module proxy, and the static-analysis tools. Re-running is cheap: every step
# checks its cache first. Binaries live outside the repository, in $KEYBROKER_CACHE.
set -euo pipefail

CACHE="${KEYBROKER_CACHE:-$HOME/.cache/keybroker}"
BIN="$CACHE/bin"
mkdir -p "$BIN"

VAULT_VERSION=v1.21.0
LOCALKMS_VERSION=v0.0.0-20260228092603-2a5e92d09ab6
STATICCHECK_VERSION=v0.8.2

log() { printf 'deps: %s\n' "$*" >&2; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# PostgreSQL server binaries (initdb, pg_ctl, postgres).
pg_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}
if ! pg_bindir >/dev/null; then
  log "installing postgresql from Debian packages"
  apt_install postgresql postgresql-contrib
fi
# pgcrypto (benchmarks) ships in postgresql-contrib on older releases, in the server package on newer.
log "postgres: $(pg_bindir)"

# PgBouncer: the store tests and benchmarks also run through it in transaction mode.
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || { log "installing pgbouncer"; apt_install pgbouncer; }

# tmux drives the CLI in a real terminal in cmd/keybroker's tests.
command -v tmux >/dev/null || { log "installing tmux"; apt_install tmux; }

# Node.js runs the Node client's node:test suite (clients/node, from its Go test).
command -v node >/dev/null || { log "installing nodejs"; apt_install nodejs; }
# psql plays MeshHook's database driver in that suite (its own transactions on its secrets table).
command -v psql >/dev/null || { log "installing postgresql-client"; apt_install postgresql-client; }

# local-kms: a Go implementation of the AWS KMS API, built with provider/awskms/testdata/
# local-kms.patch, which adds what AWS KMS has and it lacks: RotateKeyOnDemand,
# CurrentKeyMaterialId in DescribeKey, IncorrectKeyException when Decrypt's KeyId is not the
# ciphertext's key, InvalidCiphertextException (not a crash) for a too-short ciphertext.
# The stamp rebuilds it when the version or the patch changes.
LOCALKMS_PATCH="$(cd "$(dirname "$0")/.." && pwd)/provider/awskms/testdata/local-kms.patch"
localkms_stamp="$LOCALKMS_VERSION $(sha256sum <"$LOCALKMS_PATCH" | cut -d' ' -f1)"
if [ ! -x "$BIN/local-kms" ] || [ "$(cat "$BIN/local-kms.stamp" 2>/dev/null)" != "$localkms_stamp" ]; then
  log "building local-kms $LOCALKMS_VERSION (patched)"
  (
    lkms=$(mktemp -d)
    trap 'chmod -R u+w "$lkms" 2>/dev/null; rm -rf "$lkms"' EXIT
    cd "$lkms"
    src=$(go mod download -json "github.com/nsmithuk/local-kms@$LOCALKMS_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
    mkdir src-copy && cp -r "$src/." src-copy/
    chmod -R u+w src-copy
    cd src-copy
    git apply "$LOCALKMS_PATCH"
    CGO_ENABLED=0 go build -trimpath -o "$BIN/local-kms.tmp" .
  )
  mv "$BIN/local-kms.tmp" "$BIN/local-kms"
  printf '%s\n' "$localkms_stamp" >"$BIN/local-kms.stamp"
fi

# Vault: the module's go.mod replaces ./api and ./sdk, which its zip leaves out, so build a
# copy with those replace lines removed; it then uses the published api and sdk modules.
if [ ! -x "$BIN/vault" ]; then
  log "building vault $VAULT_VERSION (slow once: about 10 minutes, then cached)"
  GOFLAGS=-mod=mod go mod download "github.com/hashicorp/vault@$VAULT_VERSION"
  src=$(GOFLAGS=-mod=mod go mod download -json "github.com/hashicorp/vault@$VAULT_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
  work=$(mktemp -d)
  trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
  cp -r "$src/." "$work/"
  chmod -R u+w "$work"
  sed -i -E '/=>[[:space:]]*\.\/(api|sdk)/d' "$work/go.mod"
  (cd "$work" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' -o "$BIN/vault.tmp" .)
  mv "$BIN/vault.tmp" "$BIN/vault"
fi

if [ ! -x "$BIN/staticcheck" ]; then
  log "installing staticcheck $STATICCHECK_VERSION"
  GOBIN="$BIN" go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION"
fi

# govulncheck with an offline vulnerability database: the database is the golang.org/x/vulndb
# module (OSV files) from the module proxy, indexed once with its indexdb command. Pinned, so
# results change only when these versions are bumped.
GOVULNCHECK_VERSION=v1.9.0
VULNDB_VERSION=v0.0.0-20261105234957-e22db6528018
# The patched Go toolchain the scripts build and test with (scripts/toolchain.sh); fetched now,
# from the module proxy, so later steps need no download.
. "$(dirname "$0")/toolchain.sh"
GOTOOLCHAIN="$KEYBROKER_GOTOOLCHAIN" go version >/dev/null
if [ ! -x "$BIN/govulncheck" ] || [ "$(cat "$BIN/govulncheck.stamp" 2>/dev/null)" != "$GOVULNCHECK_VERSION" ]; then
  log "installing govulncheck $GOVULNCHECK_VERSION"
  (cd "$(mktemp -d)" && GOBIN="$BIN" go install "golang.org/x/vuln/cmd/govulncheck@$GOVULNCHECK_VERSION")
  printf '%s\n' "$GOVULNCHECK_VERSION" >"$BIN/govulncheck.stamp"
fi
if [ ! -f "$CACHE/vulndb/index/db.json" ] || [ "$(cat "$CACHE/vulndb.stamp" 2>/dev/null)" != "$VULNDB_VERSION" ]; then
  log "indexing the Go vulnerability database $VULNDB_VERSION (about 3 minutes once)"
  (
    tmpd=$(mktemp -d)
    trap 'rm -rf "$tmpd"' EXIT
    cd "$tmpd"
    src=$(GOFLAGS=-mod=mod go mod download -json "golang.org/x/vulndb@$VULNDB_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
    GOBIN="$tmpd/bin" go install "golang.org/x/vulndb/cmd/indexdb@$VULNDB_VERSION"
    rm -rf "$CACHE/vulndb.tmp"
    "$tmpd/bin/indexdb" -vulns "$src/data/osv" -out "$CACHE/vulndb.tmp"
  )
  rm -rf "$CACHE/vulndb" && mv "$CACHE/vulndb.tmp" "$CACHE/vulndb"
  printf '%s\n' "$VULNDB_VERSION" >"$CACHE/vulndb.stamp"
fi

log "ok: binaries in $BIN"
