package activities_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/lab"
)

// A vCenter that fails internally (SystemError from QueryChangedDiskAreas;
// here the lab, which could not freeze the snapshot's disk) fails the
// disk's query: it is not a CBT reset, which would make the workflow drop
// the stored change ID and take a full backup of the disk.
func TestChangedAreasSystemErrorIsNoReset(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	disk := vm.disks[0]
	query := func(s *activities.CreateSnapshotResult, changeID string) error {
		_, err := execute[activities.ChangedAreasResult](t, env, f.vs.ChangedAreas, activities.ChangedAreasInput{
			Profile: profileLab, VMRef: vm.ref, SnapshotRef: s.SnapshotRef, BackupID: backupIDOfSnapshot(s),
			Key: disk.Key, Capacity: disk.Capacity, ChangeID: changeID})
		return err
	}

	f.apply(t, disk.Key, write{off: 0, n: 1 << 20, seed: 1})
	s1 := f.snapshot(t, env, vm, "sys1")
	id1 := snapDisk(t, s1, disk.Key).ChangeID

	// The next snapshot's disk cannot be frozen: a file stands where the
	// lab keeps its frozen images.
	f.apply(t, disk.Key, write{off: 4 << 20, n: 1 << 20, seed: 2})
	snaps := filepath.Join(f.lab.Dir(), "snapshots")
	if err := os.Rename(snaps, snaps+".aside"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(snaps, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s2 := f.snapshot(t, env, vm, "sys2")
	if err := os.Remove(snaps); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(snaps+".aside", snaps); err != nil {
		t.Fatal(err)
	}
	if _, err := f.lab.SnapshotImage(s2.SnapshotRef, disk.Key); err == nil {
		t.Fatal("the lab froze the disk without its snapshots folder")
	}

	// The stored change ID is fine (the snapshot continues its series):
	// the failure is vCenter's, and the disk's query fails for good.
	app := wantAppError(t, query(s2, id1), activities.ErrTypeCBTQuery, "since "+id1+": SystemError: ")
	if app.Type() == activities.ErrTypeCBTReset {
		t.Errorf("a SystemError was taken for a CBT reset: %v", app)
	}
	// The workflow's fallback after a reset, "*", fails the same way.
	wantAppError(t, query(s2, "*"), activities.ErrTypeCBTQuery, "since *: SystemError: ")
	// A snapshot the lab froze still answers: nothing else broke.
	if err := query(s1, "*"); err != nil {
		t.Errorf("ChangedAreas on the frozen snapshot: %v", err)
	}
}

// backupIDOfSnapshot is the backup ID a "cbtflow-<backup id>" snapshot was
// taken for: ChangedAreas checks the snapshot's name against it.
func backupIDOfSnapshot(s *activities.CreateSnapshotResult) string {
	return s.SnapshotName[len(activities.SnapshotPrefix):]
}
