package catalog

import (
	"context"
	"fmt"
	"time"
)

// Verification is the newest verification of a restore point: when its
// disks were last verified (the newest of them), and whether the newest
// verification of every disk found it sound; Problem is the first
// problem found.
type Verification struct {
	At      time.Time
	OK      bool
	Problem string
}

// RecordVerification records that disk key of restore point backupID was
// verified now, sound or with problem.
func (c *Catalog) RecordVerification(ctx context.Context, backupID string, key int32, ok bool, problem string) error {
	_, err := c.pool.Exec(ctx, `INSERT INTO verifications (backup_id, disk_key, ok, problem) VALUES ($1, $2, $3, $4)`,
		backupID, key, ok, problem)
	if err != nil {
		return fmt.Errorf("catalog: record the verification of %s disk %d: %w", backupID, key, err)
	}
	return nil
}

// Verifications returns the newest verification of every restore point
// verified at least once, by backup ID.
func (c *Catalog) Verifications(ctx context.Context) (map[string]Verification, error) {
	rows, err := c.pool.Query(ctx, `SELECT backup_id, max(verified_at), bool_and(ok),
			coalesce((array_agg(problem ORDER BY disk_key) FILTER (WHERE NOT ok))[1], '')
		FROM (SELECT DISTINCT ON (backup_id, disk_key) backup_id, disk_key, verified_at, ok, problem
			FROM verifications ORDER BY backup_id, disk_key, verified_at DESC) newest
		GROUP BY backup_id`)
	if err != nil {
		return nil, fmt.Errorf("catalog: verifications: %w", err)
	}
	defer rows.Close()
	out := map[string]Verification{}
	for rows.Next() {
		var id string
		var v Verification
		if err := rows.Scan(&id, &v.At, &v.OK, &v.Problem); err != nil {
			return nil, err
		}
		out[id] = v
	}
	return out, rows.Err()
}
