-- Instant access (starter export, the Export workflow): one row per
-- running export of a restore point's disk over NBD, a lease its worker
-- renews while it serves. A prune keeps the exported point and every
-- point its chain builds on, and its catalog transactions refuse to
-- remove or rewrite any of them while the lease is live; a lease whose
-- expires_at has passed (its worker died) counts as gone.
CREATE TABLE exports (
	id          text PRIMARY KEY, -- the Export's workflow ID, export/<backup id>/<disk key>
	profile     text NOT NULL,
	vm_uuid     text NOT NULL,
	backup_id   text NOT NULL,
	disk_key    integer NOT NULL,
	address     text NOT NULL DEFAULT '', -- host:port qemu-nbd listens on
	started_at  timestamptz NOT NULL DEFAULT now(),
	expires_at  timestamptz NOT NULL
);
CREATE INDEX exports_vm ON exports (profile, vm_uuid);
