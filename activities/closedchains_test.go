package activities_test

import (
	"reflect"
	"slices"
	"testing"

	"github.com/cbtflow/cbtflow/activities"
)

// BeginBackup closes the chains of disks that left the VM and says which,
// sorted by disk key: the workflow turns them into warnings in that order,
// and a result that reorders itself from run to run reads as a change
// where there is none. The catalog hands the latest disks over as a map,
// whose order Go randomizes, so with eight removed disks an unsorted list
// comes out sorted about once in 40,000 runs.
func TestBeginBackupClosedChainsSorted(t *testing.T) {
	c := newCatalogFixture(t)
	c.begin(t, "b1", catVMUUID)
	keys := []int32{2007, 2000, 2005, 2001, 2006, 2003, 2002, 2004, 2008}
	var disks []activities.CommitDisk
	for _, k := range keys {
		disks = append(disks, c.image(t, "b1", k, nil))
	}
	if err := c.commit(t, "b1", disks...); err != nil {
		t.Fatal(err)
	}
	// Only disk 2008 is still in the VM.
	r := mustExecute[activities.BeginBackupResult](t, c.env, c.a.BeginBackup, activities.BeginBackupInput{
		BackupID: "b2", Profile: profileLab, VMUUID: catVMUUID, VMName: "DC0_H0_VM0", Mode: "auto",
		WorkflowID: "backup/lab/" + catVMUUID, RunID: "run-b2", DiskKeys: []int32{2008}})
	want := []int32{2000, 2001, 2002, 2003, 2004, 2005, 2006, 2007}
	if !reflect.DeepEqual(r.ClosedChains, want) {
		t.Errorf("ClosedChains = %v, want %v (sorted by disk key)", r.ClosedChains, want)
	}
	if len(r.Previous) != 1 || r.Previous[0].Key != 2008 {
		t.Errorf("Previous = %+v, want only disk 2008", r.Previous)
	}
	// Closed chains stay closed: the next backup neither offers nor closes them again.
	r = c.begin(t, "b3", catVMUUID)
	if len(r.ClosedChains) != 0 || len(r.Previous) != 1 || !slices.ContainsFunc(r.Previous, func(p activities.PreviousDisk) bool { return p.Key == 2008 }) {
		t.Errorf("after closing: ClosedChains %v, Previous %+v", r.ClosedChains, r.Previous)
	}
}
