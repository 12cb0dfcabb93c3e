package catalog

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Outcomes of a restore into a VM.
const (
	RestoreRunning   = "running"
	RestoreCompleted = "completed"
	RestoreFailed    = "failed"
)

// VMRestore is one restore of a restore point into a VM (migration 009).
// It is recorded before the restore writes anything, because a VM
// written by a restore no longer has the change-tracking history its
// chain was built on: the next backup of it must be full, also when the
// restore failed halfway.
type VMRestore struct {
	ID         string // the restore's ID (also in its snapshot's name)
	Profile    string // vCenter profile the restore wrote through
	VMUUID     string // instance UUID of the VM written
	VMName     string
	BackupID   string // the restore point written into the VM
	WorkflowID string
	Snapshot   string // the snapshot taken before the first write, "name (moref)"
	StartedAt  time.Time
	FinishedAt time.Time // zero while running
	Outcome    string    // running, completed or failed
	Error      string
}

// BeginVMRestore records a restore into a VM as running. It is
// idempotent: a second call with the same ID changes nothing.
func (c *Catalog) BeginVMRestore(ctx context.Context, r VMRestore) error {
	_, err := c.pool.Exec(ctx, `INSERT INTO vm_restores (id, profile, vm_uuid, vm_name, backup_id, workflow_id)
		VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING`,
		r.ID, r.Profile, r.VMUUID, r.VMName, r.BackupID, r.WorkflowID)
	if err != nil {
		return fmt.Errorf("catalog: record the restore %s into VM %s: %w", r.ID, r.VMName, err)
	}
	return nil
}

// SetVMRestoreSnapshot records the snapshot a restore took before its
// first write ("name (moref)"), so that the operator finds it in the
// catalog too.
func (c *Catalog) SetVMRestoreSnapshot(ctx context.Context, id, snapshot string) error {
	if _, err := c.pool.Exec(ctx, `UPDATE vm_restores SET snapshot = $2 WHERE id = $1`, id, snapshot); err != nil {
		return fmt.Errorf("catalog: record the snapshot of restore %s: %w", id, err)
	}
	return nil
}

// FinishVMRestore records a restore's outcome (RestoreCompleted or
// RestoreFailed, with the error). Idempotent; an unknown ID is
// ErrNotFound.
func (c *Catalog) FinishVMRestore(ctx context.Context, id, outcome, reason string) error {
	if outcome != RestoreCompleted && outcome != RestoreFailed {
		return fmt.Errorf("catalog: finish restore %s: outcome %q is not %s or %s", id, outcome, RestoreCompleted, RestoreFailed)
	}
	tag, err := c.pool.Exec(ctx, `UPDATE vm_restores SET outcome = $2, error = $3, finished_at = coalesce(finished_at, now())
		WHERE id = $1`, id, outcome, reason)
	if err != nil {
		return fmt.Errorf("catalog: finish restore %s: %w", id, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("catalog: finish restore %s: %w", id, ErrNotFound)
	}
	return nil
}

// RestoredSince returns the newest restore into the VM (by instance
// UUID, under any profile: its disks are the same) that began after
// restore point backupID began, that ended after it, or that has not
// ended, whatever its outcome; nil when none did. A backup whose previous
// restore point is older than such a restore must be full: the VM's
// change tracking no longer matches the chain. One that ended after the
// point began counts too: that point's snapshot may have caught the
// restore half way, and what the restore wrote after it is not in the
// point's changes (the lab's CBT cannot see it at all). One that has not
// ended (still running, or its workflow was terminated) counts for the
// same reason, until FinishVMRestore records its end (the sweeper does
// for a restore whose workflow is gone).
func (c *Catalog) RestoredSince(ctx context.Context, vmUUID, backupID string) (*VMRestore, error) {
	row := c.pool.QueryRow(ctx, `WITH point AS (SELECT started_at AS point_start FROM backups WHERE id = $2)
		SELECT `+vmRestoreColumns+` FROM vm_restores, point
		WHERE vm_uuid = $1 AND (started_at > point_start OR finished_at IS NULL OR finished_at > point_start)
		ORDER BY started_at DESC LIMIT 1`, vmUUID, backupID)
	r, err := scanVMRestore(row)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	return r, err
}

// UnfinishedVMRestores returns the restores into VMs whose outcome is not
// recorded yet (running, or their workflow ended without recording it),
// oldest first: into the VM of that instance UUID, or into any VM when
// vmUUID is empty.
func (c *Catalog) UnfinishedVMRestores(ctx context.Context, vmUUID string) ([]VMRestore, error) {
	rows, err := c.pool.Query(ctx, `SELECT `+vmRestoreColumns+` FROM vm_restores
		WHERE finished_at IS NULL AND ($1 = '' OR vm_uuid = $1) ORDER BY started_at, id`, vmUUID)
	if err != nil {
		return nil, fmt.Errorf("catalog: unfinished restores into VMs: %w", err)
	}
	defer rows.Close()
	var out []VMRestore
	for rows.Next() {
		r, err := scanVMRestore(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, *r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("catalog: unfinished restores into VMs: %w", err)
	}
	return out, nil
}

const vmRestoreColumns = `id, profile, vm_uuid, vm_name, backup_id, workflow_id, snapshot, started_at, finished_at, outcome, error`

func scanVMRestore(row pgx.Row) (*VMRestore, error) {
	var r VMRestore
	var finished *time.Time
	if err := row.Scan(&r.ID, &r.Profile, &r.VMUUID, &r.VMName, &r.BackupID, &r.WorkflowID, &r.Snapshot,
		&r.StartedAt, &finished, &r.Outcome, &r.Error); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, err
		}
		return nil, fmt.Errorf("catalog: restores into VMs: %w", err)
	}
	if finished != nil {
		r.FinishedAt = *finished
	}
	return &r, nil
}
