package activities_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"syscall"
	"testing"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

const (
	catVMUUID   = "4211e0b2-6c1a-7d3e-9f00-0123456789ab"
	catCapacity = 64 << 20
)

// catalogFixture is a fresh PostgreSQL database with the catalog's schema,
// a repository in a temporary folder, and the Catalog activities.
type catalogFixture struct {
	url  string
	cat  *catalog.Catalog
	repo *repository.Repository
	a    *activities.Catalog
	env  *testsuite.TestActivityEnvironment
}

func newCatalogFixture(t *testing.T) *catalogFixture {
	t.Helper()
	url := testutil.Database(t)
	cat, err := catalog.Open(ctxT(t, time.Minute), url)
	if err != nil {
		t.Fatalf("catalog.Open: %v", err)
	}
	t.Cleanup(cat.Close)
	repo, err := repository.Open(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	a := &activities.Catalog{Catalog: cat, Repo: repo}
	logger := slog.New(slog.NewTextHandler(t.Output(), nil))
	return &catalogFixture{url: url, cat: cat, repo: repo, a: a, env: newActivityEnv(t, logger, a)}
}

func (c *catalogFixture) begin(t *testing.T, id, vmUUID string) *activities.BeginBackupResult {
	t.Helper()
	return mustExecute[activities.BeginBackupResult](t, c.env, c.a.BeginBackup, activities.BeginBackupInput{
		BackupID: id, Profile: profileLab, VMUUID: vmUUID, VMName: "DC0_H0_VM0", Mode: "auto",
		WorkflowID: "backup/lab/" + vmUUID, RunID: "run-" + id})
}

func (c *catalogFixture) commit(t *testing.T, id string, disks ...activities.CommitDisk) error {
	t.Helper()
	_, err := c.env.ExecuteActivity(c.a.CommitRestorePoint, activities.CommitInput{BackupID: id, Disks: disks})
	return err
}

func (c *catalogFixture) fail(t *testing.T, id, reason string) error {
	t.Helper()
	_, err := c.env.ExecuteActivity(c.a.FailBackup, activities.FailBackupInput{BackupID: id, Reason: reason})
	return err
}

// image makes the QCOW2 of disk key of a backup where TransferDisk puts
// it — an overlay on backing when given — and returns the disk as the
// workflow would commit it.
func (c *catalogFixture) image(t *testing.T, id string, key int32, backing *activities.CommitDisk) activities.CommitDisk {
	t.Helper()
	ctx := ctxT(t, time.Minute)
	path, err := c.repo.PrepareImage(repository.Key{Profile: profileLab, VMUUID: catVMUUID, DiskKey: key, BackupID: id})
	if err != nil {
		t.Fatal(err)
	}
	d := activities.CommitDisk{Key: key, Capacity: catCapacity, Mode: catalog.ModeFull, Path: path,
		ChangeID: fmt.Sprintf("52b1c3d4-0000-4000-8000-%012d/%s", key, id), ChangedBytes: 1 << 20, WrittenBytes: 1 << 20}
	if backing == nil {
		err = qemu.Create(ctx, path, catCapacity)
	} else {
		err = qemu.CreateOverlay(ctx, path, backing.Path)
		d.Mode, d.ChangeIDFrom = catalog.ModeIncremental, backing.ChangeID
		d.BackingBackupID = backupIDOf(backing.Path)
	}
	if err != nil {
		t.Fatal(err)
	}
	d.SizeBytes, d.SHA256 = fileSum(t, path)
	return d
}

// backupIDOf is the backup ID in an image path of the repository.
func backupIDOf(path string) string {
	base := filepath.Base(path)
	return base[:len(base)-len(filepath.Ext(base))]
}

func previous(id string, d activities.CommitDisk, chain int) activities.PreviousDisk {
	return activities.PreviousDisk{Key: d.Key, BackupID: id, Capacity: d.Capacity, ChangeID: d.ChangeID, Path: d.Path, ChainLength: chain}
}

func TestBeginBackup(t *testing.T) {
	c := newCatalogFixture(t)

	if r := c.begin(t, "b1", catVMUUID); len(r.Previous) != 0 {
		t.Fatalf("BeginBackup of a VM never backed up: previous %+v", r.Previous)
	}
	if r := c.begin(t, "b1", catVMUUID); len(r.Previous) != 0 { // a retried attempt
		t.Fatalf("BeginBackup again: previous %+v", r.Previous)
	}
	b1a, b1b := c.image(t, "b1", 2001, nil), c.image(t, "b1", 2000, nil)
	if err := c.commit(t, "b1", b1a, b1b); err != nil {
		t.Fatal(err)
	}

	r := c.begin(t, "b2", catVMUUID)
	want := []activities.PreviousDisk{previous("b1", b1b, 1), previous("b1", b1a, 1)} // sorted by key
	if !reflect.DeepEqual(r.Previous, want) {
		t.Fatalf("previous after one full backup:\n got %+v\nwant %+v", r.Previous, want)
	}
	b2a := c.image(t, "b2", 2000, &b1b) // incremental on b1
	b2b := c.image(t, "b2", 2001, nil)  // a full again (resized, CBT reset, ...)
	if err := c.commit(t, "b2", b2a, b2b); err != nil {
		t.Fatal(err)
	}

	// A failed backup is no restore point.
	c.begin(t, "b3", catVMUUID)
	c.image(t, "b3", 2000, &b2a)
	if err := c.fail(t, "b3", "transfer failed"); err != nil {
		t.Fatal(err)
	}
	r = c.begin(t, "b4", catVMUUID)
	want = []activities.PreviousDisk{previous("b2", b2a, 2), previous("b2", b2b, 1)}
	// The space check's estimate of disk 2000's next incremental: the
	// most its chain's one incremental changed.
	want[0].RecentChangedBytes, want[0].RecentIncrementals = b2a.ChangedBytes, 1
	if b2a.ChangedBytes <= 0 {
		t.Fatalf("the fixture's incremental changed %d bytes", b2a.ChangedBytes)
	}
	if !reflect.DeepEqual(r.Previous, want) {
		t.Fatalf("previous after an incremental and a failed backup:\n got %+v\nwant %+v", r.Previous, want)
	}
	b4a := c.image(t, "b4", 2000, &b2a)
	if err := c.commit(t, "b4", b4a); err != nil { // disk 2001 was removed from the VM
		t.Fatal(err)
	}
	r = c.begin(t, "b5", catVMUUID)
	want = []activities.PreviousDisk{previous("b4", b4a, 3), previous("b2", b2b, 1)}
	want[0].RecentChangedBytes, want[0].RecentIncrementals = max(b2a.ChangedBytes, b4a.ChangedBytes), 2
	if !reflect.DeepEqual(r.Previous, want) {
		t.Fatalf("previous after a backup of one disk:\n got %+v\nwant %+v", r.Previous, want)
	}

	// Another VM, and the same VM UUID in another vCenter profile, have no history.
	if r := c.begin(t, "other1", "4211e0b2-6c1a-7d3e-9f00-ffffffffffff"); len(r.Previous) != 0 {
		t.Errorf("another VM sees previous %+v", r.Previous)
	}
	in := activities.BeginBackupInput{BackupID: "prof1", Profile: "other-vcenter", VMUUID: catVMUUID, Mode: "auto"}
	if r := mustExecute[activities.BeginBackupResult](t, c.env, c.a.BeginBackup, in); len(r.Previous) != 0 {
		t.Errorf("the same UUID in another profile sees previous %+v", r.Previous)
	}

	// A backup ID that is not a safe file name never reaches the catalog.
	in = activities.BeginBackupInput{BackupID: "../b6", Profile: profileLab, VMUUID: catVMUUID, Mode: "auto"}
	_, err := execute[activities.BeginBackupResult](t, c.env, c.a.BeginBackup, in)
	wantAppError(t, err, activities.ErrTypeInvalidInput, "../b6")
	// An ended backup cannot begin again.
	in.BackupID = "b3"
	if _, err := execute[activities.BeginBackupResult](t, c.env, c.a.BeginBackup, in); err == nil {
		t.Errorf("BeginBackup of a failed backup succeeded")
	}
}

func TestCommitRestorePoint(t *testing.T) {
	c := newCatalogFixture(t)
	m := &recordedMetrics{}
	c.a.Metrics = m
	ctx := ctxT(t, time.Minute)
	c.begin(t, "c1", catVMUUID)
	d1, d2 := c.image(t, "c1", 2000, nil), c.image(t, "c1", 2001, nil)
	staging, err := c.repo.StagingDir("c1")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(staging, "2000.extents.json"), []byte("[]\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	missing := d2
	missing.Path = filepath.Join(filepath.Dir(d2.Path), "gone.qcow2")
	wantAppError(t, c.commit(t, "c1", d1, missing), activities.ErrTypeInvalidInput, missing.Path)
	short := d2
	short.SizeBytes++
	wantAppError(t, c.commit(t, "c1", d1, short), activities.ErrTypeInvalidInput, d2.Path, fmt.Sprint(short.SizeBytes))
	// Nothing of a refused commit is recorded.
	b, err := c.cat.Get(ctx, "c1")
	if err != nil {
		t.Fatal(err)
	}
	if b.Status != catalog.StatusRunning || len(b.Disks) != 0 {
		t.Fatalf("after refused commits the backup is %s with disks %+v", b.Status, b.Disks)
	}

	for i := range 2 { // a retried attempt commits nothing twice
		if err := c.commit(t, "c1", d1, d2); err != nil {
			t.Fatalf("commit, call %d: %v", i+1, err)
		}
		b, err := c.cat.Get(ctx, "c1")
		if err != nil {
			t.Fatal(err)
		}
		if b.Status != catalog.StatusCommitted || len(b.Disks) != 2 {
			t.Fatalf("after commit %d: %s with %d disks", i+1, b.Status, len(b.Disks))
		}
		for j, want := range []activities.CommitDisk{d1, d2} {
			got := b.Disks[j]
			// Paths are recorded relative to the repository root, with
			// the file's stamp.
			if rel, _ := c.repo.Rel(want.Path); got.Path != rel || got.Stamp == (catalog.FileStamp{}) {
				t.Errorf("disk %d recorded at %q with stamp %+v, want %q and a stamp", j, got.Path, got.Stamp, rel)
			}
			if got.Key != want.Key || got.ChangeID != want.ChangeID || got.SizeBytes != want.SizeBytes ||
				got.SHA256 != want.SHA256 || got.Mode != want.Mode || got.Capacity != want.Capacity {
				t.Errorf("disk %d recorded as %+v, committed %+v", j, got, want)
			}
			// With the space its file takes (its blocks), which usage sums.
			if fi, err := os.Stat(want.Path); err != nil {
				t.Fatal(err)
			} else if blocks := fi.Sys().(*syscall.Stat_t).Blocks * 512; got.AllocatedBytes != blocks || blocks == 0 {
				t.Errorf("disk %d recorded with %d bytes allocated, its file has %d", j, got.AllocatedBytes, blocks)
			}
		}
	}
	if _, err := os.Stat(staging); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the staging folder outlives the commit: %v", err)
	}
	// The commit is reported once, with both disks' changed bytes, the
	// refused and the repeated ones not at all.
	if len(m.commits) != 1 || m.commits[0].changed != d1.ChangedBytes+d2.ChangedBytes ||
		m.commits[0].took < 0 || m.commits[0].took > time.Minute {
		t.Errorf("commits reported: %+v, want one of %d changed bytes", m.commits, d1.ChangedBytes+d2.ChangedBytes)
	}

	// A committed restore point is never changed.
	other := d2
	other.ChangeID += "0"
	if err := c.commit(t, "c1", d1, other); err == nil {
		t.Errorf("a second commit with another change ID succeeded")
	} else {
		logRetryable(t, "commit of other data to a committed backup", err)
	}
	if b, err := c.cat.Get(ctx, "c1"); err != nil || b.Disks[1].ChangeID != d2.ChangeID {
		t.Errorf("the committed backup changed: %+v, %v", b, err)
	}

	// A failed backup cannot be committed.
	c.begin(t, "c2", catVMUUID)
	f1 := c.image(t, "c2", 2000, &d1)
	if err := c.fail(t, "c2", "cancelled"); err != nil {
		t.Fatal(err)
	}
	f1.Path = d1.Path // c2's image is gone; commit something that exists
	f1.SizeBytes, f1.SHA256 = d1.SizeBytes, d1.SHA256
	if err := c.commit(t, "c2", f1); err == nil {
		t.Errorf("a failed backup was committed")
	} else {
		logRetryable(t, "commit of a failed backup", err)
	}
}

// logRetryable notes whether a refusal would be retried by Temporal.
func logRetryable(t *testing.T, what string, err error) {
	t.Helper()
	var app *temporal.ApplicationError
	retryable := !errors.As(err, &app) || !app.NonRetryable()
	t.Logf("%s: refused (retryable %v): %v", what, retryable, err)
}

func TestFailBackup(t *testing.T) {
	c := newCatalogFixture(t)
	ctx := ctxT(t, time.Minute)
	sums := map[string]string{}
	keep := func(ds ...activities.CommitDisk) {
		for _, d := range ds {
			sums[d.Path] = d.SHA256
		}
	}
	checkKept := func() {
		t.Helper()
		for path, sum := range sums {
			if _, err := os.Stat(path); err != nil {
				t.Errorf("committed image %s: %v", path, err)
				continue
			}
			if _, got := fileSum(t, path); got != sum {
				t.Errorf("committed image %s was modified", path)
			}
		}
	}
	staging := func(id string) string {
		t.Helper()
		dir, err := c.repo.StagingDir(id)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "2000.extents.json"), []byte("[]\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	gone := func(paths ...string) {
		t.Helper()
		for _, p := range paths {
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s is still there: %v", p, err)
			}
		}
	}

	c.begin(t, "f1", catVMUUID)
	c1, c2 := c.image(t, "f1", 2000, nil), c.image(t, "f1", 2001, nil)
	if err := c.commit(t, "f1", c1, c2); err != nil {
		t.Fatal(err)
	}
	keep(c1, c2)

	// A backup fails with partial images — one of a disk it never
	// committed anything for — and working files.
	c.begin(t, "f2", catVMUUID)
	p1, p2, p3 := c.image(t, "f2", 2000, &c1), c.image(t, "f2", 2001, nil), c.image(t, "f2", 2002, nil)
	dir := staging("f2")
	for i := range 2 {
		if err := c.fail(t, "f2", "transfer of disk 2001 failed"); err != nil {
			t.Fatalf("FailBackup, call %d: %v", i+1, err)
		}
		gone(p1.Path, p2.Path, p3.Path, dir)
		checkKept()
	}
	b, err := c.cat.Get(ctx, "f2")
	if err != nil {
		t.Fatal(err)
	}
	if b.Status != catalog.StatusFailed || b.Error != "transfer of disk 2001 failed" {
		t.Errorf("failed backup recorded as %s (%q)", b.Status, b.Error)
	}
	// The chain is intact: the next backup still builds on f1.
	r := c.begin(t, "f3", catVMUUID)
	if want := []activities.PreviousDisk{previous("f1", c1, 1), previous("f1", c2, 1)}; !reflect.DeepEqual(r.Previous, want) {
		t.Errorf("previous after a failed backup:\n got %+v\nwant %+v", r.Previous, want)
	}

	// Failing a committed backup does nothing at all.
	for i := range 2 {
		if err := c.fail(t, "f1", "late cleanup"); err != nil {
			t.Fatalf("FailBackup of a committed backup, call %d: %v", i+1, err)
		}
		checkKept()
	}
	b, err = c.cat.Get(ctx, "f1")
	if err != nil {
		t.Fatal(err)
	}
	if b.Status != catalog.StatusCommitted || b.Error != "" || len(b.Disks) != 2 {
		t.Errorf("committed backup after FailBackup: %s (%q), %d disks", b.Status, b.Error, len(b.Disks))
	}

	// A backup that never began (the workflow failed before BeginBackup
	// ran) has only working files.
	dir = staging("f9")
	if err := c.fail(t, "f9", "failed early"); err != nil {
		t.Fatal(err)
	}
	gone(dir)
	checkKept()
	if _, err := c.cat.Get(ctx, "f9"); !errors.Is(err, catalog.ErrNotFound) {
		t.Errorf("FailBackup created a backup that never began: %v", err)
	}
}

