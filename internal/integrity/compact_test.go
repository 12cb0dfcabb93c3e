package integrity

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/qemu"
)

func allocatedOf(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// TestCompact: compacting a sealed image frees the zeros of its metadata
// and leaves its content as it was: the same seal, the same bytes (qemu-img
// compare of the files as raw with a copy made before), a clean qemu-img check. An empty
// overlay and one with a single 64 KiB write take a few hundred KiB after
// it, not the 6-8 MiB of its whole 2 MiB tables.
func TestCompact(t *testing.T) {
	full, top := sealedChain(t)
	dir := filepath.Dir(full)
	empty, one := filepath.Join(dir, "b3.qcow2"), filepath.Join(dir, "b4.qcow2")
	sealedImage(t, empty, top, nil)
	sealedImage(t, one, top, []write{{5 << 20, 64 << 10, 9}})
	for _, path := range []string{full, top, empty, one} {
		name := filepath.Base(path)
		sum := seal(t, path)
		before := allocatedOf(t, path)
		saved := filepath.Join(t.TempDir(), name)
		denseCopy(t, path, saved)
		freed, err := Compact(context.Background(), path)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		after := allocatedOf(t, path)
		t.Logf("%s: %d bytes allocated, %d after compacting (%d freed)", name, before, after, freed)
		if freed <= 0 || after >= before {
			t.Errorf("%s: compacting freed %d bytes, allocated %d before and %d after", name, freed, before, after)
		}
		if (path == empty || path == one) && after > 512<<10 {
			t.Errorf("%s takes %d bytes after compacting, want at most 512 KiB", name, after)
		}
		if err := VerifySeal(context.Background(), path, sum, nil); err != nil {
			t.Errorf("%s after compacting: %v", name, err)
		}
		if got := seal(t, path); got != sum {
			t.Errorf("%s: sealed %s before compacting, %s after", name, sum, got)
		}
		// The file's bytes, compared as raw files.
		if out, err := exec.Command(qemu.QemuImg, "compare", "-f", "raw", "-F", "raw", saved, path).CombinedOutput(); err != nil {
			t.Errorf("%s: the file's bytes differ after compacting: %v: %s", name, err, out)
		}
		check, err := qemu.Check(context.Background(), path)
		if err != nil || !check.Clean() {
			t.Errorf("%s: qemu-img check after compacting: %+v, %v", name, check, err)
		}
	}
}

// TestCompactWhileWritten: an image a qemu-nbd serves writable (a stray
// attempt's) is not compacted: nothing is punched, and the error says why.
func TestCompactWhileWritten(t *testing.T) {
	_, top := sealedChain(t)
	before := allocatedOf(t, top)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	exp, err := qemu.StartQemuNBD(ctx, qemu.QemuNBDOptions{Image: top, Format: "qcow2", Dir: filepath.Join(t.TempDir(), "nbd")})
	if err != nil {
		t.Fatal(err)
	}
	defer exp.Close()
	freed, err := Compact(context.Background(), top)
	if !errors.Is(err, qemu.ErrImageWritten) || freed != 0 {
		t.Errorf("compacting a served image: freed %d, %v; want 0 and ErrImageWritten", freed, err)
	}
	if after := allocatedOf(t, top); after != before {
		t.Errorf("the served image took %d bytes before, %d after", before, after)
	}
}
