// Package catalog keeps cbtflow's record of restore points in PostgreSQL
// (pgx/v5): the VMs, every backup with its status, and per disk the QCOW2
// path, the change ID it was queried from and the new change ID, the bytes
// changed and written, the image's size and SHA-256, and those of its
// digest file (internal/digest; none for images made before digests).
//
// A restore point counts only once committed: Commit records every disk of
// a backup and its new change IDs in one transaction, and the next backup
// of a disk reads the latest committed restore point only. A committed
// backup's data never changes: only a prune (Prune) removes restore points
// a retention policy no longer keeps, and replaces a kept point's image by
// a merged one that shows the same disk.
//
// Schema migrations are embedded and applied idempotently by Open. The
// package knows nothing of Temporal or vSphere.
package catalog

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

//go:embed migrations/*.sql
var migrations embed.FS

// Status of a backup.
const (
	StatusRunning   = "running"
	StatusCommitted = "committed"
	StatusFailed    = "failed"
)

// Disk modes.
const (
	ModeFull        = "full"
	ModeIncremental = "incremental"
)

// ErrNotFound is returned when a backup does not exist.
var ErrNotFound = errors.New("catalog: not found")

// ErrCommitted is returned when an operation would modify a committed
// backup.
var ErrCommitted = errors.New("catalog: backup is committed")

// ErrFailed is returned when an operation would revive a failed backup.
var ErrFailed = errors.New("catalog: backup has failed")

// ErrBrokenChain is matched (errors.Is) by Chain's *BrokenChainError
// when a restore point's chain does not link. Retrying changes nothing.
var ErrBrokenChain = errors.New("catalog: chain does not link")

// BrokenChainError says why a chain does not link: a restore point it
// builds on does not exist, is not committed, has no row for the disk, or
// the links loop.
type BrokenChainError struct {
	Reason string // a sentence, e.g. "restore point B, which C builds on, has no row for disk 204"
}

func (e *BrokenChainError) Error() string        { return "catalog: " + e.Reason }
func (e *BrokenChainError) Is(target error) bool { return target == ErrBrokenChain }

// Check proves the database holds cbtflow's catalog, cheaply: an error
// for which Unusable is true means it does not (dropped, or its tables).
func (c *Catalog) Check(ctx context.Context) error {
	if _, err := c.pool.Exec(ctx, `SELECT 1 FROM backups, backup_disks WHERE false`); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	return nil
}

// Unusable reports whether err says the catalog database cannot serve
// cbtflow and no retry will change that: the database does not exist, or
// lacks cbtflow's tables or columns (dropped, or replaced by an older
// copy). A database that is down or unreachable is not unusable: it heals.
func Unusable(err error) bool {
	var pg *pgconn.PgError
	if !errors.As(err, &pg) {
		return false
	}
	switch pg.Code {
	case "3D000", // invalid_catalog_name: the database does not exist
		"42P01", // undefined_table
		"42703": // undefined_column
		return true
	}
	return false
}

// Catalog is the PostgreSQL catalog.
type Catalog struct {
	pool *pgxpool.Pool
}

// Open connects to the database at url and applies the migrations.
func Open(ctx context.Context, url string) (*Catalog, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("catalog: database URL: %w", redact(err))
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("catalog: %w", err)
	}
	c := &Catalog{pool: pool}
	if err := c.migrate(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return c, nil
}

// redact drops a parse error's detail, which may quote the URL and its
// password.
func redact(err error) error {
	var pe *pgconn.ParseConfigError
	if errors.As(err, &pe) {
		return errors.New("malformed connection string")
	}
	return err
}

// Close closes the connections.
func (c *Catalog) Close() { c.pool.Close() }

// migrationLock is the advisory lock key that serializes migrations of
// concurrently starting workers.
const migrationLock = 0x63627466 // "cbtf"

func (c *Catalog) migrate(ctx context.Context) error {
	conn, err := c.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1)`, migrationLock); err != nil {
		return fmt.Errorf("catalog: migration lock: %w", err)
	}
	defer func() { _, _ = conn.Exec(context.Background(), `SELECT pg_advisory_unlock($1)`, migrationLock) }()
	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	names, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil {
		return err
	}
	sort.Strings(names)
	for _, name := range names {
		version := strings.TrimSuffix(strings.TrimPrefix(name, "migrations/"), ".sql")
		var done bool
		if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)`, version).Scan(&done); err != nil {
			return fmt.Errorf("catalog: %w", err)
		}
		if done {
			continue
		}
		sql, err := migrations.ReadFile(name)
		if err != nil {
			return err
		}
		err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, string(sql)); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `INSERT INTO schema_migrations (version) VALUES ($1)`, version)
			return err
		})
		if err != nil {
			return fmt.Errorf("catalog: migration %s: %w", version, err)
		}
	}
	return nil
}

