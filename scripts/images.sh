#!/usr/bin/env bash
# images.sh builds the container images the e2e suite (e2e/) runs, under the public names it
# runs them by ($KEYBROKER_E2E_{VAULT,LOCALKMS,POSTGRES}_IMAGE, defaulting to the images a user
# elsewhere would pull), from what this machine can get without a container registry:
#   - Vault and local-kms: the static binaries scripts/deps.sh builds, in FROM scratch images
#     laid out as the official ones (binary, directories, environment, port);
#   - PostgreSQL: Debian's postgresql-15 in a `debootstrap --variant=minbase` root file system,
#     `docker import`ed, with an entrypoint (e2e/images/postgres/docker-entrypoint.sh) that
#     honours the official image's POSTGRES_* variables and listens on 0.0.0.0:5432, and with
#     POSTGRES_REPLICATE_FROM clones a primary with pg_basebackup and runs as its hot standby.
# An image that exists is reused: one this script built is rebuilt only when its input changed
# (the label below records the input's hash); one from anywhere else (pulled) is left alone.
# With no Docker engine it prints one line and does nothing, except under CI=true, where the
# e2e suite must run and this fails.
set -euo pipefail
cd "$(dirname "$0")/.."

VAULT_IMAGE="${KEYBROKER_E2E_VAULT_IMAGE:-hashicorp/vault:1.21.0}"
LOCALKMS_IMAGE="${KEYBROKER_E2E_LOCALKMS_IMAGE:-nsmithuk/local-kms:3}"
POSTGRES_IMAGE="${KEYBROKER_E2E_POSTGRES_IMAGE:-postgres:15}"
PG_ROOTFS_IMAGE=keybroker-e2e/postgres-rootfs:15-bookworm
PG_MAJOR=15
SUITE=bookworm
MIRROR="${KEYBROKER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BIN="${KEYBROKER_CACHE:-$HOME/.cache/keybroker}/bin"
LABEL=org.profullstack.keybroker.e2e.input

log() { printf 'images: %s\n' "$*" >&2; }

if ! err=$(docker info 2>&1 >/dev/null); then
  if [ -n "${CI:-}" ]; then
    log "no Docker engine, and CI is set so the e2e suite must run: docker info: ${err%%$'\n'*}"
    exit 1
  fi
  log "skipped: no Docker engine (docker info: ${err%%$'\n'*})"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/keybroker-images.XXXXXX")
trap 'rm -rf "$work"' EXIT

# stale IMAGE INPUT succeeds when IMAGE must be built: it is missing, or this script built it
# from another input. An image without the label came from a registry: it is kept.
stale() {
  local have
  have=$(docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null) || return 0
  [ -n "$have" ] && [ "$have" != "<no value>" ] && [ "$have" != "$2" ]
}

need_bin() {
  [ -x "$BIN/$1" ] || { log "$BIN/$1 is missing: run \`make deps\` (scripts/deps.sh) first"; exit 1; }
}

# build IMAGE CONTEXT: docker build, quiet unless it fails (the legacy builder's deprecation
# notice is noise here).
build() {
  if ! docker build -q -t "$1" "$2" >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    log "docker build $1 failed"
    exit 1
  fi
}

# scratch_image IMAGE INPUT CONTEXT DOCKERFILE-LINES: builds IMAGE from the files under CONTEXT/rootfs.
scratch_image() {
  local image=$1 input=$2 ctx=$3
  shift 3
  {
    echo 'FROM scratch'
    echo 'COPY rootfs/ /'
    printf '%s\n' "$@"
    echo "LABEL $LABEL=$input"
  } >"$ctx/Dockerfile"
  build "$image" "$ctx"
}

