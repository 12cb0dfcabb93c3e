package activities_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/qcow2"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// backup is what the tests know of one backup of the lab VM's second
// disk: its snapshot and its changed areas.
type backup struct {
	id      string
	vm      vmInfo
	snap    *activities.CreateSnapshotResult
	disk    activities.SnapshotDisk
	changed *activities.ChangedAreasResult
}

// takeBackup snapshots the VM and asks for the changed areas of its second
// disk since changeID ("*": a full backup).
func (f *fixture) takeBackup(t *testing.T, env *testsuite.TestActivityEnvironment, vm vmInfo, id, changeID string) backup {
	t.Helper()
	s := f.snapshot(t, env, vm, id)
	d := snapDisk(t, s, vm.disks[1].Key)
	ca := mustExecute[activities.ChangedAreasResult](t, env, f.vs.ChangedAreas, activities.ChangedAreasInput{
		Profile: profileLab, VMRef: vm.ref, SnapshotRef: s.SnapshotRef, BackupID: id,
		Key: d.Key, Capacity: d.Capacity, ChangeID: changeID})
	return backup{id: id, vm: vm, snap: s, disk: d, changed: ca}
}

// input is the TransferDisk input of the backup: full, or an overlay on
// backing.
func (b backup) input(backing string) activities.TransferDiskInput {
	in := activities.TransferDiskInput{Profile: profileLab, VMRef: b.vm.ref, VMUUID: b.vm.uuid,
		SnapshotRef: b.snap.SnapshotRef, BackupID: b.id, Key: b.disk.Key, Capacity: b.disk.Capacity,
		FileName: b.disk.FileName, Mode: "full", ExtentsFile: b.changed.ExtentsFile, ChangedBytes: b.changed.ChangedBytes}
	if backing != "" {
		in.Mode, in.BackingPath = "incremental", backing
	}
	return in
}

// frozen is the lab's image of the disk at snapshot time.
func (f *fixture) frozen(t *testing.T, b backup) string {
	t.Helper()
	img, err := f.lab.SnapshotImage(b.snap.SnapshotRef, b.disk.Key)
	if err != nil {
		t.Fatal(err)
	}
	return img.Path
}

// sameContent reports how the guest-visible content of a QCOW2 chain
// differs from a raw image ("" when identical).
func sameContent(t *testing.T, raw, qcow2 string) string {
	t.Helper()
	diff, err := qemu.Compare(ctxT(t, time.Minute), raw, "raw", qcow2, "qcow2")
	if err != nil {
		t.Fatalf("qemu-img compare: %v", err)
	}
	return diff
}

