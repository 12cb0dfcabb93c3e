package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/internal/qemu"
)

// class is what a byte of the disk is in a mapping.
type class struct {
	kind   string // "data", "zero" (present), "absent-zero", "absent"
	offset int64  // data: the byte's offset in the file
}

// classes returns, for every 4 KiB of the disk, what the mapping says of
// its first byte, and checks that the mapping covers [0, size) in order.
func classes(t *testing.T, ext []qemu.MapExtent, size int64) []class {
	t.Helper()
	var out []class
	at := int64(0)
	for _, e := range ext {
		if e.Start != at || e.Length <= 0 {
			t.Fatalf("extent %+v does not follow %d", e, at)
		}
		for b := e.Start; b < e.End(); b += 4096 {
			var c class
			switch {
			case e.Data && e.HasOffset:
				c = class{"data", e.Offset + b - e.Start}
			case e.Data:
				c = class{"data without an offset", 0}
			case e.Present:
				c = class{"zero", 0}
			case e.Zero:
				c = class{"absent-zero", 0}
			default:
				c = class{"absent", 0}
			}
			out = append(out, c)
		}
		at = e.End()
	}
	if at != size {
		t.Fatalf("the mapping ends at %d, the disk at %d", at, size)
	}
	return out
}

func qemuIO(t *testing.T, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	// A read whose pattern differs fails on the output only.
	out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput()
	if err != nil || strings.Contains(string(out), "fail") || strings.Contains(string(out), "error") {
		t.Fatalf("qemu-io %v: %v: %s", cmds, err, out)
	}
}

func create(t *testing.T, path, opts string, size int64, backing string) {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	if backing != "" {
		args = append(args, "-b", backing, "-F", "qcow2")
	}
	args = append(args, path)
	if size > 0 { // else the backing file's
		args = append(args, fmt.Sprint(size))
	}
	qemuImg(t, args...)
}

// sampleImages makes, in dir, images of layout opts (qemu-img create's
// -o) written by qemu: base, of size bytes, with data, zeros with and
// without storage, a discard, writes of part of a cluster and at the
// disk's end; top, an overlay on it with more of each; and empty, an
// empty overlay of 2 GiB on base (larger than its backing: the rest
// reads zeros).
func sampleImages(t *testing.T, dir, opts string, size int64) (base, top, empty string) {
	t.Helper()
	base, top, empty = filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2"), filepath.Join(dir, "empty.qcow2")
	create(t, base, opts, size, "")
	qemuIO(t, base, "write -P 1 0 1M", "write -P 2 5M 4k", "write -P 3 9M 100k", "write -z 20M 3M",
		"write -P 4 30M 4M", "write -z -u 31M 64k", "discard 33M 64k", "write -P 5 70M 64k",
		fmt.Sprintf("write -P 6 %d 4096", size-4096))
	create(t, top, opts, 0, "base.qcow2")
	qemuIO(t, top, "write -P 7 512k 64k", "write -P 8 9M 4k", "write -z 30M 1M", "write -z -u 32M 128k",
		"write -P 9 69M 1M")
	create(t, empty, opts, 2<<30, "base.qcow2")
	return base, top, empty
}

// TestMapLayerAsQemu: for images of both layouts (64 KiB clusters; 2 MiB
// clusters with extended L2 entries, internal/qemu.ImageOptions), full
// and overlays, with data, zeros with and without storage, discards,
// writes of part of a cluster and a disk that ends inside a cluster,
// MapLayer says of every 4 KiB of the disk what qemu-img map of the image
// alone says.
func TestMapLayerAsQemu(t *testing.T) {
	const mib = 1 << 20
	size := int64(70*mib + 3*64<<10 + 4096)
	for _, opts := range []string{"", qemu.ImageOptions, "cluster_size=64K,extended_l2=on"} {
		t.Run(strings.ReplaceAll(opts, ",", "+"), func(t *testing.T) {
			base, top, empty := sampleImages(t, t.TempDir(), opts, size)
			for _, path := range []string{base, top, empty} {
				want, err := qemu.MapLayer(context.Background(), path)
				if err != nil {
					t.Fatal(err)
				}
				f, err := os.Open(path)
				if err != nil {
					t.Fatal(err)
				}
				got, err := MapLayer(f)
				f.Close()
				if err != nil {
					t.Fatalf("%s: %v", filepath.Base(path), err)
				}
				info, err := qemu.Info(context.Background(), path)
				if err != nil {
					t.Fatal(err)
				}
				w, g := classes(t, want, info[0].VirtualSize), classes(t, got, info[0].VirtualSize)
				for i := range w {
					if w[i] != g[i] {
						t.Errorf("%s: disk offset %d: qemu-img map says %+v, MapLayer %+v", filepath.Base(path), int64(i)*4096, w[i], g[i])
						break
					}
				}
			}
		})
	}
}

// TestMapLayerRefuses: what MapLayer does not read is refused with
// ErrUnsupported (the caller asks qemu-img), never mapped wrongly.
func TestMapLayerRefuses(t *testing.T) {
	dir := t.TempDir()
	compressed := filepath.Join(dir, "c.qcow2")
	raw := filepath.Join(dir, "r.raw")
	if err := os.WriteFile(raw, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(qemu.QemuImg, "convert", "-c", "-f", "raw", "-O", "qcow2", raw, compressed).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	qemuIO(t, compressed, "write -c -P 1 0 64k")
	notQcow := filepath.Join(dir, "n.qcow2")
	if err := os.WriteFile(notQcow, []byte("not a qcow2 image at all, but long enough for a header read of 104 bytes ......................................"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Headers qemu refuses, or reads otherwise than this reader would:
	// a fresh image with bytes of its header patched.
	patched := func(name string, at int64, b []byte) string {
		path := filepath.Join(dir, name+".qcow2")
		create(t, path, qemu.ImageOptions, 64<<20, "")
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(b, at); err != nil {
			t.Fatal(err)
		}
		return path
	}
	u32 := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	u64 := func(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
	cases := []string{
		compressed, notQcow, raw,
		patched("huge-size", 24, u64(1<<64-11)),
		patched("odd-size", 24, u64(64<<20-100)),
		patched("refcount-order", 96, u32(7)),
		patched("refcount-table", 48, u64(2<<20+512)),
		patched("short-header", 100, u32(50)),
		patched("long-extension", 112+4, u32(1<<20)),
		patched("unknown-extension", 112, u32(0x23852875)), // bitmaps
		patched("snapshots", 60, u32(1)),
		patched("dirty", 72, u64(1|1<<4)),
	}
	for _, path := range cases {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		_, err = MapLayer(f)
		f.Close()
		if !errors.Is(err, ErrUnsupported) {
			t.Errorf("%s: %v, want ErrUnsupported", filepath.Base(path), err)
		}
	}
}
