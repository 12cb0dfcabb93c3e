package chaos

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// restoreVMTimeout bounds a restore into a VM whose worker was killed:
// the dead WriteVMDisk is noticed within its 30 s heartbeat timeout and
// retried after 2 s, then verifies the chain again and writes the rest.
const restoreVMTimeout = 6 * time.Minute

// restoreVMKill is the group of a worker killed during a restore into a
// VM: the two-disk VM backed up (full, incremental), written to again,
// powered off, and the newest point restored into it while the worker is
// killed half way through a disk's write (restoreVMKilled); then the
// next backup, full.
func restoreVMKill(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "restorevm"})
	tl := tallied(t, "worker SIGKILL during a restore into a VM")
	vm := vms[0]
	r := e.backup(tl, "restorevm-full", vm, 300, 128*MiB, nil, false, backupTimeout)
	e.check(tl, r)
	r = e.backup(tl, "restorevm-incr", vm, 301, 64*MiB, nil, false, backupTimeout)
	e.check(tl, r)
	e.writeGuest(vm, 302, 16*MiB) // the disks differ from the point now
	e.overwriteData(vm, 303, 128*MiB)
	e.restoreVMKilled(tl, vm)
	if err := e.l.SetPower(vm, true); err != nil {
		t.Fatal(err)
	}
	r = e.backup(tl, "restorevm-after", vm, 304, 4*MiB, nil, false, backupTimeout)
	e.check(tl, r)
	if r.completed {
		for _, d := range r.out.Disks {
			if d.Mode != workflows.ModeFull || !strings.Contains(d.Note, "the VM was restored from backup") {
				e.problem(tl, "the backup after the restore into %s: disk %d %s (%q), want full, naming the restore", vm, d.Key, d.Mode, d.Note)
			}
		}
	}
	return []*Tally{tl}
}

// overwriteData writes other data over up to n bytes of what each disk of
// vm holds, so that a restore of its newest point writes that much data
// back (not only zeroes): enough for the write to be held half way.
func (e *env) overwriteData(vm string, seed uint64, n int64) {
	t := e.t
	t.Helper()
	disks, err := e.l.Disks(vm)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		exts, err := e.l.DiskExtents(vm, d.Key)
		if err != nil {
			t.Fatal(err)
		}
		left := n
		for i, x := range exts {
			if left <= 0 {
				break
			}
			l := min(x.Length, left, 4*MiB)
			e.write(vm, d.Key, x.Offset, stacktest.Pattern(seed+uint64(i)*7+uint64(d.Key), int(l)))
			left -= l
		}
	}
}

// restoreVMKilled restores the newest restore point of vm into the
// powered-off vm (`starter restore BACKUP_ID --to-vm VM --json`) while
// the worker is killed with SIGKILL half way through a WriteVMDisk
// (MidVMRestore), then started again. The restore must either complete
// (the killed disk written by a new attempt), every disk then equal to
// the disk at backup time as `starter lab read` reads it, with no
// cbtflow snapshot left; or fail naming the snapshot it kept, which is
// then the only cbtflow snapshot of the VM. No qemu-nbd or nbdkit is
// left either way.
func (e *env) restoreVMKilled(tl *Tally, vm string) {
	t := e.t
	t.Helper()
	r := e.newest[vm]
	if r == nil || !r.completed || len(r.caps) == 0 {
		e.problem(tl, "no restore point of %s with captures to restore", vm)
		return
	}
	id := r.out.BackupID
	if err := e.l.SetPower(vm, false); err != nil {
		t.Fatal(err)
	}
	f := e.killAt(tl, faultpoint.MidVMRestore, "WriteVMDisk")
	if err := f.arm(); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	rctx, cancel := context.WithTimeout(e.ctx, restoreVMTimeout)
	defer cancel()
	run, err := e.s.StartStarter("restore", id, "--to-vm", vm, "--json")
	if err != nil {
		t.Fatal(err)
	}
	actErr := f.act(rctx)
	res, err := run.Wait(rctx)
	f.settle()
	if actErr != nil {
		e.problem(tl, "restore of %s into %s: the fault was not injected as planned: %v", id, vm, actErr)
	}
	if err != nil {
		e.problem(tl, "restore of %s into %s: no final state within %s: %v", id, vm, restoreVMTimeout, err)
		return
	}
	var out workflows.RestoreVMReport
	if err := json.Unmarshal([]byte(res.Stdout), &out); err != nil {
		e.problem(tl, "restore of %s into %s: %v\n%s", id, vm, err, res)
		return
	}
	names, err := e.snapshots(e.ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case res.ExitCode == 0 && out.Status == "completed":
		if len(names) > 0 {
			tl.LeftoverSnapshots += len(names)
			e.problem(tl, "the completed restore of %s into %s left snapshots %v", id, vm, names)
		}
		for key, want := range r.caps {
			got := filepath.Join(e.data, "restorevm-read.raw")
			lr, err := e.s.Starter(e.ctx, "lab", "read", "--vm", vm, "--disk", strconv.Itoa(int(key)), "--to", got)
			if err != nil || lr.ExitCode != 0 {
				e.problem(tl, "lab read %s disk %d: %v %s", vm, key, err, lr)
				continue
			}
			if diff, err := stacktest.SameContent(got, want); err != nil || diff != "" {
				e.problem(tl, "after the restore of %s into %s, disk %d differs from the disk at backup time: %s %v", id, vm, key, diff, err)
			}
		}
	case res.ExitCode == 1:
		// A clean failure: it names the snapshot it kept, and that is the
		// only one.
		if len(names) != 1 || !strings.HasPrefix(names[0], activities.RestoreSnapshotPrefix) ||
			!strings.Contains(out.Error, "the VM's snapshot \""+names[0]+"\"") {
			tl.LeftoverSnapshots += len(names)
			e.problem(tl, "the failed restore of %s into %s: snapshots %v, error %q: want exactly the snapshot it names", id, vm, names, out.Error)
		}
	default:
		e.problem(tl, "restore of %s into %s after the kill: %s", id, vm, res)
	}
	runs := stacktest.ListWorkflows(e.ctx, t, e.s, "WorkflowType = 'RestoreVM' AND CbtflowBackupID = '"+id+"'")
	if len(runs) != 1 {
		e.problem(tl, "restore of %s: %d RestoreVM workflows, want 1", id, len(runs))
	} else if n, _, err := e.attempts(runs[0].GetExecution().GetWorkflowId(), "WriteVMDisk"); err != nil || n < 2 {
		e.problem(tl, "restore of %s: WriteVMDisk ran %d attempt(s) (%v): the kill did not hit it", id, n, err)
	}
	e.settleProcesses(tl, "after the restore into the VM")
	for _, d := range out.Disks {
		t.Logf("%-28s %-16s restore %s disk %d: %s, written %d, zeroed %d of %d", "restore into VM (worker SIGKILL at "+faultpoint.MidVMRestore+")",
			vm, id, d.Key, d.Mode, d.WrittenBytes, d.ZeroedBytes, d.DifferingBytes)
	}
	t.Logf("restore of %s into %s: %s in %s", id, vm, out.Status, time.Since(began).Round(100*time.Millisecond))
}
