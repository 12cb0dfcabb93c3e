package progress

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/lab/labapi"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const (
	vm  = "DC0_H0_VM0"
	MiB = 1 << 20
	GiB = 1 << 30
)

// writeData fills [off, off+n) of the VM's disk with pattern data, in
// chunks that keep the test's memory small.
func writeData(t *testing.T, s *stack.Stack, key int32, off, n int64, seed uint64) {
	t.Helper()
	const chunk = 64 * MiB
	for done := int64(0); done < n; done += chunk {
		stacktest.WriteDisk(t, s.Lab(), vm, key, off+done, stacktest.Pattern(seed+uint64(done/chunk), int(min(chunk, n-done))))
	}
}

// query returns the progress query's answer of workflow id.
func query(ctx context.Context, t *testing.T, s *stack.Stack, id string) workflows.Progress {
	t.Helper()
	v, err := s.Client().QueryWorkflow(ctx, id, "", workflows.QueryProgress)
	if err != nil {
		t.Fatalf("progress query of %s: %v", id, err)
	}
	var p workflows.Progress
	if err := v.Get(&p); err != nil {
		t.Fatal(err)
	}
	return p
}

// until polls the progress of workflow id until ok says it is what the
// test waits for, failing t after a minute with the last answer.
func until(ctx context.Context, t *testing.T, s *stack.Stack, id, what string, ok func(workflows.Progress) bool) workflows.Progress {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		p := query(ctx, t, s, id)
		if ok(p) {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("progress of %s: never %s; last answer %+v", id, what, p)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// running returns the IDs of the running BackupVM workflow of the VM
// (found by CbtflowVM) and of the Backup that started it (found by the
// backup's CbtflowBackupID; the starter's Backup ends once its BackupVM
// started).
func running(ctx context.Context, t *testing.T, s *stack.Stack) (backupWID, backupVMWID string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		for _, w := range stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'BackupVM' AND ExecutionStatus = 'Running' AND CbtflowVM = '%s'", vm)) {
			backupVMWID = w.GetExecution().GetWorkflowId()
			desc, err := s.Client().DescribeWorkflow(ctx, backupVMWID, "")
			if err != nil {
				t.Fatal(err)
			}
			id, _ := desc.TypedSearchAttributes.GetKeyword(workflows.SearchBackupID)
			for _, b := range stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'Backup' AND CbtflowBackupID = '%s' AND CbtflowVM = '%s'", id, vm)) {
				backupWID = b.GetExecution().GetWorkflowId()
			}
		}
		if backupWID != "" && backupVMWID != "" {
			return backupWID, backupVMWID
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("no running BackupVM of %s and its Backup found by their search attributes (Backup %q, BackupVM %q)", vm, backupWID, backupVMWID)
	return "", ""
}

// The progress query of a running backup follows it through its phases:
// the snapshot, the copy (bytes done of bytes to copy, rate, ETA: the
// transfer's heartbeats, added by the worker), the verification of the
// image. The Backup workflow answers its BackupVM's progress, and both
// carry the search attributes, CbtflowMode the mode that ran. A backup's
// history holds as many events for a 4 GiB disk as for a 1 GiB one:
// progress costs no history.
func TestProgressAndHistorySize(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	disks, err := s.Lab().Disks(vm)
	if err != nil || len(disks) == 0 {
		t.Fatalf("lab VM %s: disks %+v (%v)", vm, disks, err)
	}
	// The data is on the first disk; the others stay empty.
	key := disks[0].Key
	writeData(t, s, key, 0, GiB, 1)

	// A full backup of 1 GiB, held at three points to look at it.
	gates := s.FaultPoints()
	for _, p := range []faultpoint.Point{faultpoint.AfterSnapshot, faultpoint.MidTransfer, faultpoint.BeforeCheck} {
		if err := gates.Arm(p); err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		for _, p := range []faultpoint.Point{faultpoint.AfterSnapshot, faultpoint.MidTransfer, faultpoint.BeforeCheck} {
			_ = gates.Release(p)
		}
	}()
	st, err := s.StartStarter("backup", vm, "--mode", "full", "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	hold := func(p faultpoint.Point) {
		t.Helper()
		wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
		defer wcancel()
		if _, err := gates.Wait(wctx, p); err != nil {
			t.Fatalf("the backup never reached %s: %v\n%s", p, err, st.Stderr())
		}
	}
	hold(faultpoint.AfterSnapshot)
	parent, child := running(ctx, t, s)
	p := query(ctx, t, s, child)
	if p.Phase != workflows.PhaseSnapshot || p.PhaseSince.IsZero() || p.VM != vm || len(p.Disks) != len(disks) || disk(p, key).Phase != workflows.DiskWaiting {
		t.Errorf("progress during the snapshot: %+v", p)
	}
	// The starter's Backup ended once its BackupVM started: its answer
	// names that one.
	if pp := query(ctx, t, s, parent); pp.Phase != workflows.PhaseStarted || pp.WorkflowID != child || pp.BackupID != p.BackupID || pp.VM != vm {
		t.Errorf("the Backup's progress during the snapshot: %+v, want phase started and its BackupVM %s", pp, child)
	}
	if err := gates.Release(faultpoint.AfterSnapshot); err != nil {
		t.Fatal(err)
	}

	hold(faultpoint.MidTransfer)
	p = until(ctx, t, s, child, "live with bytes done, a rate and an ETA", func(p workflows.Progress) bool {
		d := disk(p, key)
		return p.Live && d.Phase == workflows.DiskTransferring && d.Done > 0 && d.Rate > 0
	})
	if d := disk(p, key); p.Phase != workflows.PhaseTransferring || d.Total < GiB || d.Done >= d.Total ||
		d.Percent <= 0 || d.Percent >= 100 || d.ETASeconds <= 0 || d.Mode != workflows.ModeFull {
		t.Errorf("progress mid-transfer: %+v", p)
	}
	if err := gates.Release(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}

	hold(faultpoint.BeforeCheck)
	p = until(ctx, t, s, child, "verifying", func(p workflows.Progress) bool {
		return p.Live && disk(p, key).Phase == workflows.DiskVerifying
	})
	if d := disk(p, key); d.Done != d.Total || d.Percent != 100 || d.VerifyTotal <= 0 {
		t.Errorf("progress while the image is verified: %+v", p)
	}
	if err := gates.Release(faultpoint.BeforeCheck); err != nil {
		t.Fatal(err)
	}
	r, err := st.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var small stacktest.BackupJSON
	if err := stacktest.DecodeOne(r.Stdout, &small); err != nil || small.Status != workflows.ReportCompleted {
		t.Fatalf("the held backup: %v\n%s", err, r)
	}
	// Sizes in bytes and in human units (the Web UI shows the result).
	if d := small.Disk(t, key); d.ChangedBytes != GiB || d.Changed != "1.0 GiB" || d.Size == "" || d.Written == "" || d.Duration == "" {
		t.Errorf("the result's disk %d: %+v, want its sizes in bytes and human units", key, d)
	}
	done := query(ctx, t, s, child)
	if done.Phase != workflows.PhaseCompleted || disk(done, key).Phase != workflows.DiskDone || disk(done, key).Percent != 100 {
		t.Errorf("progress of the completed BackupVM: %+v", done)
	}
	checkAttributes(ctx, t, s, small.BackupID, workflows.ModeFull)

	// The same VM with 4 GiB, backed up in a terminal: progress bars that
	// advance, then the summary. A full backup's history is as long.
	writeData(t, s, key, GiB, 3*GiB, 100)
	bigID, bigWID := backupInTerminal(ctx, t, s, key)
	smallEvents := eventTypes(ctx, t, s, small.WorkflowID, small.BackupID)
	bigEvents := eventTypes(ctx, t, s, bigWID, bigID)
	// Workflow tasks are as many as the activities' completions that
	// arrive apart, which depends on timing: the events of the backup's
	// own steps must be the same.
	smallSteps, bigSteps := withoutWorkflowTasks(smallEvents), withoutWorkflowTasks(bigEvents)
	t.Logf("history of the backup of 1 GiB: %d events (%d without workflow tasks); of 4 GiB: %d events (%d)",
		len(smallEvents), len(smallSteps), len(bigEvents), len(bigSteps))
	if len(smallSteps) == len(smallEvents) {
		t.Errorf("no workflow task events recognized in %s", strings.Join(smallEvents, " "))
	}
	if len(smallSteps) != len(bigSteps) {
		t.Errorf("the history grows with the disk: %d events (workflow tasks aside) for 1 GiB, %d for 4 GiB\n1 GiB: %s\n4 GiB: %s",
			len(smallSteps), len(bigSteps), strings.Join(smallEvents, " "), strings.Join(bigEvents, " "))
	}
	for _, e := range bigEvents {
		if strings.Contains(e, "Signaled") {
			t.Errorf("the backup's history has a signal: %s", strings.Join(bigEvents, " "))
			break
		}
	}

	// An incremental, started as the Web UI and schedules start one (a
	// Backup that waits for its BackupVM, mode auto): CbtflowMode of
	// both says incremental, the mode that ran, not auto.
	stacktest.WriteDisk(t, s.Lab(), vm, key, 2*GiB, stacktest.Pattern(999, MiB))
	run, err := s.Client().ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: "progress-test-incremental", TaskQueue: workflows.TaskQueue},
		"Backup", workflows.BackupInput{VM: vm})
	if err != nil {
		t.Fatal(err)
	}
	var inc workflows.BackupResult
	if err := run.Get(ctx, &inc); err != nil || inc.Result == nil {
		t.Fatalf("the Backup of %s: %+v, %v", vm, inc, err)
	}
	checkAttributes(ctx, t, s, inc.BackupID, workflows.ModeIncremental)
	// A Backup that waited for its BackupVM answers the result's progress.
	if pp := query(ctx, t, s, run.GetID()); pp.Phase != workflows.PhaseCompleted || pp.BackupID != inc.BackupID ||
		pp.WorkflowID != inc.WorkflowID || disk(pp, key).Phase != workflows.DiskDone || disk(pp, key).Percent != 100 {
		t.Errorf("progress of the completed Backup: %+v", pp)
	}
	if got := stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'Backup' AND CbtflowBackupID = '%s' AND CbtflowMode = 'incremental'", inc.BackupID)); len(got) != 1 {
		t.Errorf("the waiting Backup %s by CbtflowMode = 'incremental': %d found, want 1", inc.BackupID, len(got))
	}

	// A Backup that cannot resolve its VM is found by the VM as given.
	r, err = s.Starter(ctx, "backup", "NOPE_VM", "--wait", "--json")
	if err != nil || r.ExitCode == 0 {
		t.Fatalf("backup of an unknown VM: %v %s", err, r)
	}
	if got := stacktest.ListWorkflows(ctx, t, s, "WorkflowType = 'Backup' AND CbtflowVM = 'NOPE_VM'"); len(got) != 1 ||
		got[0].GetStatus() != enumspb.WORKFLOW_EXECUTION_STATUS_FAILED {
		t.Errorf("the failed Backup of NOPE_VM by CbtflowVM: %v", got)
	}
}

