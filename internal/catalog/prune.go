package catalog

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"
)

// MergedImage is a kept restore point's disk image as a prune rewrites
// it: the same disk, now backed by another kept restore point (Backing)
// or by none (a full image), with the new file's size, SHA-256 and stamp.
// The new file is written at TempPath (relative to the repository root,
// beside the image) and renamed over the image.
type MergedImage struct {
	BackupID  string
	Key       int32
	Backing   string // the restore point the new image builds on; "" for a full image
	SizeBytes int64
	SHA256    string
	Stamp     FileStamp
	TempPath  string
	// AllocatedBytes is the space the new file takes; 0 when unknown
	// (SizeBytes then stands for it).
	AllocatedBytes int64
}

// PendingMerge is a MergedImage recorded by BeginMerges and not yet
// settled: the file at the image's path is either the old image or the
// new one, and both are sound.
type PendingMerge struct {
	PruneID string
	MergedImage
}

// ErrPendingMerge is returned by BeginMerges when a disk image already has
// a pending merge of another prune: settle it first.
var ErrPendingMerge = errors.New("catalog: a merge of this image by another prune is not settled")

// BeginMerges records, in one transaction, the new images a prune is
// about to rename over kept restore points' images. Idempotent for the
// same prune: a repeated call replaces that prune's rows.
func (c *Catalog) BeginMerges(ctx context.Context, pruneID string, ms []MergedImage) error {
	if pruneID == "" {
		return errors.New("catalog: begin merges: no prune ID")
	}
	return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		// An image a live export serves is never rewritten: under the VM's
		// lock, which an export's lease also takes, either the lease is
		// seen here, or these pending merges are seen by the lease (which
		// then waits).
		if len(ms) > 0 {
			profile, vmUUID, err := vmOf(ctx, tx, ms[0].BackupID)
			if err != nil {
				return fmt.Errorf("catalog: begin merges: %w", err)
			}
			if err := lockVM(ctx, tx, profile, vmUUID); err != nil {
				return err
			}
			if err := checkNotExported(ctx, tx, profile, vmUUID, nil, ms); err != nil {
				return fmt.Errorf("catalog: begin merges of prune %s: %w", pruneID, err)
			}
		}
		for _, m := range ms {
			if m.SHA256 == "" || m.TempPath == "" || m.SizeBytes <= 0 {
				return fmt.Errorf("catalog: begin merges: restore point %s disk %d lacks size, SHA-256 or temporary path", m.BackupID, m.Key)
			}
			var backing *string
			if m.Backing != "" {
				backing = &m.Backing
			}
			var owner string
			err := tx.QueryRow(ctx, `INSERT INTO pending_merges (backup_id, disk_key, prune_id, new_backing_backup_id,
					new_size_bytes, new_sha256, new_file_inode, new_file_mtime_ns, new_file_ctime_ns, temp_path, new_allocated_bytes)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULLIF($11::bigint, 0))
				ON CONFLICT (backup_id, disk_key) DO UPDATE SET
					new_backing_backup_id = EXCLUDED.new_backing_backup_id, new_size_bytes = EXCLUDED.new_size_bytes,
					new_sha256 = EXCLUDED.new_sha256, new_file_inode = EXCLUDED.new_file_inode,
					new_file_mtime_ns = EXCLUDED.new_file_mtime_ns, new_file_ctime_ns = EXCLUDED.new_file_ctime_ns,
					temp_path = EXCLUDED.temp_path, new_allocated_bytes = EXCLUDED.new_allocated_bytes
				WHERE pending_merges.prune_id = EXCLUDED.prune_id
				RETURNING prune_id`,
				m.BackupID, m.Key, pruneID, backing, m.SizeBytes, m.SHA256,
				m.Stamp.Inode, m.Stamp.MtimeNs, m.Stamp.CtimeNs, m.TempPath, m.AllocatedBytes).Scan(&owner)
			if errors.Is(err, pgx.ErrNoRows) {
				return fmt.Errorf("catalog: restore point %s disk %d: %w", m.BackupID, m.Key, ErrPendingMerge)
			}
			if err != nil {
				return fmt.Errorf("catalog: begin merge of %s disk %d: %w", m.BackupID, m.Key, err)
			}
		}
		return nil
	})
}

