-- Retention policies: which restore points of a VM the prune keeps
-- (internal/retention's rules), and how long a disk's chain may grow.
-- A row with a VM is that VM's own policy; the row without one (at most
-- one) is the default of every VM without its own. A VM with neither
-- keeps everything. A keep count of 0 turns its rule off; max_chain 0
-- means retention.DefaultMaxChain.
CREATE TABLE retention_policies (
	id           bigserial PRIMARY KEY,
	vm_id        bigint UNIQUE REFERENCES vms (id),
	keep_last    integer NOT NULL DEFAULT 0 CHECK (keep_last >= 0),
	keep_daily   integer NOT NULL DEFAULT 0 CHECK (keep_daily >= 0),
	keep_weekly  integer NOT NULL DEFAULT 0 CHECK (keep_weekly >= 0),
	keep_monthly integer NOT NULL DEFAULT 0 CHECK (keep_monthly >= 0),
	keep_yearly  integer NOT NULL DEFAULT 0 CHECK (keep_yearly >= 0),
	max_chain    integer NOT NULL DEFAULT 0 CHECK (max_chain >= 0),
	updated_at   timestamptz NOT NULL DEFAULT now(),
	-- A policy that keeps nothing would prune every restore point.
	CHECK (keep_last::bigint + keep_daily + keep_weekly + keep_monthly + keep_yearly > 0)
);
-- UNIQUE (vm_id) lets NULLs repeat: this index allows one default.
CREATE UNIQUE INDEX retention_policies_one_default ON retention_policies ((vm_id IS NULL)) WHERE vm_id IS NULL;
