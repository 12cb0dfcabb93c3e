-- The attempt that holds an export's lease (its ServeExport's run and
-- attempt): only it renews or deletes the lease, so an attempt that was
-- replaced (its heartbeat timed out while it ran on) can neither keep
-- the lease alive nor delete the lease of the attempt that took over.
ALTER TABLE exports ADD COLUMN holder text NOT NULL DEFAULT '';
