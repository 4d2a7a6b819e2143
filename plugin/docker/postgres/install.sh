#!/bin/sh
# Installs PostgreSQL $PG_MAJOR with plpython3u (and pgvector from source where PGVECTOR=debian-source).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update
# The cluster lives in the volume, made by the entrypoint: no Debian "main" cluster in the image.
apt-get install -y --no-install-recommends postgresql-common
sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
apt-get install -y --no-install-recommends "postgresql-$PG_MAJOR" "postgresql-plpython3-$PG_MAJOR"
case "$PGVECTOR" in
image)
    test -f "/usr/share/postgresql/$PG_MAJOR/extension/vector.control" \
        || { echo "install.sh: the base image has no pgvector; use PGVECTOR=debian-source" >&2; exit 1; }
    ;;
debian-source)
    build_deps="postgresql-server-dev-$PG_MAJOR build-essential dpkg-dev"
    apt-get install -y --no-install-recommends $build_deps
    echo "deb-src http://deb.debian.org/debian $PGVECTOR_SUITE main" > /etc/apt/sources.list.d/pgvector-src.list
    apt-get update
    mkdir /tmp/pgvector && cd /tmp/pgvector
    apt-get source pgvector
    cd pgvector-*/
    # OPTFLAGS="": no -march=native, the image must run on other CPUs than the builder's.
    make OPTFLAGS="" && make install OPTFLAGS=""
    cd / && rm -rf /tmp/pgvector /etc/apt/sources.list.d/pgvector-src.list
    apt-get purge -y --auto-remove $build_deps
    ;;
*)
    echo "install.sh: PGVECTOR must be image or debian-source, got $PGVECTOR" >&2
    exit 1
    ;;
esac
install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data
install -d -o postgres -g postgres -m 2775 /var/run/postgresql
# The model host's API key, written here by the entrypoint at each start (longembed.host_key_file).
install -d -o postgres -g postgres -m 0700 /run/longembed
apt-get clean
rm -rf /var/lib/apt/lists/*