// Backup is one backup of a VM; a committed backup is a restore point.
//
// The backups table's snapshot column (migration 001) is neither written
// nor read: a backup's snapshot is named cbtflow-<backup id>, so the sweeper
// finds what a dead backup left on vCenter itself, also when the catalog
// is lost. The column stays so that a worker of an older release, during
// an upgrade, still finds it.
type Backup struct {
	ID         string
	Profile    string // vCenter profile
	VMUUID     string // VM instance UUID
	VMName     string
	Status     string
	Mode       string // requested mode: auto, full or incremental
	WorkflowID string
	RunID      string
	Error      string
	StartedAt  time.Time
	FinishedAt time.Time // zero while running
	Disks      []Disk    // sorted by key; empty unless committed
}

// Disk is one disk of a restore point.
type Disk struct {
	Key      int32
	Capacity int64
	Mode     string // full or incremental
	// Path of the QCOW2 relative to the repository root (catalogs from
	// before relative paths may still hold an absolute path).
	Path            string
	BackingBackupID string // the previous restore point (incremental), or ""
	ChangeIDFrom    string // the change ID queried from ("" for a full)
	ChangeID        string // the disk's change ID in this backup's snapshot
	ChangedBytes    int64
	WrittenBytes    int64
	SizeBytes       int64 // the QCOW2's size at commit
	// AllocatedBytes is the space its file took at commit, or as a
	// prune's merge rewrote it (its blocks: an image is sparse); 0 when
	// unknown (recorded before it was), when SizeBytes stands for it.
	AllocatedBytes int64
	SHA256         string // hex SHA-256 of the QCOW2 at commit
	Note           string // e.g. why a disk fell back to a full backup
	// Stamp is the image file's identity when its SHA-256 was last proven:
	// while it is unchanged, so is the file, and no re-read is needed.
	Stamp FileStamp
	// Damaged says why the image, or one it builds on, was found damaged;
	// "" when sound. A damaged restore point is not restorable.
	Damaged string
	// DigestSHA256 and DigestSize are the hex SHA-256 and size of the
	// image's digest file (<image>.digests, package internal/digest) at
	// commit; "" and 0 for an image without one (made before digests
	// existed: NULL in the table).
	DigestSHA256 string
	DigestSize   int64
	// DigestPartial says a prune merged removed points' data into the
	// image: its digest file describes only what its own backup wrote.
	DigestPartial bool
}

// FileStamp identifies a file's content cheaply: any write changes mtime
// and ctime, a replaced file has another inode, and ctime cannot be set
// back by hand. Zero means unknown (catalogs from before stamps).
type FileStamp struct {
	Inode   int64
	MtimeNs int64
	CtimeNs int64
}

// Begin records a running backup. It is idempotent: a second call with the
// same ID changes nothing and returns nil, unless the backup already ended.
func (c *Catalog) Begin(ctx context.Context, b Backup) error {
	if b.ID == "" || b.Profile == "" || b.VMUUID == "" {
		return errors.New("catalog: begin: backup ID, profile and VM UUID are required")
	}
	return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		var vmID int64
		err := tx.QueryRow(ctx, `INSERT INTO vms (profile, instance_uuid, name) VALUES ($1, $2, $3)
			ON CONFLICT (profile, instance_uuid) DO UPDATE SET name = EXCLUDED.name
			RETURNING id`, b.Profile, b.VMUUID, b.VMName).Scan(&vmID)
		if err != nil {
			return fmt.Errorf("catalog: begin %s: %w", b.ID, err)
		}
		tag, err := tx.Exec(ctx, `INSERT INTO backups (id, vm_id, status, mode, workflow_id, run_id)
			VALUES ($1, $2, 'running', $3, $4, $5) ON CONFLICT (id) DO NOTHING`,
			b.ID, vmID, b.Mode, b.WorkflowID, b.RunID)
		if err != nil {
			return fmt.Errorf("catalog: begin %s: %w", b.ID, err)
		}
		if tag.RowsAffected() == 0 {
			var status string
			if err := tx.QueryRow(ctx, `SELECT status FROM backups WHERE id = $1`, b.ID).Scan(&status); err != nil {
				return fmt.Errorf("catalog: begin %s: %w", b.ID, err)
			}
			switch status {
			case StatusCommitted:
				return fmt.Errorf("catalog: begin %s: %w", b.ID, ErrCommitted)
			case StatusFailed:
				return fmt.Errorf("catalog: begin %s: %w", b.ID, ErrFailed)
			}
		}
		return nil
	})
}

