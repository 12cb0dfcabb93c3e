package activities_test

import (
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// PlanRestoreVM refuses a VM into which another restore has not ended,
// naming it and its workflow: two restores would write its disks at once.
// Once that restore ended, the plan goes through.
func TestPlanRestoreVMRefusesASecondRestore(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	if err := f.lab.SetPower(vm.name, false); err != nil {
		t.Fatal(err)
	}
	cat, err := catalog.Open(ctxT(t, time.Minute), testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	ctx := ctxT(t, time.Minute)
	const point = "20260101T000000Z-0123456789ab"
	if err := cat.Begin(ctx, catalog.Backup{ID: point, Profile: profileLab, VMUUID: vm.uuid, VMName: vm.name, Mode: "auto"}); err != nil {
		t.Fatal(err)
	}
	var disks []catalog.Disk
	for _, d := range vm.disks {
		disks = append(disks, catalog.Disk{Key: d.Key, Capacity: d.Capacity, Mode: catalog.ModeFull, Path: "x/" + point + ".qcow2",
			ChangeID: "c", SizeBytes: 4096, SHA256: strings.Repeat("a", 64)})
	}
	if err := cat.Commit(ctx, point, disks); err != nil {
		t.Fatal(err)
	}
	if err := cat.BeginVMRestore(ctx, catalog.VMRestore{ID: "r-other", Profile: profileLab, VMUUID: vm.uuid, VMName: vm.name,
		BackupID: point, WorkflowID: "restore-vm/" + point + "/other"}); err != nil {
		t.Fatal(err)
	}
	vr := &activities.VMRestorer{Sessions: f.sessions, Catalog: cat, Repo: f.repo}
	aenv := newActivityEnv(t, f.log, vr)
	in := activities.PlanRestoreVMInput{BackupID: point, VM: vm.name}
	_, err = execute[activities.PlanRestoreVMResult](t, aenv, vr.PlanRestoreVM, in)
	wantAppError(t, err, activities.ErrTypeRestoreRefused, "r-other", "restore-vm/"+point+"/other", "has not ended")
	if err := cat.FinishVMRestore(ctx, "r-other", catalog.RestoreFailed, "boom"); err != nil {
		t.Fatal(err)
	}
	p := mustExecute[activities.PlanRestoreVMResult](t, aenv, vr.PlanRestoreVM, in)
	if len(p.Disks) != len(vm.disks) {
		t.Errorf("plan %+v, want %d disks", p, len(vm.disks))
	}
}
