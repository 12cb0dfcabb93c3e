package activities_test

import (
	"context"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// disksBackup is a full backup of both disks of the lab's two-disk VM:
// its snapshot, each disk's changed areas and TransferDisk input.
type disksBackup struct {
	backups []backup
	in      activities.TransferDisksInput
}

func (f *fixture) takeDisksBackup(t *testing.T, env *testsuite.TestActivityEnvironment, vm vmInfo, id string) disksBackup {
	t.Helper()
	s := f.snapshot(t, env, vm, id)
	db := disksBackup{in: activities.TransferDisksInput{MaxParallel: 2}}
	for _, d := range vm.disks {
		sd := snapDisk(t, s, d.Key)
		ca := mustExecute[activities.ChangedAreasResult](t, env, f.vs.ChangedAreas, activities.ChangedAreasInput{
			Profile: profileLab, VMRef: vm.ref, SnapshotRef: s.SnapshotRef, BackupID: id,
			Key: sd.Key, Capacity: sd.Capacity, ChangeID: "*"})
		b := backup{id: id, vm: vm, snap: s, disk: sd, changed: ca}
		db.backups = append(db.backups, b)
		db.in.Disks = append(db.in.Disks, b.input(""))
	}
	return db
}

// check checks every disk's image against the disk at snapshot time.
func (f *fixture) checkDisks(t *testing.T, db disksBackup, res *activities.TransferDisksResult) {
	t.Helper()
	if len(res.Disks) != len(db.backups) {
		t.Fatalf("TransferDisks answered for %d disks, want %d", len(res.Disks), len(db.backups))
	}
	for i, b := range db.backups {
		f.checkResult(t, b, &res.Disks[i])
		if diff := sameContent(t, f.frozen(t, b), res.Disks[i].Path); diff != "" {
			t.Errorf("disk %d: the image differs from the disk at snapshot time: %s", b.disk.Key, diff)
		}
	}
}

// TestTransferDisks transfers both disks of a VM in one activity; a retry
// keeps a disk its details say is done while its image is unchanged, and
// transfers again one whose image changed; the first disk that fails
// fails the activity, naming it; a snapshot gone fails it, the disks
// done included.
func TestTransferDisks(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	f.tr.Digests = true // as the worker runs it
	testutil.CheckNoSockets(t, f.runDir)
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	f.apply(t, vm.disks[0].Key, write{off: 0, n: 3 << 20, seed: 1}, write{off: 700 << 20, n: 1 << 20, seed: 2})
	f.apply(t, vm.disks[1].Key, write{off: 64 << 20, n: 2 << 20, seed: 3}, write{off: 3 << 30, n: 5 << 20, seed: 4})
	db := f.takeDisksBackup(t, env, vm, "disks1")

	res := mustExecute[activities.TransferDisksResult](t, f.newEnv(t), f.tr.TransferDisks, db.in)
	f.checkDisks(t, db, res)
	for i, d := range res.Disks {
		if d.ReadBytes != db.in.Disks[i].ChangedBytes {
			t.Errorf("disk %d: read %d bytes, want its %d changed", db.in.Disks[i].Key, d.ReadBytes, db.in.Disks[i].ChangedBytes)
		}
	}

	// A retry whose details say the first disk is done: that disk is not
	// copied again (its result is kept, its image untouched), the second
	// is (no resume point: from scratch).
	first, second := res.Disks[0], res.Disks[1]
	env2 := f.newEnv(t)
	env2.SetHeartbeatDetails(activities.TransferDisksProgress{Done: []activities.TransferDiskDone{{Key: db.in.Disks[0].Key, Result: first}}})
	res2 := mustExecute[activities.TransferDisksResult](t, env2, f.tr.TransferDisks, db.in)
	f.checkDisks(t, db, res2)
	if !sameResult(res2.Disks[0], first) {
		t.Errorf("the disk done was transferred again: %+v, want %+v", res2.Disks[0], first)
	}
	if res2.Disks[1].ReadBytes != second.ReadBytes || res2.Disks[1].Seconds == second.Seconds {
		t.Errorf("the disk not done was not transferred again: %+v", res2.Disks[1])
	}

	// A result whose digest file or path is not the image's as it is now
	// is not kept either (the commit would refuse it).
	if first.DigestSHA256 == "" {
		t.Fatal("the transfer recorded no digest file")
	}
	wrongDigest, wrongPath := first, first
	wrongDigest.DigestSHA256 = strings.Repeat("0", 64)
	wrongPath.Path += ".elsewhere"
	for _, r := range []activities.TransferDiskResult{wrongDigest, wrongPath} {
		envW := f.newEnv(t)
		envW.SetHeartbeatDetails(activities.TransferDisksProgress{Done: []activities.TransferDiskDone{{Key: db.in.Disks[0].Key, Result: r}}})
		resW := mustExecute[activities.TransferDisksResult](t, envW, f.tr.TransferDisks, db.in)
		f.checkDisks(t, db, resW)
		if sameResult(resW.Disks[0], r) || resW.Disks[0].Seconds == first.Seconds {
			t.Errorf("a done disk's result naming another digest or path (%s, %s) was kept", r.DigestSHA256, r.Path)
		}
	}
	first = mustExecute[activities.TransferDisksResult](t, f.newEnv(t), f.tr.TransferDisks, db.in).Disks[0]

	// Its image changed since (its stamp differs): it is transferred again.
	now := time.Now().Add(time.Minute)
	if err := os.Chtimes(first.Path, now, now); err != nil {
		t.Fatal(err)
	}
	env3 := f.newEnv(t)
	env3.SetHeartbeatDetails(activities.TransferDisksProgress{Done: []activities.TransferDiskDone{{Key: db.in.Disks[0].Key, Result: first}}})
	res3 := mustExecute[activities.TransferDisksResult](t, env3, f.tr.TransferDisks, db.in)
	f.checkDisks(t, db, res3)
	if *res3.Disks[0].Stamp == *first.Stamp || res3.Disks[0].ReadBytes != first.ReadBytes {
		t.Errorf("the disk whose image changed was not transferred again: %+v", res3.Disks[0])
	}

	// A disk that cannot be transferred (its extents file is gone) fails
	// the activity, non-retryably, naming it.
	bad := db.in
	bad.Disks = append([]activities.TransferDiskInput(nil), db.in.Disks...)
	bad.Disks[1].ExtentsFile += ".gone"
	_, err := execute[activities.TransferDisksResult](t, f.newEnv(t), f.tr.TransferDisks, bad)
	if err == nil || !strings.Contains(err.Error(), ".gone") {
		t.Errorf("a disk without its extents file: %v, want an error naming the file", err)
	}

	// The snapshot is gone: a retry whose disks are all done fails all
	// the same (the check after the copies), naming the snapshot; so
	// does one that would copy (the check before).
	if err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
		SnapshotRef: db.backups[0].snap.SnapshotRef, SnapshotName: db.backups[0].snap.SnapshotName}); err != nil {
		t.Fatal(err)
	}
	for _, done := range [][]activities.TransferDiskDone{
		{{Key: db.in.Disks[0].Key, Result: res3.Disks[0]}, {Key: db.in.Disks[1].Key, Result: res3.Disks[1]}},
		nil,
	} {
		envG := f.newEnv(t)
		envG.SetHeartbeatDetails(activities.TransferDisksProgress{Done: done})
		_, err := execute[activities.TransferDisksResult](t, envG, f.tr.TransferDisks, db.in)
		wantAppError(t, err, activities.ErrTypeSnapshotGone, db.backups[0].snap.SnapshotRef)
	}

	// Bad input.
	other := db.in.Disks[1]
	other.SnapshotRef = "snapshot-1"
	for _, in := range []activities.TransferDisksInput{{}, {Disks: []activities.TransferDiskInput{db.in.Disks[0], db.in.Disks[0]}},
		{Disks: []activities.TransferDiskInput{db.in.Disks[0], other}}} {
		_, err := execute[activities.TransferDisksResult](t, f.newEnv(t), f.tr.TransferDisks, in)
		wantAppError(t, err, activities.ErrTypeInvalidInput)
	}
}

