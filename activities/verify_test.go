package activities_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/verify"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// Transfers write a digest file beside each image, the commit records it,
// and VerifyPoint re-reads the point through its chain against it.
func TestTransferDigestsCommitAndVerify(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	cat, err := catalog.Open(ctxT(t, time.Minute), testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	ca := &activities.Catalog{Catalog: cat, Repo: f.repo}
	f.tr.Digests = true
	env := newActivityEnv(t, f.log, f.vs, f.tr, ca)
	vm := f.prepareVM(t, env)
	key := vm.disks[1].Key

	f.apply(t, key, write{off: 0, n: 8 << 20, seed: 1}, write{off: 3 << 30, n: 1<<20 + 12345, seed: 2},
		write{off: 4 << 30, n: 1 << 20, zero: true})
	full := f.takeBackup(t, env, vm, "full1", "*")
	res := mustExecute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, full.input(""))
	f.apply(t, key, write{off: 1 << 20, n: 512 << 10, seed: 4}, write{off: 2 << 20, n: 1 << 20, zero: true},
		write{off: 6 << 30, n: 2 << 20, seed: 6})
	inc := f.takeBackup(t, env, vm, "inc2", full.disk.ChangeID)
	ires := mustExecute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, inc.input(res.Path))

	for _, r := range []*activities.TransferDiskResult{res, ires} {
		size, sum, err := digest.HashFile(digest.PathOf(r.Path))
		if err != nil || r.DigestSHA256 != sum || r.DigestSize != size {
			t.Fatalf("%s: the result says digest file %d bytes %s; the file: %d %s (%v)", r.Path, r.DigestSize, r.DigestSHA256, size, sum, err)
		}
		// A transfer now writes BLAKE3 digests.
		if df, err := digest.Read(digest.PathOf(r.Path)); err != nil || df.Header.Algorithm != digest.BLAKE3 {
			t.Fatalf("%s's digest file: %v, %+v; want one of BLAKE3", r.Path, err, df)
		}
	}
	commit := func(b backup, r *activities.TransferDiskResult, backing string, withDigest bool) {
		t.Helper()
		if err := cat.Begin(ctxT(t, time.Minute), catalog.Backup{ID: b.id, Profile: profileLab, VMUUID: vm.uuid, VMName: vm.name, Mode: "auto"}); err != nil {
			t.Fatal(err)
		}
		d := activities.CommitDisk{Key: key, Capacity: b.disk.Capacity, Mode: catalog.ModeFull, Path: r.Path, ChangeID: b.disk.ChangeID,
			ChangedBytes: b.changed.ChangedBytes, WrittenBytes: r.WrittenBytes, SizeBytes: r.SizeBytes, SHA256: r.SHA256, Stamp: r.Stamp}
		if backing != "" {
			d.Mode, d.BackingBackupID = catalog.ModeIncremental, backing
		}
		if withDigest {
			d.DigestSHA256, d.DigestSize = r.DigestSHA256, r.DigestSize
		}
		if _, err := env.ExecuteActivity(ca.CommitRestorePoint, activities.CommitInput{BackupID: b.id, Disks: []activities.CommitDisk{d}}); err != nil {
			t.Fatal(err)
		}
	}
	// A workflow that does not pass the digest on: the commit finds it.
	commit(full, res, "", false)
	commit(inc, ires, "full1", true)
	chain, err := cat.Chain(ctxT(t, time.Minute), "inc2", key)
	if err != nil {
		t.Fatal(err)
	}
	if chain[0].DigestSHA256 != ires.DigestSHA256 || chain[1].DigestSHA256 != res.DigestSHA256 || chain[1].DigestSize != res.DigestSize {
		t.Fatalf("catalog digests %q %q; want %q %q", chain[0].DigestSHA256, chain[1].DigestSHA256, ires.DigestSHA256, res.DigestSHA256)
	}

	v := mustExecute[activities.VerifyPointResult](t, env, ca.VerifyPoint, activities.VerifyPointInput{BackupID: "inc2", Key: key})
	if !v.OK || !v.BlocksRead || v.CheckedBytes < 8<<20 || len(v.Undigested) != 0 {
		t.Fatalf("verify inc2: %+v", v)
	}
	t.Logf("inc2: %+v", v)

	// The full image's digest file gone: named, with its restore point.
	if err := os.Remove(digest.PathOf(res.Path)); err != nil {
		t.Fatal(err)
	}
	v = mustExecute[activities.VerifyPointResult](t, env, ca.VerifyPoint, activities.VerifyPointInput{BackupID: "inc2", Key: key})
	if v.OK || len(v.Problems) != 1 || v.Problems[0].BackupID != "full1" || !strings.HasSuffix(v.Problems[0].File, "full1.qcow2.digests") ||
		!strings.Contains(v.Problems[0].Reason, "missing") || v.BlocksRead {
		t.Fatalf("verify inc2 without full1's digest file: %+v", v)
	}
	_, err = env.ExecuteActivity(ca.VerifyPoint, activities.VerifyPointInput{BackupID: "nope", Key: key})
	wantAppError(t, err, activities.ErrTypeInvalidInput, "nope")
}

