package merge

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/testkit/testutil"
	"golang.org/x/sys/unix"
)

const mib = 1 << 20

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func run(t *testing.T, prog string, args ...string) string {
	t.Helper()
	out, err := exec.Command(prog, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v: %s", prog, args, err, out)
	}
	return string(out)
}

// qio runs qemu-io commands (e.g. "write -P 0x11 0 1M", "write -z 4M 1M",
// "discard 8M 1M") on a QCOW2 image.
func qio(t *testing.T, img string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	run(t, "qemu-io", append(args, img)...)
}

// chain makes images named i1.qcow2 … in dir: i1 a full image of 64 MiB,
// each next one an overlay on the one before (relative backing name), and
// applies writes[i] to image i.
func chain(t *testing.T, dir string, writes ...[]string) []string {
	t.Helper()
	var imgs []string
	for i, w := range writes {
		p := filepath.Join(dir, fmt.Sprintf("i%d.qcow2", i+1))
		if i == 0 {
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
		} else {
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", filepath.Base(imgs[i-1]), "-F", "qcow2", p)
		}
		if len(w) > 0 {
			qio(t, p, w...)
		}
		imgs = append(imgs, p)
	}
	return imgs
}

// rawView reads the whole view of a QCOW2 (through its chain) as qemu-img
// convert writes it raw.
func rawView(t *testing.T, img string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "view.raw")
	run(t, "qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", img, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type fileState struct {
	sum   string
	mtime time.Time
	ctime int64
}

func states(t *testing.T, paths ...string) map[string]fileState {
	t.Helper()
	m := map[string]fileState{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		_, st, err := integrity.StampOf(p)
		if err != nil {
			t.Fatal(err)
		}
		s := sha256.Sum256(b)
		m[p] = fileState{hex.EncodeToString(s[:]), fi.ModTime(), st.CtimeNs}
	}
	return m
}

func checkUnchanged(t *testing.T, before map[string]fileState) {
	t.Helper()
	for p, s := range before {
		now := states(t, p)[p]
		if now != s {
			t.Errorf("input %s changed: before %+v, after %+v", filepath.Base(p), s, now)
		}
	}
}

func sumFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// checkMerged proves the result of j: same view as Top (qemu-img compare
// and byte for byte), backing file Base by relative name, a sound image,
// and Result's size and SHA-256 are Temp's.
func checkMerged(t *testing.T, ctx context.Context, j Job, res Result) {
	t.Helper()
	out, err := exec.CommandContext(ctx, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", j.Temp, j.Top).CombinedOutput()
	if err != nil {
		t.Errorf("qemu-img compare %s %s: %v: %s", j.Temp, j.Top, err, out)
	}
	a, b := rawView(t, j.Temp), rawView(t, j.Top)
	if !bytes.Equal(a, b) {
		t.Errorf("raw views differ (%d and %d bytes) at byte %d", len(a), len(b), firstDiff(a, b))
	}
	want := ""
	if j.Base != "" {
		want = filepath.Base(j.Base)
	}
	got, err := integrity.BackingFile(j.Temp)
	if err != nil || got != want || res.Backing != want {
		t.Errorf("backing file of the result = %q (%v), Result.Backing %q; want %q", got, err, res.Backing, want)
	}
	if want != "" {
		info := run(t, "qemu-img", "info", "-U", "--output=json", j.Temp)
		if !strings.Contains(info, `"backing-filename-format": "qcow2"`) {
			t.Errorf("result's backing format is not qcow2: %s", info)
		}
	}
	fi, err := os.Stat(j.Temp)
	if err != nil {
		t.Fatal(err)
	}
	if res.Size != fi.Size() || res.SHA256 != sumFile(t, j.Temp) {
		t.Errorf("Result size %d sha %s; file has %d, %s", res.Size, res.SHA256, fi.Size(), sumFile(t, j.Temp))
	}
	if _, st, _ := integrity.StampOf(j.Temp); st != res.Stamp {
		t.Errorf("Result.Stamp %+v, file's %+v", res.Stamp, st)
	}
	run(t, "qemu-img", "check", "-f", "qcow2", j.Temp)
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// zeroAt reports whether the view of img holds only zeros in [off, off+n).
func zeroAt(t *testing.T, img string, off, n int) bool {
	t.Helper()
	v := rawView(t, img)
	return bytes.Count(v[off:off+n], []byte{0}) == n
}

// fiveChain is a chain of five images whose writes overlap: data over
// data, zero writes and discards over older data, in every layer.
func fiveChain(t *testing.T, dir string) []string {
	return chain(t, dir,
		[]string{"write -P 0x11 0 8M", "write -P 0x12 16M 4M", "write -P 0x13 40M 2M", "write -P 0x14 60M 4M"},
		[]string{"write -P 0x21 4M 4M", "write -z 16M 1M", "write -P 0x22 24M 2M", "write -z -u 60M 1M"},
		[]string{"write -P 0x31 6M 4M", "discard 40M 1M", "write -z 24M 512K", "write -P 0x32 17M 64K"},
		[]string{"write -P 0x41 30M 2M", "write -z 0 1M", "write -P 0x42 16M 512K"},
		[]string{"write -P 0x51 50M 1M", "write -P 0x52 7M 2M"},
	)
}

func TestMerge(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	tests := []struct {
		name    string
		top     int   // index of Top in the chain
		removed []int // nearest first
		base    int   // -1: none
	}{
		{"remove the full", 1, []int{0}, -1},
		{"remove the full and two more", 3, []int{2, 1, 0}, -1},
		{"remove one middle image", 2, []int{1}, 0},
		{"remove three consecutive", 4, []int{3, 2, 1}, 0},
		{"remove two below the top", 4, []int{3, 2}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			imgs := fiveChain(t, dir)
			j := Job{Top: imgs[tt.top], Temp: filepath.Join(dir, "merge.tmp")}
			for _, r := range tt.removed {
				j.Removed = append(j.Removed, imgs[r])
			}
			if tt.base >= 0 {
				j.Base = imgs[tt.base]
			}
			before := states(t, imgs...)
			p, err := Estimate(ctx, j)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("plan: method %s, bytes %v (Top allocated %d, removed data %d, view data %d, clone %v)",
				p.Method, p.Bytes, p.TopAllocated, p.RemovedData, p.ViewData, p.Clone)
			methods := []string{MethodRebase}
			if tt.base < 0 {
				methods = append(methods, MethodConvert)
			} else if _, ok := p.Bytes[MethodConvert]; ok || p.Method != MethodRebase {
				t.Errorf("with a Base, the plan offers %v and picks %s; want rebase only", p.Bytes, p.Method)
			}
			if p.Bytes[p.Method] > min(p.Bytes[MethodRebase], bytesOr(p.Bytes, MethodConvert)) {
				t.Errorf("plan picks %s, not the fewest bytes: %v", p.Method, p.Bytes)
			}
			// Every applicable method must merge correctly, not only the chosen one.
			for _, m := range methods {
				q := p
				q.Method = m
				beats := 0
				res, err := Run(ctx, j, q, func() { beats++ })
				if err != nil {
					t.Fatalf("%s: %v", m, err)
				}
				t.Logf("%s: estimated %d bytes; copied %d, result allocates %d (file %d); write %s, verify %s",
					m, p.Bytes[m], res.Copied, res.Allocated, res.Size, res.Write.Round(time.Millisecond), res.Verify.Round(time.Millisecond))
				if res.Method != m {
					t.Errorf("Result.Method %s, want %s", res.Method, m)
				}
				checkMerged(t, ctx, j, res)
				// I2 zeroed 16M..17M over I1's data; I3 discarded 40M..41M over I1's.
				if tt.top >= 2 && !zeroAt(t, j.Temp, 40*mib, mib) {
					t.Error("the discard over the full's data does not read as zeros in the result")
				}
				if tt.top == 2 && !zeroAt(t, j.Temp, 16*mib, 64<<10) {
					t.Error("the zero write over Base's data does not read as zeros in the result")
				}
				checkUnchanged(t, before)
			}
		})
	}
}

func bytesOr(m map[string]int64, k string) int64 {
	if v, ok := m[k]; ok {
		return v
	}
	return 1 << 62
}

// TestZeroOverBase is the classic merge bug: a removed image zeroes an
// area that Base holds data in. The merged image must read zeros there,
// not Base's old data showing through.
func TestZeroOverBase(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	imgs := chain(t, dir,
		[]string{"write -P 0xAA 0 8M"},
		[]string{"write -z 0 2M", "write -z -u 2M 2M", "discard 4M 1M"},
		[]string{"write -P 0xBB 7M 64K"},
	)
	before := states(t, imgs...)
	j := Job{Top: imgs[2], Removed: imgs[1:2], Base: imgs[0], Temp: filepath.Join(dir, "merge.tmp")}
	p, err := Estimate(ctx, j)
	if err != nil {
		t.Fatal(err)
	}
	if p.RemovedData < 5*mib {
		t.Errorf("estimate counts %d bytes from the removed image; its 5 MiB of zeros over Base's data must be written", p.RemovedData)
	}
	res, err := Run(ctx, j, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkMerged(t, ctx, j, res)
	if !zeroAt(t, j.Temp, 0, 5*mib) {
		t.Error("Base's data shows through where the removed image had zeroed it")
	}
	if zeroAt(t, j.Temp, 5*mib, 64<<10) {
		t.Error("Base's data beyond the zeroed area is lost")
	}
	checkUnchanged(t, before)
}

// TestMethodChoice builds a chain where each method moves fewer bytes
// than the other, and checks that Estimate picks it and that its numbers
// are what the result shows.
func TestMethodChoice(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)

	t.Run("convert: a Top whose file holds space its view no longer uses", func(t *testing.T) {
		// 16 MiB written and then zeroed without unmapping (a retried
		// transfer): the clusters stay allocated in Top's file. A copy
		// of Top moves them; convert writes only the view's data.
		dir := t.TempDir()
		imgs := chain(t, dir,
			[]string{"write -P 0x11 0 1M"},
			[]string{"write -P 0x22 8M 16M", "write -z 8M 16M", "write -P 0x23 32M 1M"},
		)
		j := Job{Top: imgs[1], Removed: imgs[:1], Temp: filepath.Join(dir, "merge.tmp")}
		p, err := Estimate(ctx, j)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("bytes %v, Top allocated %d, clone %v", p.Bytes, p.TopAllocated, p.Clone)
		if p.Clone {
			// Top's filesystem clones files: the clone shares Top's dead
			// clusters for free, so rebase writes only the removed
			// image's 1 MiB, fewer bytes than convert's view of Top.
			if p.Method != MethodRebase || p.Bytes[MethodRebase] >= p.Bytes[MethodConvert] {
				t.Fatalf("plan %s %v on a filesystem that clones; want rebase, below convert", p.Method, p.Bytes)
			}
		} else if p.Method != MethodConvert || p.Bytes[MethodConvert]*4 > p.Bytes[MethodRebase] {
			t.Fatalf("plan %s %v; want convert, by far", p.Method, p.Bytes)
		}
		for _, m := range []string{MethodConvert, MethodRebase} {
			q := p
			q.Method = m
			res, err := Run(ctx, j, q, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: copied %d, result allocates %d; write %s", m, res.Copied, res.Allocated, res.Write.Round(time.Millisecond))
			checkMerged(t, ctx, j, res)
			if m == MethodConvert && res.Allocated > p.Bytes[MethodConvert]+64<<10 {
				t.Errorf("convert wrote %d bytes, estimated %d", res.Allocated, p.Bytes[MethodConvert])
			}
			if m == MethodRebase && res.Allocated < 16*mib {
				t.Errorf("rebase's result allocates %d bytes; the copy of Top should carry its 16 MiB of dead clusters", res.Allocated)
			}
			if m == MethodRebase && p.Clone && res.Copied != 0 {
				t.Errorf("the copy of Top moved %d bytes; a clone moves none", res.Copied)
			}
		}
	})

	t.Run("rebase: a big Top over a small removed full, on a filesystem that clones", func(t *testing.T) {
		dir := reflinkDir(t)
		imgs := chain(t, dir,
			[]string{"write -P 0x11 0 1M"},
			[]string{"write -P 0x22 8M 32M"},
		)
		j := Job{Top: imgs[1], Removed: imgs[:1], Temp: filepath.Join(dir, "merge.tmp")}
		p, err := Estimate(ctx, j)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("bytes %v, Top allocated %d, clone %v", p.Bytes, p.TopAllocated, p.Clone)
		if !p.Clone {
			t.Fatalf("%s does not clone files", dir)
		}
		if p.Method != MethodRebase {
			t.Fatalf("plan %s %v; want rebase", p.Method, p.Bytes)
		}
		res, err := Run(ctx, j, p, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("rebase: copied %d; write %s", res.Copied, res.Write.Round(time.Millisecond))
		if res.Copied != 0 {
			t.Errorf("the copy of Top moved %d bytes; a clone moves none", res.Copied)
		}
		checkMerged(t, ctx, j, res)
	})

	t.Run("rebase: the only method onto a Base", func(t *testing.T) {
		dir := t.TempDir()
		imgs := chain(t, dir,
			[]string{"write -P 0x11 0 16M"},
			[]string{"write -P 0x22 1M 1M"},
			[]string{"write -P 0x33 20M 4M"},
		)
		j := Job{Top: imgs[2], Removed: imgs[1:2], Base: imgs[0], Temp: filepath.Join(dir, "merge.tmp")}
		p, err := Estimate(ctx, j)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("bytes %v", p.Bytes)
		if p.Method != MethodRebase || len(p.Bytes) != 1 {
			t.Fatalf("plan %s %v; want rebase only", p.Method, p.Bytes)
		}
		if p.RemovedData != mib {
			t.Errorf("removed data %d; want 1 MiB", p.RemovedData)
		}
		q := p
		q.Method = MethodConvert
		if _, err := Run(ctx, j, q, nil); err == nil || !strings.Contains(err.Error(), "cannot merge onto Base") {
			t.Errorf("convert onto a Base: err=%v", err)
		}
	})
}

// reflinkDir returns a folder, removed when t ends, on a filesystem that
// clones files: in CBTFLOW_REFLINK_DIR when set (e.g. on XFS or btrfs),
// else on an XFS with reflinks made for the test in a 512 MiB sparse file
// of t.TempDir(), loop-mounted (root only) and unmounted and detached
// when t ends, whether it passed or not.
func reflinkDir(t *testing.T) string {
	t.Helper()
	if over := os.Getenv("CBTFLOW_REFLINK_DIR"); over != "" {
		dir, err := os.MkdirTemp(over, "merge-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}
	if os.Geteuid() != 0 {
		t.Fatal("mounting an XFS with reflinks needs root (CI runs as root; run make test as root), or set CBTFLOW_REFLINK_DIR to a folder on a filesystem with reflinks (XFS, btrfs)")
	}
	mkfs, err := exec.LookPath("mkfs.xfs")
	if err != nil {
		t.Fatal("mkfs.xfs is missing: run make deps (package xfsprogs)")
	}
	unmountStaleReflink(t)
	base := t.TempDir()
	img := filepath.Join(base, "xfs.img")
	mnt := filepath.Join(base, fmt.Sprintf("%s%d", reflinkMountPrefix, os.Getpid()))
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Truncate(512 * mib)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the mount (and after t.TempDir's removal, so it
	// runs first): whatever step fails, nothing stays mounted or attached.
	t.Cleanup(func() {
		if err := unmountReflink(mnt, img); err != nil {
			t.Error(err)
		}
	})
	run(t, mkfs, "-q", "-m", "reflink=1", img)
	run(t, "mount", "-o", "loop", img, mnt)
	return mnt
}

// reflinkMountPrefix starts the name of reflinkDir's mount point, followed
// by the pid of the test process that mounted it.
const reflinkMountPrefix = "merge-reflink-"

// unmountReflink unmounts mnt when mounted (lazily when busy) and detaches
// every loop device still attached to img.
func unmountReflink(mnt, img string) error {
	var errs []error
	err := unix.Unmount(mnt, 0)
	if errors.Is(err, unix.EBUSY) {
		err = unix.Unmount(mnt, unix.MNT_DETACH)
	}
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) { // EINVAL: not mounted
		errs = append(errs, fmt.Errorf("unmount %s: %w", mnt, err))
	}
	out, err := exec.Command("losetup", "--noheadings", "--output", "NAME", "--associated", img).CombinedOutput()
	if err != nil {
		errs = append(errs, fmt.Errorf("losetup --associated %s: %v: %s", img, err, out))
	}
	for _, dev := range strings.Fields(string(out)) {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("losetup --detach %s: %v: %s", dev, err, out))
		}
	}
	return errors.Join(errs...)
}

// unmountStaleReflink unmounts and detaches what reflinkDir mounted in a
// test process that no longer runs (killed, or timed out, before its
// cleanup).
func unmountStaleReflink(t *testing.T) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[2] != "xfs" {
			continue
		}
		mnt := f[1]
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(mnt), reflinkMountPrefix))
		if !strings.HasPrefix(filepath.Base(mnt), reflinkMountPrefix) || err != nil || pid <= 0 {
			continue
		}
		if err := unix.Kill(pid, 0); err == nil || errors.Is(err, unix.EPERM) {
			continue // its test process still runs
		}
		t.Logf("unmounting %s, left by test process %d", mnt, pid)
		if err := unmountReflink(mnt, filepath.Join(filepath.Dir(mnt), "xfs.img")); err != nil {
			t.Error(err)
			continue
		}
		os.RemoveAll(filepath.Dir(mnt))
	}
}

