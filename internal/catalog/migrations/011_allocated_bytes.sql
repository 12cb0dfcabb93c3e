-- The space an image takes in the repository (its file's blocks), at
-- commit or as a prune's merge rewrote it. Images are sparse (2 MiB
-- clusters whose unwritten subclusters are holes), so their size says
-- less of the space they use; NULL for images recorded before this
-- column, whose size then stands for it.
ALTER TABLE backup_disks ADD COLUMN allocated_bytes bigint;
ALTER TABLE pending_merges ADD COLUMN new_allocated_bytes bigint;
