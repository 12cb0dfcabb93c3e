-- Restores into a VM (starter restore --to-vm, the RestoreVM workflow):
-- one row per restore, recorded before its first write. A VM written by
-- a restore no longer has the CBT history its chain was built on, so the
-- next backup of every disk of the VM is full when a restore into it
-- began after its latest restore point (whatever the outcome: a failed
-- restore may have written part of a disk).
CREATE TABLE vm_restores (
	id          text PRIMARY KEY,
	profile     text NOT NULL,
	vm_uuid     text NOT NULL,
	vm_name     text NOT NULL,
	backup_id   text NOT NULL,
	workflow_id text NOT NULL DEFAULT '',
	snapshot    text NOT NULL DEFAULT '',
	started_at  timestamptz NOT NULL DEFAULT now(),
	finished_at timestamptz,
	outcome     text NOT NULL DEFAULT 'running' CHECK (outcome IN ('running', 'completed', 'failed')),
	error       text NOT NULL DEFAULT ''
);
CREATE INDEX vm_restores_vm_started ON vm_restores (vm_uuid, started_at DESC);