// sameResult compares two results, their stamps by value.
func sameResult(a, b activities.TransferDiskResult) bool {
	if (a.Stamp == nil) != (b.Stamp == nil) || (a.Stamp != nil && *a.Stamp != *b.Stamp) {
		return false
	}
	a.Stamp, b.Stamp = nil, nil
	return a == b
}

// disksBeats records the heartbeats of a TransferDisks.
type disksBeats struct {
	interceptor.WorkerInterceptorBase
	mu    sync.Mutex
	beats []activities.TransferDisksProgress
}

func (r *disksBeats) InterceptActivity(ctx context.Context, next interceptor.ActivityInboundInterceptor) interceptor.ActivityInboundInterceptor {
	return &disksBeatsInbound{ActivityInboundInterceptorBase: interceptor.ActivityInboundInterceptorBase{Next: next}, root: r}
}

type disksBeatsInbound struct {
	interceptor.ActivityInboundInterceptorBase
	root *disksBeats
}

func (i *disksBeatsInbound) Init(outbound interceptor.ActivityOutboundInterceptor) error {
	o := &disksBeatsOutbound{root: i.root}
	o.Next = outbound
	return i.Next.Init(o)
}

type disksBeatsOutbound struct {
	interceptor.ActivityOutboundInterceptorBase
	root *disksBeats
}

