package catalog

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/testutil"
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