// A transfer resumed from a heartbeat keeps the digest records below its
// resume point and records the rest once; without its digest file it
// copies afresh.
func TestTransferDigestsResumed(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	f.tr.Digests = true
	f.tr.Copy = copier.Options{FlushBytes: 2 << 20, FlushInterval: 50 * time.Millisecond,
		ProgressInterval: time.Millisecond, InFlight: 4}
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	key := vm.disks[1].Key
	var ws []write
	for i := range 12 {
		ws = append(ws, write{off: int64(i) * (512 << 20), n: 4 << 20, seed: byte(10 + i)})
	}
	f.apply(t, key, ws...)
	b := f.takeBackup(t, env, vm, "resume1", "*")
	total := b.changed.ChangedBytes
	interrupted := func() activities.TransferProgress {
		t.Helper()
		ic := &cancelOnProgress{stop: func(p activities.TransferProgress) bool {
			return p.ResumePoint > 0 && p.Done >= total/3
		}}
		env1 := f.newEnv(t)
		env1.SetWorkerOptions(worker.Options{Interceptors: []interceptor.WorkerInterceptor{ic}})
		_, err := execute[activities.TransferDiskResult](t, env1, f.tr.TransferDisk, b.input(""))
		last, _, canceled := ic.lastBeat()
		if !canceled || err == nil || last.ResumePoint <= 0 {
			t.Fatalf("the attempt was not interrupted after a resume point (canceled %v, last %+v): %v", canceled, last, err)
		}
		return last
	}
	check := func(res *activities.TransferDiskResult) {
		t.Helper()
		v, err := verify.Chain(context.Background(), []verify.Image{{Path: res.Path, Size: res.SizeBytes, SHA256: res.SHA256,
			DigestSHA256: res.DigestSHA256, DigestSize: res.DigestSize}}, verify.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if !v.OK() || v.CheckedBytes != total {
			t.Fatalf("verify the resumed image: %v; %d bytes checked, want the %d changed", v.Err(), v.CheckedBytes, total)
		}
	}

	last := interrupted()
	env2 := f.newEnv(t)
	env2.SetHeartbeatDetails(last)
	res := mustExecute[activities.TransferDiskResult](t, env2, f.tr.TransferDisk, b.input(""))
	if res.ReadBytes >= total {
		t.Errorf("the resumed attempt read %d of %d bytes: it did not resume", res.ReadBytes, total)
	}
	check(res)

	// Without the digest file, the records below the resume point are
	// lost: the retry copies afresh.
	if err := os.Remove(res.Path); err != nil {
		t.Fatal(err)
	}
	last = interrupted()
	if err := os.Remove(digest.PathOf(res.Path)); err != nil {
		t.Fatal(err)
	}
	env3 := f.newEnv(t)
	env3.SetHeartbeatDetails(last)
	res = mustExecute[activities.TransferDiskResult](t, env3, f.tr.TransferDisk, b.input(""))
	if res.ReadBytes != total {
		t.Errorf("without its digest file the retry read %d bytes, want all %d", res.ReadBytes, total)
	}
	check(res)
}
