package histories

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	failurepb "go.temporal.io/api/failure/v1"
	historypb "go.temporal.io/api/history/v1"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

var update = flag.Bool("update", false, "save new versions of the recorded histories into workflows/testdata (never overwriting one)")

func TestMain(m *testing.M) { stacktest.Main(m) }

const (
	KiB = 1 << 10
	MiB = 1 << 20
)

// testdata is where workflows/replay_test.go reads the recorded histories.
var testdata = filepath.Join("..", "..", "workflows", "testdata")

// recorded is one case's history produced here.
type recorded struct {
	name   string
	events []*historypb.HistoryEvent
}

// TestHistories drives every recorded case on one stack, checks its
// outcome, checks that its history holds no secret and replays on the
// current workflows, and with -update saves the histories whose commands
// are new.
func TestHistories(t *testing.T) {
	began := time.Now()
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	h := &harness{t: t, s: s, l: s.Lab(), ctx: ctx}

	h.backups()
	h.restoreAndVerify()
	h.export()
	h.failed()
	h.canceled()
	h.sweep()
	h.prune()
	h.restoreVM()

	if len(h.recorded) != 16 {
		t.Fatalf("%d histories recorded, want 16", len(h.recorded))
	}
	// A history is saved only when every scenario went as it should.
	scenariosOK := !t.Failed()
	for _, r := range h.recorded {
		t.Run(r.name, func(t *testing.T) {
			checkNoSecret(t, r.name, r.events, s.Lab().Password())
			if err := replay(r.events); err != nil {
				t.Fatalf("the history of %s just recorded does not replay on the current workflows: %v", r.name, err)
			}
			if t.Failed() {
				return
			}
			if !*update {
				if have, err := versions(testdata, r.name); err == nil {
					known := false
					for _, v := range have {
						old, err := commandsOfFile(v.path)
						known = known || (err == nil && slices.Equal(old, commandsOf(r.events)))
					}
					if !known {
						t.Logf("%s: commands not yet recorded in %s; record them with go test -tags cbtflow_faultpoints ./test/histories -update", r.name, testdata)
					}
				}
				return
			}
			if !scenariosOK {
				t.Errorf("%s: not recorded: a scenario failed", r.name)
				return
			}
			path, why, err := record(testdata, r.name, r.events)
			if err != nil {
				t.Fatal(err)
			}
			if path == "" {
				t.Logf("%s: not recorded: %s", r.name, why)
			} else {
				t.Logf("%s: wrote %s (%d events): %s", r.name, path, len(r.events), why)
			}
		})
	}
	if left := s.Leftovers(); len(left) > 0 {
		t.Errorf("processes of the stack still running after the scenarios: %v", left)
	}
	t.Logf("histories in %s (the stack's close is checked next)", time.Since(began).Round(time.Second))
}

type harness struct {
	t        *testing.T
	s        *stack.Stack
	l        *lab.Lab
	ctx      context.Context
	recorded []recorded
	// newest is the newest backup of the two-disk VM (backups), which
	// restoreAndVerify restores and verifies.
	newest stacktest.BackupJSON
}

func (h *harness) keep(name string, events []*historypb.HistoryEvent) {
	h.t.Helper()
	if len(events) == 0 {
		h.t.Fatalf("%s: empty history", name)
	}
	h.recorded = append(h.recorded, recorded{name, events})
}

// createVM creates a lab VM with disks of the given capacities and
// returns its moref and disk keys.
func (h *harness) createVM(name string, caps ...int64) (string, []int32) {
	h.t.Helper()
	ref, err := h.l.CreateVM(name, caps...)
	if err != nil {
		h.t.Fatal(err)
	}
	disks, err := h.l.Disks(ref)
	if err != nil || len(disks) != len(caps) {
		h.t.Fatalf("disks of %s: %+v %v", name, disks, err)
	}
	var keys []int32
	for _, d := range disks {
		keys = append(keys, d.Key)
	}
	slices.Sort(keys)
	return ref, keys
}

// backup runs `starter backup VM --wait --json`.
func (h *harness) backup(vm string) stacktest.BackupJSON {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(h.ctx, 3*time.Minute)
	defer cancel()
	res, err := h.s.Starter(ctx, "backup", vm, "--wait", "--json")
	if err != nil {
		h.t.Fatalf("starter backup %s: %v", vm, err)
	}
	var b stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &b); err != nil {
		h.t.Fatalf("%v\n%s", err, res)
	}
	if (res.ExitCode == 0) != (b.Status == "completed") {
		h.t.Fatalf("backup of %s: exit %d with status %q\n%s", vm, res.ExitCode, b.Status, res)
	}
	return b
}