// TestStaleTemp: a Temp left by a killed run (a partial copy of Top, or
// garbage) is replaced.
func TestStaleTemp(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	imgs := fiveChain(t, dir)
	before := states(t, imgs...)
	j := Job{Top: imgs[3], Removed: []string{imgs[2], imgs[1]}, Base: imgs[0], Temp: filepath.Join(dir, "merge.tmp")}
	p, err := Estimate(ctx, j)
	if err != nil {
		t.Fatal(err)
	}
	top, err := os.ReadFile(j.Top)
	if err != nil {
		t.Fatal(err)
	}
	for name, stale := range map[string][]byte{
		"half a copy of Top":  top[:len(top)/2],
		"a whole copy of Top": top,
		"garbage":             bytes.Repeat([]byte("x"), 12345),
	} {
		if err := os.WriteFile(j.Temp, stale, 0o600); err != nil {
			t.Fatal(err)
		}
		res, err := Run(ctx, j, p, nil)
		if err != nil {
			t.Fatalf("over %s: %v", name, err)
		}
		checkMerged(t, ctx, j, res)
	}
	checkUnchanged(t, before)
}

// TestCancel cancels Run while qemu-img writes Temp: qemu-img is killed,
// Temp is gone, the inputs are unchanged, and a retry succeeds.
func TestCancel(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	imgs := fiveChain(t, dir)
	before := states(t, imgs...)
	for _, tc := range []struct {
		step string
		j    Job
	}{
		{"rebase", Job{Top: imgs[2], Removed: imgs[1:2], Base: imgs[0]}},
		{"convert", Job{Top: imgs[1], Removed: imgs[:1]}},
		{"compare", Job{Top: imgs[4], Removed: []string{imgs[3], imgs[2]}, Base: imgs[1]}},
	} {
		t.Run(tc.step, func(t *testing.T) {
			j := tc.j
			j.Temp = filepath.Join(dir, "merge.tmp")
			p, err := Estimate(ctxT(t), j)
			if err != nil {
				t.Fatal(err)
			}
			if tc.step == MethodRebase || tc.step == MethodConvert {
				p.Method = tc.step
			}
			ctx, cancel := context.WithCancel(ctxT(t))
			pid := 0
			started = func(step string, p int) {
				if step == tc.step {
					pid = p
					cancel()
				}
			}
			t.Cleanup(func() { started = nil })
			_, err = Run(ctx, j, p, nil)
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("Run canceled during %s: err=%v", tc.step, err)
			}
			if pid == 0 {
				t.Fatalf("Run never started qemu-img %s", tc.step)
			}
			if alive(pid) {
				t.Errorf("qemu-img %s (pid %d) still runs after Run returned", tc.step, pid)
			}
			if _, err := os.Lstat(j.Temp); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("Temp left after a canceled run: %v", err)
			}
			checkUnchanged(t, before)
			started = nil
			res, err := Run(ctxT(t), j, p, nil)
			if err != nil {
				t.Fatalf("retry: %v", err)
			}
			checkMerged(t, ctxT(t), j, res)
		})
	}
	checkUnchanged(t, before)
}