const pendingColumns = `p.prune_id, p.backup_id, p.disk_key, coalesce(p.new_backing_backup_id, ''), p.new_size_bytes,
	p.new_sha256, p.new_file_inode, p.new_file_mtime_ns, p.new_file_ctime_ns, p.temp_path, coalesce(p.new_allocated_bytes, 0)`

func scanPending(row pgx.Row, p *PendingMerge) error {
	return row.Scan(&p.PruneID, &p.BackupID, &p.Key, &p.Backing, &p.SizeBytes, &p.SHA256,
		&p.Stamp.Inode, &p.Stamp.MtimeNs, &p.Stamp.CtimeNs, &p.TempPath, &p.AllocatedBytes)
}

// PendingMerges returns the unsettled merges of a VM's restore points.
func (c *Catalog) PendingMerges(ctx context.Context, profile, vmUUID string) ([]PendingMerge, error) {
	rows, err := c.pool.Query(ctx, `SELECT `+pendingColumns+` FROM pending_merges p
		JOIN backups b ON b.id = p.backup_id JOIN vms v ON v.id = b.vm_id
		WHERE v.profile = $1 AND v.instance_uuid = $2 ORDER BY p.backup_id, p.disk_key`, profile, vmUUID)
	if err != nil {
		return nil, fmt.Errorf("catalog: pending merges: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (PendingMerge, error) {
		var p PendingMerge
		return p, scanPending(r, &p)
	})
	if err != nil {
		return nil, fmt.Errorf("catalog: pending merges: %w", err)
	}
	return out, nil
}

// pendingOf returns the pending merge of one disk image, or nil.
func pendingOf(ctx context.Context, q pgx.Row) (*PendingMerge, error) {
	var p PendingMerge
	err := scanPending(q, &p)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("catalog: pending merge: %w", err)
	}
	return &p, nil
}

// SettleMerge ends a pending merge that its prune did not finish. applied
// says which file is at the image's path: the new one (the catalog then
// records it, so the restore point keeps showing the same disk over its
// new backing) or still the old one (the pending row is dropped and the
// caller removes the temporary file).
func (c *Catalog) SettleMerge(ctx context.Context, backupID string, key int32, applied bool) error {
	return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		p, err := pendingOf(ctx, tx.QueryRow(ctx, `SELECT `+pendingColumns+` FROM pending_merges p
			WHERE p.backup_id = $1 AND p.disk_key = $2 FOR UPDATE`, backupID, key))
		if err != nil || p == nil {
			return err
		}
		if applied {
			if err := applyMerged(ctx, tx, p.MergedImage, p.PruneID); err != nil {
				return err
			}
		}
		_, err = tx.Exec(ctx, `DELETE FROM pending_merges WHERE backup_id = $1 AND disk_key = $2`, backupID, key)
		if err != nil {
			return fmt.Errorf("catalog: settle merge of %s disk %d: %w", backupID, key, err)
		}
		return nil
	})
}

