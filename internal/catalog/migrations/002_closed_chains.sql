-- A disk removed from its VM closes its chain: the chain's restore points
-- stay (and restore), but no later backup continues it, even when a new
-- disk gets the same device key.
CREATE TABLE closed_chains (
	vm_id          bigint NOT NULL REFERENCES vms (id),
	disk_key       integer NOT NULL,
	last_backup_id text NOT NULL REFERENCES backups (id),
	closed_at      timestamptz NOT NULL DEFAULT now(),
	reason         text NOT NULL DEFAULT '',
	PRIMARY KEY (vm_id, disk_key, last_backup_id)
);
