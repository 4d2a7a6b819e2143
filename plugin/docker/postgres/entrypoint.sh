#!/bin/sh
# Starts PostgreSQL as the postgres user: initdb on the first start (scram-sha-256 everywhere, the password
# from $POSTGRES_PASSWORD), the longembed settings included, the model host's key written for
# longembed.host_key_file; both secrets are then dropped from the server's environment.
set -eu
: "${POSTGRES_PASSWORD:?the database password is required (compose: LONGEMBED_DB_PASSWORD in the env file)}"
: "${LONGEMBED_API_KEY:?the model host API key is required (compose: LONGEMBED_API_KEY in the env file)}"
: "${POSTGRES_USER:=longembed}"
: "${POSTGRES_DB:=longembed}"
bin="/usr/lib/postgresql/$PG_MAJOR/bin"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" --auth=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8
    rm -f "$pwfile"
    # Other containers reach it over the compose network; still with the password.
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        printf 'CREATE DATABASE "%s" OWNER "%s";\n' "$POSTGRES_DB" "$POSTGRES_USER" \
            | "$bin/postgres" --single -D "$PGDATA" -j postgres > /dev/null
    fi
fi
include="include_if_exists '/etc/longembed/postgresql.conf'"
grep -qxF "$include" "$PGDATA/postgresql.conf" || echo "$include" >> "$PGDATA/postgresql.conf"

umask 077
printf '%s\n' "$LONGEMBED_API_KEY" > /run/longembed/host_key
unset POSTGRES_PASSWORD LONGEMBED_API_KEY
exec "$bin/postgres" -D "$PGDATA" "$@"
