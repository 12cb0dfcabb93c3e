// Package restorevm tests restores into a VM (`starter restore BACKUP_ID
// --to-vm VM`, the RestoreVM workflow) on a whole stack: a powered-on VM
// refused by name; a restore into the powered-off lab VM that writes only
// the areas that differ, after which `starter lab read` equals the disk
// at backup time, no snapshot is left, and the next backup is full and
// says why; a restore whose CBT continuity is broken writes the whole
// disk, and so does one into another VM or into a new VM made beside the
// source; what cannot work is refused by name; a restore held half way
// shows in the progress query and `starter status`, `starter cancel`
// ends it, it keeps its snapshot and names it, and the sweeper leaves
// that snapshot alone; on a terminal, bars; a VM powered on half way
// fails the restore, which says so.
package restorevm

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
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const vm = lab.SecondDiskVM // two disks

// report is what `starter restore --to-vm --json` prints.
type report = workflows.RestoreVMReport

type fixture struct {
	t    *testing.T
	ctx  context.Context
	s    *stack.Stack
	l    *lab.Lab
	ref  string
	keys []int32
	cap  int64
	dir  string
}

func (f *fixture) backup(args ...string) stacktest.BackupJSON {
	f.t.Helper()
	r, err := f.s.Starter(f.ctx, append([]string{"backup", vm, "--wait", "--json"}, args...)...)
	if err != nil || r.ExitCode != 0 {
		f.t.Fatalf("backup %v: %v %s", args, err, r)
	}
	var b stacktest.BackupJSON
	if err := stacktest.DecodeOne(r.Stdout, &b); err != nil {
		f.t.Fatal(err)
	}
	return b
}

// capture records every disk's content now, as files named by tag.
func (f *fixture) capture(tag string) map[int32]string {
	f.t.Helper()
	out := map[int32]string{}
	for _, k := range f.keys {
		p := filepath.Join(f.dir, tag+"-"+strconv.Itoa(int(k))+".raw")
		stacktest.Capture(f.t, f.l, vm, k, p)
		out[k] = p
	}
	return out
}

// sameAs reads every disk with `starter lab read` and compares it with
// the capture.
func (f *fixture) sameAs(what string, want map[int32]string) {
	f.t.Helper()
	for _, k := range f.keys {
		got := filepath.Join(f.dir, "read-"+strconv.Itoa(int(k))+".raw")
		r, err := f.s.Starter(f.ctx, "lab", "read", "--vm", vm, "--disk", strconv.Itoa(int(k)), "--to", got)
		if err != nil || r.ExitCode != 0 {
			f.t.Fatalf("lab read disk %d: %v %s", k, err, r)
		}
		if diff, err := stacktest.SameContent(got, want[k]); err != nil || diff != "" {
			f.t.Errorf("%s: disk %d differs from the disk at backup time: %s %v", what, k, diff, err)
		}
	}
}

func (f *fixture) restore(backupID string, args ...string) (report, stack.StarterResult) {
	f.t.Helper()
	r, err := f.s.Starter(f.ctx, append([]string{"restore", backupID, "--to-vm", vm, "--json"}, args...)...)
	if err != nil {
		f.t.Fatal(err)
	}
	var rep report
	if err := stacktest.DecodeOne(r.Stdout, &rep); err != nil {
		f.t.Fatalf("restore %s: %v\n%s", backupID, err, r)
	}
	return rep, r
}

func (f *fixture) snapshots() []string {
	f.t.Helper()
	names, err := stacktest.Snapshots(f.ctx, f.l, f.ref)
	if err != nil {
		f.t.Fatal(err)
	}
	return names
}

func (f *fixture) write(seed uint64, off int64, n int) {
	f.t.Helper()
	for i, k := range f.keys {
		stacktest.WriteDisk(f.t, f.l, vm, k, off, stacktest.Pattern(seed+uint64(i)*100, n))
	}
}