// checkResult checks what every successful transfer promises: the image
// is at the repository's path for the backup, it passes qemu-img check
// (and Prove, the worker's own check), and its size and SHA-256 are the
// ones reported.
func (f *fixture) checkResult(t *testing.T, b backup, res *activities.TransferDiskResult) {
	t.Helper()
	want, err := f.repo.ImagePath(repository.Key{Profile: profileLab, VMUUID: b.vm.uuid, DiskKey: b.disk.Key, BackupID: b.id})
	if err != nil {
		t.Fatal(err)
	}
	if res.Path != want {
		t.Errorf("image at %s, want %s", res.Path, want)
	}
	size, sum := fileSum(t, res.Path)
	if f.tr.Digests {
		// With its digest file, the image is sealed (internal/integrity),
		// and the seal proves the file as it is.
		if !integrity.IsSeal(res.SHA256) {
			t.Errorf("result says proof %s for an image with a digest file, want a seal", res.SHA256)
		}
		if err := integrity.Verify(ctxT(t, time.Minute), res.Path, res.SHA256, nil); err != nil || res.SizeBytes != size {
			t.Errorf("result says %d bytes, seal %s; the file has %d bytes: %v", res.SizeBytes, res.SHA256, size, err)
		}
	} else if res.SizeBytes != size || res.SHA256 != sum {
		t.Errorf("result says %d bytes, sha256 %s; the file has %d bytes, sha256 %s", res.SizeBytes, res.SHA256, size, sum)
	}
	// The steps' seconds (make bench's table) are measured, and are
	// parts of the whole (the check and the hash run at once).
	if steps := res.SetupSeconds + res.CopySeconds + max(res.CheckSeconds, res.HashSeconds); res.CopySeconds <= 0 ||
		res.CheckSeconds <= 0 || res.HashSeconds <= 0 || res.SetupSeconds <= 0 || steps > res.Seconds {
		t.Errorf("steps: setup %gs, copy %gs, check %gs, hash %gs, of %gs in all", res.SetupSeconds, res.CopySeconds, res.CheckSeconds, res.HashSeconds, res.Seconds)
	}
	check, err := qemu.Check(ctxT(t, time.Minute), res.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !check.Clean() {
		t.Errorf("qemu-img check %s: %+v", res.Path, check)
	}
	// A transfer's image is one its check proves clean in the worker
	// (internal/qcow2.Prove), without qemu-img.
	if _, err := qcow2.Prove(ctxT(t, time.Minute), res.Path); err != nil {
		t.Errorf("the image is not proven clean without qemu-img: %v", err)
	}
}

// TestTransferDiskFullThenIncremental: the copier writes the images
// itself (qcow2.Writer); and, the same again, through qemu-nbd
// (Transfer.QemuNBDTarget).
func TestTransferDiskFullThenIncremental(t *testing.T) {
	for _, writer := range []string{activities.WriterCopier, activities.WriterQemuNBD} {
		t.Run(writer, func(t *testing.T) { testFullThenIncremental(t, writer) })
	}
}

func testFullThenIncremental(t *testing.T, writer string) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	m := &recordedMetrics{}
	f.tr.Metrics = m
	f.tr.QemuNBDTarget = writer == activities.WriterQemuNBD
	testutil.CheckNoSockets(t, f.runDir)
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	key := vm.disks[1].Key
	capacity := vm.disks[1].Capacity

	f.apply(t, key,
		write{off: 0, n: 8 << 20, seed: 1},
		write{off: 3 << 30, n: 1<<20 + 12345, seed: 2},
		write{off: 4 << 30, n: 1 << 20, zero: true}, // allocated zeros: skipped on a fresh image
		write{off: capacity - 256<<10, n: 256 << 10, seed: 3},
	)
	full := f.takeBackup(t, env, vm, "full1", "*")
	// The guest goes on writing while the snapshot's data is copied: it
	// overwrites data, zeroes some, discards some, writes new data. The
	// full copy must not see any of it; the overlay must hide the backing
	// file wherever it changed.
	f.apply(t, key,
		write{off: 1 << 20, n: 512 << 10, seed: 4},
		write{off: 2 << 20, n: 1 << 20, zero: true},
		write{off: 5 << 20, n: 1 << 20, punch: true},
		write{off: 3<<30 + 4096, n: 100, seed: 5},
		write{off: 6 << 30, n: 2 << 20, seed: 6},
	)
	res := mustExecute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, full.input(""))
	f.checkResult(t, full, res)
	if diff := sameContent(t, f.frozen(t, full), res.Path); diff != "" {
		t.Fatalf("the full image differs from the disk at snapshot time: %s", diff)
	}
	// CBT answers in 64 KiB blocks, the source's block status in file
	// system blocks: the copy reads at least what the guest wrote, at most
	// what CBT reported, and writes no zeros into a fresh image.
	if written := int64(8<<20 + 1<<20 + 12345 + 256<<10 + 1<<20); res.ReadBytes < written || res.ReadBytes > full.changed.ChangedBytes ||
		res.WrittenBytes < written-(1<<20) || res.WrittenBytes > res.ReadBytes-(1<<20) {
		t.Errorf("full: read %d, wrote %d; the guest wrote %d bytes (1 MiB of them zeros), CBT reported %d",
			res.ReadBytes, res.WrittenBytes, written, full.changed.ChangedBytes)
	}
	info, err := qemu.Info(ctxT(t, time.Minute), res.Path)
	if err != nil {
		t.Fatal(err)
	}
	if len(info) != 1 || info[0].Format != "qcow2" || info[0].VirtualSize != capacity || info[0].BackingFilename != "" {
		t.Errorf("qemu-img info of the full image: %+v", info)
	}
	_, fullSum := fileSum(t, res.Path)
	// The NBD servers' folders go with their servers.
	if left, err := os.ReadDir(f.runDir); err != nil || len(left) != 0 {
		t.Errorf("the runtime folder holds %v after the transfer (%v): want nothing", left, err)
	}

	inc := f.takeBackup(t, env, vm, "inc2", full.disk.ChangeID)
	ires := mustExecute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, inc.input(res.Path))
	f.checkResult(t, inc, ires)
	if diff := sameContent(t, f.frozen(t, inc), ires.Path); diff != "" {
		t.Fatalf("the incremental chain differs from the disk at the second snapshot: %s", diff)
	}
	// The comparison can tell the two points in time apart.
	if diff := sameContent(t, f.frozen(t, full), ires.Path); diff == "" {
		t.Fatalf("the incremental chain equals the disk at the first snapshot: the test proves nothing")
	}
	if ires.WrittenBytes != inc.changed.ChangedBytes || ires.ReadBytes > inc.changed.ChangedBytes {
		t.Errorf("incremental: read %d, wrote %d (data and zeros), changed %d: every changed byte must be written",
			ires.ReadBytes, ires.WrittenBytes, inc.changed.ChangedBytes)
	}
	info, err = qemu.Info(ctxT(t, time.Minute), ires.Path)
	if err != nil {
		t.Fatal(err)
	}
	if len(info) != 2 || info[0].BackingFilename != filepath.Base(res.Path) || info[1].Filename != res.Path {
		t.Errorf("the overlay's chain: %+v, want a relative backing file %s", info, filepath.Base(res.Path))
	}
	// The previous restore point is untouched, and still the first snapshot.
	if _, sum := fileSum(t, res.Path); sum != fullSum {
		t.Errorf("the incremental transfer modified the full image")
	}
	if diff := sameContent(t, f.frozen(t, full), res.Path); diff != "" {
		t.Errorf("the full image changed: %s", diff)
	}

	// Nothing written since: an empty overlay, made without NBD servers
	// or a copy, checked and sealed like any other.
	same := f.takeBackup(t, env, vm, "inc3", inc.disk.ChangeID)
	if len(readExtentsFile(t, same.changed.ExtentsFile)) != 0 {
		t.Fatalf("CBT reports changes with nothing written: %+v", same.changed)
	}
	sres := mustExecute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, same.input(ires.Path))
	f.checkResult(t, same, sres)
	if sres.ReadBytes != 0 || sres.WrittenBytes != 0 {
		t.Errorf("unchanged disk: read %d, wrote %d, want nothing", sres.ReadBytes, sres.WrittenBytes)
	}
	if diff := sameContent(t, f.frozen(t, same), sres.Path); diff != "" {
		t.Errorf("the unchanged overlay differs from the disk: %s", diff)
	}
	if info, err := qemu.Info(ctxT(t, time.Minute), sres.Path); err != nil || len(info) != 3 || info[0].BackingFilename != filepath.Base(ires.Path) {
		t.Errorf("the unchanged overlay's chain: %+v (%v)", info, err)
	}
	if res.Writer != writer || ires.Writer != writer || sres.Writer != "" {
		t.Errorf("images written by %q and %q, and %q with nothing copied; want %q, %q and nothing", res.Writer, ires.Writer, sres.Writer, writer, writer)
	}

	// Bad inputs are permanent.
	bad := inc.input("")
	bad.BackupID = "inc4"
	bad.Mode = "incremental"
	_, err = execute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, bad)
	wantAppError(t, err, activities.ErrTypeInvalidInput, "backing")
	bad.BackingPath = f.frozen(t, full) // outside the repository
	_, err = execute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, bad)
	wantAppError(t, err, activities.ErrTypeInvalidInput, "outside the repository")
	bad.Mode = "differential"
	_, err = execute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, bad)
	wantAppError(t, err, activities.ErrTypeInvalidInput, "differential")

	// Each successful transfer reported its bytes and duration by mode;
	// the refused ones nothing.
	if len(m.transfers) != 3 {
		t.Fatalf("transfers reported: %+v, want the full and the two incrementals", m.transfers)
	}
	for i, want := range []struct {
		mode string
		res  *activities.TransferDiskResult
	}{{activities.ModeFull, res}, {activities.ModeIncremental, ires}} {
		got := m.transfers[i]
		if got.mode != want.mode || got.read != want.res.ReadBytes || got.written+got.zeroed != want.res.WrittenBytes ||
			got.written <= 0 || got.took <= 0 || got.took.Seconds() > want.res.Seconds+1 {
			t.Errorf("transfer %d reported as %+v; its result: %+v", i, got, *want.res)
		}
	}
	if got := m.transfers[2]; got.mode != activities.ModeIncremental || got.read != 0 || got.written+got.zeroed != 0 || got.took <= 0 {
		t.Errorf("the unchanged transfer reported as %+v", got)
	}
}

