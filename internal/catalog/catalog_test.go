package catalog

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cbtflow/cbtflow/testkit/testutil"
)

func open(t *testing.T) (*Catalog, string) {
	t.Helper()
	url := testutil.Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, url
}

func disk(key int32, mode, changeID, backing string) Disk {
	return Disk{Key: key, Capacity: 1 << 30, Mode: mode, Path: "/repo/x/" + changeID + ".qcow2",
		BackingBackupID: backing, ChangeID: changeID, SizeBytes: 4096, SHA256: strings.Repeat("a", 64)}
}

func TestMigrationsIdempotentAndConcurrent(t *testing.T) {
	_, url := open(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := Open(ctx, url)
			if err != nil {
				errs <- err
				return
			}
			c.Close()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent open: %v", err)
	}
}

func TestRestorePointLifecycle(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	vm := Backup{Profile: "lab", VMUUID: "uuid-1", VMName: "vm one", Mode: "auto"}

	b1 := vm
	b1.ID = "b1"
	if err := c.Begin(ctx, b1); err != nil {
		t.Fatal(err)
	}
	if err := c.Begin(ctx, b1); err != nil {
		t.Fatalf("repeated begin: %v", err)
	}
	// Nothing counts before the commit.
	latest, err := c.LatestDisks(ctx, "lab", "uuid-1")
	if err != nil || len(latest) != 0 {
		t.Fatalf("latest before commit: %v %v", latest, err)
	}
	d1 := []Disk{disk(204, ModeFull, "u/1", ""), disk(205, ModeFull, "u/1b", "")}
	if err := c.Commit(ctx, "b1", d1); err != nil {
		t.Fatal(err)
	}
	if err := c.Commit(ctx, "b1", d1); err != nil {
		t.Fatalf("repeated commit: %v", err)
	}
	other := []Disk{disk(204, ModeFull, "u/9", ""), disk(205, ModeFull, "u/1b", "")}
	if err := c.Commit(ctx, "b1", other); err == nil {
		t.Error("commit with other change IDs over a committed backup accepted")
	}
	if err := c.Fail(ctx, "b1", "late failure"); !errors.Is(err, ErrCommitted) {
		t.Errorf("fail of a committed backup: %v", err)
	}
	if err := c.Begin(ctx, b1); err == nil {
		t.Error("begin of a committed backup accepted")
	}

	// A second backup that fails does not move the latest restore point.
	b2 := vm
	b2.ID = "b2"
	if err := c.Begin(ctx, b2); err != nil {
		t.Fatal(err)
	}
	if err := c.Fail(ctx, "b2", "disk 204: EIO"); err != nil {
		t.Fatal(err)
	}
	if err := c.Commit(ctx, "b2", []Disk{disk(204, ModeIncremental, "u/2", "b1")}); err == nil {
		t.Error("commit of a failed backup accepted")
	}
	latest, err = c.LatestDisks(ctx, "lab", "uuid-1")
	if err != nil {
		t.Fatal(err)
	}
	if latest[204].BackupID != "b1" || latest[204].ChangeID != "u/1" || latest[205].ChangeID != "u/1b" {
		t.Errorf("latest = %+v", latest)
	}

	b3 := vm
	b3.ID = "b3"
	if err := c.Begin(ctx, b3); err != nil {
		t.Fatal(err)
	}
	if err := c.Commit(ctx, "b3", []Disk{disk(204, ModeIncremental, "u/3", "b1"), disk(205, ModeIncremental, "u/3b", "b1")}); err != nil {
		t.Fatal(err)
	}
	latest, _ = c.LatestDisks(ctx, "lab", "uuid-1")
	if latest[204].BackupID != "b3" || latest[204].ChangeID != "u/3" {
		t.Errorf("latest after b3 = %+v", latest[204])
	}

	chain, err := c.Chain(ctx, "b3", 204)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[0].BackupID != "b3" || chain[1].BackupID != "b1" || chain[1].Mode != ModeFull {
		t.Errorf("chain = %+v", chain)
	}
	if _, err := c.Chain(ctx, "b2", 204); err == nil {
		t.Error("chain of a failed backup accepted")
	}
	if _, err := c.Chain(ctx, "nope", 204); !errors.Is(err, ErrNotFound) {
		t.Errorf("chain of a missing backup: %v", err)
	}
	if _, err := c.Get(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("get of a missing backup: %v", err)
	}

	list, err := c.List(ctx, ListFilter{VM: "vm one"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 3 || list[0].ID != "b3" || list[2].ID != "b1" || len(list[0].Disks) != 2 || list[1].Status != StatusFailed {
		t.Errorf("list = %+v", list)
	}
	if list[1].Error != "disk 204: EIO" || list[0].FinishedAt.IsZero() {
		t.Errorf("list details = %+v", list)
	}
	if l, _ := c.List(ctx, ListFilter{VM: "uuid-1", Status: StatusCommitted}); len(l) != 2 {
		t.Errorf("committed by uuid: %d", len(l))
	}
	if l, _ := c.List(ctx, ListFilter{VM: "other"}); len(l) != 0 {
		t.Errorf("other VM: %d", len(l))
	}
}

func TestCommitValidates(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	if err := c.Commit(ctx, "missing", []Disk{disk(1, ModeFull, "u/1", "")}); !errors.Is(err, ErrNotFound) {
		t.Errorf("commit of a missing backup: %v", err)
	}
	if err := c.Begin(ctx, Backup{ID: "b", Profile: "p", VMUUID: "u", Mode: "auto"}); err != nil {
		t.Fatal(err)
	}
	noID := disk(1, ModeFull, "", "")
	if err := c.Commit(ctx, "b", []Disk{noID}); err == nil {
		t.Error("disk without change ID accepted")
	}
	if err := c.Commit(ctx, "b", nil); err == nil {
		t.Error("commit without disks accepted")
	}
	if err := c.Begin(ctx, Backup{ID: "x"}); err == nil {
		t.Error("begin without VM accepted")
	}
}

func TestClosedChain(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	vm := Backup{Profile: "lab", VMUUID: "u", VMName: "vm", Mode: "auto"}
	b1 := vm
	b1.ID = "b1"
	if err := c.Begin(ctx, b1); err != nil {
		t.Fatal(err)
	}
	if err := c.Commit(ctx, "b1", []Disk{disk(204, ModeFull, "u/1", ""), disk(205, ModeFull, "v/1", "")}); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseChain(ctx, "lab", "u", 205, "b1", "disk removed"); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseChain(ctx, "lab", "u", 205, "b1", "disk removed"); err != nil {
		t.Fatalf("second close: %v", err)
	}
	latest, err := c.LatestDisks(ctx, "lab", "u")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := latest[205]; ok || latest[204].BackupID != "b1" {
		t.Errorf("latest after closing 205 = %+v", latest)
	}
	// The closed chain still restores.
	if chain, err := c.Chain(ctx, "b1", 205); err != nil || len(chain) != 1 {
		t.Errorf("closed chain: %+v %v", chain, err)
	}
	// A new disk with the same key starts a new chain that counts again.
	b2 := vm
	b2.ID = "b2"
	if err := c.Begin(ctx, b2); err != nil {
		t.Fatal(err)
	}
	if err := c.Commit(ctx, "b2", []Disk{disk(204, ModeIncremental, "u/2", "b1"), disk(205, ModeFull, "w/1", "")}); err != nil {
		t.Fatal(err)
	}
	latest, _ = c.LatestDisks(ctx, "lab", "u")
	if latest[205].BackupID != "b2" || latest[205].ChangeID != "w/1" {
		t.Errorf("latest after a new disk 205 = %+v", latest[205])
	}
}

// chainOfThree commits b1 (full) <- b2 <- b3 for disk 204 of one VM.
func chainOfThree(t *testing.T, c *Catalog) {
	t.Helper()
	ctx := context.Background()
	prev := ""
	for i, id := range []string{"b1", "b2", "b3"} {
		if err := c.Begin(ctx, Backup{ID: id, Profile: "lab", VMUUID: "uuid-1", VMName: "vm", Mode: "auto"}); err != nil {
			t.Fatal(err)
		}
		mode := ModeIncremental
		if i == 0 {
			mode = ModeFull
		}
		d := disk(204, mode, "u/"+id, prev)
		d.Path = "lab/uuid-1/204/" + id + ".qcow2"
		d.Stamp = FileStamp{Inode: int64(i + 1), MtimeNs: 10, CtimeNs: 20}
		if err := c.Commit(ctx, id, []Disk{d}); err != nil {
			t.Fatal(err)
		}
		prev = id
	}
}

func TestDamagedMarksDependents(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	chainOfThree(t, c)
	chain, err := c.Chain(ctx, "b3", 204)
	if err != nil || len(chain) != 3 || chain[2].Stamp.Inode != 1 || chain[0].Damaged != "" {
		t.Fatalf("chain %+v %v", chain, err)
	}
	marked, err := c.MarkDamaged(ctx, "b2", 204, "image x: truncated")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(marked, ",") != "b2,b3" {
		t.Fatalf("marked %v, want b2 and the point built on it, b3", marked)
	}
	chain, err = c.Chain(ctx, "b3", 204)
	if err != nil {
		t.Fatal(err)
	}
	if chain[0].Damaged != "builds on damaged restore point b2: image x: truncated" || chain[1].Damaged != "image x: truncated" || chain[2].Damaged != "" {
		t.Errorf("damaged: %q %q %q", chain[0].Damaged, chain[1].Damaged, chain[2].Damaged)
	}
	// Marking again keeps the first reason and marks nothing new.
	if marked, err := c.MarkDamaged(ctx, "b3", 204, "other"); err != nil || len(marked) != 0 {
		t.Errorf("second mark: %v %v", marked, err)
	}
	// List shows it (nothing is dropped).
	list, err := c.List(ctx, ListFilter{VM: "vm"})
	if err != nil || len(list) != 3 {
		t.Fatalf("list: %d %v", len(list), err)
	}
	if err := c.SetStamp(ctx, "b1", 204, FileStamp{Inode: 9, MtimeNs: 8, CtimeNs: 7}); err != nil {
		t.Fatal(err)
	}
	b1, err := c.Get(ctx, "b1")
	if err != nil || b1.Disks[0].Stamp != (FileStamp{Inode: 9, MtimeNs: 8, CtimeNs: 7}) {
		t.Errorf("stamp after SetStamp: %+v %v", b1, err)
	}
}

func TestBrokenChain(t *testing.T) {
	c, url := open(t)
	ctx := context.Background()
	chainOfThree(t, c)
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// A disk row of the middle restore point deleted by hand.
	if _, err := conn.Exec(ctx, `DELETE FROM backup_disks WHERE backup_id = 'b2'`); err != nil {
		t.Fatal(err)
	}
	chain, err := c.Chain(ctx, "b3", 204)
	if !errors.Is(err, ErrBrokenChain) || len(chain) != 1 || chain[0].BackupID != "b3" {
		t.Fatalf("chain %+v, %v: want b3 and ErrBrokenChain", chain, err)
	}
	var broken *BrokenChainError
	if !errors.As(err, &broken) || broken.Reason != "restore point b2, which b3 builds on, has no row for disk 204" {
		t.Errorf("the error says what does not link in a sentence: %v", err)
	}
	// The first link itself missing is not found, not broken.
	if _, err := c.Chain(ctx, "b2", 204); !errors.Is(err, ErrNotFound) {
		t.Errorf("chain of b2: %v", err)
	}
}

func TestMigrationMakesPathsRelative(t *testing.T) {
	url := testutil.Database(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// A catalog as the first two migrations left it, with absolute paths.
	if _, err := conn.Exec(ctx, `CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"001_init", "002_closed_chains"} {
		sql, err := migrations.ReadFile("migrations/" + v + ".sql")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Exec(ctx, string(sql)); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Exec(ctx, `INSERT INTO schema_migrations (version) VALUES ($1)`, v); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := conn.Exec(ctx, `INSERT INTO vms (profile, instance_uuid, name) VALUES ('lab', 'u-1', 'vm');
		INSERT INTO backups (id, vm_id, status, mode) VALUES ('b1', 1, 'committed', 'auto'), ('b2', 1, 'committed', 'auto');
		INSERT INTO backup_disks (backup_id, disk_key, capacity, mode, path, change_id, size_bytes, sha256)
		VALUES ('b1', 204, 1, 'full', '/srv/repo/lab/u-1/204/b1.qcow2', 'c', 1, 's'),
		       ('b2', 204, 1, 'full', '/somewhere/else/b2.qcow2', 'c', 1, 's')`); err != nil {
		t.Fatal(err)
	}
	c, err := Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b1, err := c.Get(ctx, "b1")
	if err != nil || b1.Disks[0].Path != "lab/u-1/204/b1.qcow2" {
		t.Errorf("b1 path after migration: %+v %v", b1, err)
	}
	// A path outside the layout stays as it was (resolved as absolute).
	b2, err := c.Get(ctx, "b2")
	if err != nil || b2.Disks[0].Path != "/somewhere/else/b2.qcow2" {
		t.Errorf("b2 path after migration: %+v %v", b2, err)
	}
}

func TestUnusable(t *testing.T) {
	c, url := open(t)
	ctx := context.Background()
	if err := c.Check(ctx); err != nil {
		t.Fatalf("Check of a sound catalog: %v", err)
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `DROP TABLE closed_chains, backup_disks, backups, vms CASCADE`); err != nil {
		t.Fatal(err)
	}
	_, err = c.LatestDisks(ctx, "lab", "u")
	if err == nil || !Unusable(err) {
		t.Fatalf("catalog without tables: %v, want Unusable", err)
	}
	if err := c.Check(ctx); err == nil || !Unusable(err) {
		t.Fatalf("Check of a catalog without tables: %v, want Unusable", err)
	}
	// A database that does not exist is unusable too.
	u := strings.Replace(url, "cbtflow_test_", "cbtflow_test_gone_", 1)
	_, err = Open(ctx, u)
	if err == nil || !Unusable(err) {
		t.Fatalf("missing database: %v, want Unusable", err)
	}
	// A server that does not answer is not: it heals.
	_, err = Open(ctx, "postgres://127.0.0.1:1/x?connect_timeout=2")
	if err == nil || Unusable(err) {
		t.Fatalf("unreachable server: %v, want a retryable error", err)
	}
}
