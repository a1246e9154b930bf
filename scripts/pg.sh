#!/usr/bin/env bash
# pg.sh start|stop DIR — a throwaway PostgreSQL server for the tests, on a free
# loopback port, with its data and socket under DIR. `start` prints the URL.
# As root it runs the server as the postgres user, since initdb refuses root.
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?data directory}

bindir=""
for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && bindir=$d; done
[ -n "$bindir" ] || { echo "pg.sh: no PostgreSQL server binaries: run make deps" >&2; exit 1; }

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir"
    # The server runs as postgres, so it must be able to reach DIR (mktemp makes 0700 parents).
    parent=$(dirname "$dir")
    runuser -u postgres -- test -x "$dir" || chmod o+x "$parent"
    runuser -u postgres -- test -x "$dir" || { echo "pg.sh: user postgres cannot reach $dir" >&2; exit 1; }
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  as_owner "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" start >/dev/null \
    || { cat "$dir/server.log" >&2; exit 1; }
  echo "postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
  ;;
stop)
  [ -d "$dir/data" ] && as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  ;;
*) echo "pg.sh: unknown command $cmd" >&2; exit 2 ;;
esac