// cancelOnProgress is a worker interceptor that sees every heartbeat of
// TransferDisk and cancels the activity's context once stop approves of
// the progress: a worker dying in the middle of a copy.
type cancelOnProgress struct {
	interceptor.WorkerInterceptorBase
	stop func(activities.TransferProgress) bool

	mu       sync.Mutex
	cancel   context.CancelFunc
	last     activities.TransferProgress
	beats    int
	canceled bool
}

func (c *cancelOnProgress) InterceptActivity(ctx context.Context, next interceptor.ActivityInboundInterceptor) interceptor.ActivityInboundInterceptor {
	i := &cancelInbound{root: c}
	i.Next = next
	return i
}

func (c *cancelOnProgress) observe(p activities.TransferProgress) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.last = p
	c.beats++
	if !c.canceled && c.stop(p) {
		c.canceled = true
		c.cancel()
	}
}

// lastBeat returns the last heartbeat detail and whether the context was
// cancelled.
func (c *cancelOnProgress) lastBeat() (activities.TransferProgress, int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.last, c.beats, c.canceled
}

type cancelInbound struct {
	interceptor.ActivityInboundInterceptorBase
	root *cancelOnProgress
}

func (i *cancelInbound) Init(outbound interceptor.ActivityOutboundInterceptor) error {
	o := &cancelOutbound{root: i.root}
	o.Next = outbound
	return i.Next.Init(o)
}