// backupInTerminal runs `starter backup VM --mode full --wait` with its
// stdout on a pseudo-terminal and checks what it shows: the phase, a bar
// for the disk that advances (several different percents, rising), then
// the summary. It returns the backup's ID and BackupVM workflow ID.
func backupInTerminal(ctx context.Context, t *testing.T, s *stack.Stack, key int32) (backupID, workflowID string) {
	t.Helper()
	tty, err := testutil.OpenPTY(40, 160)
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	// Held before the image check until the terminal shows the verifying
	// stage: the image's seal reads its metadata only, so unheld that
	// stage can pass between two frames.
	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.BeforeCheck); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = gates.Release(faultpoint.BeforeCheck) }()
	// The bar must be seen to advance: each 2 MiB read of the snapshot
	// waits 20 ms, so that the copy of 4 GiB (8 reads at once) lasts
	// about 5 s however fast the machine copies (3 s unslowed on one of
	// 6 December, when the bar showed only 0, 23 and 47%).
	if err := s.Lab().SetSourceFilters([]labapi.Filter{{Filter: "delay", Params: []string{"delay-read=20ms"}}}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Lab().SetSourceFilters(nil) }()
	st, err := s.StartStarterOn(tty.Slave, "backup", vm, "--mode", "full", "--wait")
	if err != nil {
		t.Fatal(err)
	}
	tty.CloseSlave()
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Minute)
	defer wcancel()
	if _, err := gates.Wait(wctx, faultpoint.BeforeCheck); err != nil {
		t.Fatalf("the backup in a terminal never reached its image check: %v\n%s", err, st.Stderr())
	}
	for !strings.Contains(tty.Output(), "verifying") && wctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
	if err := gates.Release(faultpoint.BeforeCheck); err != nil {
		t.Fatal(err)
	}
	r, err := st.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tty.Drain()
	out := tty.Output()
	if r.ExitCode != 0 {
		t.Fatalf("backup in a terminal: %s\nterminal:\n%s", r, out)
	}
	// Every frame redraws the disk's line: the copy's percents, in order
	// (the bar's text is "1.2 GiB of 4.0 GiB (30%), …" while it copies,
	// "verifying …" after).
	var percents, fills []int
	diskLine := regexp.MustCompile(fmt.Sprintf(`disk %d full\s*\[([^\]\n\r]*)\] +[\d.]+ [KMGT]?i?B of [^(\n\r]*\((\d+)%%\)`, key))
	for _, m := range diskLine.FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(m[2])
		if len(percents) == 0 || percents[len(percents)-1] != n {
			percents = append(percents, n)
		}
		if f := strings.Count(m[1], "="); len(fills) == 0 || fills[len(fills)-1] != f {
			fills = append(fills, f)
		}
	}
	if !slices.IsSorted(percents) || len(percents) < 3 || percents[len(percents)-1] < 50 {
		t.Errorf("the disk's bar in the terminal showed percents %v: want at least 3 different ones, rising\n%q", percents, tail(out, 4000))
	}
	if !slices.IsSorted(fills) || len(fills) < 3 {
		t.Errorf("the disk's bar filled %v characters: want it to grow at least 3 times\n%q", fills, tail(out, 4000))
	}
	for _, want := range []string{"transferring", "/s", "ETA", "GiB", "verifying", "done, 4.0 GiB"} {
		if !strings.Contains(out, want) {
			t.Errorf("the terminal never showed %q\n%q", want, tail(out, 4000))
		}
	}
	m := regexp.MustCompile(`backup (\S+) of VM ` + vm + ` \(\S+\): completed`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no summary of a completed backup in the terminal:\n%q", tail(out, 4000))
	}
	runs := stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'BackupVM' AND CbtflowBackupID = '%s'", m[1]))
	if len(runs) != 1 {
		t.Fatalf("BackupVM of backup %s: %d found", m[1], len(runs))
	}
	t.Logf("the disk's bar showed %d different percents: %v; its fill: %v", len(percents), percents, fills)
	return m[1], runs[0].GetExecution().GetWorkflowId()
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// disk is p's disk key (a zero DiskProgress when p has none).
func disk(p workflows.Progress, key int32) workflows.DiskProgress {
	for _, d := range p.Disks {
		if d.Key == key {
			return d
		}
	}
	return workflows.DiskProgress{}
}

