-- Block digests: since this release a transfer writes, beside each image,
-- a digest file (<image>.digests, package internal/digest) holding the
-- SHA-256 of every block it wrote and the ranges it zeroed; the file's own
-- SHA-256 and size are recorded with the image, so a verification can
-- prove the file before it trusts it. NULL: the image has no digest file
-- (made before digests existed). digest_partial is set when a prune merges
-- removed points' data into the image: its digest file still describes
-- what its own backup wrote, not what was merged in.
ALTER TABLE backup_disks
	ADD COLUMN digest_sha256  text,
	ADD COLUMN digest_size    bigint,
	ADD COLUMN digest_partial boolean NOT NULL DEFAULT false;