func (i *cancelInbound) ExecuteActivity(ctx context.Context, in *interceptor.ExecuteActivityInput) (any, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	i.root.mu.Lock()
	i.root.cancel = cancel
	i.root.mu.Unlock()
	return i.Next.ExecuteActivity(ctx, in)
}

type cancelOutbound struct {
	interceptor.ActivityOutboundInterceptorBase
	root *cancelOnProgress
}

func (o *cancelOutbound) RecordHeartbeat(ctx context.Context, details ...any) {
	o.Next.RecordHeartbeat(ctx, details...)
	if len(details) == 1 {
		if p, ok := details[0].(activities.TransferProgress); ok {
			o.root.observe(p)
		}
	}
}

func TestTransferDiskResume(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	// Flush often, so the resume point moves in small steps.
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
	if total != 48<<20 {
		t.Fatalf("changed areas: %d bytes, want 48 MiB", total)
	}

	// Attempt 1 dies a third of the way in.
	ic := &cancelOnProgress{stop: func(p activities.TransferProgress) bool {
		return p.ResumePoint > 0 && p.Done >= total/3
	}}
	env1 := f.newEnv(t)
	env1.SetWorkerOptions(worker.Options{Interceptors: []interceptor.WorkerInterceptor{ic}})
	_, err := execute[activities.TransferDiskResult](t, env1, f.tr.TransferDisk, b.input(""))
	last, beats, canceled := ic.lastBeat()
	if !canceled || err == nil {
		t.Fatalf("attempt 1 was not interrupted (canceled %v, %d heartbeats, last %+v): %v", canceled, beats, last, err)
	}
	t.Logf("attempt 1 interrupted after %d heartbeats: %v; last heartbeat %+v", beats, err, last)
	path, err := f.repo.ImagePath(repository.Key{Profile: profileLab, VMUUID: vm.uuid, DiskKey: key, BackupID: b.id})
	if err != nil {
		t.Fatal(err)
	}
	if last.Path != path || last.ResumePoint <= 0 || last.Total != total {
		t.Fatalf("last heartbeat %+v: want the image %s, a resume point and total %d", last, path, total)
	}
	if diff := sameContent(t, f.frozen(t, b), path); diff == "" {
		t.Fatalf("attempt 1 finished its copy: nothing to resume")
	}
	var remaining int64
	for _, e := range readExtentsFile(t, b.changed.ExtentsFile) {
		remaining += e.End() - max(e.Offset, min(last.ResumePoint, e.End()))
	}
	if remaining <= 0 || remaining >= total {
		t.Fatalf("resume point %d leaves %d of %d bytes: not a partial copy", last.ResumePoint, remaining, total)
	}

	// Attempt 2 gets the last heartbeat's details, as a retry would.
	env2 := f.newEnv(t)
	env2.SetHeartbeatDetails(last)
	res := mustExecute[activities.TransferDiskResult](t, env2, f.tr.TransferDisk, b.input(""))
	if res.ReadBytes != remaining {
		t.Errorf("the resumed attempt read %d bytes, want the %d above resume point %d (of %d)", res.ReadBytes, remaining, last.ResumePoint, total)
	}
	f.checkResult(t, b, res)
	if diff := sameContent(t, f.frozen(t, b), res.Path); diff != "" {
		t.Fatalf("the resumed image differs from the disk at snapshot time: %s", diff)
	}
}

