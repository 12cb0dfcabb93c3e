package copier_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/nbd"
	"github.com/cbtflow/cbtflow/testkit/nbdtest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

const MiB = 1 << 20

// source is a sparse raw test image and what it holds.
type source struct {
	path    string
	size    int64
	data    []int64 // offsets of random 1 MiB pieces
	zeros   []int64 // offsets of 1 MiB pieces written as explicit zeros
	extents []copier.Extent
	nonzero int64
}

// fill writes fast pseudo-random bytes (never an all-zero 8-byte word).
func fill(r *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64()|1)
	}
}

// makeSource builds a sparse raw image of size bytes with nData random and
// nZero explicitly zeroed 1 MiB pieces at distinct random MiB slots. Its
// extents are the allocated areas, as CBT "*" would report them, plus a few
// wide extents over holes, which the copier must not read.
func makeSource(t *testing.T, dir string, size int64, nData, nZero int, seed uint64) *source {
	t.Helper()
	s := &source{path: filepath.Join(dir, "src.raw"), size: size}
	f, err := os.Create(s.path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	slots := r.Perm(int(size / MiB))
	for _, sl := range slots[:nData] {
		s.data = append(s.data, int64(sl)*MiB)
	}
	for _, sl := range slots[nData : nData+nZero] {
		s.zeros = append(s.zeros, int64(sl)*MiB)
	}
	slices.Sort(s.data)
	buf := make([]byte, MiB)
	for _, off := range s.data {
		fill(r, buf)
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	clear(buf)
	for _, off := range s.zeros {
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	s.nonzero = int64(nData) * MiB
	var ex []copier.Extent
	for _, off := range append(slices.Clone(s.data), s.zeros...) {
		ex = append(ex, copier.Extent{Offset: off, Length: MiB})
	}
	// Wide areas over holes (CBT may report more than what was written).
	for i := 0; i < 4; i++ {
		ex = append(ex, copier.Extent{Offset: r.Int64N(size/MiB-16) * MiB, Length: 16 * MiB})
	}
	s.extents = mergeExtents(ex)
	return s
}

// mergeExtents sorts and merges overlapping or touching extents.
func mergeExtents(ex []copier.Extent) []copier.Extent {
	slices.SortFunc(ex, func(a, b copier.Extent) int { return int(a.Offset - b.Offset) })
	var out []copier.Extent
	for _, e := range ex {
		if n := len(out); n > 0 && e.Offset <= out[n-1].End() {
			out[n-1].Length = max(out[n-1].End(), e.End()) - out[n-1].Offset
			continue
		}
		out = append(out, e)
	}
	return out
}

func total(ex []copier.Extent) int64 {
	var n int64
	for _, e := range ex {
		n += e.Length
	}
	return n
}

func run(t *testing.T, dir string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// compare runs qemu-img compare and returns nil when the images are
// identical.
func compare(t *testing.T, raw, qcow2 string) error {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, qcow2).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 1 {
		return fmt.Errorf("images differ: %s", strings.TrimSpace(string(out)))
	}
	if err != nil {
		t.Fatalf("qemu-img compare: %v: %s", err, out)
	}
	return nil
}

// serveTarget serves a QCOW2 image read-write the way TransferDisk does.
func serveTarget(t *testing.T, dir, img string) *nbdtest.Server {
	return nbdtest.StartQemuNBD(t, dir, "-f", "qcow2", "-e", "4", "--cache=writeback", "--discard=unmap", img)
}

// serveSource serves raw read-only with nbdkit's file plugin; filter
// arguments (--filter=…) and their parameters are split around the plugin.
func serveSource(t *testing.T, dir, raw string, filterArgs ...string) *nbdtest.Server {
	args := []string{"-r"}
	var params []string
	for _, a := range filterArgs {
		if strings.HasPrefix(a, "--filter=") {
			args = append(args, a)
		} else {
			params = append(params, a)
		}
	}
	args = append(args, "file", raw)
	return nbdtest.StartNbdkit(t, dir, append(args, params...)...)
}

func allocated(t *testing.T, path string) int64 {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestFullAndIncremental(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src := makeSource(t, dir, 4<<30, 1024, 64, 1)
	full := filepath.Join(dir, "full.qcow2")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", full, "4G")

	t.Run("full", func(t *testing.T) {
		s := serveSource(t, dir, src.path)
		d := serveTarget(t, dir, full)
		var last copier.Progress
		calls := 0
		res, err := copier.Copy(context.Background(), copier.Options{
			Source: s.URI, Target: d.URI, Extents: src.extents,
			Progress: func(p copier.Progress) { last = p; calls++ },
		})
		if err != nil {
			t.Fatal(err)
		}
		d.Stop()
		s.Stop()
		t.Logf("full copy: %+v (extents %d bytes in %d, %d progress calls)", *res, total(src.extents), len(src.extents), calls)
		if err := compare(t, src.path, full); err != nil {
			t.Fatal(err)
		}
		if res.Written != src.nonzero {
			t.Errorf("written %d bytes; want exactly the non-zero data %d", res.Written, src.nonzero)
		}
		// Holes are known from block status and never read.
		if allocatedSrc := int64(len(src.data)+len(src.zeros)) * MiB; res.Read != allocatedSrc {
			t.Errorf("read %d bytes; want the allocated %d", res.Read, allocatedSrc)
		}
		if res.Zeroed != 0 {
			t.Errorf("zeroed %d bytes on a fresh image", res.Zeroed)
		}
		if res.Skipped != total(src.extents)-src.nonzero {
			t.Errorf("skipped %d; want %d", res.Skipped, total(src.extents)-src.nonzero)
		}
		if a := allocated(t, full); a > src.nonzero+8*MiB {
			t.Errorf("full.qcow2 holds %d bytes; want at most the %d non-zero bytes plus metadata", a, src.nonzero)
		}
		if last.Done != last.Total || last.ResumePoint != src.extents[len(src.extents)-1].End() || res.ResumePoint != last.ResumePoint {
			t.Errorf("last progress %+v; want done = total and the resume point at the end", last)
		}
	})
	if t.Failed() {
		return
	}

	t.Run("incremental", func(t *testing.T) {
		// 1% of the disk in scattered 64 KiB changes: new data, zero bytes
		// or punched holes, the latter two over data the full image holds.
		r := rand.New(rand.NewPCG(7, 8))
		f, err := os.OpenFile(src.path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		const piece = 64 << 10
		n := int(src.size / 100 / piece)
		var changed []copier.Extent
		var toZero int64
		buf := make([]byte, piece)
		seen := map[int64]bool{}
		for i := 0; i < n; i++ {
			var off int64
			kind := i % 4 // 0,1: new data anywhere; 2: zero bytes; 3: hole
			if kind >= 2 {
				off = src.data[r.IntN(len(src.data))] + r.Int64N(MiB/piece)*piece
			} else {
				off = r.Int64N(src.size/piece) * piece
			}
			if seen[off] {
				continue
			}
			seen[off] = true
			switch kind {
			case 0, 1:
				fill(r, buf)
				_, err = f.WriteAt(buf, off)
			case 2:
				clear(buf)
				_, err = f.WriteAt(buf, off)
				toZero += piece
			case 3:
				err = syscall.Fallocate(int(f.Fd()), 0x01|0x02, off, piece) // KEEP_SIZE|PUNCH_HOLE
				toZero += piece
			}
			if err != nil {
				t.Fatal(err)
			}
			changed = append(changed, copier.Extent{Offset: off, Length: piece})
		}
		f.Close()
		changed = mergeExtents(changed)

		s := serveSource(t, dir, src.path)
		copyInto := func(name string, overlay bool) *copier.Result {
			img := filepath.Join(dir, name)
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2", name)
			d := serveTarget(t, dir, img)
			defer d.Stop()
			res, err := copier.Copy(context.Background(), copier.Options{
				Source: s.URI, Target: d.URI, Extents: changed, Overlay: overlay,
			})
			if err != nil {
				t.Fatal(err)
			}
			return res
		}
		res := copyInto("over.qcow2", true)
		t.Logf("incremental: %+v (%d bytes changed)", *res, total(changed))
		if err := compare(t, src.path, filepath.Join(dir, "over.qcow2")); err != nil {
			t.Fatalf("overlay: %v", err)
		}
		if res.Zeroed < toZero || res.Skipped != 0 {
			t.Errorf("zeroed %d, skipped %d; want ≥ %d zeroed and nothing skipped in an overlay", res.Zeroed, res.Skipped, toZero)
		}
		// The check above has teeth: treating the overlay as a fresh image
		// lets the backing data show through.
		copyInto("wrong.qcow2", false)
		if err := compare(t, src.path, filepath.Join(dir, "wrong.qcow2")); err == nil {
			t.Fatal("an overlay copied with zero chunks skipped compares identical: the test cannot see skipped zeros")
		}
	})
}

// smallSource is a 256 MiB image with 64 MiB of data for the slower tests.
func smallSource(t *testing.T, dir string) (*source, string) {
	src := makeSource(t, dir, 256*MiB, 64, 8, 3)
	img := filepath.Join(dir, "dst.qcow2")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", img, "256M")
	return src, img
}

func TestFaultPersistentNamesOffset(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src, img := smallSource(t, dir)
	errFile := filepath.Join(dir, "fail-now")
	s := serveSource(t, dir, src.path, "--filter=error", "error=EIO", "error-pread-rate=100%", "error-file="+errFile)
	d := serveTarget(t, dir, img)
	half := total(src.extents) / 2
	start := time.Now()
	_, err := copier.Copy(context.Background(), copier.Options{
		Source: s.URI, Target: d.URI, Extents: src.extents,
		RequestSize: 256 << 10, RetryBackoff: 5 * time.Millisecond, ProgressInterval: time.Millisecond,
		Progress: func(p copier.Progress) {
			// From the middle on, every read fails.
			if p.Done >= half {
				if f, err := os.Create(errFile); err == nil {
					f.Close()
				}
			}
		},
	})
	if err == nil {
		t.Fatal("copy succeeded although the source failed every read")
	}
	t.Logf("error after %v: %v", time.Since(start), err)
	var ne *nbd.Error
	if !errors.As(err, &ne) || ne.Op != "pread" || !errors.Is(err, syscall.EIO) {
		t.Fatalf("error %v does not wrap the failed pread with EIO", err)
	}
	if ne.Offset < 0 || !strings.Contains(err.Error(), fmt.Sprintf("offset %d", ne.Offset)) {
		t.Fatalf("error %q does not name the offset", err)
	}
	inside := false
	for _, e := range src.extents {
		inside = inside || (ne.Offset >= e.Offset && ne.Offset < e.End())
	}
	if !inside {
		t.Errorf("offset %d named by the error is in no extent", ne.Offset)
	}
	if !strings.Contains(err.Error(), "4 attempts") {
		t.Errorf("error %q: want the request tried 1+3 times", err)
	}
}

func TestFaultRareIsRetried(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src, img := smallSource(t, dir)
	s := serveSource(t, dir, src.path, "--filter=error", "error=EIO", "error-pread-rate=2%")
	d := serveTarget(t, dir, img)
	res, err := copier.Copy(context.Background(), copier.Options{
		Source: s.URI, Target: d.URI, Extents: src.extents,
		RequestSize: 64 << 10, Retries: 6, RetryBackoff: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	d.Stop()
	t.Logf("%+v", *res)
	if res.Retried == 0 {
		t.Error("no request was retried at a 2% error rate over 1000+ reads")
	}
	if err := compare(t, src.path, img); err != nil {
		t.Fatal(err)
	}
}

func TestResumeAfterTargetKilled(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src, img := smallSource(t, dir)
	s := serveSource(t, dir, src.path)
	d := serveTarget(t, dir, img)
	half := total(src.extents) / 2
	var resume, doneAtKill int64
	killed := false
	_, err := copier.Copy(context.Background(), copier.Options{
		Source: s.URI, Target: d.URI, Extents: src.extents,
		RequestSize: 256 << 10, InFlight: 4, FlushBytes: 8 * MiB, ProgressInterval: time.Millisecond,
		Progress: func(p copier.Progress) {
			if killed {
				return
			}
			resume = p.ResumePoint
			if p.Done >= half && p.ResumePoint > 0 {
				// A crash: qemu-nbd loses what was not flushed.
				d.Kill()
				killed, doneAtKill = true, p.Done
			}
		},
	})
	if !killed {
		t.Fatalf("the target was never killed (err %v)", err)
	}
	if err == nil {
		t.Fatal("copy succeeded although its target was killed")
	}
	t.Logf("killed at done %d, resume point %d: %v", doneAtKill, resume, err)
	if resume <= 0 || resume >= src.extents[len(src.extents)-1].End() {
		t.Fatalf("resume point %d is not in the middle", resume)
	}

	if err := syscall.Kill(s.Pid(), 0); err != nil {
		t.Fatalf("source nbdkit gone: %v: %s", err, s.Stderr())
	}
	d2 := serveTarget(t, dir, img)
	res, err := copier.Copy(context.Background(), copier.Options{
		Source: s.URI, Target: d2.URI, Extents: src.extents, ResumeFrom: resume,
	})
	if err != nil {
		fi, serr := os.Stat(s.Socket)
		t.Logf("socket %v %v; ls: %s", fi, serr, run(t, dir, "ls", "-la", dir))
		t.Fatalf("%v; source stderr: %s", err, s.Stderr())
	}
	d2.Stop()
	var below int64
	for _, e := range src.extents {
		if e.Offset < resume {
			below += min(e.End(), resume) - e.Offset
		}
	}
	t.Logf("resumed: %+v, %d extent bytes below the resume point", *res, below)
	if res.Read > total(src.extents)-below {
		t.Errorf("resumed copy read %d bytes; want at most the %d above the resume point", res.Read, total(src.extents)-below)
	}
	if err := compare(t, src.path, img); err != nil {
		t.Fatal(err)
	}
	// A crash may leak clusters (exit status 3), never corrupt metadata.
	out, err := exec.Command("qemu-img", "check", "-f", "qcow2", img).CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 3) {
		t.Fatalf("qemu-img check: %v: %.500s", err, out)
	}
}

func TestCancelStopsPromptly(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src, img := smallSource(t, dir)
	// A slow source: the copy would take many seconds.
	s := serveSource(t, dir, src.path, "--filter=delay", "delay-read=50ms")
	d := serveTarget(t, dir, img)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	time.AfterFunc(300*time.Millisecond, cancel)
	start := time.Now()
	_, err := copier.Copy(ctx, copier.Options{Source: s.URI, Target: d.URI, Extents: src.extents})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v; want context.Canceled", err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("cancelled copy returned after %v", el)
	}
	// The connections are closed: the target serves a new client at once
	// and the image is consistent.
	h, err := nbd.Connect(d.URI)
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
}

// TestSourceConnections checks that reads are spread over several source
// connections only when the source advertises multi-conn, and the copy
// holds 32 MiB of data or more.
func TestSourceConnections(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	src, _ := smallSource(t, dir) // 64 MiB of data
	little := makeSource(t, t.TempDir(), 256*MiB, 31, 0, 5)
	little.extents = nil // its data only: CBT's areas of a small incremental
	for _, off := range little.data {
		little.extents = append(little.extents, copier.Extent{Offset: off, Length: MiB})
	}
	little.extents = mergeExtents(little.extents)
	for _, tc := range []struct {
		name  string
		src   *source
		args  []string
		conns int
	}{
		{"multi-conn", src, nil, copier.DefaultSourceConnections},
		{"no multi-conn", src, []string{"--filter=multi-conn", "multi-conn-mode=disable"}, 1},
		{"multi-conn, 31 MiB of data", little, nil, 1},
	} {
		src := tc.src
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(dir, "conns.qcow2")
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", img, "256M")
			logFile := filepath.Join(dir, "log.txt")
			os.Remove(logFile)
			s := serveSource(t, dir, src.path, append([]string{"--filter=log", "logfile=" + logFile}, tc.args...)...)
			d := serveTarget(t, dir, img)
			res, err := copier.Copy(context.Background(), copier.Options{Source: s.URI, Target: d.URI, Extents: src.extents})
			if err != nil {
				t.Fatal(err)
			}
			s.Stop()
			d.Stop()
			if err := compare(t, src.path, img); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(logFile)
			if err != nil {
				t.Fatal(err)
			}
			if n := strings.Count(string(b), " Connect "); n != tc.conns {
				t.Errorf("%d source connections; want %d (%+v)", n, tc.conns, *res)
			}
		})
	}
}