// Commit makes a running backup a restore point: it records every disk
// with its new change ID and marks the backup committed, in one
// transaction. It is idempotent: committing an already committed backup
// with the same disks returns nil. A failed backup cannot be committed.
func (c *Catalog) Commit(ctx context.Context, backupID string, disks []Disk) error {
	if len(disks) == 0 {
		return fmt.Errorf("catalog: commit %s: no disks", backupID)
	}
	for _, d := range disks {
		if d.ChangeID == "" || d.Path == "" || d.SHA256 == "" {
			return fmt.Errorf("catalog: commit %s: disk %d lacks change ID, path or SHA-256", backupID, d.Key)
		}
		if d.Mode != ModeFull && d.Mode != ModeIncremental {
			return fmt.Errorf("catalog: commit %s: disk %d has mode %q", backupID, d.Key, d.Mode)
		}
		if (d.DigestSHA256 == "") != (d.DigestSize == 0) {
			return fmt.Errorf("catalog: commit %s: disk %d has a digest file's SHA-256 without its size, or the reverse", backupID, d.Key)
		}
	}
	return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		var status string
		err := tx.QueryRow(ctx, `SELECT status FROM backups WHERE id = $1 FOR UPDATE`, backupID).Scan(&status)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("catalog: commit %s: %w", backupID, ErrNotFound)
		}
		if err != nil {
			return fmt.Errorf("catalog: commit %s: %w", backupID, err)
		}
		switch status {
		case StatusCommitted:
			return c.sameDisks(ctx, tx, backupID, disks)
		case StatusFailed:
			return fmt.Errorf("catalog: commit %s: %w", backupID, ErrFailed)
		}
		for _, d := range disks {
			var backing *string
			if d.BackingBackupID != "" {
				backing = &d.BackingBackupID
			}
			_, err := tx.Exec(ctx, `INSERT INTO backup_disks (backup_id, disk_key, capacity, mode, path,
				backing_backup_id, change_id_from, change_id, changed_bytes, written_bytes, size_bytes, sha256, note,
				file_inode, file_mtime_ns, file_ctime_ns, digest_sha256, digest_size, allocated_bytes)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
					NULLIF($17, ''), NULLIF($18::bigint, 0), NULLIF($19::bigint, 0))`,
				backupID, d.Key, d.Capacity, d.Mode, d.Path, backing, d.ChangeIDFrom, d.ChangeID,
				d.ChangedBytes, d.WrittenBytes, d.SizeBytes, d.SHA256, d.Note,
				d.Stamp.Inode, d.Stamp.MtimeNs, d.Stamp.CtimeNs, d.DigestSHA256, d.DigestSize, d.AllocatedBytes)
			if err != nil {
				return fmt.Errorf("catalog: commit %s disk %d: %w", backupID, d.Key, err)
			}
		}
		_, err = tx.Exec(ctx, `UPDATE backups SET status = 'committed', finished_at = now(), error = '' WHERE id = $1`, backupID)
		if err != nil {
			return fmt.Errorf("catalog: commit %s: %w", backupID, err)
		}
		return nil
	})
}

// sameDisks checks that a repeated commit records what the first did.
func (c *Catalog) sameDisks(ctx context.Context, tx pgx.Tx, backupID string, disks []Disk) error {
	stored, err := loadDisks(ctx, tx, backupID)
	if err != nil {
		return err
	}
	byKey := map[int32]Disk{}
	for _, d := range stored {
		byKey[d.Key] = d
	}
	if len(stored) != len(disks) {
		return fmt.Errorf("catalog: commit %s: %w with %d disks, not %d", backupID, ErrCommitted, len(stored), len(disks))
	}
	for _, d := range disks {
		s, ok := byKey[d.Key]
		if !ok || s.ChangeID != d.ChangeID || s.SHA256 != d.SHA256 || s.Path != d.Path {
			return fmt.Errorf("catalog: commit %s: %w with other data for disk %d", backupID, ErrCommitted, d.Key)
		}
	}
	return nil
}