func TestTransferDiskReplacesStalePartial(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	key := vm.disks[1].Key
	f.apply(t, key, write{off: 0, n: 4 << 20, seed: 1}, write{off: 2 << 30, n: 4 << 20, seed: 2})
	b := f.takeBackup(t, env, vm, "stale1", "*")
	path, err := f.repo.PrepareImage(repository.Key{Profile: profileLab, VMUUID: vm.uuid, DiskKey: key, BackupID: b.id})
	if err != nil {
		t.Fatal(err)
	}

	// A partial QCOW2 of a dead attempt, with data where the disk has
	// none: reusing it would leave that data in the restore point.
	junkRaw := filepath.Join(f.dir, "junk.raw")
	stale := func() {
		t.Helper()
		_ = os.Remove(path)
		jf, err := os.Create(junkRaw)
		if err != nil {
			t.Fatal(err)
		}
		if err := jf.Truncate(b.disk.Capacity); err != nil {
			t.Fatal(err)
		}
		if _, err := jf.WriteAt(pattern(1<<20, 99), 1<<30); err != nil {
			t.Fatal(err)
		}
		if err := jf.Close(); err != nil {
			t.Fatal(err)
		}
		if err := qemu.Convert(ctxT(t, time.Minute), qemu.ConvertOptions{Source: junkRaw, SourceFormat: "raw",
			Target: path, TargetFormat: "qcow2"}); err != nil {
			t.Fatal(err)
		}
		if diff := sameContent(t, f.frozen(t, b), path); diff == "" {
			t.Fatal("the stale image equals the snapshot: the test proves nothing")
		}
	}
	for _, tc := range []struct {
		name    string
		details *activities.TransferProgress
		remove  bool
	}{
		{"no heartbeat details", nil, false},
		{"details of another image", &activities.TransferProgress{Path: path + ".other", ResumePoint: 3 << 30}, false},
		{"details but the image is gone", &activities.TransferProgress{Path: path, ResumePoint: 3 << 30}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stale()
			if tc.remove {
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
			}
			env := f.newEnv(t)
			if tc.details != nil {
				env.SetHeartbeatDetails(*tc.details)
			}
			res := mustExecute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, b.input(""))
			if res.ReadBytes != b.changed.ChangedBytes {
				t.Errorf("read %d bytes, want all %d: nothing may be resumed", res.ReadBytes, b.changed.ChangedBytes)
			}
			f.checkResult(t, b, res)
			if diff := sameContent(t, f.frozen(t, b), res.Path); diff != "" {
				t.Errorf("the image differs from the snapshot (stale data reused?): %s", diff)
			}
		})
	}
}

// mountTmpfs mounts a tmpfs of size on a fresh folder and unmounts it at
// cleanup (detaching it if something still holds it), so the test leaves
// nothing mounted. It needs CAP_SYS_ADMIN: without it the test fails,
// since a full or read-only repository cannot be had otherwise.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "size="+size+",mode=0700"); err != nil {
		t.Fatalf("mount a tmpfs on %s (the test needs root): %v", dir, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v (detaching it)", dir, err)
			if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
				t.Errorf("detach %s: %v", dir, err)
			}
		}
	})
	return dir
}