// startBackup starts a backup without waiting (`starter backup VM
// --json`) and returns its backup ID and BackupVM workflow ID.
func (h *harness) startBackup(vm string) (backupID, wid string) {
	h.t.Helper()
	res, err := h.s.Starter(h.ctx, "backup", vm, "--json")
	if err != nil {
		h.t.Fatal(err)
	}
	var started struct {
		BackupID   string `json:"backup_id"`
		WorkflowID string `json:"workflow_id"`
	}
	if res.ExitCode != 0 || json.Unmarshal([]byte(res.Stdout), &started) != nil || started.BackupID == "" || started.WorkflowID == "" {
		h.t.Fatalf("starting a backup of %s: %s", vm, res)
	}
	return started.BackupID, started.WorkflowID
}

// backupVMRun returns the workflow and run ID of the BackupVM of a backup.
func (h *harness) backupVMRun(backupID string) (wid, run string) {
	h.t.Helper()
	q := fmt.Sprintf("WorkflowType = 'BackupVM' AND %s = '%s'", workflows.SearchBackupID.GetName(), backupID)
	deadline := time.Now().Add(30 * time.Second)
	for {
		runs := stacktest.ListWorkflows(h.ctx, h.t, h.s, q)
		if len(runs) == 1 && runs[0].GetStatus() != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
			return runs[0].GetExecution().GetWorkflowId(), runs[0].GetExecution().GetRunId()
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%d closed BackupVM runs of backup %s, want 1", len(runs), backupID)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// history returns the history of the BackupVM of a backup, closed.
func (h *harness) history(backupID string) (wid string, events []*historypb.HistoryEvent) {
	h.t.Helper()
	wid, run := h.backupVMRun(backupID)
	return wid, stacktest.History(h.ctx, h.t, h.s, wid, run)
}

// catalogEntry returns the catalog's entry of a backup (`starter list VM
// --json`).
func (h *harness) catalogEntry(vm, backupID string) (stacktest.ListJSON, string) {
	h.t.Helper()
	res, err := h.s.Starter(h.ctx, "list", vm, "--json")
	if err != nil || res.ExitCode != 0 {
		h.t.Fatalf("starter list %s: %v %s", vm, err, res)
	}
	var list []struct {
		stacktest.ListJSON
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(res.Stdout), &list); err != nil {
		h.t.Fatalf("starter list: %v\n%s", err, res)
	}
	for _, e := range list {
		if e.BackupID == backupID {
			return e.ListJSON, e.Error
		}
	}
	h.t.Fatalf("no catalog entry of backup %s of %s:\n%s", backupID, vm, res.Stdout)
	return stacktest.ListJSON{}, ""
}

// waitNoNBD waits until no qemu-nbd or nbdkit of the worker is left
// (30 s), failing t otherwise.
func (h *harness) waitNoNBD(what string) {
	h.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var left []stack.Proc
		for _, p := range stack.Descendants(h.s.WorkerPID()) {
			if strings.Contains(p.Cmd, "qemu-nbd") || strings.Contains(p.Cmd, "nbdkit") {
				left = append(left, p)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s: NBD processes left: %v", what, left)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// noLeftovers checks that a backup that did not commit left no snapshot
// of its own, no file in the repository, and a failed catalog row without
// disks.
func (h *harness) noLeftovers(label, vm, ref, backupID string) {
	h.t.Helper()
	h.waitNoNBD(label)
	snaps, err := stacktest.Snapshots(h.ctx, h.l, ref)
	if err != nil {
		h.t.Fatal(err)
	}
	if len(snaps) > 0 {
		h.t.Errorf("%s: cbtflow snapshots left on %s: %v", label, vm, snaps)
	}
	if files := stacktest.FilesOf(h.t, h.s.Repository(), backupID); len(files) > 0 {
		h.t.Errorf("%s: files of backup %s left in the repository: %v", label, backupID, files)
	}
	if e, reason := h.catalogEntry(vm, backupID); e.Status != "failed" || len(e.Disks) != 0 {
		h.t.Errorf("%s: catalog row of %s: status %q with %d disks (%q), want failed without disks", label, backupID, e.Status, len(e.Disks), reason)
	}
}

// scheduled lists the activity types the history ran, in order: its
// activities and local activities (stacktest.Steps).
func scheduled(t testing.TB, events []*historypb.HistoryEvent) []string {
	t.Helper()
	var out []string
	for _, s := range stacktest.Steps(t, events) {
		out = append(out, s.Type)
	}
	return out
}

// activityFailures returns, per activity type, the failures that its
// activities and local activities ended with (each one's last
// attempt's).
func activityFailures(t testing.TB, events []*historypb.HistoryEvent) map[string][]*failurepb.Failure {
	t.Helper()
	out := map[string][]*failurepb.Failure{}
	for _, s := range stacktest.Steps(t, events) {
		if s.Failure != nil {
			out[s.Type] = append(out[s.Type], s.Failure)
		}
	}
	return out
}

func lastEvent(events []*historypb.HistoryEvent) enumspb.EventType {
	return events[len(events)-1].GetEventType()
}

func count(list []string, s string) int {
	n := 0
	for _, x := range list {
		if x == s {
			n++
		}
	}
	return n
}

// backups: a full, an incremental and a CBT-reset backup of a VM with two
// disks; the Backup that started the incremental.
func (h *harness) backups() {
	t := h.t
	const vm = "hist-two-disks"
	ref, keys := h.createVM(vm, 256*MiB, 256*MiB)
	k1, k2 := keys[0], keys[1]

	stacktest.WriteDisk(t, h.l, ref, k1, 0, stacktest.Pattern(1, 4*MiB))
	stacktest.WriteDisk(t, h.l, ref, k2, 100*MiB, stacktest.Pattern(2, 2*MiB))
	full := h.backup(vm)
	if full.Status != "completed" || len(full.Disks) != 2 {
		t.Fatalf("full backup: %+v", full)
	}
	for _, k := range keys {
		if d := full.Disk(t, k); d.Mode != workflows.ModeFull || d.ChangedBytes == 0 {
			t.Errorf("full backup: disk %d: %+v, want a full backup of the data written", k, d)
		}
	}
	_, events := h.history(full.BackupID)
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED || count(scheduled(t, events), "TransferDisks") != 1 {
		t.Errorf("full backup: history ends %s with transfers %q, want completed with the 2 disks' transfer (one TransferDisks)", lastEvent(events), scheduled(t, events))
	}
	h.keep("backupvm_full", events)

	stacktest.WriteDisk(t, h.l, ref, k1, 50*MiB, stacktest.Pattern(3, MiB))
	stacktest.WriteDisk(t, h.l, ref, k2, 0, stacktest.Pattern(4, 256*KiB))
	incr := h.backup(vm)
	if incr.Status != "completed" {
		t.Fatalf("incremental backup: %+v", incr)
	}
	for _, k := range keys {
		if d := incr.Disk(t, k); d.Mode != workflows.ModeIncremental || d.ChangedBytes == 0 || d.ChangedBytes > 2*MiB {
			t.Errorf("incremental backup: disk %d: %+v, want an incremental of the area written since", k, d)
		}
	}
	wid, events := h.history(incr.BackupID)
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED {
		t.Errorf("incremental backup: history ends %s", lastEvent(events))
	}
	h.keep("backupvm_incremental", events)

	// The Backup that started it (the starter's, detached): ResolveVM,
	// then BackupVM under the vCenter's and the VM's instance UUIDs,
	// started through the client (StartWorkflow, a local activity, in the
	// same workflow task), the Backup named in its memo.
	_, run := h.backupVMRun(incr.BackupID)
	desc, err := h.s.Client().DescribeWorkflow(h.ctx, wid, run)
	if err != nil {
		t.Fatal(err)
	}
	info := desc.RawResponse.GetWorkflowExecutionInfo()
	if p := info.GetParentExecution(); p != nil {
		t.Errorf("BackupVM %s was started as a child of %s: a detached Backup starts it through the client", wid, p.GetWorkflowId())
	}
	memo := map[string]string{}
	for k, f := range info.GetMemo().GetFields() {
		var v string
		_ = json.Unmarshal(f.GetData(), &v)
		memo[k] = v
	}
	by, byRun := memo[workflows.MemoStartedByWorkflowID], memo[workflows.MemoStartedByRunID]
	if by == "" || byRun == "" {
		t.Fatalf("BackupVM %s names no Backup in its memo: %v", wid, memo)
	}
	pevents := stacktest.History(h.ctx, t, h.s, by, byRun)
	var children []string
	for _, ev := range pevents {
		if a := ev.GetStartChildWorkflowExecutionInitiatedEventAttributes(); a != nil {
			children = append(children, a.GetWorkflowId())
		}
	}
	var res workflows.BackupResult
	if a := pevents[len(pevents)-1].GetWorkflowExecutionCompletedEventAttributes(); a == nil ||
		converter.GetDefaultDataConverter().FromPayloads(a.GetResult(), &res) != nil {
		t.Fatalf("the Backup of the incremental: history ends %s", lastEvent(pevents))
	}
	if len(children) != 0 || res.WorkflowID != wid || res.RunID != run || strings.Count(wid, "/") != 2 || strings.Contains(wid, "/lab/") {
		t.Errorf("the Backup started children %q and returned %s run %s, want none and %s run %s, named by the vCenter's instance UUID", children, res.WorkflowID, res.RunID, wid, run)
	}
	if n := countWorkflowTasks(pevents); n != 1 {
		t.Errorf("the Backup of the incremental ran %d workflow tasks, want 1", n)
	}
	h.keep("backup", pevents)
	h.waiting(vm)

	// CBT switched off and on again: the stored change IDs are refused,
	// each disk is backed up full with a warning.
	if err := h.l.SetCBT(ref, false); err != nil {
		t.Fatal(err)
	}
	stacktest.WriteDisk(t, h.l, ref, k1, 200*MiB, stacktest.Pattern(5, MiB))
	if err := h.l.SetCBT(ref, true); err != nil {
		t.Fatal(err)
	}
	stacktest.WriteDisk(t, h.l, ref, k2, 30*MiB, stacktest.Pattern(6, 64*KiB))
	reset := h.backup(vm)
	if reset.Status != "completed" {
		t.Fatalf("backup after a CBT reset: %+v", reset)
	}
	for _, k := range keys {
		d := reset.Disk(t, k)
		if d.Mode != workflows.ModeFull || !strings.Contains(d.Note, "reset") || d.ChangeID == incr.Disk(t, k).ChangeID {
			t.Errorf("backup after a CBT reset: disk %d: %+v, want a full backup with a note saying CBT was reset and a new change ID", k, d)
		}
		warned := false
		for _, w := range reset.Warnings {
			warned = warned || (strings.Contains(w, fmt.Sprintf("disk %d", k)) && strings.Contains(w, "changed block tracking was reset"))
		}
		if !warned {
			t.Errorf("backup after a CBT reset: no warning about disk %d among %q", k, reset.Warnings)
		}
	}
	_, events = h.history(reset.BackupID)
	fails := activityFailures(t, events)["ChangedAreas"]
	if len(fails) != 2 || count(scheduled(t, events), "ChangedAreas") != 4 || lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED {
		t.Errorf("backup after a CBT reset: %d ChangedAreas failed of %q, history ends %s; want the 2 incremental queries refused, then 2 full ones",
			len(fails), scheduled(t, events), lastEvent(events))
	}
	for _, f := range fails {
		if info := f.GetApplicationFailureInfo(); info.GetType() != activities.ErrTypeCBTReset || !info.GetNonRetryable() {
			t.Errorf("backup after a CBT reset: ChangedAreas failed with %+v, want non-retryable %s", info, activities.ErrTypeCBTReset)
		}
	}
	h.keep("backupvm_cbt_reset", events)
	h.newest = reset
}

// closedRun returns the workflow and run ID of the one closed workflow
// the visibility query finds (30 s for visibility to catch up).
func (h *harness) closedRun(what, query string) (wid, run string) {
	h.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		runs := stacktest.ListWorkflows(h.ctx, h.t, h.s, query)
		if len(runs) == 1 && runs[0].GetStatus() != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
			return runs[0].GetExecution().GetWorkflowId(), runs[0].GetExecution().GetRunId()
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s: %d workflows match %s, want one closed", what, len(runs), query)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// restoreAndVerify: a Restore of a disk of the two-disk VM's newest
// point (`starter restore --to`, in the worker), a Verify of that point
// (`starter verify`: both disks sound), and a Verify of a restore point
// the catalog does not have, which fails at once in PlanVerify.
func (h *harness) restoreAndVerify() {
	t := h.t
	b := h.newest
	if b.BackupID == "" || len(b.Disks) != 2 {
		t.Fatalf("no two-disk backup to restore and verify: %+v", b)
	}
	key := b.Disks[0].Key
	to := filepath.Join(t.TempDir(), "restored.raw")
	res, err := h.s.Starter(h.ctx, "restore", b.BackupID, "--disk", fmt.Sprint(key), "--to", to)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("starter restore %s --disk %d: %v %s", b.BackupID, key, err, res)
	}
	if fi, err := os.Stat(to); err != nil || fi.Size() != 256*MiB {
		t.Errorf("the restored disk: %v, size %v; want 256 MiB", err, fi)
	}
	wid, run := h.closedRun("restore", "WorkflowType = 'Restore'")
	events := stacktest.History(h.ctx, t, h.s, wid, run)
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED || !slices.Equal(scheduled(t, events), []string{"FindRestorePoint", "RestoreDisk"}) {
		t.Errorf("restore: history ends %s with activities %q, want completed after FindRestorePoint, RestoreDisk", lastEvent(events), scheduled(t, events))
	}
	h.keep("restore", events)

	if res, err := h.s.Starter(h.ctx, "verify", b.BackupID); err != nil || res.ExitCode != 0 || strings.Count(res.Stdout, ": verified") != 2 {
		t.Fatalf("starter verify %s: %v %s", b.BackupID, err, res)
	}
	wid, run = h.closedRun("verify", "WorkflowType = 'Verify'")
	events = stacktest.History(h.ctx, t, h.s, wid, run)
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED || !slices.Equal(scheduled(t, events), []string{"PlanVerify", "VerifyPoint", "VerifyPoint"}) {
		t.Errorf("verify: history ends %s with activities %q, want completed after PlanVerify and a VerifyPoint per disk", lastEvent(events), scheduled(t, events))
	}
	h.keep("verify", events)

	const unknown = "20250101T000000Z-000000000000"
	vrun, err := h.s.Client().ExecuteWorkflow(h.ctx, client.StartWorkflowOptions{ID: "hist-verify-failed", TaskQueue: workflows.TaskQueue},
		workflows.Verify, workflows.VerifyInput{BackupID: unknown})
	if err != nil {
		t.Fatal(err)
	}
	var app *temporal.ApplicationError
	if err := vrun.Get(h.ctx, nil); !errors.As(err, &app) || app.Type() != activities.ErrTypeInvalidInput || !strings.Contains(err.Error(), unknown) {
		t.Errorf("a Verify of an unknown restore point ended with %v, want %s naming it", err, activities.ErrTypeInvalidInput)
	}
	events = stacktest.History(h.ctx, t, h.s, vrun.GetID(), vrun.GetRunID())
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED || !slices.Equal(scheduled(t, events), []string{"PlanVerify"}) {
		t.Errorf("failed verify: history ends %s with activities %q, want failed after PlanVerify", lastEvent(events), scheduled(t, events))
	}
	h.keep("verify_failed", events)
}

// export: an Export of a disk of the two-disk VM's newest point
// (`starter export --detach`: served by the worker), stopped with
// `starter export stop`, so it ends canceled after FindRestorePoint and
// ServeExport.
func (h *harness) export() {
	t := h.t
	b := h.newest
	key := b.Disks[0].Key
	res, err := h.s.Starter(h.ctx, "export", b.BackupID, "--disk", fmt.Sprint(key), "--detach", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("starter export %s --disk %d --detach: %v %s", b.BackupID, key, err, res)
	}
	var out struct {
		URI string `json:"uri"`
	}
	if err := json.Unmarshal([]byte(res.Stdout), &out); err != nil || !strings.HasPrefix(out.URI, "nbd://") {
		t.Errorf("starter export --json: %v, uri %q, want nbd://...: %s", err, out.URI, res.Stdout)
	}
	if res, err := h.s.Starter(h.ctx, "export", "stop", b.BackupID, "--disk", fmt.Sprint(key)); err != nil || res.ExitCode != 0 {
		t.Fatalf("starter export stop %s --disk %d: %v %s", b.BackupID, key, err, res)
	}
	wid, run := h.closedRun("export", "WorkflowType = 'Export'")
	events := stacktest.History(h.ctx, t, h.s, wid, run)
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED || !slices.Equal(scheduled(t, events), []string{"FindRestorePoint", "ServeExport"}) {
		t.Errorf("export: history ends %s with activities %q, want canceled after FindRestorePoint, ServeExport", lastEvent(events), scheduled(t, events))
	}
	h.waitNoNBD("the stopped export")
	h.keep("export", events)
}

// failed: the backup's snapshot moref names an administrator's snapshot
// by the time ChangedAreas reads it (renamed while CreateSnapshot is held
// at its fault point). The backup fails at once, non-retryably, and
// commits nothing.
func (h *harness) failed() {
	t := h.t
	const vm, adminName = "hist-failed", "admin-before-upgrade"
	ref, keys := h.createVM(vm, 128*MiB)
	stacktest.WriteDisk(t, h.l, ref, keys[0], 0, stacktest.Pattern(7, 2*MiB))

	gates := h.s.FaultPoints()
	if err := gates.Arm(faultpoint.AfterSnapshot); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = gates.Release(faultpoint.AfterSnapshot) }()
	run, err := h.s.StartStarter("backup", vm, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(h.ctx, 2*time.Minute)
	_, err = gates.Wait(wctx, faultpoint.AfterSnapshot)
	wcancel()
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := h.l.Snapshots(vm)
	if err != nil || len(snaps) != 1 || !strings.HasPrefix(snaps[0].Name, activities.SnapshotPrefix) {
		t.Fatalf("snapshots while the backup is held: %+v %v, want its own only", snaps, err)
	}
	ours := snaps[0]
	if err := h.l.RenameSnapshot(vm, ours.Ref, adminName); err != nil {
		t.Fatal(err)
	}
	if err := gates.Release(faultpoint.AfterSnapshot); err != nil {
		t.Fatal(err)
	}
	bctx, bcancel := context.WithTimeout(h.ctx, 2*time.Minute)
	res, err := run.Wait(bctx)
	bcancel()
	if err != nil {
		t.Fatalf("the backup did not end: %v", err)
	}
	var out stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &out); err != nil {
		t.Fatalf("%v\n%s", err, res)
	}
	if res.ExitCode == 0 || out.Status != "failed" || out.BackupID == "" {
		t.Fatalf("backup whose snapshot moref names another snapshot: exit %d, status %q, want failed\n%s", res.ExitCode, out.Status, res)
	}
	for _, want := range []string{ours.Name, adminName, ours.Ref} {
		if !strings.Contains(out.Error, want) {
			t.Errorf("failure %q does not name %q", out.Error, want)
		}
	}
	_, events := h.history(out.BackupID)
	fails := activityFailures(t, events)["ChangedAreas"]
	if len(fails) != 1 || lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED {
		t.Errorf("failed backup: ChangedAreas failures %v, history ends %s; want one, and failed", fails, lastEvent(events))
	} else if info := fails[0].GetApplicationFailureInfo(); info.GetType() != activities.ErrTypeSnapshotIdentity || !info.GetNonRetryable() {
		t.Errorf("failed backup: ChangedAreas failed with %+v, want non-retryable %s", info, activities.ErrTypeSnapshotIdentity)
	}
	sch := scheduled(t, events)
	if slices.Contains(sch, "CommitRestorePoint") || slices.Contains(sch, "TransferDisk") || slices.Contains(sch, "TransferDisks") || !slices.Contains(sch, "FailBackup") || !slices.Contains(sch, "RemoveSnapshot") {
		t.Errorf("failed backup: activities %q, want no transfer or commit, then RemoveSnapshot and FailBackup", sch)
	}
	h.noLeftovers("failed backup", vm, ref, out.BackupID)
	if got, err := h.l.Snapshots(vm); err != nil || len(got) != 1 || got[0] != (lab.SnapshotInfo{Ref: ours.Ref, Name: adminName}) {
		t.Errorf("snapshots after the failed backup: %+v %v, want the administrator's %s (%s) only", got, err, adminName, ours.Ref)
	}
	h.keep("backupvm_failed", events)
}

// holdTransfer writes data onto the VM's disk, arms MidTransfer, starts a
// backup without waiting and waits until its transfer is held half way.
func (h *harness) holdTransfer(vm, ref string, key int32) (backupID, wid string) {
	t := h.t
	chunk := stacktest.Pattern(8, 16*MiB)
	for off := int64(0); off < 64*MiB; off += int64(len(chunk)) {
		stacktest.WriteDisk(t, h.l, ref, key, off, chunk)
	}
	gates := h.s.FaultPoints()
	if err := gates.Arm(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	backupID, wid = h.startBackup(vm)
	wctx, wcancel := context.WithTimeout(h.ctx, 2*time.Minute)
	_, err := gates.Wait(wctx, faultpoint.MidTransfer)
	wcancel()
	if err != nil {
		_ = gates.Release(faultpoint.MidTransfer)
		t.Fatalf("the transfer of backup %s was not held half way: %v", backupID, err)
	}
	return backupID, wid
}

// canceled: a backup canceled by the Temporal client while its transfer
// is held half way ends canceled, removes its snapshot, commits nothing
// and leaves no file.
func (h *harness) canceled() {
	t := h.t
	const vm = "hist-canceled"
	ref, keys := h.createVM(vm, 128*MiB)
	backupID, wid := h.holdTransfer(vm, ref, keys[0])
	gates := h.s.FaultPoints()
	h.skipped(vm, wid)
	err := h.s.Client().CancelWorkflow(h.ctx, wid, "")
	if rerr := gates.Release(faultpoint.MidTransfer); rerr != nil {
		t.Fatal(rerr)
	}
	if err != nil {
		t.Fatalf("cancel %s: %v", wid, err)
	}
	wctx, wcancel := context.WithTimeout(h.ctx, 2*time.Minute)
	err = h.s.Client().GetWorkflow(wctx, wid, "").Get(wctx, nil)
	wcancel()
	var canceled *temporal.CanceledError
	if !errors.As(err, &canceled) {
		t.Fatalf("the canceled backup %s ended with %v, want canceled", backupID, err)
	}
	_, events := h.history(backupID)
	sch := scheduled(t, events)
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED || slices.Contains(sch, "CommitRestorePoint") ||
		!slices.Contains(sch, "RemoveSnapshot") || !slices.Contains(sch, "FailBackup") {
		t.Errorf("canceled backup: history ends %s with activities %q; want canceled, no commit, the snapshot removed and the backup failed", lastEvent(events), sch)
	}
	cancelRequested := false
	for _, ev := range events {
		cancelRequested = cancelRequested || ev.GetEventType() == enumspb.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED
	}
	if !cancelRequested {
		t.Error("canceled backup: the held transfer was not asked to cancel")
	}
	h.noLeftovers("canceled backup", vm, ref, backupID)
	h.keep("backupvm_canceled", events)
}

// countWorkflowTasks counts a history's completed workflow tasks.
func countWorkflowTasks(events []*historypb.HistoryEvent) int {
	n := 0
	for _, ev := range events {
		if ev.GetEventType() == enumspb.EVENT_TYPE_WORKFLOW_TASK_COMPLETED {
			n++
		}
	}
	return n
}

// skipped: a Backup as a schedule starts it (skip_if_running) while the
// VM's backup wid runs: it starts nothing and completes, saying so.
func (h *harness) skipped(vm, wid string) {
	t := h.t
	run, err := h.s.Client().ExecuteWorkflow(h.ctx, client.StartWorkflowOptions{ID: "hist-skipped", TaskQueue: workflows.TaskQueue},
		workflows.Backup, workflows.BackupInput{VM: vm, SkipIfRunning: true})
	if err != nil {
		t.Fatal(err)
	}
	var res workflows.BackupResult
	if err := run.Get(h.ctx, &res); err != nil || res.Skipped == "" || res.WorkflowID != wid || res.Result != nil {
		t.Fatalf("a skip_if_running Backup while %s runs: %+v, %v; want skipped, naming it", wid, res, err)
	}
	events := stacktest.History(h.ctx, t, h.s, run.GetID(), run.GetRunID())
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED {
		t.Errorf("the skipped Backup: history ends %s", lastEvent(events))
	}
	h.keep("backup_skipped", events)
}

// waiting: a Backup that waits for its BackupVM (as the Web UI starts
// one), an incremental of the two-disk VM.
func (h *harness) waiting(vm string) {
	t := h.t
	run, err := h.s.Client().ExecuteWorkflow(h.ctx, client.StartWorkflowOptions{ID: "hist-waiting", TaskQueue: workflows.TaskQueue},
		workflows.Backup, workflows.BackupInput{VM: vm})
	if err != nil {
		t.Fatal(err)
	}
	var res workflows.BackupResult
	if err := run.Get(h.ctx, &res); err != nil || res.Result == nil || len(res.Result.Disks) != 2 {
		t.Fatalf("a Backup waiting for its BackupVM: %+v, %v", res, err)
	}
	events := stacktest.History(h.ctx, t, h.s, run.GetID(), run.GetRunID())
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED {
		t.Errorf("the waiting Backup: history ends %s", lastEvent(events))
	}
	h.keep("backup_waiting", events)
}

// sweep: a backup terminated while its transfer is held leaves its
// snapshot, its partial image and a running catalog row; `starter sweep
// --min-age 0` removes the snapshot and the files and fails the backup.
func (h *harness) sweep() {
	t := h.t
	const vm = "hist-swept"
	ref, keys := h.createVM(vm, 128*MiB)
	backupID, wid := h.holdTransfer(vm, ref, keys[0])
	gates := h.s.FaultPoints()
	err := h.s.Client().TerminateWorkflow(h.ctx, wid, "", "test: a backup killed by an operator")
	if rerr := gates.Release(faultpoint.MidTransfer); rerr != nil {
		t.Fatal(rerr)
	}
	if err != nil {
		t.Fatalf("terminate %s: %v", wid, err)
	}
	h.waitNoNBD("terminated backup")
	snapName := activities.SnapshotPrefix + backupID
	if snaps, err := stacktest.Snapshots(h.ctx, h.l, ref); err != nil || len(snaps) != 1 || snaps[0] != snapName {
		t.Fatalf("before the sweep: snapshots %v (%v), want the terminated backup's %s", snaps, err, snapName)
	}
	if e, _ := h.catalogEntry(vm, backupID); e.Status != "running" {
		t.Fatalf("before the sweep: the catalog says %s is %q, want running", backupID, e.Status)
	}

	res, err := h.s.Starter(h.ctx, "sweep", "--min-age", "0")
	if err != nil {
		t.Fatal(err)
	}
	var out workflows.SweepResult
	if res.ExitCode != 0 || json.Unmarshal([]byte(res.Stdout), &out) != nil {
		t.Fatalf("starter sweep --min-age 0: %s", res)
	}
	if !slices.Equal(out.SnapshotsRemoved, []string{snapName}) || !slices.Equal(out.BackupsFailed, []string{backupID}) || len(out.Errors) != 0 {
		t.Errorf("sweep result %+v, want %s removed and %s failed", out, snapName, backupID)
	}
	h.noLeftovers("swept backup", vm, ref, backupID)

	runs := stacktest.ListWorkflows(h.ctx, t, h.s, "WorkflowType = 'Sweep'")
	if len(runs) != 1 {
		t.Fatalf("%d Sweep workflows, want 1", len(runs))
	}
	ex := runs[0].GetExecution()
	events := stacktest.History(h.ctx, t, h.s, ex.GetWorkflowId(), ex.GetRunId())
	sch := scheduled(t, events)
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED || !slices.Equal(sch, []string{"FindOrphans", "RemoveSnapshot", "FailBackup"}) {
		t.Errorf("sweep: history ends %s with activities %q, want completed after FindOrphans, RemoveSnapshot, FailBackup", lastEvent(events), sch)
	}
	h.keep("sweep", events)
}

// restoreVM: a RestoreVM of a one-disk VM's backup into the VM, powered
// off after more writes (`starter restore --to-vm`): it completes, its
// snapshot taken and removed.
func (h *harness) restoreVM() {
	t := h.t
	const vm = "hist-restorevm"
	ref, keys := h.createVM(vm, 64*MiB)
	stacktest.WriteDisk(t, h.l, ref, keys[0], 4*MiB, stacktest.Pattern(61, MiB))
	b := h.backup(vm)
	if b.Status != "completed" {
		t.Fatalf("backup of %s: %+v", vm, b)
	}
	stacktest.WriteDisk(t, h.l, ref, keys[0], 8*MiB, stacktest.Pattern(62, MiB))
	if err := h.l.SetPower(vm, false); err != nil {
		t.Fatal(err)
	}
	if res, err := h.s.Starter(h.ctx, "restore", b.BackupID, "--to-vm", vm, "--json"); err != nil || res.ExitCode != 0 {
		t.Fatalf("starter restore %s --to-vm %s: %v %s", b.BackupID, vm, err, res)
	}
	wid, run := h.closedRun("restore-vm", "WorkflowType = 'RestoreVM'")
	events := stacktest.History(h.ctx, t, h.s, wid, run)
	sch := scheduled(t, events)
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED || count(sch, "WriteVMDisk") != 1 ||
		count(sch, "CreateRestoreSnapshot") != 1 || count(sch, "RemoveSnapshot") != 1 {
		t.Errorf("restore-vm: history ends %s with activities %q, want completed after one CreateRestoreSnapshot, WriteVMDisk and RemoveSnapshot", lastEvent(events), sch)
	}
	h.waitNoNBD("the restore into " + vm)
	h.keep("restorevm", events)
}

// prune: three backups of a VM, keep-last 1, a prune that merges the two
// older points into the newest and removes them: a Prune and its PruneVM.
func (h *harness) prune() {
	t := h.t
	const vm = "hist-pruned"
	ref, keys := h.createVM(vm, 64*MiB)
	var last string
	for i := 1; i <= 3; i++ {
		stacktest.WriteDisk(t, h.l, ref, keys[0], int64(i)*4*MiB, stacktest.Pattern(uint64(40+i), MiB))
		b := h.backup(vm)
		if b.Status != "completed" {
			t.Fatalf("backup %d of %s: %+v", i, vm, b)
		}
		last = b.BackupID
	}
	if res, err := h.s.Starter(h.ctx, "retention", "set", vm, "--keep-last", "1"); err != nil || res.ExitCode != 0 {
		t.Fatalf("retention set: %v %s", err, res)
	}
	res, err := h.s.Starter(h.ctx, "prune", vm, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var out workflows.PruneResult
	if res.ExitCode != 0 || stacktest.DecodeOne(res.Stdout, &out) != nil {
		t.Fatalf("starter prune %s --wait --json: %s", vm, res)
	}
	if len(out.VMs) != 1 || len(out.VMs[0].Removed) != 2 || len(out.VMs[0].Merged) != 1 || len(out.VMs[0].Kept) != 1 || out.VMs[0].Kept[0].BackupID != last {
		t.Fatalf("prune result %+v, want %s kept, two points removed, one image merged", out, last)
	}
	runs := stacktest.ListWorkflows(h.ctx, t, h.s, "WorkflowType = 'Prune'")
	if len(runs) != 1 {
		t.Fatalf("%d Prune workflows, want 1", len(runs))
	}
	ex := runs[0].GetExecution()
	events := stacktest.History(h.ctx, t, h.s, ex.GetWorkflowId(), ex.GetRunId())
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED || !slices.Equal(scheduled(t, events), []string{"PlanPrune"}) {
		t.Errorf("prune: history ends %s with activities %q, want completed after PlanPrune (and a PruneVM child)", lastEvent(events), scheduled(t, events))
	}
	h.keep("prune", events)
	runs = stacktest.ListWorkflows(h.ctx, t, h.s, "WorkflowType = 'PruneVM'")
	if len(runs) != 1 {
		t.Fatalf("%d PruneVM workflows, want 1", len(runs))
	}
	ex = runs[0].GetExecution()
	events = stacktest.History(h.ctx, t, h.s, ex.GetWorkflowId(), ex.GetRunId())
	if lastEvent(events) != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED || !slices.Equal(scheduled(t, events), []string{"PlanVM", "MergeImage", "ApplyPrune"}) {
		t.Errorf("prunevm: history ends %s with activities %q, want completed after PlanVM, MergeImage, ApplyPrune", lastEvent(events), scheduled(t, events))
	}
	h.keep("prunevm", events)
}
