-- Pruning: restore points a retention policy no longer keeps are removed,
-- and the data of a removed image that a kept restore point builds on is
-- merged into a new image of that point (same view, new backing), written
-- beside it and renamed over it. From the rename until the transaction
-- that records the new image, the file at the path may be the old image or
-- the new one: both show the kept point's disk exactly, and a pending
-- merge records the new one's identity so that checks accept either.
CREATE TABLE pending_merges (
	backup_id             text    NOT NULL,
	disk_key              integer NOT NULL,
	prune_id              text    NOT NULL,
	new_backing_backup_id text REFERENCES backups (id),
	new_size_bytes        bigint  NOT NULL,
	new_sha256            text    NOT NULL,
	new_file_inode        bigint  NOT NULL DEFAULT 0,
	new_file_mtime_ns     bigint  NOT NULL DEFAULT 0,
	new_file_ctime_ns     bigint  NOT NULL DEFAULT 0,
	-- where the new image waits before its rename, relative to the
	-- repository root
	temp_path             text    NOT NULL,
	created_at            timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (backup_id, disk_key),
	FOREIGN KEY (backup_id, disk_key) REFERENCES backup_disks (backup_id, disk_key)
);

-- The prunes that removed restore points, for `starter repo`, metrics and
-- the operator's record.
CREATE TABLE prunes (
	id            text PRIMARY KEY,
	vm_id         bigint NOT NULL REFERENCES vms (id),
	finished_at   timestamptz NOT NULL DEFAULT now(),
	removed       text[] NOT NULL,
	bytes_freed   bigint NOT NULL DEFAULT 0
);