func TestTransferDiskRepositoryFaults(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	key := vm.disks[1].Key
	f.apply(t, key, write{off: 0, n: 16 << 20, seed: 1}, write{off: 1 << 30, n: 16 << 20, seed: 2})
	b := f.takeBackup(t, env, vm, "fault1", "*")

	// transfer runs TransferDisk with a repository at root.
	transfer := func(t *testing.T, root string, prepare func(*repository.Repository)) error {
		t.Helper()
		repo, err := repository.Open(root)
		if err != nil {
			t.Fatal(err)
		}
		if prepare != nil {
			prepare(repo)
		}
		tr := &activities.Transfer{Sessions: f.sessions, Repo: repo, RuntimeDir: f.runDir}
		_, err = execute[activities.TransferDiskResult](t, newActivityEnv(t, f.log, tr), tr.TransferDisk, b.input(""))
		return err
	}

	t.Run("no space", func(t *testing.T) {
		// Room for the QCOW2's metadata, not for 32 MiB of data: the
		// target's writes fail with ENOSPC in the middle of the copy.
		mnt := mountTmpfs(t, "8m")
		err := transfer(t, filepath.Join(mnt, "repo"), nil)
		wantAppError(t, err, activities.ErrTypeNoSpace)
		t.Logf("error: %v", err)
	})
	t.Run("no space for the image", func(t *testing.T) {
		mnt := mountTmpfs(t, "4k") // not even for the QCOW2 header and tables
		err := transfer(t, filepath.Join(mnt, "repo"), nil)
		wantAppError(t, err, activities.ErrTypeNoSpace)
		if err == nil || !strings.Contains(err.Error(), "create") {
			t.Errorf("error %v: not the image's creation", err)
		}
		t.Logf("error: %v", err)
		if es, _ := filepath.Glob(filepath.Join(mnt, "repo", "*", "*", "*", "*.qcow2")); len(es) > 0 {
			t.Errorf("a partial image is left: %v", es)
		}
	})
	t.Run("read-only", func(t *testing.T) {
		mnt := mountTmpfs(t, "8m")
		err := transfer(t, filepath.Join(mnt, "repo"), func(repo *repository.Repository) {
			if _, err := repo.PrepareImage(repository.Key{Profile: profileLab, VMUUID: vm.uuid, DiskKey: key, BackupID: b.id}); err != nil {
				t.Fatal(err)
			}
			if err := syscall.Mount("", mnt, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
				t.Fatalf("remount %s read-only: %v", mnt, err)
			}
		})
		wantAppError(t, err, activities.ErrTypeReadOnly)
		t.Logf("error: %v", err)
	})
	if t.Failed() {
		return
	}
	// The lab and the snapshot are fine: a good repository works.
	if err := transfer(t, filepath.Join(f.dir, "good-repo"), nil); err != nil {
		t.Errorf("transfer into a good repository: %v", err)
	}
}

func TestTransferDiskSnapshotGone(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	f.apply(t, vm.disks[1].Key, write{off: 0, n: 1 << 20, seed: 1})
	b := f.takeBackup(t, env, vm, "gone1", "*")
	if err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
		SnapshotRef: b.snap.SnapshotRef, SnapshotName: b.snap.SnapshotName}); err != nil {
		t.Fatal(err)
	}
	// The target's qemu-nbd is already running when the source fails to
	// open: it must be stopped (CheckNoChildren) and its socket removed.
	_, err := execute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, b.input(""))
	if err == nil || !strings.Contains(err.Error(), b.snap.SnapshotRef) {
		t.Fatalf("TransferDisk from a removed snapshot: %v, want an error naming %s", err, b.snap.SnapshotRef)
	}
	// No retry brings the snapshot back: the identity check before the
	// source is opened fails it at once.
	var app *temporal.ApplicationError
	if !errors.As(err, &app) || app.Type() != activities.ErrTypeSnapshotGone || !app.NonRetryable() {
		t.Errorf("TransferDisk from a removed snapshot: %v, want a non-retryable %s", err, activities.ErrTypeSnapshotGone)
	}
}