func TestBadInput(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	imgs := chain(t, dir, []string{"write -P 1 0 1M"}, []string{"write -P 2 1M 1M"}, []string{"write -P 3 2M 1M"}, []string{"write -P 4 3M 1M"})
	// A second chain in the folder (after a new full backup): x2 builds on x1.
	x1, x2 := filepath.Join(dir, "x1.qcow2"), filepath.Join(dir, "x2.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", x1, "64M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "x1.qcow2", "-F", "qcow2", x2)
	other := filepath.Join(t.TempDir(), "merge.tmp")
	temp := filepath.Join(dir, "merge.tmp")
	ok := Job{Top: imgs[3], Removed: []string{imgs[2], imgs[1]}, Base: imgs[0], Temp: temp}
	if _, err := Estimate(ctx, ok); err != nil {
		t.Fatal(err)
	}
	before := states(t, append(imgs, x1, x2)...)
	tests := []struct {
		name string
		j    Job
		want string
	}{
		{"Temp elsewhere", Job{Top: imgs[3], Removed: []string{imgs[2]}, Base: imgs[1], Temp: other}, "is not in Top's folder"},
		{"Temp relative", Job{Top: imgs[3], Removed: []string{imgs[2]}, Base: imgs[1], Temp: "merge.tmp"}, `Temp "merge.tmp" is not an absolute path`},
		{"Temp is Base", Job{Top: imgs[3], Removed: []string{imgs[2]}, Base: imgs[1], Temp: imgs[1]}, "Temp " + imgs[1] + " is Base"},
		{"Temp is a later restore point", Job{Top: imgs[1], Removed: []string{imgs[0]}, Temp: imgs[3]}, "builds on Top"},
		{"Temp is built on", Job{Top: imgs[1], Removed: []string{imgs[0]}, Temp: x1}, x2 + " builds on it"},
		{"no Removed", Job{Top: imgs[3], Base: imgs[2], Temp: temp}, "no Removed image"},
		{"Removed[0] not Top's backing", Job{Top: imgs[3], Removed: []string{imgs[1]}, Base: imgs[0], Temp: temp}, "Removed[0] " + imgs[1] + " is not the backing file of Top " + imgs[3] + ", which is " + imgs[2]},
		{"gap in Removed", Job{Top: imgs[3], Removed: []string{imgs[2], imgs[0]}, Temp: temp}, "Removed[1] " + imgs[0] + " is not the backing file of Removed[0]"},
		{"Base not the last removed's backing", Job{Top: imgs[3], Removed: []string{imgs[2]}, Base: imgs[0], Temp: temp}, "Base " + imgs[0] + " is not the backing file of Removed[0] " + imgs[2] + ", which is " + imgs[1]},
		{"no Base under an overlay", Job{Top: imgs[3], Removed: []string{imgs[2]}, Temp: temp}, `Base is "" but the last removed image ` + imgs[2]},
		{"Base below a full", Job{Top: imgs[1], Removed: []string{imgs[0]}, Base: imgs[2], Temp: temp}, "is a full image, but Base"},
		{"Top missing", Job{Top: filepath.Join(dir, "gone.qcow2"), Removed: []string{imgs[2]}, Temp: temp}, "Top " + filepath.Join(dir, "gone.qcow2") + ": missing"},
		{"Removed missing", Job{Top: imgs[3], Removed: []string{imgs[2], filepath.Join(dir, "gone.qcow2")}, Temp: temp}, "Removed[1] " + filepath.Join(dir, "gone.qcow2") + ": missing"},
		{"Base missing", Job{Top: imgs[3], Removed: []string{imgs[2]}, Base: filepath.Join(dir, "gone.qcow2"), Temp: temp}, "Base " + filepath.Join(dir, "gone.qcow2") + ": missing"},
		{"Top twice", Job{Top: imgs[3], Removed: []string{imgs[3]}, Temp: temp}, "Top and Removed[0] are the same image"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Estimate(ctx, tt.j)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Estimate: err=%v\nwant it to contain %q", err, tt.want)
			}
			p := Plan{Top: tt.j.Top, Base: tt.j.Base, Method: MethodRebase}
			_, err = Run(ctx, tt.j, p, nil)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Run: err=%v\nwant it to contain %q", err, tt.want)
			}
		})
	}
	t.Run("plan of another job", func(t *testing.T) {
		p, err := Estimate(ctx, ok)
		if err != nil {
			t.Fatal(err)
		}
		j := Job{Top: imgs[2], Removed: []string{imgs[1]}, Base: imgs[0], Temp: temp}
		if _, err := Run(ctx, j, p, nil); err == nil || !strings.Contains(err.Error(), "plan was made for Top "+imgs[3]) {
			t.Errorf("err=%v", err)
		}
		small := p
		small.Bytes = map[string]int64{MethodRebase: 1 << 60}
		if _, err := Run(ctx, ok, small, nil); err == nil || !strings.Contains(err.Error(), "bytes free; method rebase needs about 1152921504606846976") {
			t.Errorf("a merge bigger than the free space: err=%v", err)
		}
		p.Method = "commit"
		if _, err := Run(ctx, ok, p, nil); err == nil || !strings.Contains(err.Error(), `unknown method "commit"`) {
			t.Errorf("err=%v", err)
		}
	})
	checkUnchanged(t, before)
	for _, p := range imgs {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("an input was removed: %v", err)
		}
	}
}