func TestRestoreIntoVM(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	l := s.Lab()
	info, err := l.VM(vm)
	if err != nil || len(info.Disks) != 2 {
		t.Fatalf("lab VM %s: %+v %v", vm, info, err)
	}
	f := &fixture{t: t, ctx: ctx, s: s, l: l, ref: info.Ref, cap: info.Disks[0].Capacity, dir: t.TempDir()}
	for _, d := range info.Disks {
		f.keys = append(f.keys, d.Key)
	}

	// A full backup and an incremental, then more data: the disks differ
	// from the first point in a few MiB only.
	for i := range int64(8) {
		f.write(uint64(i+1), i*(f.cap/8), 2<<20)
	}
	b1 := f.backup("--full")
	at1 := f.capture("b1")
	f.write(20, 3<<20, 1<<20)
	f.write(21, f.cap/2+(5<<20), 1<<20)
	b2 := f.backup()
	if b2.Disk(t, f.keys[0]).Mode != workflows.ModeIncremental {
		t.Fatalf("the second backup is %s, want incremental", b2.Disk(t, f.keys[0]).Mode)
	}
	at2 := f.capture("b2")
	f.write(30, f.cap/8+(1<<20), 3<<20) // over b1's data
	f.write(31, f.cap-(4<<20), 1<<20)   // where b1 had none

	// 1. A powered-on VM is refused by name, before anything is done.
	rep, r := f.restore(b1.BackupID)
	if r.ExitCode != 1 || rep.Status != "failed" || !strings.Contains(rep.Error, "is poweredOn: power it off before restoring into it") ||
		!strings.Contains(rep.Error, vm) {
		t.Errorf("restore into the powered-on VM: %+v\n%s", rep, r)
	}
	if snaps := f.snapshots(); len(snaps) != 0 {
		t.Errorf("a refused restore left snapshots %v", snaps)
	}

	// 2. Powered off, the restore writes only what differs.
	if err := l.SetPower(vm, false); err != nil {
		t.Fatal(err)
	}
	rep, r = f.restore(b1.BackupID)
	if r.ExitCode != 0 || rep.Status != "completed" || len(rep.Disks) != 2 {
		t.Fatalf("restore into the powered-off VM: %+v\n%s", rep, r)
	}
	for _, d := range rep.Disks {
		// b2 changed 2 MiB and the writes since 4 MiB (at 64 KiB
		// granularity): a few MiB, against a 10 GiB disk.
		if d.Mode != activities.RestoreDiffering || d.DifferingBytes < 4<<20 || d.DifferingBytes > 16<<20 ||
			d.WrittenBytes+d.ZeroedBytes != d.DifferingBytes || d.WrittenBytes == 0 || d.ZeroedBytes == 0 {
			t.Errorf("disk %d: %+v, want differing areas of a few MiB, written and zeroed", d.Key, d)
		}
	}
	if !strings.HasPrefix(rep.Snapshot, activities.RestoreSnapshotPrefix) || rep.SnapshotRef == "" {
		t.Errorf("the restore's snapshot: %q (%s)", rep.Snapshot, rep.SnapshotRef)
	}
	f.sameAs("after the restore of the first backup", at1)
	if snaps := f.snapshots(); len(snaps) != 0 {
		t.Errorf("a completed restore left snapshots %v", snaps)
	}

	// 3. The next backup is full, and says why.
	b3 := f.backup()
	for _, k := range f.keys {
		d := b3.Disk(t, k)
		if d.Mode != workflows.ModeFull || !strings.Contains(d.Note, "the VM was restored from backup "+b1.BackupID) ||
			!strings.Contains(d.Note, "its CBT history no longer matches the chain") {
			t.Errorf("the backup after the restore, disk %d: %s, note %q; want full, naming the restore", k, d.Mode, d.Note)
		}
	}

	// 4. The restore ended the disks' change-ID series: b2's change IDs
	// are refused, and the whole disk is written.
	rep, r = f.restore(b2.BackupID, "--disk", strconv.Itoa(int(f.keys[1])))
	if r.ExitCode != 0 || len(rep.Disks) != 1 {
		t.Fatalf("restore of the second backup: %+v\n%s", rep, r)
	}
	if d := rep.Disks[0]; d.Key != f.keys[1] || d.Mode != activities.RestoreWholeDisk || !strings.Contains(d.Why, "CBT cannot say") ||
		d.DifferingBytes != f.cap || d.WrittenBytes > 64<<20 {
		t.Errorf("restore without CBT continuity: %+v, want the whole disk, mostly zeroed", d)
	}
	r, err = s.Starter(ctx, "lab", "read", "--vm", vm, "--disk", strconv.Itoa(int(f.keys[1])), "--to", filepath.Join(f.dir, "b2-read.raw"))
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("lab read: %v %s", err, r)
	}
	if diff, err := stacktest.SameContent(filepath.Join(f.dir, "b2-read.raw"), at2[f.keys[1]]); err != nil || diff != "" {
		t.Errorf("after the whole-disk restore of the second backup: %s %v", diff, err)
	}

	// 5. Into another VM: its disk of the same key and size, the whole
	// disk (CBT cannot say what differs on another VM). What cannot work
	// is refused by name.
	const other = "DC0_H0_VM1"
	if err := l.SetPower(other, false); err != nil {
		t.Fatal(err)
	}
	k0 := strconv.Itoa(int(f.keys[0]))
	r, err = s.Starter(ctx, "restore", b1.BackupID, "--to-vm", other, "--disk", k0, "--json")
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("restore into %s: %v %s", other, err, r)
	}
	rep = report{}
	if err := stacktest.DecodeOne(r.Stdout, &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Disks) != 1 || rep.Disks[0].Mode != activities.RestoreWholeDisk || !strings.Contains(rep.Disks[0].Why, "is not the restore point's VM") {
		t.Errorf("restore into another VM: %+v, want the whole disk, saying why", rep)
	}
	got := filepath.Join(f.dir, "other.raw")
	if r, err := s.Starter(ctx, "lab", "read", "--vm", other, "--disk", k0, "--to", got); err != nil || r.ExitCode != 0 {
		t.Fatalf("lab read %s: %v %s", other, err, r)
	}
	if diff, err := stacktest.SameContent(got, at1[f.keys[0]]); err != nil || diff != "" {
		t.Errorf("%s's disk after the restore: %s %v", other, diff, err)
	}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"restore", "20990101T000000Z-000000000000", "--to-vm", vm}, 1, "backup 20990101T000000Z-000000000000 does not exist"},
		{[]string{"restore", b1.BackupID, "--to-vm", "no-such-vm"}, 1, "no-such-vm"},
		{[]string{"restore", b1.BackupID, "--to-vm", other}, 1, "VM \"" + other + "\" has no disk " + strconv.Itoa(int(f.keys[1])) + " (its disks: " + k0 + "); restore into a new VM"},
		{[]string{"restore", b1.BackupID, "--to-vm", vm, "--disk", "999"}, 1, "has no disk 999"},
		{[]string{"restore", b1.BackupID, "--to-vm", vm, "--new-vm", other}, 1, "--new-vm \"" + other + "\": vsphere: VM name taken"},
		{[]string{"restore", b1.BackupID, "--to-vm", vm, "--new-vm", "x", "--disk", k0}, 2, "not with --disk"},
		{[]string{"restore", b1.BackupID, "--to-vm", vm, "--to", filepath.Join(f.dir, "x.raw")}, 2, "not with --to or --to-device"},
		{[]string{"restore", b1.BackupID, "--to-vm", vm, "--disk", "x"}, 2, "--disk \"x\" is not a device key"},
	} {
		r, err := s.Starter(ctx, c.args...)
		if err != nil || r.ExitCode != c.code || !strings.Contains(r.Stderr, c.want) {
			t.Errorf("starter %v: want exit %d and %q, got %v %s", c.args, c.code, c.want, err, r)
		}
	}
	if snaps := f.snapshots(); len(snaps) != 0 {
		t.Errorf("refused restores left snapshots %v", snaps)
	}

	// 6. Into a new VM beside the source: made powered off, with disks of
	// the point's sizes, every disk written whole.
	const made = "DC0_H0_VM0-restored"
	r, err = s.Starter(ctx, "restore", b1.BackupID, "--to-vm", vm, "--new-vm", made, "--json")
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("restore into a new VM: %v %s", err, r)
	}
	rep = report{}
	if err := stacktest.DecodeOne(r.Stdout, &rep); err != nil {
		t.Fatal(err)
	}
	newDisks, err := l.Disks(made)
	if err != nil || len(newDisks) != 2 || rep.VM != made || len(rep.Disks) != 2 {
		t.Fatalf("the new VM %s: %+v %v; result %+v", made, newDisks, err, rep)
	}
	for i, d := range newDisks {
		if d.Capacity != f.cap || rep.Disks[i].Mode != activities.RestoreWholeDisk {
			t.Errorf("new VM disk %d: %+v, result %+v", d.Key, d, rep.Disks[i])
		}
		got := filepath.Join(f.dir, "made.raw")
		if r, err := s.Starter(ctx, "lab", "read", "--vm", made, "--disk", strconv.Itoa(int(d.Key)), "--to", got); err != nil || r.ExitCode != 0 {
			t.Fatalf("lab read %s: %v %s", made, err, r)
		}
		if diff, err := stacktest.SameContent(got, at1[f.keys[i]]); err != nil || diff != "" {
			t.Errorf("the new VM's disk %d (the point's %d): %s %v", d.Key, f.keys[i], diff, err)
		}
	}
	if names, err := stacktest.Snapshots(ctx, l, newDisks[0].VMRef); err != nil || len(names) != 0 {
		t.Errorf("snapshots of the new VM: %v %v", names, err)
	}

	// 7. Canceled midway: the restore fails naming the snapshot it kept,
	// and the sweeper leaves that snapshot alone.
	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.MidVMRestore); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = gates.Release(faultpoint.MidVMRestore) }()
	run, err := s.StartStarter("restore", b1.BackupID, "--to-vm", vm, "--json")
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	if _, err := gates.Wait(wctx, faultpoint.MidVMRestore); err != nil {
		wcancel()
		t.Fatal(err)
	}
	wcancel()
	found := stacktest.ListWorkflows(ctx, t, s, "WorkflowType = 'RestoreVM' AND ExecutionStatus = 'Running'")
	deadline := time.Now().Add(30 * time.Second)
	for len(found) != 1 && time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		found = stacktest.ListWorkflows(ctx, t, s, "WorkflowType = 'RestoreVM' AND ExecutionStatus = 'Running'")
	}
	if len(found) != 1 {
		t.Fatalf("running RestoreVM workflows: %v", found)
	}
	wid := found[0].GetExecution().GetWorkflowId()
	// The progress query answers the live figures of the held write.
	var p workflows.RestoreVMProgress
	deadline = time.Now().Add(30 * time.Second)
	for {
		v, err := s.Client().QueryWorkflow(ctx, wid, "", workflows.QueryProgress)
		if err == nil {
			err = v.Get(&p)
		}
		if err == nil && p.Live && p.Phase == workflows.RestoreVMWriting {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("progress of the held restore: %+v %v", p, err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	// starter status lists it, and starter cancel ends it.
	r, err = s.Starter(ctx, "status", "--json")
	if err != nil || r.ExitCode != 0 || !strings.Contains(r.Stdout, `"kind":"restore-vm"`) || !strings.Contains(r.Stdout, wid) ||
		!strings.Contains(r.Stdout, `"restore_vm":{`) {
		t.Errorf("starter status --json during the restore into the VM: %v %s", err, r)
	}
	r, err = s.Starter(ctx, "cancel", wid)
	if err != nil || r.ExitCode != 0 || !strings.Contains(r.Stdout, "canceled") {
		t.Errorf("starter cancel %s: %v %s", wid, err, r)
	}
	r, err = run.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rep = report{}
	if err := json.Unmarshal([]byte(r.Stdout), &rep); err != nil {
		t.Fatalf("%v\n%s", err, r)
	}
	snaps := f.snapshots()
	if r.ExitCode != 1 || len(snaps) != 1 || !strings.HasPrefix(snaps[0], activities.RestoreSnapshotPrefix) ||
		rep.Status != "canceled" || !strings.Contains(rep.Error, "failed: canceled") ||
		!strings.Contains(rep.Error, "the VM's snapshot \""+snaps[0]+"\"") || !strings.Contains(rep.Error, "revert the VM to it") {
		t.Fatalf("the canceled restore: snapshots %v, %+v\n%s", snaps, rep, r)
	}
	if err := gates.Release(faultpoint.MidVMRestore); err != nil {
		t.Fatal(err)
	}
	r, err = s.Starter(ctx, "sweep", "--min-age", "0")
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("sweep: %v %s", err, r)
	}
	if after := f.snapshots(); len(after) != 1 || after[0] != snaps[0] {
		t.Errorf("the sweeper touched the kept restore snapshot: before %v, after %v", snaps, after)
	}

	// 8. On a terminal: the headline and a bar per disk, done at the end,
	// then the summary.
	tty, err := testutil.OpenPTY(40, 220)
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	run, err = s.StartStarterOn(tty.Slave, "restore", b1.BackupID, "--to-vm", vm)
	if err != nil {
		t.Fatal(err)
	}
	tty.CloseSlave()
	r, err = run.Wait(ctx)
	tty.Drain()
	screen := tty.Output()
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("restore --to-vm on a terminal: %v %s\nterminal: %q", err, r, screen)
	}
	for _, want := range []string{"restore of backup " + b1.BackupID + " into VM " + vm, "disk " + strconv.Itoa(int(f.keys[0])),
		"disk " + strconv.Itoa(int(f.keys[1])), " done (", ": completed", "the next backup of the VM is full"} {
		if !strings.Contains(screen, want) {
			t.Errorf("the terminal lacks %q: %q", want, screen)
		}
	}
	f.sameAs("after the restore on a terminal", at1)

	// 9. Powered on half way through the write (the lab, unlike vSphere,
	// does not lock the disk): the restore fails, saying so, and keeps
	// its snapshot; it used to report the mixed disk restored (with one
	// disk to write, or its VM's last).
	if err := gates.Arm(faultpoint.MidVMRestore); err != nil {
		t.Fatal(err)
	}
	run, err = s.StartStarter("restore", b1.BackupID, "--to-vm", vm, "--disk", strconv.Itoa(int(f.keys[1])), "--json")
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel = context.WithTimeout(ctx, 3*time.Minute)
	if _, err := gates.Wait(wctx, faultpoint.MidVMRestore); err != nil {
		wcancel()
		t.Fatal(err)
	}
	wcancel()
	if err := l.SetPower(vm, true); err != nil {
		t.Fatal(err)
	}
	if err := gates.Release(faultpoint.MidVMRestore); err != nil {
		t.Fatal(err)
	}
	r, err = run.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rep = report{}
	if err := stacktest.DecodeOne(r.Stdout, &rep); err != nil {
		t.Fatalf("%v\n%s", err, r)
	}
	if r.ExitCode != 1 || rep.Status != "failed" || !strings.Contains(rep.Error, "was powered on while its disk") ||
		!strings.Contains(rep.Error, "the VM's snapshot \"cbtflow-restore-") {
		t.Errorf("a restore during which the VM was powered on: %+v\n%s", rep, r)
	}
}