# Vault, laid out as hashicorp/vault: /bin/vault, /vault/{config,file,logs}, port 8200. The
# official entrypoint is a shell script, which a scratch image cannot run; the suite always
# names its entrypoint (`vault`) and command, so it runs either image the same way.
need_bin vault
vault_input="vault-$(sha256sum <"$BIN/vault" | cut -c1-16)"
if stale "$VAULT_IMAGE" "$vault_input"; then
  log "building $VAULT_IMAGE from $BIN/vault"
  ctx="$work/vault"
  mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/vault/config" "$ctx/rootfs/vault/file" "$ctx/rootfs/vault/logs" "$ctx/rootfs/tmp"
  chmod 1777 "$ctx/rootfs/tmp"
  cp "$BIN/vault" "$ctx/rootfs/bin/vault"
  scratch_image "$VAULT_IMAGE" "$vault_input" "$ctx" \
    'ENV PATH=/bin' \
    'EXPOSE 8200' \
    'ENTRYPOINT ["vault"]' \
    'CMD ["server", "-dev", "-dev-listen-address=0.0.0.0:8200"]'
fi

# local-kms, laid out as nsmithuk/local-kms: /usr/local/bin/local-kms, /init, /data, its
# environment, port 8080.
need_bin local-kms
kms_input="local-kms-$(sha256sum <"$BIN/local-kms" | cut -c1-16)"
if stale "$LOCALKMS_IMAGE" "$kms_input"; then
  log "building $LOCALKMS_IMAGE from $BIN/local-kms"
  ctx="$work/local-kms"
  mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/init" "$ctx/rootfs/data" "$ctx/rootfs/tmp"
  chmod 1777 "$ctx/rootfs/tmp"
  cp "$BIN/local-kms" "$ctx/rootfs/usr/local/bin/local-kms"
  scratch_image "$LOCALKMS_IMAGE" "$kms_input" "$ctx" \
    'ENV PATH=/usr/local/bin KMS_ACCOUNT_ID=111122223333 KMS_REGION=eu-west-2 KMS_DATA_PATH=/data PORT=8080' \
    'EXPOSE 8080' \
    'ENTRYPOINT ["local-kms"]'
fi

# PostgreSQL: the Debian root file system is built once (a few minutes) and kept as its own
# image; the entrypoint layer on top is rebuilt when the entrypoint script changes.
entrypoint=e2e/images/postgres/docker-entrypoint.sh
pg_input="postgres-$PG_MAJOR-$SUITE-$(sha256sum <"$entrypoint" | cut -c1-16)"
if stale "$POSTGRES_IMAGE" "$pg_input"; then
  if ! docker image inspect "$PG_ROOTFS_IMAGE" >/dev/null 2>&1; then
    if ! command -v debootstrap >/dev/null; then
      log "installing debootstrap"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    fi
    log "building $PG_ROOTFS_IMAGE: debootstrap $SUITE with postgresql-$PG_MAJOR (slow once: a few minutes)"
    root="$work/pgroot"
    if ! debootstrap --variant=minbase --include="postgresql-$PG_MAJOR" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
      tail -n 20 "$work/debootstrap.log" >&2
      log "debootstrap failed"
      exit 1
    fi
    # The package's postinst made a cluster and configuration of its own: the entrypoint makes
    # the one the container uses. Package caches are not needed at run time.
    rm -rf "$root/var/lib/postgresql/$PG_MAJOR" "$root/etc/postgresql/$PG_MAJOR" \
      "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
      "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/locale"
    tar -C "$root" -c . | docker import -m "debootstrap $SUITE postgresql-$PG_MAJOR" - "$PG_ROOTFS_IMAGE" >/dev/null
  fi
  log "building $POSTGRES_IMAGE on $PG_ROOTFS_IMAGE"
  ctx="$work/postgres"
  mkdir -p "$ctx"
  cp "$entrypoint" "$ctx/docker-entrypoint.sh"
  cat >"$ctx/Dockerfile" <<EOF
FROM $PG_ROOTFS_IMAGE
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 PGDATA=/var/lib/postgresql/data
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
LABEL $LABEL=$pg_input
EOF
  build "$POSTGRES_IMAGE" "$ctx"
fi

log "ok: $VAULT_IMAGE, $LOCALKMS_IMAGE, $POSTGRES_IMAGE"
