-- Verifications (starter verify, the Verify workflow and its weekly
-- schedule): one row per verified disk of a restore point and run; the
-- newest of each disk says whether the point is known good, and when it
-- was last proven. Removed with the restore point.
CREATE TABLE verifications (
	backup_id   text NOT NULL REFERENCES backups (id) ON DELETE CASCADE,
	disk_key    integer NOT NULL,
	verified_at timestamptz NOT NULL DEFAULT now(),
	ok          boolean NOT NULL,
	problem     text NOT NULL DEFAULT '',
	PRIMARY KEY (backup_id, disk_key, verified_at)
);
