-- cbtflow catalog: VMs, backups (restore points) and per-disk rows.
CREATE TABLE vms (
	id            bigserial PRIMARY KEY,
	profile       text NOT NULL,
	instance_uuid text NOT NULL,
	name          text NOT NULL,
	UNIQUE (profile, instance_uuid)
);

CREATE TABLE backups (
	id          text PRIMARY KEY,
	vm_id       bigint NOT NULL REFERENCES vms (id),
	-- running: started, not committed; committed: a restore point;
	-- failed: ended without a restore point (its files may be partial).
	status      text NOT NULL CHECK (status IN ('running', 'committed', 'failed')),
	mode        text NOT NULL,
	workflow_id text NOT NULL DEFAULT '',
	run_id      text NOT NULL DEFAULT '',
	snapshot    text NOT NULL DEFAULT '',
	error       text NOT NULL DEFAULT '',
	started_at  timestamptz NOT NULL DEFAULT now(),
	finished_at timestamptz
);
CREATE INDEX backups_vm_started ON backups (vm_id, started_at DESC);

CREATE TABLE backup_disks (
	backup_id         text NOT NULL REFERENCES backups (id),
	disk_key          integer NOT NULL,
	capacity          bigint NOT NULL,
	mode              text NOT NULL CHECK (mode IN ('full', 'incremental')),
	path              text NOT NULL,
	backing_backup_id text REFERENCES backups (id),
	change_id_from    text NOT NULL DEFAULT '',
	change_id         text NOT NULL,
	changed_bytes     bigint NOT NULL DEFAULT 0,
	written_bytes     bigint NOT NULL DEFAULT 0,
	size_bytes        bigint NOT NULL,
	sha256            text NOT NULL,
	note              text NOT NULL DEFAULT '',
	PRIMARY KEY (backup_id, disk_key)
);