// Fail marks a running backup failed with a reason. A committed backup is
// left alone (ErrCommitted); failing a failed backup is a no-op.
func (c *Catalog) Fail(ctx context.Context, backupID, reason string) error {
	var status string
	err := c.pool.QueryRow(ctx, `UPDATE backups SET status = CASE WHEN status = 'running' THEN 'failed' ELSE status END,
		error = CASE WHEN status = 'running' THEN $2 ELSE error END,
		finished_at = CASE WHEN status = 'running' THEN now() ELSE finished_at END
		WHERE id = $1 RETURNING status`, backupID, reason).Scan(&status)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("catalog: fail %s: %w", backupID, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("catalog: fail %s: %w", backupID, err)
	}
	if status == StatusCommitted {
		return fmt.Errorf("catalog: fail %s: %w", backupID, ErrCommitted)
	}
	return nil
}

// LatestDisks returns, for each disk key of a VM, the disk of its latest
// committed restore point, with the restore point's backup ID in
// BackupID of the map value.
func (c *Catalog) LatestDisks(ctx context.Context, profile, vmUUID string) (map[int32]LatestDisk, error) {
	// The latest restore point of each disk, unless its chain was closed.
	rows, err := c.pool.Query(ctx, `SELECT DISTINCT ON (d.disk_key) b.id, `+diskColumns+`,
		EXISTS (SELECT 1 FROM closed_chains cc WHERE cc.vm_id = v.id AND cc.disk_key = d.disk_key AND cc.last_backup_id = b.id)
		FROM backup_disks d JOIN backups b ON b.id = d.backup_id JOIN vms v ON v.id = b.vm_id
		WHERE v.profile = $1 AND v.instance_uuid = $2 AND b.status = 'committed'
		ORDER BY d.disk_key, b.finished_at DESC, b.id DESC`, profile, vmUUID)
	if err != nil {
		return nil, fmt.Errorf("catalog: latest disks: %w", err)
	}
	defer rows.Close()
	out := map[int32]LatestDisk{}
	for rows.Next() {
		var l LatestDisk
		var closed bool
		if err := scanDisk(rows, &l.BackupID, &l.Disk, &closed); err != nil {
			return nil, fmt.Errorf("catalog: latest disks: %w", err)
		}
		if !closed {
			out[l.Key] = l
		}
	}
	return out, rows.Err()
}

// CloseChain closes the chain of a disk that left its VM: the chain ending
// at lastBackupID is kept and restorable, but LatestDisks no longer offers
// it, so a later disk with the same key starts a new chain. Idempotent.
func (c *Catalog) CloseChain(ctx context.Context, profile, vmUUID string, key int32, lastBackupID, reason string) error {
	_, err := c.pool.Exec(ctx, `INSERT INTO closed_chains (vm_id, disk_key, last_backup_id, reason)
		SELECT v.id, $3, $4, $5 FROM vms v WHERE v.profile = $1 AND v.instance_uuid = $2
		ON CONFLICT DO NOTHING`, profile, vmUUID, key, lastBackupID, reason)
	if err != nil {
		return fmt.Errorf("catalog: close chain of disk %d: %w", key, err)
	}
	return nil
}

// SpaceBytes is the space the disk's image takes: its allocated bytes,
// or its size where they are unknown.
func (d Disk) SpaceBytes() int64 {
	if d.AllocatedBytes > 0 {
		return d.AllocatedBytes
	}
	return d.SizeBytes
}

// LatestDisk is a disk of a committed restore point with its backup ID.
type LatestDisk struct {
	BackupID string
	Disk
}

const diskColumns = `d.disk_key, d.capacity, d.mode, d.path, coalesce(d.backing_backup_id, ''), d.change_id_from,
	d.change_id, d.changed_bytes, d.written_bytes, d.size_bytes, d.sha256, d.note,
	d.file_inode, d.file_mtime_ns, d.file_ctime_ns, d.damaged, coalesce(d.digest_sha256, ''), coalesce(d.digest_size, 0),
	d.digest_partial, coalesce(d.allocated_bytes, 0)`

func scanDisk(row pgx.Row, backupID *string, d *Disk, extra ...any) error {
	dst := []any{&d.Key, &d.Capacity, &d.Mode, &d.Path, &d.BackingBackupID, &d.ChangeIDFrom,
		&d.ChangeID, &d.ChangedBytes, &d.WrittenBytes, &d.SizeBytes, &d.SHA256, &d.Note,
		&d.Stamp.Inode, &d.Stamp.MtimeNs, &d.Stamp.CtimeNs, &d.Damaged, &d.DigestSHA256, &d.DigestSize, &d.DigestPartial, &d.AllocatedBytes}
	if backupID != nil {
		dst = append([]any{backupID}, dst...)
	}
	return row.Scan(append(dst, extra...)...)
}

