#!/bin/bash
# docker-entrypoint.sh for the PostgreSQL image scripts/images.sh builds from Debian's
# packages. It implements the part of the official postgres image's entrypoint that the
# e2e suite (and most users) rely on, with the same environment variables and defaults:
#   POSTGRES_PASSWORD        superuser password (required unless POSTGRES_HOST_AUTH_METHOD=trust)
#   POSTGRES_USER            superuser name (default postgres)
#   POSTGRES_DB              database created at first start (default $POSTGRES_USER)
#   POSTGRES_HOST_AUTH_METHOD  auth for TCP connections (default scram-sha-256)
#   POSTGRES_INITDB_ARGS     extra initdb arguments
#   PGDATA                   data directory (default /var/lib/postgresql/data)
# Arguments starting with "-" are passed to postgres (`docker run IMAGE -c fsync=off`).
# The server listens on 0.0.0.0:5432. Not implemented: /docker-entrypoint-initdb.d scripts,
# *_FILE secrets, POSTGRES_INITDB_WALDIR.
set -Eeuo pipefail

if [ "${1:0:1}" = '-' ]; then
	set -- postgres "$@"
fi
export PGDATA="${PGDATA:-/var/lib/postgresql/data}"

if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
	mkdir -p "$PGDATA" /var/run/postgresql
	chown postgres:postgres "$PGDATA" /var/run/postgresql
	chmod 700 "$PGDATA"
	chmod 2777 /var/run/postgresql
	exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
	user="${POSTGRES_USER:-postgres}"
	db="${POSTGRES_DB:-$user}"
	auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
	if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
		echo 'docker-entrypoint.sh: database is uninitialized and superuser password is not specified: set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust)' >&2
		exit 1
	fi
	# initdb reads the password from a file descriptor so it never appears in a process list.
	# shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of words, as in the official image.
	initdb --username="$user" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD:-}") -D "$PGDATA" \
		--encoding=UTF8 --locale=C.UTF-8 ${POSTGRES_INITDB_ARGS:-} >/dev/null
	printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.conf"
	printf '\nhost all all all %s\n' "$auth" >>"$PGDATA/pg_hba.conf"
	if [ "$db" != postgres ]; then
		# Single-user mode: no server is listening while the database is created.
		printf 'CREATE DATABASE "%s"\n' "${db//\"/\"\"}" |
			postgres --single -D "$PGDATA" postgres >/dev/null
	fi
	echo 'docker-entrypoint.sh: PostgreSQL init process complete; ready for start up.'
fi

exec "$@"