// applyMerged records a merged image as the restore point's disk image.
// The backup's mode and byte counts stay what the backup did; the note
// says the image was merged.
func applyMerged(ctx context.Context, tx pgx.Tx, m MergedImage, pruneID string) error {
	var backing *string
	if m.Backing != "" {
		backing = &m.Backing
	}
	note := "image merged by prune " + pruneID
	if m.Backing == "" {
		note += ": now a full image"
	} else {
		note += ": now builds on " + m.Backing
	}
	tag, err := tx.Exec(ctx, `UPDATE backup_disks SET backing_backup_id = $3, size_bytes = $4, sha256 = $5,
			allocated_bytes = NULLIF($10::bigint, 0),
			file_inode = $6, file_mtime_ns = $7, file_ctime_ns = $8, digest_partial = true,
			note = CASE WHEN note = '' THEN $9 ELSE note || '; ' || $9 END
		WHERE backup_id = $1 AND disk_key = $2`,
		m.BackupID, m.Key, backing, m.SizeBytes, m.SHA256, m.Stamp.Inode, m.Stamp.MtimeNs, m.Stamp.CtimeNs, note, m.AllocatedBytes)
	if err != nil {
		return fmt.Errorf("catalog: merged image of %s disk %d: %w", m.BackupID, m.Key, err)
	}
	if tag.RowsAffected() != 1 {
		return fmt.Errorf("catalog: merged image of %s disk %d: %w", m.BackupID, m.Key, ErrNotFound)
	}
	return nil
}

// PruneRecord is one prune of one VM.
type PruneRecord struct {
	ID      string
	Profile string
	VMUUID  string
	// Removed are the restore points removed.
	Removed    []string
	BytesFreed int64
}

// Prune removes restore points of one VM and records the merged images of
// the kept points that built on them, in one transaction: every merged
// image is recorded (its pending merge dropped), every removed point's
// rows are deleted, a closed chain that ended at a removed point now ends
// at its nearest kept point, and the prune is recorded. A removed point
// that a remaining disk image still builds on fails the transaction
// (nothing changes). It returns the bytes freed as recorded. Idempotent:
// a prune already recorded changes nothing, and its record's bytes are
// returned.
func (c *Catalog) Prune(ctx context.Context, p PruneRecord, merged []MergedImage) (int64, error) {
	if p.ID == "" || p.Profile == "" || p.VMUUID == "" {
		return 0, errors.New("catalog: prune: ID, profile and VM UUID are required")
	}
	freed := p.BytesFreed
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		var vmID int64
		err := tx.QueryRow(ctx, `SELECT id FROM vms WHERE profile = $1 AND instance_uuid = $2`, p.Profile, p.VMUUID).Scan(&vmID)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("catalog: prune %s: VM %s (%s): %w", p.ID, p.VMUUID, p.Profile, ErrNotFound)
		}
		if err != nil {
			return fmt.Errorf("catalog: prune %s: %w", p.ID, err)
		}
		err = tx.QueryRow(ctx, `SELECT bytes_freed FROM prunes WHERE id = $1`, p.ID).Scan(&freed)
		if err == nil {
			return nil // recorded by an earlier attempt
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("catalog: prune %s: %w", p.ID, err)
		}
		freed = p.BytesFreed
		// No point a live export reads is removed, and no image it reads
		// is replaced by a merged one (see BeginMerges): checked under the
		// VM's lock.
		if err := lockVM(ctx, tx, p.Profile, p.VMUUID); err != nil {
			return err
		}
		if err := checkNotExported(ctx, tx, p.Profile, p.VMUUID, p.Removed, merged); err != nil {
			return fmt.Errorf("catalog: prune %s: %w", p.ID, err)
		}
		for _, m := range merged {
			if slices.Contains(p.Removed, m.BackupID) {
				return fmt.Errorf("catalog: prune %s: restore point %s is both removed and merged", p.ID, m.BackupID)
			}
			if err := applyMerged(ctx, tx, m, p.ID); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `DELETE FROM pending_merges WHERE backup_id = $1 AND disk_key = $2`, m.BackupID, m.Key); err != nil {
				return fmt.Errorf("catalog: prune %s: %w", p.ID, err)
			}
		}
		for _, id := range p.Removed {
			var status string
			var owner int64
			err := tx.QueryRow(ctx, `SELECT status, vm_id FROM backups WHERE id = $1 FOR UPDATE`, id).Scan(&status, &owner)
			if errors.Is(err, pgx.ErrNoRows) {
				continue // removed by an earlier attempt of this prune... or never there
			}
			if err != nil {
				return fmt.Errorf("catalog: prune %s: %w", p.ID, err)
			}
			if owner != vmID || status != StatusCommitted {
				return fmt.Errorf("catalog: prune %s: backup %s is not a restore point of VM %s", p.ID, id, p.VMUUID)
			}
			if err := moveClosedChains(ctx, tx, id, p.Removed); err != nil {
				return fmt.Errorf("catalog: prune %s: %w", p.ID, err)
			}
		}
		if len(p.Removed) > 0 {
			if _, err := tx.Exec(ctx, `DELETE FROM pending_merges WHERE backup_id = ANY($1)`, p.Removed); err != nil {
				return fmt.Errorf("catalog: prune %s: %w", p.ID, err)
			}
			if _, err := tx.Exec(ctx, `DELETE FROM backup_disks WHERE backup_id = ANY($1)`, p.Removed); err != nil {
				return fmt.Errorf("catalog: prune %s: %w", p.ID, err)
			}
			// A remaining image that still builds on a removed point fails
			// here (foreign key): the prune's plan was wrong, nothing changes.
			if _, err := tx.Exec(ctx, `DELETE FROM backups WHERE id = ANY($1)`, p.Removed); err != nil {
				return fmt.Errorf("catalog: prune %s: removing %v: %w", p.ID, p.Removed, err)
			}
		}
		_, err = tx.Exec(ctx, `INSERT INTO prunes (id, vm_id, removed, bytes_freed) VALUES ($1, $2, $3, $4)`,
			p.ID, vmID, append([]string{}, p.Removed...), p.BytesFreed)
		if err != nil {
			return fmt.Errorf("catalog: prune %s: %w", p.ID, err)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return freed, nil
}