// checkAttributes checks the search attributes of both workflows of a
// backup: CbtflowVM, CbtflowBackupID, CbtflowVCenter, and on the BackupVM
// CbtflowMode, the mode that ran.
func checkAttributes(ctx context.Context, t *testing.T, s *stack.Stack, backupID, mode string) {
	t.Helper()
	q := fmt.Sprintf("CbtflowBackupID = '%s' AND CbtflowVM = '%s' AND CbtflowVCenter = '%s'", backupID, vm, stack.Profile)
	// Visibility is eventually consistent.
	deadline := time.Now().Add(30 * time.Second)
	for {
		types := map[string]bool{}
		for _, w := range stacktest.ListWorkflows(ctx, t, s, q) {
			types[w.GetType().GetName()] = true
		}
		vms := stacktest.ListWorkflows(ctx, t, s, q+fmt.Sprintf(" AND WorkflowType = 'BackupVM' AND CbtflowMode = '%s'", mode))
		if types["Backup"] && types["BackupVM"] && len(vms) == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("workflows matching %s: %v, want Backup and BackupVM; BackupVM with CbtflowMode %s: %d", q, types, mode, len(vms))
			return
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// eventTypes is the list of event types of the BackupVM run of backupID.
func eventTypes(ctx context.Context, t *testing.T, s *stack.Stack, wid, backupID string) []string {
	t.Helper()
	runs := stacktest.ListWorkflows(ctx, t, s, fmt.Sprintf("WorkflowType = 'BackupVM' AND CbtflowBackupID = '%s'", backupID))
	if len(runs) != 1 {
		t.Fatalf("BackupVM runs of backup %s: %d, want 1", backupID, len(runs))
	}
	var out []string
	for _, ev := range stacktest.History(ctx, t, s, wid, runs[0].GetExecution().GetRunId()) {
		out = append(out, strings.TrimPrefix(ev.GetEventType().String(), "EVENT_TYPE_"))
	}
	return out
}

// withoutWorkflowTasks drops the workflow task events (the API's
// String() spells them WorkflowTaskScheduled, older ones
// EVENT_TYPE_WORKFLOW_TASK_SCHEDULED).
func withoutWorkflowTasks(events []string) []string {
	var out []string
	for _, e := range events {
		if !strings.HasPrefix(e, "WorkflowTask") && !strings.HasPrefix(e, "WORKFLOW_TASK_") {
			out = append(out, e)
		}
	}
	return out
}
