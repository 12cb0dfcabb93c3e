package vsphere

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"slices"
	"sync"
	"testing"

	"github.com/cbtflow/cbtflow/lab"
)

// SessionOptions.OnCall is told of every call a client makes, by method;
// finding a VM, a backup's snapshot and its removal make few of them: a task that ended
// already is read once (not waited for through a property collector of
// its own: five calls), and the new snapshot's tree entry and config are
// read together.
func TestSnapshotCalls(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	var mu sync.Mutex
	calls := map[string]int{}
	s := NewSessionsWithOptions(map[string]Profile{"lab": f.profile}, nil, SessionOptions{OnCall: func(profile, method string) {
		mu.Lock()
		defer mu.Unlock()
		if profile != "lab" {
			t.Errorf("a call named profile %q", profile)
		}
		calls[method]++
	}})
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	c, err := s.Client(ctx, "lab")
	if err != nil {
		t.Fatal(err)
	}
	vm, err := c.FindVM(ctx, lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	// Data on the last disk, away from its end: its changed areas.
	last := vm.Disks[len(vm.Disks)-1]
	if _, err := f.lab.WriteDisk(vm.Name, last.Key, lab.BlockSize, bytes.NewReader(bytes.Repeat([]byte{7}, lab.BlockSize))); err != nil {
		t.Fatal(err)
	}
	take := func() map[string]int {
		mu.Lock()
		defer mu.Unlock()
		out := maps.Clone(calls)
		clear(calls)
		return out
	}
	if got := take(); got["Login"] != 1 || got["RetrievePropertiesEx"] == 0 {
		t.Errorf("calls of the connect and FindVM: %v, want one Login and the reads", got)
	}

	// A VM a step resolved before is read at its moref, its instance UUID
	// checked, in one call; a moref that names another VM, or none, finds
	// it by its UUID.
	at, err := c.VMAt(ctx, vm.Ref, vm.UUID)
	if err != nil || at.Ref != vm.Ref || at.Name != vm.Name || at.UUID != vm.UUID {
		t.Fatalf("VMAt(%s, %s) = %+v, %v", vm.Ref, vm.UUID, at, err)
	}
	if got := take(); len(got) != 1 || got["RetrievePropertiesEx"] != 1 {
		t.Errorf("VMAt made the calls %v, want one read", got)
	}
	other, err := c.FindVM(ctx, "DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	take()
	for _, ref := range []string{other.Ref, "vm-999999", ""} {
		at, err := c.VMAt(ctx, ref, vm.UUID)
		if err != nil || at.Ref != vm.Ref || at.Name != vm.Name || len(at.Disks) != len(vm.Disks) {
			t.Fatalf("VMAt(%q, %s) = %+v, %v, want %s found by its UUID", ref, vm.UUID, at, err, vm.Ref)
		}
		if got := take(); got["FindByUuid"] != 1 {
			t.Errorf("VMAt(%q) made the calls %v, want a FindByUuid", ref, got)
		}
	}
	if _, err := c.VMAt(ctx, vm.Ref, "00000000-0000-0000-0000-000000000000"); !errors.Is(err, ErrVMNotFound) {
		t.Errorf("VMAt with a UUID no VM has: %v, want ErrVMNotFound", err)
	}
	take()

	// A VM is found by its instance UUID, and its properties are read,
	// in a call each (its inventory path, which nothing used, took one
	// more).
	if _, err := c.VMByUUID(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if got := take(); len(got) != 2 || got["FindByUuid"] != 1 || got["RetrievePropertiesEx"] != 1 {
		t.Errorf("VMByUUID made the calls %v, want one FindByUuid and one read", got)
	}

	const name = "cbtflow-calls-1"
	snap, err := c.CreateSnapshot(ctx, vm, name)
	if err != nil {
		t.Fatal(err)
	}
	// The recent tasks, their infos, the tree, the task's info, the new
	// snapshot: five reads at most; a task that had not ended yet is
	// waited for with a property collector (its WaitForUpdatesEx calls
	// depend on how long the task takes).
	got := take()
	if got["CreateSnapshot_Task"] != 1 || got["RetrievePropertiesEx"] > 5 || got["CreatePropertyCollector"] > 1 {
		t.Errorf("CreateSnapshot made the calls %v, want one CreateSnapshot_Task, at most 5 reads and one collector", got)
	}
	// Found again: the recent tasks, their infos, the tree, its config.
	if _, err := c.CreateSnapshot(ctx, vm, name); err != nil {
		t.Fatal(err)
	}
	if got := take(); len(got) != 1 || got["RetrievePropertiesEx"] > 4 {
		t.Errorf("CreateSnapshot of an existing snapshot made the calls %v, want 4 reads at most", got)
	}
	// A disk's changed areas that one answer describes to the disk's end
	// take one query: none more from the end of its last area, which
	// could only come back empty.
	var areas []area
	if err := c.QueryChangedAreas(ctx, vm.Ref, snap.Ref, last.Key, last.Capacity, "*", func(off, n int64) error {
		areas = append(areas, area{off, n})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if want := []area{{lab.BlockSize, lab.BlockSize}}; !slices.Equal(areas, want) {
		t.Errorf("changed areas %v, want %v", areas, want)
	}
	if got := take(); len(got) != 1 || got["QueryChangedDiskAreas"] != 1 {
		t.Errorf("QueryChangedAreas of a disk made the calls %v, want one QueryChangedDiskAreas", got)
	}
	if _, err := c.RemoveOwnSnapshot(ctx, vm.Ref, snap.Ref, name); err != nil {
		t.Fatal(err)
	}
	// The check of the tree, the task, its info (or a collector's wait).
	got = take()
	if got["RemoveSnapshot_Task"] != 1 || got["RetrievePropertiesEx"] > 2 || got["CreatePropertyCollector"] > 1 {
		t.Errorf("RemoveOwnSnapshot made the calls %v, want one RemoveSnapshot_Task, at most 2 reads and one collector", got)
	}
}
