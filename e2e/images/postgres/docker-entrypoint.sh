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
#   POSTGRES_REPLICATE_FROM  host[:port] of a primary made by this image: an empty PGDATA is
#                            cloned from it with pg_basebackup (as POSTGRES_USER, with
#                            POSTGRES_PASSWORD) and the server starts as a hot standby streaming
#                            from it, instead of initdb (an extension of the official image)
#   POSTGRES_STANDBY_NAME    the standby's application_name, the name the primary's
#                            synchronous_standby_names refers to (default: the host name)
# Arguments starting with "-" are passed to postgres (`docker run IMAGE -c fsync=off`).
# The server listens on 0.0.0.0:5432, and a primary accepts replication connections from
# any address with the same authentication as other TCP connections. Not implemented:
# /docker-entrypoint-initdb.d scripts, *_FILE secrets, POSTGRES_INITDB_WALDIR.
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

if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ] && [ -n "${POSTGRES_REPLICATE_FROM:-}" ]; then
	user="${POSTGRES_USER:-postgres}"
	host="${POSTGRES_REPLICATE_FROM%:*}"
	port=5432
	[ "$host" != "$POSTGRES_REPLICATE_FROM" ] && port="${POSTGRES_REPLICATE_FROM##*:}"
	name="${POSTGRES_STANDBY_NAME:-$HOSTNAME}"
	# The password goes to a password file, never to a command line or a setting that
	# SHOW prints; the standby's walreceiver reads the same file.
	passfile=/var/lib/postgresql/.pgpass
	printf '*:*:*:%s:%s\n' "$user" "${POSTGRES_PASSWORD:-}" >"$passfile"
	chmod 600 "$passfile"
	# The primary's configuration files (postgresql.conf, pg_hba.conf) come with the copy.
	PGPASSFILE="$passfile" pg_basebackup --host="$host" --port="$port" --username="$user" \
		--no-password --pgdata="$PGDATA" --wal-method=stream --checkpoint=fast
	printf "\nprimary_conninfo = 'host=%s port=%s user=%s passfile=%s application_name=%s'\n" \
		"$host" "$port" "$user" "$passfile" "$name" >>"$PGDATA/postgresql.auto.conf"
	touch "$PGDATA/standby.signal"
	echo "docker-entrypoint.sh: standby $name cloned from $host:$port; ready for start up."
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
	printf '\nhost all all all %s\nhost replication all all %s\n' "$auth" "$auth" >>"$PGDATA/pg_hba.conf"
	if [ "$db" != postgres ]; then
		# Single-user mode: no server is listening while the database is created.
		printf 'CREATE DATABASE "%s"\n' "${db//\"/\"\"}" |
			postgres --single -D "$PGDATA" postgres >/dev/null
	fi
	echo 'docker-entrypoint.sh: PostgreSQL init process complete; ready for start up.'
fi

exec "$@"
