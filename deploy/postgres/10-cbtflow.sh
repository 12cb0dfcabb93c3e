#!/bin/sh
# Runs once, when the PostgreSQL data folder is first initialised (the
# official image runs /docker-entrypoint-initdb.d/*.sh as the postgres
# user). Creates the role and the database of cbtflow's catalog; cbtflow
# creates its tables itself (embedded migrations) when the worker starts.
# Temporal's databases are created by the temporal service (auto-setup).
#
# The password is read from the same pgpass line the worker uses
# (secret cbtflow_pgpass: "*:*:cbtflow:cbtflow:PASSWORD"), so it is
# written down in one place only.
set -eu

pgpass=/run/secrets/cbtflow_pgpass
line=$(grep -v '^#' "$pgpass" | head -n 1)
password=${line#*:*:*:*:}
if [ -z "$password" ] || [ "$password" = "$line" ]; then
	echo "10-cbtflow.sh: $pgpass: want one line HOST:PORT:DATABASE:USER:PASSWORD" >&2
	exit 1
fi

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -v pw="$password" <<'SQL'
CREATE ROLE cbtflow LOGIN PASSWORD :'pw';
CREATE DATABASE cbtflow OWNER cbtflow;
REVOKE ALL ON DATABASE cbtflow FROM PUBLIC;
SQL
