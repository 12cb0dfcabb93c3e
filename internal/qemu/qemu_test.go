package qemu

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/testkit/testutil"
)

const mib = 1 << 20

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// writeRaw makes a sparse raw image of size bytes with random data at the
// given MiB offsets.
func writeRaw(t *testing.T, path string, size int64, seed uint64, mibs ...int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, 1))
	buf := make([]byte, mib)
	for _, m := range mibs {
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
		if _, err := f.WriteAt(buf, m*mib); err != nil {
			t.Fatal(err)
		}
	}
}

// nbdcopy runs libnbd's nbdcopy, which talks to the export over NBD.
func nbdcopy(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("nbdcopy", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("nbdcopy %q: %v: %s", args, err, out)
	}
}

func TestImageLifecycle(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	full := filepath.Join(dir, "chain", "full.qcow2")
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := Create(ctx, full, 64*mib); err != nil {
		t.Fatal(err)
	}
	if err := Create(ctx, full, 64*mib); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("second create over an existing image: err=%v", err)
	}
	if err := Create(ctx, filepath.Join(dir, "bad.qcow2"), 0); err == nil {
		t.Error("size 0 accepted")
	}
	over := filepath.Join(dir, "chain", "sub", "over.qcow2")
	if err := os.MkdirAll(filepath.Dir(over), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := CreateOverlay(ctx, over, full); err != nil {
		t.Fatal(err)
	}
	if err := CreateOverlay(ctx, filepath.Join(dir, "x.qcow2"), filepath.Join(dir, "missing.qcow2")); err == nil || !strings.Contains(err.Error(), "missing.qcow2") {
		t.Errorf("overlay on a missing backing file: err=%v", err)
	}

	// The chain survives a move of the whole folder: backing names are relative.
	moved := filepath.Join(dir, "moved")
	if err := os.Rename(filepath.Join(dir, "chain"), moved); err != nil {
		t.Fatal(err)
	}
	chain, err := Info(ctx, filepath.Join(moved, "sub", "over.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 {
		t.Fatalf("chain has %d images, want 2: %+v", len(chain), chain)
	}
	if chain[0].BackingFilename != "../full.qcow2" || chain[0].VirtualSize != 64*mib || chain[1].Format != "qcow2" {
		t.Errorf("chain = %+v", chain)
	}
	if got, want := chain[1].Filename, filepath.Join(moved, "sub", "../full.qcow2"); filepath.Clean(got) != filepath.Clean(want) {
		t.Errorf("backing resolved to %s, want %s", got, want)
	}

	res, err := Check(ctx, filepath.Join(moved, "full.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if !res.Clean() {
		t.Errorf("fresh image not clean: %+v", res)
	}
	// Damage the header's L1 table offset: check must not call it clean.
	bad := filepath.Join(dir, "bad.qcow2")
	if err := Create(ctx, bad, 64*mib); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(bad, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// l1_table_offset lives at byte 40 of the header.
	if _, err := f.WriteAt([]byte{0, 0, 0, 0, 0, 0, 0x10, 0x01}, 40); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if res, err := Check(ctx, bad); err == nil && res.Clean() {
		t.Errorf("damaged image checked clean: %+v", res)
	}
}

func TestCompareAndConvert(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	a := filepath.Join(dir, "a.raw")
	writeRaw(t, a, 32*mib, 1, 3, 17)
	q := filepath.Join(dir, "a.qcow2")
	if err := Convert(ctx, ConvertOptions{Source: a, SourceFormat: "raw", Target: q, TargetFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	if diff, err := Compare(ctx, a, "raw", q, "qcow2"); err != nil || diff != "" {
		t.Fatalf("converted image differs: %q %v", diff, err)
	}
	b := filepath.Join(dir, "b.raw")
	writeRaw(t, b, 32*mib, 1, 3, 18)
	diff, err := Compare(ctx, b, "raw", q, "qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(diff, "mismatch") {
		t.Errorf("different images: diff=%q", diff)
	}
	if _, err := Compare(ctx, filepath.Join(dir, "none.raw"), "raw", q, "qcow2"); err == nil {
		t.Error("compare of a missing file: no error")
	}
}

func TestQemuNBDServesAndStops(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src := filepath.Join(dir, "src.raw")
	writeRaw(t, src, 16*mib, 2, 0, 5, 15)
	img := filepath.Join(dir, "t.qcow2")
	if err := Create(ctx, img, 16*mib); err != nil {
		t.Fatal(err)
	}
	exp, err := StartQemuNBD(ctx, QemuNBDOptions{Image: img, Format: "qcow2", Dir: filepath.Join(dir, "sock")})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, "sock"))
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode %v, %v; want 0700", fi.Mode().Perm(), err)
	}
	nbdcopy(t, "--flush", src, exp.URI())
	// Readers may connect while a writer is connected (-e 4).
	nbdcopy(t, exp.URI(), filepath.Join(dir, "back.raw"))
	if err := exp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := exp.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := os.Stat(exp.Socket()); !os.IsNotExist(err) {
		t.Errorf("socket still there after Close: %v", err)
	}
	if diff, err := Compare(ctx, src, "raw", img, "qcow2"); err != nil || diff != "" {
		t.Fatalf("image differs from what was written: %q %v", diff, err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "back.raw"))
	want, _ := os.ReadFile(src)
	if !bytes.Equal(got, want) {
		t.Error("data read back over NBD differs")
	}

	// Read-only raw export refuses writes.
	ro, err := StartQemuNBD(ctx, QemuNBDOptions{Image: src, Format: "raw", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if out, err := exec.Command("nbdcopy", src, ro.URI()).CombinedOutput(); err == nil {
		t.Errorf("write to a read-only export succeeded: %s", out)
	}
	sockDir := filepath.Dir(ro.Socket())
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sockDir); !os.IsNotExist(err) {
		t.Errorf("private socket directory %s not removed: %v", sockDir, err)
	}
}

func TestStartFailsClearly(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	_, err := StartQemuNBD(ctx, QemuNBDOptions{Image: filepath.Join(dir, "missing.qcow2"), Format: "qcow2"})
	if err == nil || !strings.Contains(err.Error(), "missing.qcow2") {
		t.Errorf("missing image: err=%v", err)
	}
	long := filepath.Join(dir, strings.Repeat("d", 120))
	if _, err := StartNbdkit(ctx, NbdkitFile(filepath.Join(dir, "x"), true)); err == nil {
		t.Error("nbdkit on a missing file started")
	}
	if _, err := StartQemuNBD(ctx, QemuNBDOptions{Image: "x", Format: "raw", Dir: long}); err == nil || !strings.Contains(err.Error(), "longer") {
		t.Errorf("long socket path: err=%v", err)
	}
}

// attempts is a 16 MiB image in a test's folder and what starts qemu-nbd
// on it in one socket folder, as the attempts of one transfer do: a start
// stops the server an earlier one left there.
type attempts struct {
	ctx      context.Context
	dir, img string
	sockDir  string
}

func newAttempts(t *testing.T) *attempts {
	t.Helper()
	testutil.CheckNoChildren(t)
	a := &attempts{ctx: ctxT(t), dir: t.TempDir()}
	testutil.CheckNoSockets(t, a.dir)
	a.img, a.sockDir = filepath.Join(a.dir, "t.qcow2"), filepath.Join(a.dir, "s")
	if err := Create(a.ctx, a.img, 16*mib); err != nil {
		t.Fatal(err)
	}
	return a
}

func (a *attempts) start() (*Export, error) {
	return StartQemuNBD(a.ctx, QemuNBDOptions{Image: a.img, Format: "qcow2", Dir: a.sockDir})
}

// A retry after a killed worker finds the previous server still holding
// the image's write lock; starting in the same Dir stops it first.
func TestRestartStopsStaleServer(t *testing.T) {
	a := newAttempts(t)
	ctx, dir, img := a.ctx, a.dir, a.img
	first, err := a.start()
	if err != nil {
		t.Fatal(err)
	}
	// Without the stale-server check the second qemu-nbd would fail on the
	// image's write lock.
	second, err := a.start()
	if err != nil {
		t.Fatalf("restart in the same directory: %v", err)
	}
	select {
	case <-first.Done():
	case <-time.After(5 * time.Second):
		t.Error("stale server still running")
	}
	src := filepath.Join(dir, "src.raw")
	writeRaw(t, src, 16*mib, 3, 1)
	nbdcopy(t, "--flush", src, second.URI())
	if err := second.Close(); err != nil {
		t.Fatal(err)
	}
	_ = first.Close()
	if diff, err := Compare(ctx, src, "raw", img, "qcow2"); err != nil || diff != "" {
		t.Fatalf("image differs: %q %v", diff, err)
	}
}

// A server stopped as stale by a later start in the same folder (a retry
// of the same transfer) and closed after it leaves the later server's
// socket and pid file alone: the later server still answers on its
// socket, and its own Close removes them.
func TestCloseLeavesALaterServersFiles(t *testing.T) {
	a := newAttempts(t)
	first, err := a.start()
	if err != nil {
		t.Fatal(err)
	}
	second, err := a.start()
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if second.Socket() != first.Socket() {
		t.Fatalf("the two servers' sockets are %s and %s: want one path", first.Socket(), second.Socket())
	}
	if err := first.Close(); err != nil {
		t.Fatalf("close of the stale server: %v", err)
	}
	if !Greets("unix", second.Socket()) {
		t.Fatal("the later server no longer answers on its socket once the stale one was closed")
	}
	pidFile := filepath.Join(a.sockDir, pidFileName)
	if b, err := os.ReadFile(pidFile); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(second.Pid()) {
		t.Fatalf("pid file after the stale server's close: %q, %v; want the later server's pid %d", b, err, second.Pid())
	}
	if err := second.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{second.Socket(), pidFile} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is left after the later server's close (%v)", p, err)
		}
	}
}

// A start that stops a stale server in its folder succeeds while the
// stale server's owner closes it as it exits (two attempts of one transfer
// overlapping): the pid file that Close removed meanwhile is not an error
// of the start. (Before, about a third of these starts failed: "remove
// .../nbd.pid: no such file or directory".)
func TestStartWhileStaleServerCloses(t *testing.T) {
	a := newAttempts(t)
	for i := range 20 {
		stale, err := a.start()
		if err != nil {
			t.Fatal(err)
		}
		closed := make(chan struct{})
		go func() {
			defer close(closed)
			<-stale.Done()
			_ = stale.Close()
		}()
		later, err := a.start()
		<-closed
		if err != nil {
			t.Fatalf("start %d, stopping a stale server that its owner closes meanwhile: %v", i+1, err)
		}
		if !Greets("unix", later.Socket()) {
			t.Fatalf("start %d: the server does not answer on its socket once the stale one was closed", i+1)
		}
		if err := later.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestKillThenRestartOnSameImage(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	img := filepath.Join(dir, "t.qcow2")
	if err := Create(ctx, img, 16*mib); err != nil {
		t.Fatal(err)
	}
	exp, err := StartQemuNBD(ctx, QemuNBDOptions{Image: img, Format: "qcow2"})
	if err != nil {
		t.Fatal(err)
	}
	if err := exp.Kill(); err != nil {
		t.Fatal(err)
	}
	again, err := StartQemuNBD(ctx, QemuNBDOptions{Image: img, Format: "qcow2"})
	if err != nil {
		t.Fatalf("restart after kill: %v", err)
	}
	if err := again.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestNbdkitFilters(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src := filepath.Join(dir, "src.raw")
	writeRaw(t, src, 8*mib, 4, 2)
	stats := filepath.Join(dir, "stats.txt")
	o := NbdkitFile(src, true)
	o.Filters = []string{"stats"}
	o.Params = append(o.Params, "statsfile="+stats)
	exp, err := StartNbdkit(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	nbdcopy(t, exp.URI(), filepath.Join(dir, "out.raw"))
	if err := exp.Close(); err != nil {
		t.Fatal(err)
	}
	// The stats filter writes its file when nbdkit exits cleanly.
	b, err := os.ReadFile(stats)
	if err != nil {
		t.Fatalf("stats file: %v", err)
	}
	if !strings.Contains(string(b), "read:") {
		t.Errorf("stats file has no reads: %s", b)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "out.raw"))
	want, _ := os.ReadFile(src)
	if !bytes.Equal(got, want) {
		t.Error("data read over nbdkit differs")
	}
}

func TestCompareSizeMismatch(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.raw"), filepath.Join(dir, "b.raw")
	writeRaw(t, a, 8*mib, 1)
	writeRaw(t, b, 9*mib, 1)
	diff, err := Compare(ctx, a, "raw", b, "raw")
	if err != nil || !strings.Contains(diff, "size mismatch") {
		t.Errorf("diff=%q err=%v", diff, err)
	}
}

// Check of an image whose backing chain comes back to it (damage, or a
// hostile file in the repository) fails at once, naming the loop, where
// qemu-img check spun for ever; so does the check of an overlay whose
// backing file is gone, as it did.
func TestCheckRefusesALoopingChain(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // a spinning check ends here, failed
	defer cancel()

	// loop.qcow2 is its own backing file; a.qcow2 and b.qcow2 each other's.
	loop, a, b := filepath.Join(dir, "loop.qcow2"), filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	for _, p := range []string{loop, a, b} {
		if err := Create(ctx, p, 64*mib); err != nil {
			t.Fatal(err)
		}
	}
	for _, rb := range [][2]string{{loop, "loop.qcow2"}, {a, "b.qcow2"}, {b, "a.qcow2"}} {
		if out, err := exec.Command(QemuImg, "rebase", "-u", "-F", "qcow2", "-b", rb[1], rb[0]).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img rebase: %v: %s", err, out)
		}
	}
	base, over := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "over.qcow2")
	if err := Create(ctx, base, 64*mib); err != nil {
		t.Fatal(err)
	}
	if err := CreateOverlay(ctx, over, base); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct{ path, want string }{{loop, "infinite loop"}, {a, "infinite loop"}, {over, "base.qcow2"}} {
		res, err := Check(ctx, c.path)
		if ctx.Err() != nil {
			t.Fatalf("check of %s did not end: %v", filepath.Base(c.path), err)
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("check of %s = %+v, %v; want an error naming %q", filepath.Base(c.path), res, err, c.want)
		}
	}
}
