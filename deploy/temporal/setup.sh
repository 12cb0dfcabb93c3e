#!/bin/sh
# One-shot set-up of the Temporal namespace for cbtflow, run by the
# temporal-setup service (temporalio/admin-tools). Idempotent: it waits for
# the namespace that auto-setup registers, then creates each of cbtflow's
# search attributes (type Keyword) that is not there yet.
set -eu

: "${TEMPORAL_ADDRESS:?set TEMPORAL_ADDRESS (host:port of the Temporal frontend)}"
ns=${TEMPORAL_NAMESPACE:-default}
echo "waiting for namespace $ns on $TEMPORAL_ADDRESS"
i=0
until temporal operator namespace describe --address "$TEMPORAL_ADDRESS" --namespace "$ns" >/dev/null 2>&1; do
	i=$((i + 1))
	if [ "$i" -ge 120 ]; then
		echo "namespace $ns not found after 4 minutes" >&2
		exit 1
	fi
	sleep 2
done

existing=$(temporal operator search-attribute list --address "$TEMPORAL_ADDRESS" --namespace "$ns")
for name in CbtflowVM CbtflowMode CbtflowVCenter CbtflowBackupID; do
	if printf '%s\n' "$existing" | grep -qw "$name"; then
		echo "search attribute $name: already registered"
	else
		temporal operator search-attribute create --address "$TEMPORAL_ADDRESS" --namespace "$ns" --name "$name" --type Keyword
		echo "search attribute $name: registered"
	fi
done