// A repository that turned read-only after a backup made its files: the
// backup is still marked failed and FailBackup returns, leaving the
// partial files, instead of retrying for its whole time limit while the
// VM's workflow stays open.
func TestFailBackupOnReadOnlyRepository(t *testing.T) {
	url := testutil.Database(t)
	cat, err := catalog.Open(ctxT(t, time.Minute), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	root := mountTmpfs(t, "16m")
	repo, err := repository.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	a := &activities.Catalog{Catalog: cat, Repo: repo}
	c := &catalogFixture{cat: cat, repo: repo, a: a, env: newActivityEnv(t, slog.New(slog.NewTextHandler(t.Output(), nil)), a)}
	const id, uuid = "b-ro", "5011aaaa-0000-0000-0000-000000000001"
	c.begin(t, id, uuid)
	img, err := repo.PrepareImage(repository.Key{Profile: profileLab, VMUUID: uuid, DiskKey: 204, BackupID: id})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, []byte("partial"), 0o644); err != nil {
		t.Fatal(err)
	}
	staging, _ := repo.StagingDir(id)
	if err := os.MkdirAll(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("", root, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
		t.Fatalf("remount read-only: %v", err)
	}
	if err := c.fail(t, id, "repository went read-only"); err != nil {
		t.Fatalf("FailBackup on a read-only repository: %v", err)
	}
	b, err := cat.Get(context.Background(), id)
	if err != nil || b.Status != catalog.StatusFailed {
		t.Fatalf("backup after FailBackup: %+v %v", b, err)
	}
	if _, err := os.Stat(img); err != nil {
		t.Errorf("the partial image should be left on a read-only repository: %v", err)
	}
}

// A backup of a VM into which a restore has not ended is refused, naming
// the restore and its workflow, before the catalog records it: a restore
// point taken then would hold half-restored disks. Once the restore
// ended, the backup begins.
func TestBeginBackupRefusedDuringARestoreIntoTheVM(t *testing.T) {
	c := newCatalogFixture(t)
	ctx := ctxT(t, time.Minute)
	if err := c.cat.BeginVMRestore(ctx, catalog.VMRestore{ID: "r1", Profile: profileLab, VMUUID: catVMUUID, VMName: "DC0_H0_VM0",
		BackupID: "b0", WorkflowID: "restore-vm/b0/x"}); err != nil {
		t.Fatal(err)
	}
	_, err := execute[activities.BeginBackupResult](t, c.env, c.a.BeginBackup, activities.BeginBackupInput{
		BackupID: "b1", Profile: profileLab, VMUUID: catVMUUID, VMName: "DC0_H0_VM0", Mode: "auto"})
	wantAppError(t, err, activities.ErrTypeRestoreIntoVMRunning, "r1", "restore-vm/b0/x", "DC0_H0_VM0")
	if _, err := c.cat.Get(ctx, "b1"); !errors.Is(err, catalog.ErrNotFound) {
		t.Errorf("the refused backup is in the catalog: %v", err)
	}
	if err := c.cat.FinishVMRestore(ctx, "r1", catalog.RestoreCompleted, ""); err != nil {
		t.Fatal(err)
	}
	c.begin(t, "b1", catVMUUID)
}
