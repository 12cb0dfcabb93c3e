-- Integrity of committed images, kept cheap to check before every
-- incremental: the file's inode, mtime and ctime at commit (or at the last
-- full hash) prove it unchanged without re-reading it; a difference means
-- a full SHA-256. An image found damaged, and every restore point built
-- on it, is marked: never offered as restorable, never silently dropped.
ALTER TABLE backup_disks
	ADD COLUMN file_inode    bigint NOT NULL DEFAULT 0,
	ADD COLUMN file_mtime_ns bigint NOT NULL DEFAULT 0,
	ADD COLUMN file_ctime_ns bigint NOT NULL DEFAULT 0,
	ADD COLUMN damaged       text NOT NULL DEFAULT '',
	ADD COLUMN damaged_at    timestamptz;

-- Paths relative to the repository root, so a moved or remounted
-- repository keeps working. The layout is
-- <profile>/<vm instance uuid>/<disk key>/<backup id>.qcow2: an absolute
-- path that ends so is cut to that; anything else stays as it was (the
-- code resolves both).
UPDATE backup_disks d
SET path = v.profile || '/' || v.instance_uuid || '/' || d.disk_key || '/' || d.backup_id || '.qcow2'
FROM backups b JOIN vms v ON v.id = b.vm_id
WHERE b.id = d.backup_id
  AND left(d.path, 1) = '/'
  AND right(d.path, length(v.profile || '/' || v.instance_uuid || '/' || d.disk_key || '/' || d.backup_id || '.qcow2') + 1)
      = '/' || v.profile || '/' || v.instance_uuid || '/' || d.disk_key || '/' || d.backup_id || '.qcow2';
