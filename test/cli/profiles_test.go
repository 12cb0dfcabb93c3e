package cli

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// One VM, one vCenter, two profiles: while a backup of the VM under
// profile lab-alias is held mid-transfer, `starter backup VM --profile lab
// --wait` is refused at once with exit code 3 naming the running backup
// (its workflow ID is the vCenter's and the VM's instance UUIDs, which
// both profiles share); the VM never has more than one cbtflow snapshot;
// released, the held backup commits. A later backup under lab then runs,
// under the same workflow ID, as the first of lab's own chain.
func TestOneBackupPerVMAcrossProfiles(t *testing.T) {
	const alias = "lab-alias"
	s := stacktest.New(t, stack.Options{FaultPoints: true, LabAliases: []string{alias}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	const vm = "DC0_H0_VM1"
	l := s.Lab()
	disks, err := l.Disks(vm)
	if err != nil || len(disks) != 1 {
		t.Fatalf("lab VM %s: %+v %v", vm, disks, err)
	}
	key, vmRef := disks[0].Key, disks[0].VMRef
	// Two profiles of one lab in the file the worker reads.
	if b, err := os.ReadFile(s.VCentersFile()); err != nil || !strings.Contains(string(b), `"`+alias+`"`) || !strings.Contains(string(b), `"`+stack.Profile+`"`) {
		t.Fatalf("profiles file %s lacks %s or %s: %v\n%s", s.VCentersFile(), stack.Profile, alias, err, b)
	}
	// The vCenter's identity as vSphere itself answers it.
	sc := soap.NewClient(l.URL(), true) // the lab, on loopback
	vc, err := vim25.NewClient(ctx, sc)
	if err != nil {
		t.Fatal(err)
	}
	vcUUID := vc.ServiceContent.About.InstanceUuid
	sc.CloseIdleConnections()
	if vcUUID == "" {
		t.Fatal("the lab reports no vCenter instance UUID")
	}
	// Enough data that a progress report falls between half and all of
	// the copy, where the mid-transfer point holds it (as in make chaos).
	chunk := stacktest.Pattern(9, 16<<20)
	for off := int64(0); off < 320<<20; off += int64(len(chunk)) {
		stacktest.WriteDisk(t, l, vm, key, off, chunk)
	}

	// Watch the VM's cbtflow snapshots for the whole test: never two.
	var (
		mu       sync.Mutex
		most     int
		seen     = map[string]bool{}
		watchErr error
	)
	wctx, stopWatch := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for wctx.Err() == nil {
			snaps, err := stacktest.Snapshots(wctx, l, vmRef)
			mu.Lock()
			if err != nil && wctx.Err() == nil && watchErr == nil {
				watchErr = err
			}
			most = max(most, len(snaps))
			for _, n := range snaps {
				seen[n] = true
			}
			mu.Unlock()
			select {
			case <-wctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	stopWatching := func() {
		stopWatch()
		<-watched
	}
	defer stopWatching()

	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	// Released on every way out, so the stack can stop.
	t.Cleanup(func() { _ = gates.Release(faultpoint.MidTransfer) })
	held, err := s.StartStarter("backup", vm, "--profile", alias, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	hctx, hcancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err = gates.Wait(hctx, faultpoint.MidTransfer)
	hcancel()
	if err != nil {
		_ = held.Signal(os.Kill)
		r, _ := held.Wait(ctx)
		t.Fatalf("the backup under %s: %v\nstarter: %s", alias, err, r)
	}

	// What runs: one backup in the catalog, one BackupVM in Temporal,
	// under the vCenter's and the VM's instance UUIDs, for profile alias.
	var running []stacktest.ListJSON
	for _, e := range list(ctx, t, s, vm) {
		if e.Status == "running" {
			running = append(running, e)
		}
	}
	if len(running) != 1 {
		t.Fatalf("%d running backups of %s in the catalog, want 1: %+v", len(running), vm, running)
	}
	runningID, vmUUID := running[0].BackupID, running[0].VMUUID
	wid := workflows.BackupWorkflowID(vcUUID, vmUUID)
	if want := "backup/" + vcUUID + "/" + vmUUID; wid != want {
		t.Fatalf("BackupWorkflowID = %s, want %s", wid, want)
	}
	wfs := stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'BackupVM' AND ExecutionStatus = 'Running' AND CbtflowBackupID = '%s'", runningID))
	if len(wfs) != 1 || wfs[0].GetExecution().GetWorkflowId() != wid {
		t.Fatalf("running BackupVM of backup %s: %v, want one, workflow %s", runningID, wfs, wid)
	}
	desc, err := s.Client().DescribeWorkflow(ctx, wid, "")
	if err != nil {
		t.Fatal(err)
	}
	if p, _ := desc.TypedSearchAttributes.GetKeyword(workflows.SearchVCenter); p != alias {
		t.Errorf("workflow %s: CbtflowVCenter %q, want the profile %s", wid, p, alias)
	}

	// The same VM under the other profile: refused, naming what runs.
	r := run(ctx, t, s, "backup", vm, "--profile", stack.Profile, "--wait")
	t.Logf("backup under %s while %s runs under %s: %s", stack.Profile, runningID, alias, r)
	if r.ExitCode != 3 {
		t.Errorf("backup under %s: exit code %d, want 3\n%s", stack.Profile, r.ExitCode, r)
	}
	for _, want := range []string{"already running", "backup " + runningID, "under profile " + alias, "workflow " + wid} {
		if !strings.Contains(r.Stderr, want) {
			t.Errorf("backup under %s: stderr lacks %q:\n%s", stack.Profile, want, r.Stderr)
		}
	}
	if r.Duration > time.Minute {
		t.Errorf("backup under %s was refused after %s: want at once", stack.Profile, r.Duration)
	}
	// --json: one object naming the running backup.
	r = run(ctx, t, s, "backup", vm, "--profile", stack.Profile, "--json")
	var out stacktest.BackupJSON
	if err := stacktest.DecodeOne(r.Stdout, &out); err != nil {
		t.Error(err)
	} else if r.ExitCode != 3 || out.Status != "already_running" || out.BackupID != runningID || out.WorkflowID != wid || out.VMUUID != vmUUID {
		t.Errorf("backup under %s --json: %+v (exit %d), want status already_running, backup %s, workflow %s", stack.Profile, out, r.ExitCode, runningID, wid)
	}
	// Nothing of the refused starts reached vSphere or the catalog.
	if all := stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'BackupVM' AND CbtflowVM = '%s'", vm)); len(all) != 1 {
		t.Errorf("%d BackupVM workflows of %s, want only the held one", len(all), vm)
	}
	if snaps, err := stacktest.Snapshots(ctx, l, vmRef); err != nil || len(snaps) != 1 || snaps[0] != activities.SnapshotPrefix+runningID {
		t.Errorf("snapshots of %s while %s is held: %v (%v), want only its own", vm, runningID, snaps, err)
	}
	if !gates.Reached(faultpoint.MidTransfer) {
		t.Errorf("backup %s is no longer held mid-transfer", runningID)
	}

	// Released, the held backup commits.
	if err := gates.Release(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	hr, err := held.Wait(ctx)
	if err != nil {
		t.Fatalf("the held backup's starter: %v\n%s", err, hr)
	}
	var first stacktest.BackupJSON
	if err := stacktest.DecodeOne(hr.Stdout, &first); err != nil || hr.ExitCode != 0 || first.Status != "completed" || first.BackupID != runningID {
		t.Fatalf("the backup under %s: %+v %v, want backup %s completed\n%s", alias, first, err, runningID, hr)
	}
	if d := first.Disk(t, key); d.Mode != workflows.ModeFull || d.ChangedBytes < 320<<20 {
		t.Errorf("the backup under %s: disk %+v, want a full of at least 320 MiB", alias, d)
	}

	// One VM under two profiles has two chains: the next backup under lab
	// is the first of its own (a full), under the same workflow ID.
	r = run(ctx, t, s, "backup", vm, "--profile", stack.Profile, "--wait", "--json")
	var second stacktest.BackupJSON
	if err := stacktest.DecodeOne(r.Stdout, &second); err != nil || r.ExitCode != 0 || second.Status != "completed" {
		t.Fatalf("backup under %s after the release: %+v %v\n%s", stack.Profile, second, err, r)
	}
	if second.WorkflowID != wid {
		t.Errorf("backup under %s ran as workflow %s, want %s", stack.Profile, second.WorkflowID, wid)
	}
	if d := second.Disk(t, key); d.Mode != workflows.ModeFull || !strings.Contains(d.Note, "no previous restore point") || !strings.Contains(d.Path, "/"+stack.Profile+"/"+vmUUID+"/") {
		t.Errorf("backup under %s: disk %+v, want the full of a chain of its own, in %s's folder", stack.Profile, d, stack.Profile)
	}
	if d := first.Disk(t, key); !strings.Contains(d.Path, "/"+alias+"/"+vmUUID+"/") {
		t.Errorf("backup under %s: image %s, want it in %s's folder", alias, d.Path, alias)
	}
	var committed []string
	for _, e := range list(ctx, t, s, vm) {
		if e.Status != "committed" || !e.Restorable {
			t.Errorf("catalog: backup %s is %s (restorable %v)", e.BackupID, e.Status, e.Restorable)
		}
		committed = append(committed, e.BackupID)
	}
	wantCommitted := []string{runningID, second.BackupID}
	slices.Sort(committed)
	slices.Sort(wantCommitted)
	if !slices.Equal(committed, wantCommitted) {
		t.Errorf("catalog of %s: %v, want %s and %s", vm, committed, runningID, second.BackupID)
	}

	stopWatching()
	mu.Lock()
	defer mu.Unlock()
	if watchErr != nil {
		t.Errorf("watching the snapshots of %s: %v", vm, watchErr)
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	slices.Sort(names)
	want := []string{activities.SnapshotPrefix + runningID, activities.SnapshotPrefix + second.BackupID}
	slices.Sort(want)
	if most != 1 || !slices.Equal(names, want) {
		t.Errorf("snapshots of %s: at most %d at once, seen %v; want one at a time, only %v", vm, most, names, want)
	}
	if snaps, err := stacktest.Snapshots(ctx, l, vmRef); err != nil || len(snaps) != 0 {
		t.Errorf("snapshots of %s at the end: %v (%v)", vm, snaps, err)
	}
	// The lab's own record: snapshots of the VM were only ever taken by
	// those two backups (a snapshot too short-lived to be watched shows
	// here).
	for _, st := range l.ChangeIDLog() {
		if st.VMRef == vmRef && !slices.Contains(want, st.SnapshotName) {
			t.Errorf("the lab stamped a change ID for snapshot %s of %s: a third backup took a snapshot", st.SnapshotName, vm)
		}
	}
}
