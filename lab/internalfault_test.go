package lab_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab"
)

// wantSystemError checks that err is the SystemError vCenter answers its
// own failures with, and not one of the faults that say a change ID is
// refused (FileFault, InvalidArgument): cbtflow reads those as a CBT reset
// and starts a new chain, so a lab failure reported with them would turn a
// failure into a full backup.
func wantSystemError(t *testing.T, what string, err error) {
	t.Helper()
	wantFault(t, what, err, &types.SystemError{})
	if fault.Is(err, &types.FileFault{}) || fault.Is(err, &types.InvalidArgument{}) {
		t.Errorf("%s: %v, a change-ID refusal for a lab failure", what, err)
	}
}

// The lab's own failures answer QueryChangedDiskAreas with SystemError,
// whether the change ID is stored or "*": a snapshot whose disk could not
// be frozen (no room for the copy, here a file where the snapshots folder
// belongs), and a frozen image that cannot be read.
func TestInternalErrorsAreSystemErrors(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	vm := findVM(t, c, vm1)
	write(t, l, vm1, diskKey, 0, []byte("x"))
	s1 := snapshot(t, vm, "frozen")
	id1 := backing(t, c, s1, diskKey).ChangeId
	if id1 == "" {
		t.Fatal("the first snapshot has no change ID")
	}

	// A write since s1, so that the next freeze must copy (an unchanged
	// disk shares the previous frozen image).
	write(t, l, vm1, diskKey, 4*block, []byte("y"))
	snaps := filepath.Join(l.Dir(), "snapshots")
	aside := snaps + ".aside"
	if err := os.Rename(snaps, aside); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(snaps, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s2 := snapshot(t, vm, "not-frozen")
	if err := os.Remove(snaps); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(aside, snaps); err != nil {
		t.Fatal(err)
	}
	if _, err := l.SnapshotImage(s2.Value, diskKey); err == nil {
		t.Fatal("the disk of a snapshot taken without a snapshots folder was frozen")
	}
	// CBT itself is intact: the snapshot has the next change ID, and only
	// the lab's failure stands between it and an answer.
	if id2 := backing(t, c, s2, diskKey).ChangeId; id2 == "" || id2 == id1 {
		t.Errorf("snapshot without a frozen disk has change ID %q (the first: %q)", id2, id1)
	}
	_, err := query(c, vm, s2, diskKey, 0, id1)
	wantSystemError(t, "stored change ID, disk not frozen", err)
	_, err = query(c, vm, s2, diskKey, 0, "*")
	wantSystemError(t, "*, disk not frozen", err)

	// The frozen image of s1 gone behind the lab's back: "*" reads it.
	img, err := l.SnapshotImage(s1.Value, diskKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(img.Path); err != nil {
		t.Fatal(err)
	}
	_, err = query(c, vm, s1, diskKey, 0, "*")
	wantSystemError(t, "*, frozen image unreadable", err)

	// What vCenter itself refuses keeps its faults.
	_, err = query(c, vm, s2, diskKey, 0, "not-a-change-id")
	wantFault(t, "malformed change ID", err, &types.InvalidArgument{})
}
