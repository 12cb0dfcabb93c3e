package catalog

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// VMUsage is what one VM's restore points hold in the repository, by the
// catalog: the images' sizes as recorded at commit, or as a prune's merge
// rewrote them.
type VMUsage struct {
	VM
	// RestorePoints counts the committed backups; Damaged those of them
	// with a disk marked damaged (not restorable).
	RestorePoints int64
	Damaged       int64
	// Oldest and Newest are the start times of the oldest and newest
	// restore points (the times retention goes by); zero when there is
	// none.
	Oldest, Newest time.Time
	// Bytes is the space the restore points' images take: the sum of
	// their allocated bytes at commit (Disk.AllocatedBytes), or of their
	// sizes where that is unknown.
	Bytes int64
	// NewestImage is the path, relative to the repository root, of one
	// image of the newest restore point ("" when there is none): whoever
	// reads the catalog from elsewhere can tell by it whether the folder
	// it sees is the repository.
	NewestImage string
}

// Usage returns every VM of the catalog with its restore points and the
// bytes their images take, sorted by name, profile and UUID as FindVMs
// sorts. A VM whose restore points are all gone (failed backups only, or
// pruned) is there with zeros.
func (c *Catalog) Usage(ctx context.Context) ([]VMUsage, error) {
	rows, err := c.pool.Query(ctx, `WITH points AS (
			SELECT b.vm_id, b.id, b.started_at,
				coalesce(sum(coalesce(d.allocated_bytes, d.size_bytes)), 0) AS bytes,
				coalesce(bool_or(d.damaged <> ''), false) AS damaged,
				min(d.path) AS image
			FROM backups b LEFT JOIN backup_disks d ON d.backup_id = b.id
			WHERE b.status = 'committed'
			GROUP BY b.id
		)
		SELECT v.profile, v.instance_uuid, v.name,
			count(p.id), count(p.id) FILTER (WHERE p.damaged),
			min(p.started_at), max(p.started_at), coalesce(sum(p.bytes), 0)::bigint,
			coalesce((SELECT q.image FROM points q WHERE q.vm_id = v.id
				ORDER BY q.started_at DESC, q.id DESC LIMIT 1), '')
		FROM vms v LEFT JOIN points p ON p.vm_id = v.id
		GROUP BY v.id
		ORDER BY v.name, v.profile, v.instance_uuid`)
	if err != nil {
		return nil, fmt.Errorf("catalog: usage: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (VMUsage, error) {
		var u VMUsage
		var oldest, newest *time.Time
		if err := r.Scan(&u.Profile, &u.UUID, &u.Name, &u.RestorePoints, &u.Damaged,
			&oldest, &newest, &u.Bytes, &u.NewestImage); err != nil {
			return u, err
		}
		if oldest != nil {
			u.Oldest, u.Newest = *oldest, *newest
		}
		return u, nil
	})
	if err != nil {
		return nil, fmt.Errorf("catalog: usage: %w", err)
	}
	return out, nil
}

// PruneTotals returns how many prunes the catalog has recorded (one per
// VM and run) and the bytes they freed in the repository, all told.
func (c *Catalog) PruneTotals(ctx context.Context) (count, bytes int64, err error) {
	err = c.pool.QueryRow(ctx, `SELECT count(*), coalesce(sum(bytes_freed), 0)::bigint FROM prunes`).Scan(&count, &bytes)
	if err != nil {
		return 0, 0, fmt.Errorf("catalog: prune totals: %w", err)
	}
	return count, bytes, nil
}
