-- The space an image takes in the repository at commit (its file's
-- blocks). Images are sparse (2 MiB clusters whose unwritten subclusters
-- are holes), so their size says less of the space they use; NULL for
-- images committed before this column and for images a prune merged,
-- whose size then stands for it.
ALTER TABLE backup_disks ADD COLUMN allocated_bytes bigint;