func TestHeartbeat(t *testing.T) {
	old := beatEvery
	beatEvery = time.Millisecond
	t.Cleanup(func() { beatEvery = old })
	n := make(chan struct{}, 100)
	stop := heartbeat(func() {
		select {
		case n <- struct{}{}:
		default:
		}
	})
	<-n
	stop()
	stop2 := heartbeat(nil)
	stop2()
}

// TestKilledRun kills a worker (a child test process) with SIGKILL while
// its qemu-img rebase runs: the qemu-img dies with it (Pdeathsig), the
// inputs are unchanged, and the next Run replaces the Temp it left.
func TestKilledRun(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	imgs := fiveChain(t, dir)
	before := states(t, imgs...)
	j := Job{Top: imgs[3], Removed: []string{imgs[2], imgs[1]}, Base: imgs[0], Temp: filepath.Join(dir, "merge.tmp")}

	// The helper's qemu-img hangs in rebase, as a long one would.
	fake := filepath.Join(t.TempDir(), "qemu-img")
	real, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal(err)
	}
	script := "#!/bin/sh\nif [ \"$1\" = rebase ]; then exec sleep 600; fi\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0]) // TestMain runs killedRunHelper
	cmd.Env = append(os.Environ(), "CBTFLOW_MERGE_HELPER=1", "CBTFLOW_MERGE_QEMU_IMG="+fake,
		"CBTFLOW_MERGE_JOB="+strings.Join([]string{j.Top, j.Removed[0], j.Removed[1], j.Base, j.Temp}, "\n"))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	var got []byte
	for !bytes.Contains(got, []byte("\n")) {
		n, err := out.Read(buf)
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("helper: %v (output %q)", err, got)
		}
		got = append(got, buf[:n]...)
	}
	line := strings.TrimSpace(string(got))
	var pid int
	if _, err := fmt.Sscanf(line, "rebase running as %d", &pid); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper said %q", line)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	deadline := time.Now().Add(20 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("qemu-img (pid %d) outlived its killed worker", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := os.Stat(j.Temp); err != nil {
		t.Fatalf("the killed run left no Temp (%v); this test wants one to replace", err)
	}
	checkUnchanged(t, before)

	p, err := Estimate(ctx, j)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Run(ctx, j, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkMerged(t, ctx, j, res)
	checkUnchanged(t, before)
}

