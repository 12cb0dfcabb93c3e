package catalog

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// ExportLease is a running export of one disk of a restore point (instant
// access): while it is live (ExpiresAt in the future), no prune removes
// or rewrites the exported point or any point its chain builds on.
type ExportLease struct {
	ID       string // the export's workflow ID
	Profile  string
	VMUUID   string
	BackupID string
	DiskKey  int32
	Address  string // host:port the NBD server listens on ("" until it does)
	// Holder names the attempt that holds the lease (the export's
	// ServeExport attempt): taking the lease again hands it to the new
	// holder, and only the holder renews or ends it.
	Holder    string
	StartedAt time.Time
	ExpiresAt time.Time
}

// ErrExported is wrapped by a prune's transaction (BeginMerges, Prune)
// that would remove or rewrite an image a live export serves; the message
// names the export. Nothing was changed.
var ErrExported = errors.New("catalog: restore point is being exported")

// ErrMergePending is wrapped by TakeExport when a prune's merge of an
// image of the chain is pending: the image may be replaced (renamed over)
// at any moment, so the export waits until the merge is settled.
var ErrMergePending = errors.New("catalog: a prune's merge of an image of the chain is pending")

// lockVM takes the transaction-scoped advisory lock of one VM's restore
// points, which export leases and a prune's transactions both take: a
// lease is either visible to the prune's check, or the prune's pending
// merges and removals are visible to the lease's (no check passes on
// both sides of a race).
func lockVM(ctx context.Context, tx pgx.Tx, profile, vmUUID string) error {
	// The two-key form: its key space is apart from the migrations'
	// single-key lock.
	_, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(x'63627466'::int, hashtext($1 || '/' || $2))`, profile, vmUUID)
	if err != nil {
		return fmt.Errorf("catalog: lock of VM %s: %w", vmUUID, err)
	}
	return nil
}

// exportedLink is one image a live export reads: a restore point's disk
// in the chain of an exported point (the exported one, or one it builds
// on, by the catalog's backing links of that disk), and the export.
type exportedLink struct {
	BackupID string
	DiskKey  int32
	Lease    string
}

// exportedChains returns the images the live exports of a VM read: for
// each export, its point's disk and the same disk of every point it
// builds on.
func exportedChains(ctx context.Context, q querier, profile, vmUUID string) ([]exportedLink, error) {
	rows, err := q.Query(ctx, `WITH RECURSIVE ch(backup_id, disk_key, lease) AS (
			SELECT e.backup_id, e.disk_key, e.id FROM exports e
			WHERE e.profile = $1 AND e.vm_uuid = $2 AND e.expires_at > now()
			UNION
			SELECT d.backing_backup_id, d.disk_key, ch.lease FROM backup_disks d
			JOIN ch ON d.backup_id = ch.backup_id AND d.disk_key = ch.disk_key
			WHERE d.backing_backup_id IS NOT NULL
		)
		SELECT backup_id, disk_key, lease FROM ch ORDER BY backup_id, lease, disk_key`, profile, vmUUID)
	if err != nil {
		return nil, fmt.Errorf("catalog: exported chains: %w", err)
	}
	defer rows.Close()
	var out []exportedLink
	for rows.Next() {
		var l exportedLink
		if err := rows.Scan(&l.BackupID, &l.DiskKey, &l.Lease); err != nil {
			return nil, fmt.Errorf("catalog: exported chains: %w", err)
		}
		out = append(out, l)
	}
	return out, rows.Err()
}

// ExportedPoints returns the restore points of a VM that live exports
// read, each with the IDs of the exports that read it: the exported
// points and every point their chains build on. A prune keeps them
// (a point is removed with all its disks).
func (c *Catalog) ExportedPoints(ctx context.Context, profile, vmUUID string) (map[string][]string, error) {
	links, err := exportedChains(ctx, c.pool, profile, vmUUID)
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for _, l := range links {
		if !slices.Contains(out[l.BackupID], l.Lease) {
			out[l.BackupID] = append(out[l.BackupID], l.Lease)
		}
	}
	return out, nil
}

// checkNotExported fails with ErrExported, naming the first export, when
// a live export of the VM reads any of the restore points removed (any of
// their disks), or the image of a merged one (that point's disk: a merge
// of another disk of an exported point rewrites nothing the export
// reads). The caller holds the VM's lock (lockVM).
func checkNotExported(ctx context.Context, tx pgx.Tx, profile, vmUUID string, removed []string, merged []MergedImage) error {
	links, err := exportedChains(ctx, tx, profile, vmUUID)
	if err != nil {
		return err
	}
	for _, id := range removed {
		var leases []string
		for _, l := range links {
			if l.BackupID == id && !slices.Contains(leases, l.Lease) {
				leases = append(leases, l.Lease)
			}
		}
		if len(leases) > 0 {
			return fmt.Errorf("%w: restore point %s is read by export %s (starter export stop ends it)", ErrExported, id, strings.Join(leases, ", "))
		}
	}
	for _, m := range merged {
		var leases []string
		for _, l := range links {
			if l.BackupID == m.BackupID && l.DiskKey == m.Key {
				leases = append(leases, l.Lease)
			}
		}
		if len(leases) > 0 {
			return fmt.Errorf("%w: restore point %s disk %d is read by export %s (starter export stop ends it)", ErrExported, m.BackupID, m.Key, strings.Join(leases, ", "))
		}
	}
	return nil
}

// vmOf returns the profile and instance UUID of a backup's VM.
func vmOf(ctx context.Context, tx pgx.Tx, backupID string) (profile, vmUUID string, err error) {
	err = tx.QueryRow(ctx, `SELECT v.profile, v.instance_uuid FROM backups b JOIN vms v ON v.id = b.vm_id WHERE b.id = $1`,
		backupID).Scan(&profile, &vmUUID)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", "", fmt.Errorf("catalog: backup %s: %w", backupID, ErrNotFound)
	}
	if err != nil {
		return "", "", fmt.Errorf("catalog: backup %s: %w", backupID, err)
	}
	return profile, vmUUID, nil
}

// TakeExport records (or renews) the lease of an export of one disk of a
// committed restore point, for ttl, under the VM's lock: it fails with
// ErrNotFound when the point or the disk is gone (a prune removed it),
// with ErrBrokenChain when the chain does not link, and with
// ErrMergePending when a prune's merge of an image of the chain is
// pending (that prune may be renaming a new image over it right now).
// It returns the lease with the VM filled in. Idempotent for one ID: a
// retried export takes its lease again, which then is its holder's.
func (c *Catalog) TakeExport(ctx context.Context, l ExportLease, ttl time.Duration) (*ExportLease, error) {
	if l.ID == "" || l.BackupID == "" {
		return nil, errors.New("catalog: take export: ID and backup ID are required")
	}
	out := l
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		profile, vmUUID, err := vmOf(ctx, tx, l.BackupID)
		if err != nil {
			return err
		}
		if err := lockVM(ctx, tx, profile, vmUUID); err != nil {
			return err
		}
		// The chain as the catalog has it now, under the lock: every
		// point committed and linked, none with a pending merge.
		seen := map[string]bool{}
		for id := l.BackupID; id != ""; {
			if seen[id] {
				return &BrokenChainError{fmt.Sprintf("the chain of restore point %s disk %d loops at %s", l.BackupID, l.DiskKey, id)}
			}
			seen[id] = true
			var status, backing string
			var pending bool
			err := tx.QueryRow(ctx, `SELECT b.status, coalesce(d.backing_backup_id, ''),
					EXISTS (SELECT 1 FROM pending_merges p WHERE p.backup_id = d.backup_id AND p.disk_key = d.disk_key)
				FROM backups b JOIN backup_disks d ON d.backup_id = b.id
				WHERE b.id = $1 AND d.disk_key = $2`, id, l.DiskKey).Scan(&status, &backing, &pending)
			switch {
			case errors.Is(err, pgx.ErrNoRows) && id == l.BackupID:
				return fmt.Errorf("catalog: restore point %s disk %d: %w", id, l.DiskKey, ErrNotFound)
			case errors.Is(err, pgx.ErrNoRows):
				return &BrokenChainError{fmt.Sprintf("restore point %s, which the chain of %s disk %d builds on, is gone", id, l.BackupID, l.DiskKey)}
			case err != nil:
				return fmt.Errorf("catalog: take export %s: %w", l.ID, err)
			case status != StatusCommitted:
				return fmt.Errorf("catalog: backup %s is %s, not a restore point: %w", id, status, ErrNotFound)
			case pending:
				return fmt.Errorf("%w: restore point %s disk %d (a prune of the VM is putting a merged image in its place)", ErrMergePending, id, l.DiskKey)
			}
			id = backing
		}
		err = tx.QueryRow(ctx, `INSERT INTO exports (id, profile, vm_uuid, backup_id, disk_key, address, expires_at, holder)
			VALUES ($1, $2, $3, $4, $5, $6, now() + $7::interval, $8)
			ON CONFLICT (id) DO UPDATE SET profile = EXCLUDED.profile, vm_uuid = EXCLUDED.vm_uuid,
				backup_id = EXCLUDED.backup_id, disk_key = EXCLUDED.disk_key, address = EXCLUDED.address,
				expires_at = EXCLUDED.expires_at, holder = EXCLUDED.holder,
				started_at = CASE WHEN exports.expires_at > now() THEN exports.started_at ELSE now() END
			RETURNING started_at, expires_at`,
			l.ID, profile, vmUUID, l.BackupID, l.DiskKey, l.Address, ttl.String(), l.Holder).Scan(&out.StartedAt, &out.ExpiresAt)
		if err != nil {
			return fmt.Errorf("catalog: take export %s: %w", l.ID, err)
		}
		out.Profile, out.VMUUID = profile, vmUUID
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &out, nil
}

// RenewExport extends holder's lease by ttl from now and returns its new
// expiry. A lease that is gone (ended, or never taken) is ErrNotFound:
// the export must stop, as nothing protects its images any more. A lease
// that expired meanwhile is not renewed either (a prune may have removed
// its images since), nor one another holder took since (a retry of the
// export): ErrNotFound too.
func (c *Catalog) RenewExport(ctx context.Context, id, holder string, ttl time.Duration) (time.Time, error) {
	var exp time.Time
	err := c.pool.QueryRow(ctx, `UPDATE exports SET expires_at = now() + $2::interval
		WHERE id = $1 AND holder = $3 AND expires_at > now() RETURNING expires_at`, id, ttl.String(), holder).Scan(&exp)
	if errors.Is(err, pgx.ErrNoRows) {
		return time.Time{}, fmt.Errorf("catalog: export %s has no live lease held by %q: %w", id, holder, ErrNotFound)
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("catalog: renew export %s: %w", id, err)
	}
	return exp, nil
}

// EndExport deletes holder's lease; one another holder took since (a
// retry of the export) stays. Idempotent.
func (c *Catalog) EndExport(ctx context.Context, id, holder string) error {
	if _, err := c.pool.Exec(ctx, `DELETE FROM exports WHERE id = $1 AND holder = $2`, id, holder); err != nil {
		return fmt.Errorf("catalog: end export %s: %w", id, err)
	}
	return nil
}
