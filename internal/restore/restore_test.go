package restore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

const mib = 1 << 20

func sum(t *testing.T, path string) (int64, string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(b)
	return int64(len(b)), hex.EncodeToString(h[:])
}

// writeVia writes data into an image at off through qemu-io.
func writeVia(t *testing.T, img string, pattern byte, off, n int64) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c",
		"write -P "+itoa(int64(pattern))+" "+itoa(off)+" "+itoa(n), img).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func TestRestoreChain(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := context.Background()
	cat, err := catalog.Open(ctx, testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	dir := t.TempDir()
	full := filepath.Join(dir, "b1.qcow2")
	over := filepath.Join(dir, "b2.qcow2")
	if err := qemu.Create(ctx, full, 16*mib); err != nil {
		t.Fatal(err)
	}
	writeVia(t, full, 0xaa, 0, 4*mib)
	if err := qemu.CreateOverlay(ctx, over, full); err != nil {
		t.Fatal(err)
	}
	writeVia(t, over, 0xbb, 2*mib, 1*mib)
	writeVia(t, over, 0x00, 3*mib, 1*mib) // zeros hide the backing data

	for i, p := range []string{full, over} {
		id := []string{"b1", "b2"}[i]
		if err := cat.Begin(ctx, catalog.Backup{ID: id, Profile: "lab", VMUUID: "u", VMName: "vm", Mode: "auto"}); err != nil {
			t.Fatal(err)
		}
		size, h := sum(t, p)
		d := catalog.Disk{Key: 204, Capacity: 16 * mib, Mode: catalog.ModeFull, Path: p, ChangeID: "x/" + id, SizeBytes: size, SHA256: h}
		if i == 1 {
			d.Mode, d.BackingBackupID = catalog.ModeIncremental, "b1"
		}
		if err := cat.Commit(ctx, id, []catalog.Disk{d}); err != nil {
			t.Fatal(err)
		}
	}

	want := make([]byte, 16*mib)
	for i := 0; i < 4*mib; i++ {
		want[i] = 0xaa
	}
	for i := 2 * mib; i < 3*mib; i++ {
		want[i] = 0xbb
	}
	for i := 3 * mib; i < 4*mib; i++ {
		want[i] = 0
	}
	out := filepath.Join(dir, "restored.raw")
	res, err := Disk(ctx, cat, Options{BackupID: "b2", DiskKey: 204, To: out})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, want) {
		t.Fatal("restored disk differs from what was written")
	}
	if len(res.Chain) != 2 || res.Bytes != 16*mib {
		t.Errorf("result = %+v", res)
	}
	// Sparse: the raw output does not allocate the untouched 12 MiB.
	if st := mustStat(t, out); st > 8*mib {
		t.Errorf("restored raw file allocates %d bytes", st)
	}
	q := filepath.Join(dir, "restored.qcow2")
	if _, err := Disk(ctx, cat, Options{BackupID: "b2", DiskKey: 204, To: q, Format: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	if diff, err := qemu.Compare(ctx, out, "raw", q, "qcow2"); err != nil || diff != "" {
		t.Errorf("qcow2 restore differs: %q %v", diff, err)
	}

	// Errors name what was wrong and leave no output behind.
	bad := filepath.Join(dir, "bad.raw")
	if _, err := Disk(ctx, cat, Options{BackupID: "nope", DiskKey: 204, To: bad}); err == nil || !strings.Contains(err.Error(), "nope does not exist") {
		t.Errorf("unknown backup: %v", err)
	}
	if _, err := Disk(ctx, cat, Options{BackupID: "b2", DiskKey: 999, To: bad}); err == nil || !strings.Contains(err.Error(), "no disk 999") {
		t.Errorf("unknown disk: %v", err)
	}
	// Alter one byte of the full image after commit.
	f, err := os.OpenFile(full, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	fi, _ := f.Stat()
	off := fi.Size() - 100
	_, _ = f.ReadAt(b, off)
	b[0] ^= 0xff
	_, _ = f.WriteAt(b, off)
	f.Close()
	_, err = Disk(ctx, cat, Options{BackupID: "b2", DiskKey: 204, To: bad})
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), full) {
		t.Errorf("altered chain: %v", err)
	}
	os.Remove(full)
	_, err = Disk(ctx, cat, Options{BackupID: "b2", DiskKey: 204, To: bad})
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), full) {
		t.Errorf("deleted chain file: %v", err)
	}
	if _, err := os.Stat(bad); !os.IsNotExist(err) {
		t.Errorf("output written despite errors: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*partial*"))
	if len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func mustStat(t *testing.T, p string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// Options.Progress is told the chain's verification, then the writing,
// each from 0 up to its total and never back; a restore that is canceled
// while Progress holds it leaves no file.
func TestRestoreProgress(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := context.Background()
	cat, err := catalog.Open(ctx, testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	dir := t.TempDir()
	img := filepath.Join(dir, "b1.qcow2")
	if err := qemu.Create(ctx, img, 64*mib); err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < 64*mib; off += 8 * mib {
		writeVia(t, img, byte(off/mib+1), off, 2*mib)
	}
	if err := cat.Begin(ctx, catalog.Backup{ID: "p1", Profile: "lab", VMUUID: "u", VMName: "vm", Mode: "auto"}); err != nil {
		t.Fatal(err)
	}
	size, h := sum(t, img)
	if err := cat.Commit(ctx, "p1", []catalog.Disk{{Key: 204, Capacity: 64 * mib, Mode: catalog.ModeFull, Path: img, ChangeID: "x/1", SizeBytes: size, SHA256: h}}); err != nil {
		t.Fatal(err)
	}
	var seen []Progress
	out := filepath.Join(dir, "restored.raw")
	if _, err := Disk(ctx, cat, Options{BackupID: "p1", DiskKey: 204, To: out, Progress: func(p Progress) { seen = append(seen, p) }}); err != nil {
		t.Fatal(err)
	}
	if diff, err := qemu.Compare(ctx, out, "raw", img, "qcow2"); err != nil || diff != "" {
		t.Errorf("restore with progress differs: %q %v", diff, err)
	}
	stage, last, mid := StageVerifying, int64(-1), false
	for _, p := range seen {
		if p.Stage != stage {
			if stage != StageVerifying || p.Stage != StageWriting || last != size {
				t.Fatalf("progress %+v after stage %s at %d: want verifying up to %d, then writing", p, stage, last, size)
			}
			stage, last = p.Stage, -1
		}
		want := size
		if stage == StageWriting {
			want = 64 * mib
		}
		if p.Total != want || p.Done < last || p.Done > p.Total {
			t.Errorf("progress %+v after %d: want Total %d and Done growing", p, last, want)
		}
		mid = mid || stage == StageWriting && p.Done > 0 && p.Done < p.Total
		last = p.Done
	}
	if stage != StageWriting || last != 64*mib || !mid {
		t.Errorf("progress ends at %s %d (some midway: %v), want writing at %d with figures midway: %+v", stage, last, mid, 64*mib, seen)
	}

	// Canceled while Progress holds it midway: no file, no temporary file.
	cctx, cancel := context.WithCancel(ctx)
	held := filepath.Join(dir, "held.raw")
	_, err = Disk(cctx, cat, Options{BackupID: "p1", DiskKey: 204, To: held, Progress: func(p Progress) {
		if p.Stage == StageWriting && p.Done > 0 && p.Done < p.Total {
			cancel()
		}
	}})
	cancel()
	if !errors.Is(err, context.Canceled) {
		t.Errorf("canceled restore: %v, want context.Canceled", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*held*")); len(left) != 0 {
		t.Errorf("a canceled restore left %v", left)
	}
}

func TestParsePercent(t *testing.T) {
	for in, want := range map[string]float64{"    (0.00/100%)": 0, "(42.50/100%)": 42.5, "    (100.00/100%)": 100} {
		if got, ok := parsePercent(in); !ok || got != want {
			t.Errorf("parsePercent(%q) = %v %v, want %v", in, got, ok, want)
		}
	}
	for _, in := range []string{"", "qemu-img: error", "(x/100%)", "(142/100%)"} {
		if _, ok := parsePercent(in); ok {
			t.Errorf("parsePercent(%q) ok", in)
		}
	}
}