func (o *disksBeatsOutbound) RecordHeartbeat(ctx context.Context, details ...any) {
	o.Next.RecordHeartbeat(ctx, details...)
	if len(details) == 1 {
		if p, ok := details[0].(activities.TransferDisksProgress); ok {
			o.root.mu.Lock()
			o.root.beats = append(o.root.beats, p)
			o.root.mu.Unlock()
		}
	}
}

// A retry keeps, in its first heartbeat (the disks kept as done), the
// resume point of a disk it has not started yet, as waiting.
func TestTransferDisksKeepsResumePoints(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	f.tr.Digests = true
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	f.apply(t, vm.disks[0].Key, write{off: 0, n: 1 << 20, seed: 51})
	f.apply(t, vm.disks[1].Key, write{off: 0, n: 1 << 20, seed: 52})
	db := f.takeDisksBackup(t, env, vm, "keep1")
	res := mustExecute[activities.TransferDisksResult](t, f.newEnv(t), f.tr.TransferDisks, db.in)
	k0, k1 := db.in.Disks[0].Key, db.in.Disks[1].Key
	begun := activities.TransferProgress{Path: "/elsewhere/partial.qcow2", ResumePoint: 1 << 20, Done: 1 << 20, Total: 2 << 20,
		Key: k1, Stage: activities.TransferStageCopying, Rate: 1e6}
	rec := &disksBeats{}
	env2 := f.newEnv(t)
	env2.SetWorkerOptions(worker.Options{Interceptors: []interceptor.WorkerInterceptor{rec}})
	env2.SetHeartbeatDetails(activities.TransferDisksProgress{Disks: []activities.TransferProgress{begun},
		Done: []activities.TransferDiskDone{{Key: k0, Result: res.Disks[0]}}})
	res2 := mustExecute[activities.TransferDisksResult](t, env2, f.tr.TransferDisks, db.in)
	f.checkDisks(t, db, res2)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.beats) == 0 {
		t.Fatal("no heartbeat")
	}
	want := activities.TransferProgress{Path: begun.Path, ResumePoint: begun.ResumePoint, Done: begun.Done, Total: begun.Total,
		Key: k1, Stage: activities.TransferStageWaiting}
	if b := rec.beats[0]; len(b.Done) != 1 || b.Done[0].Key != k0 || len(b.Disks) != 1 || b.Disks[0] != want {
		t.Errorf("first heartbeat %+v: want disk %d done and disk %d waiting at its resume point (%+v)", b, k0, k1, want)
	}
}
