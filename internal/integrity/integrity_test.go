package integrity

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/qemu"
)

// chainOf makes a real two-image chain with qemu-img and records it as a
// commit would: size, SHA-256, stamp, backing.
func chainOf(t *testing.T) (dir string, full, top Image) {
	t.Helper()
	ctx := context.Background()
	dir = t.TempDir()
	fp, tp := filepath.Join(dir, "b1.qcow2"), filepath.Join(dir, "b2.qcow2")
	if err := qemu.Create(ctx, fp, 64<<20); err != nil {
		t.Fatal(err)
	}
	if err := qemu.CreateOverlay(ctx, tp, fp); err != nil {
		t.Fatal(err)
	}
	return dir, record(t, fp, ""), record(t, tp, fp)
}

func record(t *testing.T, path, backing string) Image {
	t.Helper()
	size, st, err := StampOf(path)
	if err != nil {
		t.Fatal(err)
	}
	_, sum, err := Hash(context.Background(), path, nil)
	if err != nil {
		t.Fatal(err)
	}
	return Image{Path: path, Size: size, SHA256: sum, Stamp: st, Backing: backing}
}

func wantDamage(t *testing.T, err error, path, reason string) {
	t.Helper()
	var d *Damage
	if !errors.As(err, &d) {
		t.Fatalf("want damage of %s (%s), got %v", path, reason, err)
	}
	if d.Path != path || !strings.Contains(d.Reason, reason) {
		t.Fatalf("damage %v, want %s: ...%s...", d, path, reason)
	}
}

func TestUnchangedImagesAreNotReread(t *testing.T) {
	_, full, top := chainOf(t)
	var order []int
	idx, err := CheckChain(context.Background(), []Image{top, full}, nil, func(i int, out Outcome) error {
		order = append(order, i)
		if out.Hashed {
			t.Errorf("image %d was re-read although its stamp is unchanged", i)
		}
		return nil
	})
	if err != nil || idx != -1 || len(order) != 2 || order[0] != 1 {
		t.Fatalf("sound chain: checked %v (want the full image first), %d %v", order, idx, err)
	}
}

func TestChangedStampRehashes(t *testing.T) {
	dir, full, _ := chainOf(t)
	// A copy (a moved repository) has another inode: hashed once, sound,
	// with the new stamp to record.
	moved := filepath.Join(dir, "copy.qcow2")
	if out, err := exec.Command("cp", "--preserve=all", full.Path, moved).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	im := full
	im.Path = moved
	out, err := Check(context.Background(), im, nil)
	if err != nil || !out.Hashed || out.Stamp == full.Stamp {
		t.Fatalf("copied image: %+v %v", out, err)
	}
	// With the new stamp recorded, the next check reads nothing.
	im.Stamp = out.Stamp
	if out, err := Check(context.Background(), im, nil); err != nil || out.Hashed {
		t.Fatalf("after recording the new stamp: %+v %v", out, err)
	}
	// An unknown stamp (a catalog from before stamps) hashes.
	im.Stamp = Stamp{}
	if out, err := Check(context.Background(), im, nil); err != nil || !out.Hashed {
		t.Fatalf("unknown stamp: %+v %v", out, err)
	}
	// A sound callback's error ends the check.
	stop := errors.New("stop")
	if _, err := CheckChain(context.Background(), []Image{im}, nil, func(int, Outcome) error { return stop }); !errors.Is(err, stop) {
		t.Errorf("CheckChain with a failing callback: %v", err)
	}
}

func TestDamage(t *testing.T) {
	ctx := context.Background()
	t.Run("truncated", func(t *testing.T) {
		_, full, top := chainOf(t)
		if err := os.Truncate(full.Path, full.Size/2); err != nil {
			t.Fatal(err)
		}
		idx, err := CheckChain(ctx, []Image{top, full}, nil, nil)
		wantDamage(t, err, full.Path, "bytes, ")
		if idx != 1 {
			t.Errorf("index %d, want 1 (the full image)", idx)
		}
	})
	t.Run("same size, other content, mtime set back", func(t *testing.T) {
		_, full, _ := chainOf(t)
		f, err := os.OpenFile(full.Path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte{0xff}, full.Size-1); err != nil {
			t.Fatal(err)
		}
		f.Close()
		mt := time.Unix(0, full.Stamp.MtimeNs)
		if err := os.Chtimes(full.Path, mt, mt); err != nil {
			t.Fatal(err)
		}
		_, err = Check(ctx, full, nil)
		wantDamage(t, err, full.Path, "SHA-256")
	})
	t.Run("missing", func(t *testing.T) {
		_, full, top := chainOf(t)
		os.Remove(full.Path)
		idx, err := CheckChain(ctx, []Image{top, full}, nil, nil)
		wantDamage(t, err, full.Path, "missing")
		if idx != 1 {
			t.Errorf("index %d", idx)
		}
	})
	t.Run("folder missing is not damage", func(t *testing.T) {
		dir, full, _ := chainOf(t)
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		_, err := Check(ctx, full, nil)
		var d *Damage
		if !errors.Is(err, ErrFolderMissing) || errors.As(err, &d) {
			t.Fatalf("got %v, want ErrFolderMissing", err)
		}
	})
	t.Run("backing link changed", func(t *testing.T) {
		dir, full, top := chainOf(t)
		other := filepath.Join(dir, "other.qcow2")
		if err := qemu.Create(ctx, other, 64<<20); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("qemu-img", "rebase", "-u", "-b", "other.qcow2", "-F", "qcow2", top.Path).CombinedOutput(); err != nil {
			t.Fatalf("rebase: %v %s", err, out)
		}
		idx, err := CheckChain(ctx, []Image{top, full}, nil, nil)
		wantDamage(t, err, top.Path, `backing file "other.qcow2"`)
		if idx != 0 {
			t.Errorf("index %d", idx)
		}
	})
	t.Run("full image recorded, overlay found", func(t *testing.T) {
		_, full, top := chainOf(t)
		im := top
		im.Backing = ""
		_, err := Check(ctx, im, nil)
		wantDamage(t, err, top.Path, "recorded a full image")
		_ = full
	})
	t.Run("not qcow2", func(t *testing.T) {
		_, full, _ := chainOf(t)
		if err := os.WriteFile(full.Path, make([]byte, full.Size), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Check(ctx, full, nil)
		wantDamage(t, err, full.Path, "not a QCOW2")
	})
	t.Run("a directory in its place", func(t *testing.T) {
		_, full, _ := chainOf(t)
		os.Remove(full.Path)
		if err := os.Mkdir(full.Path, 0o700); err != nil {
			t.Fatal(err)
		}
		_, err := Check(ctx, full, nil)
		wantDamage(t, err, full.Path, "not a regular file")
	})
}
