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

// VMVerification is a VM's newest verification: that of the restore
// point verified last, as Verifications sums up each point's.
type VMVerification struct {
	VM
	BackupID string
	Verification
}

// NewestVerifications returns the newest verification of every VM with a
// verified restore point (the worker's metrics), sorted by name, profile
// and UUID as Usage sorts. It is the newest by time, not the newest
// point's: a point verified after a newer one decides.
func (c *Catalog) NewestVerifications(ctx context.Context) ([]VMVerification, error) {
	rows, err := c.pool.Query(ctx, `WITH newest AS (
			SELECT DISTINCT ON (backup_id, disk_key) backup_id, disk_key, verified_at, ok, problem
			FROM verifications ORDER BY backup_id, disk_key, verified_at DESC
		), points AS (
			SELECT backup_id, max(verified_at) AS at, bool_and(ok) AS ok,
				coalesce((array_agg(problem ORDER BY disk_key) FILTER (WHERE NOT ok))[1], '') AS problem
			FROM newest GROUP BY backup_id
		)
		SELECT profile, instance_uuid, name, backup_id, at, ok, problem FROM (
			SELECT DISTINCT ON (v.id) v.profile, v.instance_uuid, v.name, p.backup_id, p.at, p.ok, p.problem
			FROM points p JOIN backups b ON b.id = p.backup_id JOIN vms v ON v.id = b.vm_id
			ORDER BY v.id, p.at DESC, p.backup_id DESC) vm
		ORDER BY name, profile, instance_uuid`)
	if err != nil {
		return nil, fmt.Errorf("catalog: newest verifications: %w", err)
	}
	defer rows.Close()
	var out []VMVerification
	for rows.Next() {
		var v VMVerification
		if err := rows.Scan(&v.Profile, &v.UUID, &v.Name, &v.BackupID, &v.At, &v.OK, &v.Problem); err != nil {
			return nil, fmt.Errorf("catalog: newest verifications: %w", err)
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("catalog: newest verifications: %w", err)
	}
	return out, nil
}