// alive reports whether pid is a live, non-zombie process.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	return len(f) > 0 && f[0] != "Z"
}

// TestMain runs the package's tests, or, in the worker that TestKilledRun
// starts (CBTFLOW_MERGE_HELPER set), killedRunHelper alone.
func TestMain(m *testing.M) {
	if os.Getenv("CBTFLOW_MERGE_HELPER") != "" {
		killedRunHelper()
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// killedRunHelper is TestKilledRun's worker: it runs the rebase of the job
// in CBTFLOW_MERGE_JOB with the qemu-img of CBTFLOW_MERGE_QEMU_IMG (one
// that hangs in rebase), says "rebase running as PID" on stdout once
// qemu-img rebase started, and waits to be killed. It returns only when
// something went wrong, said on stderr.
func killedRunHelper() {
	f := strings.Split(os.Getenv("CBTFLOW_MERGE_JOB"), "\n")
	if len(f) != 5 {
		fmt.Fprintf(os.Stderr, "killed-run helper: CBTFLOW_MERGE_JOB holds %d lines, want 5\n", len(f))
		return
	}
	j := Job{Top: f[0], Removed: f[1:3], Base: f[3], Temp: f[4]}
	p, err := Estimate(context.Background(), j)
	if err != nil {
		fmt.Fprintf(os.Stderr, "killed-run helper: %v\n", err)
		return
	}
	p.Method = MethodRebase
	started = func(step string, pid int) {
		if step == "rebase" {
			fmt.Printf("rebase running as %d\n", pid)
			os.Stdout.Sync()
		}
	}
	qemu.QemuImg = os.Getenv("CBTFLOW_MERGE_QEMU_IMG")
	_, err = Run(context.Background(), j, p, nil)
	fmt.Fprintf(os.Stderr, "killed-run helper: Run returned (%v); it should have been killed\n", err)
}

// TestVerifyCatchesLoss runs a rebase that only rewrites the header (what
// an unsafe rebase, or a qemu-img bug, would do): the removed image's data
// is lost, and Run must refuse the result by comparing, and remove it.
func TestVerifyCatchesLoss(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := ctxT(t)
	dir := t.TempDir()
	imgs := fiveChain(t, dir)
	before := states(t, imgs...)
	real, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal(err)
	}
	fake := filepath.Join(t.TempDir(), "qemu-img")
	script := "#!/bin/sh\nif [ \"$1\" = rebase ]; then shift; exec " + real + " rebase -u \"$@\"; fi\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	old := qemu.QemuImg
	qemu.QemuImg = fake
	t.Cleanup(func() { qemu.QemuImg = old })
	j := Job{Top: imgs[2], Removed: imgs[1:2], Base: imgs[0], Temp: filepath.Join(dir, "merge.tmp")}
	p, err := Estimate(ctx, j)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Run(ctx, j, p, nil)
	if err == nil || !strings.Contains(err.Error(), "differs from Top") {
		t.Fatalf("a merge that lost data: err=%v", err)
	}
	t.Log(err)
	if _, err := os.Lstat(j.Temp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused result was left at Temp: %v", err)
	}
	checkUnchanged(t, before)
}