// PrunedPoints returns the restore points of a VM that its prunes removed
// from the catalog, oldest prune first.
func (c *Catalog) PrunedPoints(ctx context.Context, profile, vmUUID string) ([]string, error) {
	rows, err := c.pool.Query(ctx, `SELECT r FROM prunes p JOIN vms v ON v.id = p.vm_id, unnest(p.removed) AS r
		WHERE v.profile = $1 AND v.instance_uuid = $2 ORDER BY p.finished_at, r`, profile, vmUUID)
	if err != nil {
		return nil, fmt.Errorf("catalog: pruned points: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("catalog: pruned points: %w", err)
	}
	return ids, nil
}

// moveClosedChains makes each closed chain that ends at the removed point
// id end at the nearest point of that disk's chain that is not removed,
// or drops it when there is none.
func moveClosedChains(ctx context.Context, tx pgx.Tx, id string, removed []string) error {
	rows, err := tx.Query(ctx, `SELECT vm_id, disk_key, reason FROM closed_chains WHERE last_backup_id = $1`, id)
	if err != nil {
		return err
	}
	type cc struct {
		vm     int64
		key    int32
		reason string
	}
	closed, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (cc, error) {
		var x cc
		return x, r.Scan(&x.vm, &x.key, &x.reason)
	})
	if err != nil {
		return err
	}
	for _, x := range closed {
		last := id
		for last != "" && slices.Contains(removed, last) {
			var next string
			err := tx.QueryRow(ctx, `SELECT coalesce(backing_backup_id, '') FROM backup_disks
				WHERE backup_id = $1 AND disk_key = $2`, last, x.key).Scan(&next)
			if errors.Is(err, pgx.ErrNoRows) {
				next = ""
			} else if err != nil {
				return err
			}
			last = next
		}
		if _, err := tx.Exec(ctx, `DELETE FROM closed_chains WHERE vm_id = $1 AND disk_key = $2 AND last_backup_id = $3`, x.vm, x.key, id); err != nil {
			return err
		}
		if last != "" {
			if _, err := tx.Exec(ctx, `INSERT INTO closed_chains (vm_id, disk_key, last_backup_id, reason)
				VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING`, x.vm, x.key, last, x.reason); err != nil {
				return err
			}
		}
	}
	return nil
}