type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

func loadDisks(ctx context.Context, q querier, backupID string) ([]Disk, error) {
	rows, err := q.Query(ctx, `SELECT `+diskColumns+` FROM backup_disks d WHERE d.backup_id = $1 ORDER BY d.disk_key`, backupID)
	if err != nil {
		return nil, fmt.Errorf("catalog: disks of %s: %w", backupID, err)
	}
	defer rows.Close()
	var out []Disk
	for rows.Next() {
		var d Disk
		if err := scanDisk(rows, nil, &d); err != nil {
			return nil, fmt.Errorf("catalog: disks of %s: %w", backupID, err)
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

const backupColumns = `b.id, v.profile, v.instance_uuid, v.name, b.status, b.mode, b.workflow_id, b.run_id,
	b.error, b.started_at, b.finished_at`

func scanBackup(row pgx.Row, b *Backup) error {
	var finished *time.Time
	if err := row.Scan(&b.ID, &b.Profile, &b.VMUUID, &b.VMName, &b.Status, &b.Mode, &b.WorkflowID, &b.RunID,
		&b.Error, &b.StartedAt, &finished); err != nil {
		return err
	}
	if finished != nil {
		b.FinishedAt = *finished
	}
	return nil
}

// Get returns one backup with its disks.
func (c *Catalog) Get(ctx context.Context, backupID string) (*Backup, error) {
	var b Backup
	err := scanBackup(c.pool.QueryRow(ctx, `SELECT `+backupColumns+` FROM backups b JOIN vms v ON v.id = b.vm_id
		WHERE b.id = $1`, backupID), &b)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("catalog: backup %s: %w", backupID, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("catalog: backup %s: %w", backupID, err)
	}
	if b.Disks, err = loadDisks(ctx, c.pool, b.ID); err != nil {
		return nil, err
	}
	return &b, nil
}

// ListFilter selects backups for List. Zero fields match everything.
type ListFilter struct {
	VM      string // a VM name or instance UUID
	Profile string
	Status  string
}

// List returns backups, newest first, with their disks.
func (c *Catalog) List(ctx context.Context, f ListFilter) ([]Backup, error) {
	rows, err := c.pool.Query(ctx, `SELECT `+backupColumns+` FROM backups b JOIN vms v ON v.id = b.vm_id
		WHERE ($1 = '' OR v.name = $1 OR v.instance_uuid = $1)
		  AND ($2 = '' OR v.profile = $2) AND ($3 = '' OR b.status = $3)
		ORDER BY b.started_at DESC, b.id DESC`, f.VM, f.Profile, f.Status)
	if err != nil {
		return nil, fmt.Errorf("catalog: list: %w", err)
	}
	var out []Backup
	for rows.Next() {
		var b Backup
		if err := scanBackup(rows, &b); err != nil {
			rows.Close()
			return nil, fmt.Errorf("catalog: list: %w", err)
		}
		out = append(out, b)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("catalog: list: %w", err)
	}
	for i := range out {
		if out[i].Disks, err = loadDisks(ctx, c.pool, out[i].ID); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ChainLink is one restore point of a disk's chain.
type ChainLink struct {
	BackupID string
	Disk
	// Pending is set while a prune's merge of this image is not settled:
	// the file at Path is then either the image Disk describes or this
	// new one, and both are sound (see BeginMerges).
	Pending *MergedImage
}

// Chain returns the chain of one disk of a committed restore point, from
// that restore point down to its full image. When the chain does not link
// (a restore point it builds on is not committed, or has no row for the
// disk), the error wraps ErrBrokenChain and the links read so far are
// returned with it: the last of them builds on the missing one.
func (c *Catalog) Chain(ctx context.Context, backupID string, key int32) ([]ChainLink, error) {
	var out []ChainLink
	seen := map[string]bool{}
	for id := backupID; id != ""; {
		if seen[id] {
			return out, &BrokenChainError{fmt.Sprintf("the chain of restore point %s disk %d loops at %s", backupID, key, id)}
		}
		seen[id] = true
		var status string
		var link ChainLink
		err := c.pool.QueryRow(ctx, `SELECT b.status FROM backups b WHERE b.id = $1`, id).Scan(&status)
		if errors.Is(err, pgx.ErrNoRows) {
			if len(out) == 0 {
				return nil, fmt.Errorf("catalog: backup %s: %w", id, ErrNotFound)
			}
			return out, &BrokenChainError{fmt.Sprintf("restore point %s, which %s builds on, does not exist", id, out[len(out)-1].BackupID)}
		}
		if err != nil {
			return nil, fmt.Errorf("catalog: chain: %w", err)
		}
		if status != StatusCommitted {
			if len(out) == 0 {
				return nil, fmt.Errorf("catalog: backup %s is %s, not a restore point", id, status)
			}
			return out, &BrokenChainError{fmt.Sprintf("backup %s, which %s builds on, is %s, not a restore point", id, out[len(out)-1].BackupID, status)}
		}
		err = scanDisk(c.pool.QueryRow(ctx, `SELECT `+diskColumns+` FROM backup_disks d
			WHERE d.backup_id = $1 AND d.disk_key = $2`, id, key), nil, &link.Disk)
		if errors.Is(err, pgx.ErrNoRows) {
			if len(out) == 0 {
				return nil, fmt.Errorf("catalog: backup %s has no disk %d: %w", id, key, ErrNotFound)
			}
			return out, &BrokenChainError{fmt.Sprintf("restore point %s, which %s builds on, has no row for disk %d", id, out[len(out)-1].BackupID, key)}
		}
		if err != nil {
			return nil, fmt.Errorf("catalog: chain: %w", err)
		}
		link.BackupID = id
		p, err := pendingOf(ctx, c.pool.QueryRow(ctx, `SELECT `+pendingColumns+` FROM pending_merges p
			WHERE p.backup_id = $1 AND p.disk_key = $2`, id, key))
		if err != nil {
			return nil, err
		}
		if p != nil {
			link.Pending = &p.MergedImage
		}
		out = append(out, link)
		id = link.BackingBackupID
	}
	return out, nil
}

// SetStamp records the file stamp of an image whose SHA-256 was just
// proven again (e.g. after the repository was copied elsewhere).
func (c *Catalog) SetStamp(ctx context.Context, backupID string, key int32, st FileStamp) error {
	_, err := c.pool.Exec(ctx, `UPDATE backup_disks SET file_inode = $3, file_mtime_ns = $4, file_ctime_ns = $5
		WHERE backup_id = $1 AND disk_key = $2`, backupID, key, st.Inode, st.MtimeNs, st.CtimeNs)
	if err != nil {
		return fmt.Errorf("catalog: stamp of %s disk %d: %w", backupID, key, err)
	}
	return nil
}

// MarkDamaged marks one disk of a restore point damaged, and every restore
// point of that disk built on it (directly or through others) as
// unrestorable for that reason, in one transaction. A point already marked
// keeps its first reason. It returns the backup IDs it marked, oldest
// first.
func (c *Catalog) MarkDamaged(ctx context.Context, backupID string, key int32, reason string) ([]string, error) {
	// UNION (not UNION ALL) on the ID alone ends a loop of backing links.
	rows, err := c.pool.Query(ctx, `WITH RECURSIVE dep(backup_id) AS (
			SELECT $1::text
			UNION
			SELECT d.backup_id FROM backup_disks d JOIN dep ON d.backing_backup_id = dep.backup_id
			WHERE d.disk_key = $2
		)
		UPDATE backup_disks d SET damaged = CASE WHEN d.backup_id = $1 THEN $3
				ELSE 'builds on damaged restore point ' || $1 || ': ' || $3 END,
			damaged_at = now()
		FROM dep JOIN backups b ON b.id = dep.backup_id
		WHERE d.backup_id = dep.backup_id AND d.disk_key = $2 AND d.damaged = ''
		RETURNING d.backup_id, b.started_at`, backupID, key, reason)
	if err != nil {
		return nil, fmt.Errorf("catalog: mark %s disk %d damaged: %w", backupID, key, err)
	}
	type marked struct {
		id      string
		started time.Time
	}
	ms, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (marked, error) {
		var m marked
		return m, r.Scan(&m.id, &m.started)
	})
	if err != nil {
		return nil, fmt.Errorf("catalog: mark %s disk %d damaged: %w", backupID, key, err)
	}
	slices.SortFunc(ms, func(a, b marked) int { return a.started.Compare(b.started) })
	ids := make([]string, len(ms))
	for i, m := range ms {
		ids[i] = m.id
	}
	return ids, nil
}
