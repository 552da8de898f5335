#!/usr/bin/env bash
# Make sure a local PostgreSQL cluster runs and the current user is a superuser on it over the
# Unix socket: what the `postgres`-marked tests (and a PostgreSQL lease on one host) need.
# Idempotent; works without systemd (containers, CI), on Debian's postgresql package.
# Prints one line at the end: the libpq DSN to use (RECONCILER_TEST_POSTGRES).
set -euo pipefail

SOCKET_DIR=/var/run/postgresql
me=$(id -un)

if ! command -v pg_lsclusters >/dev/null 2>&1; then
    echo "start-postgres.sh: PostgreSQL is not installed; run: apt-get install postgresql" >&2
    exit 1
fi

if [ "$(id -u)" = 0 ]; then
    as_postgres() { (cd / && runuser -u postgres -- "$@"); }
    as_root() { "$@"; }
else
    as_postgres() { (cd / && sudo -u postgres -- "$@"); }
    as_root() { sudo -- "$@"; }
fi

# pg_lsclusters -h: "<version> <cluster> <port> <status> <owner> <datadir> <logfile>".
# Prefer a cluster that is already online, then one called main, then any.
pick_cluster() {
    pg_lsclusters -h | awk '
        $4 ~ /^online/ && !online { online = $1 " " $2 " " $3 }
        $2 == "main" && !main { main = $1 " " $2 " " $3 }
        !any { any = $1 " " $2 " " $3 }
        END { print (online ? online : (main ? main : any)) }'
}

cluster_line=$(pick_cluster)
if [ -z "$cluster_line" ]; then
    # The package normally creates 15/main on install; a host where it was dropped (or where
    # createcluster.conf disables it) gets one for the newest installed server.
    version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)
    if [ -z "$version" ]; then
        echo "start-postgres.sh: no PostgreSQL server binaries in /usr/lib/postgresql;" \
            "run: apt-get install postgresql" >&2
        exit 1
    fi
    as_root pg_createcluster "$version" main >/dev/null
    cluster_line=$(pick_cluster)
fi
read -r version cluster port <<<"$cluster_line"

status=$(pg_lsclusters -h "$version" "$cluster" | awk '{ print $4 }')
if [[ "$status" != online* ]]; then
    # pg_ctlcluster, not systemctl: there is no systemd in containers and CI runners. It creates
    # the socket directory when /run was emptied, and waits until the server accepts connections.
    as_root pg_ctlcluster "$version" "$cluster" start
fi

for _ in $(seq 1 60); do
    if pg_isready -q -h "$SOCKET_DIR" -p "$port"; then break; fi
    sleep 0.5
done
if ! pg_isready -q -h "$SOCKET_DIR" -p "$port"; then
    echo "start-postgres.sh: PostgreSQL $version/$cluster does not accept connections on" \
        "$SOCKET_DIR port $port; see /var/log/postgresql/postgresql-$version-$cluster.log" >&2
    exit 1
fi

# Debian's pg_hba.conf maps local OS users to roles of the same name (peer), so a superuser role
# named like us is all a connection over the socket needs.
if [ "$me" != postgres ]; then
    exists=$(as_postgres psql -h "$SOCKET_DIR" -p "$port" -d postgres -tAq \
        -c "SELECT 1 FROM pg_roles WHERE rolname = '${me//\'/\'\'}'")
    if [ "$exists" != 1 ]; then
        as_postgres createuser -h "$SOCKET_DIR" -p "$port" --superuser "$me"
    fi
fi

echo "PostgreSQL $version/$cluster is running; DSN: host=$SOCKET_DIR port=$port dbname=postgres"
