package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cbtflow/cbtflow/internal/qemu"
)

// qemuImg runs qemu-img and fails the test when it fails.
func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(qemu.QemuImg, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestCreateAsQemuImg: an image Create makes is the image qemu-img create
// makes with the repository's options (qemu.CreateArgs), byte for byte,
// full or overlay, and its zeros take no space.
func TestCreateAsQemuImg(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Backing files of both layouts: the repository's, and qemu's default
	// 64 KiB clusters (what a merge by convert writes).
	qemuImg(t, qemu.CreateArgs(filepath.Join(dir, "base.qcow2"), 4<<30)...)
	create(t, filepath.Join(dir, "merged.qcow2"), "", 1<<30+512, "")
	for _, tc := range []struct {
		name     string
		capacity int64
		path     string // below dir
		backing  string // as the overlay names it
	}{
		{"4 GiB", 4 << 30, "a.qcow2", ""},
		{"10 GiB and 512 bytes", 10<<30 + 512, "a.qcow2", ""},
		{"512 bytes", 512, "a.qcow2", ""},
		{"2 TiB", 2 << 40, "a.qcow2", ""},
		{"62 TiB, vSphere's largest disk", 62 << 40, "a.qcow2", ""},
		{"overlay beside its backing file", 0, "o.qcow2", "base.qcow2"},
		{"overlay in another folder", 0, "sub/o.qcow2", "../base.qcow2"},
		{"overlay on a 64 KiB-cluster image", 0, "sub/o.qcow2", "../merged.qcow2"},
		{"overlay named absolutely", 0, "o.qcow2", filepath.Join(dir, "base.qcow2")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ours := filepath.Join(dir, tc.path)
			theirs := ours + ".qemu"
			t.Cleanup(func() { os.Remove(ours); os.Remove(theirs) })
			if err := Create(ours, tc.capacity, tc.backing); err != nil {
				t.Fatalf("Create: %v", err)
			}
			if tc.backing == "" {
				qemuImg(t, qemu.CreateArgs(theirs, tc.capacity)...)
			} else {
				create(t, theirs, qemu.ImageOptions, 0, tc.backing)
			}
			a, err := os.ReadFile(ours)
			if err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(theirs)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(a, b) {
				at := 0
				for at < min(len(a), len(b)) && a[at] == b[at] {
					at++
				}
				t.Fatalf("Create wrote %d bytes, qemu-img create %d; they differ first at byte %#x", len(a), len(b), at)
			}
			var st syscall.Stat_t
			if err := syscall.Stat(ours, &st); err != nil {
				t.Fatal(err)
			}
			if used := st.Blocks * 512; used > 64<<10 {
				t.Errorf("the image takes %d bytes: its zeros were written", used)
			}
			out := qemuImg(t, "check", ours)
			if !strings.Contains(out, "No errors were found") {
				t.Errorf("qemu-img check: %s", out)
			}
		})
	}
}

// TestCreateRefuses: what Create cannot make as qemu-img would is
// refused, with ErrUnsupported where qemu-img can make it, and nothing is
// left behind.
func TestCreateRefuses(t *testing.T) {
	dir := t.TempDir()
	exists := filepath.Join(dir, "exists.qcow2")
	if err := os.WriteFile(exists, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, qemu.CreateArgs(filepath.Join(dir, "base.qcow2"), 4<<30)...)
	notQcow2 := filepath.Join(dir, "raw.img")
	if err := os.WriteFile(notQcow2, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name        string
		capacity    int64
		path        string
		backing     string
		unsupported bool
		want        string
	}{
		{"not a multiple of 512", 1000, "a.qcow2", "", true, "1000 bytes"},
		{"more than 64 PiB", 1 << 57, "a.qcow2", "", true, "L1 table"},
		{"no size", 0, "a.qcow2", "", false, "size must be positive"},
		{"a file that exists", 4 << 30, "exists.qcow2", "", false, "file exists"},
		{"no backing file", 0, "a.qcow2", "missing.qcow2", false, "backing file"},
		{"a backing file that is not QCOW2", 0, "a.qcow2", "raw.img", true, "no QCOW2 magic"},
		{"a size other than the backing file's", 1 << 30, "a.qcow2", "base.qcow2", true, "an overlay of 1073741824 bytes"},
		{"a backing name qemu refuses", 0, "a.qcow2", strings.Repeat("x", 1024), false, "backing file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.path)
			err := Create(p, tc.capacity, tc.backing)
			if err == nil {
				t.Fatal("Create made it")
			}
			if errors.Is(err, ErrUnsupported) != tc.unsupported {
				t.Errorf("error %v: unsupported %v, want %v", err, errors.Is(err, ErrUnsupported), tc.unsupported)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
			if tc.path == "exists.qcow2" {
				if b, _ := os.ReadFile(exists); string(b) != "keep" {
					t.Errorf("the existing file holds %q", b)
				}
			} else if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("Create left %s: %v", p, err)
			}
		})
	}
}

// TestMakeFallsBack: what Create refuses, Make and MakeOverlay leave to
// qemu-img create; what it makes, they make.
func TestMakeFallsBack(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	odd := filepath.Join(dir, "odd.qcow2")
	if err := Make(ctx, odd, 1000); err != nil {
		t.Fatalf("Make of 1000 bytes: %v", err)
	}
	// qemu-img rounds the size up to a sector.
	if out := qemuImg(t, "info", odd); !strings.Contains(out, "virtual size: 1 KiB (1024 bytes)") {
		t.Errorf("qemu-img info of the image qemu-img made:\n%s", out)
	}
	full := filepath.Join(dir, "full.qcow2")
	if err := Make(ctx, full, 64<<20); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	over := filepath.Join(dir, "sub", "over.qcow2")
	if err := MakeOverlay(ctx, over, full); err != nil {
		t.Fatal(err)
	}
	out := qemuImg(t, "info", "--output=json", over)
	for _, want := range []string{`"backing-filename": "../full.qcow2"`, `"virtual-size": 67108864`, `"cluster-size": 2097152`, `"extended-l2": true`} {
		if !strings.Contains(out, want) {
			t.Errorf("qemu-img info of the overlay lacks %s:\n%s", want, out)
		}
	}
	if err := MakeOverlay(ctx, filepath.Join(dir, "o2.qcow2"), filepath.Join(dir, "missing.qcow2")); err == nil || !strings.Contains(err.Error(), "backing file") {
		t.Errorf("overlay on a missing file: %v", err)
	}
	if err := Make(ctx, full, 64<<20); err == nil {
		t.Error("Make overwrote an image")
	}
}

// TestCreateTables: an image made with the L2 tables of the ranges to be
// written is clean and empty; qemu writes through those tables (and
// allocates the others itself), and reads what it wrote, the backing
// file's data elsewhere.
func TestCreateTables(t *testing.T) {
	dir := t.TempDir()
	const gib = int64(1) << 30
	const table = 256 * gib // what one L2 table maps
	base := filepath.Join(dir, "base.qcow2")
	if err := Create(base, 2<<40, ""); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, base, "write -q -P 0x11 0 1M", fmt.Sprintf("write -q -P 0x11 %d 1M", 5*table))
	for _, tc := range []struct {
		name    string
		backing string
	}{{"full", ""}, {"overlay", "base.qcow2"}} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name+".qcow2")
			written := []Range{{0, 1 << 20}, {3*table - 64<<10, 128 << 10}, {7 * table, 64 << 10}}
			capacity := int64(2 << 40)
			if tc.backing != "" {
				capacity = 0
			}
			if err := Create(p, capacity, tc.backing, written...); err != nil {
				t.Fatal(err)
			}
			if out := qemuImg(t, "check", p); !strings.Contains(out, "No errors were found") {
				t.Fatalf("qemu-img check of the new image: %s", out)
			}
			// Tables for L1 indices 0, 2, 3 and 7: every byte unallocated.
			m := qemuImg(t, "map", "--output=json", p)
			if tc.backing == "" && strings.Contains(m, `"data": true`) || strings.Contains(m, `"depth": 0, "present": true`) {
				t.Fatalf("the new image holds data:\n%s", m)
			}
			var st syscall.Stat_t
			if err := syscall.Stat(p, &st); err != nil {
				t.Fatal(err)
			}
			if fi, _ := os.Stat(p); fi.Size() != 8*createCluster || st.Blocks*512 > 64<<10 {
				t.Errorf("the image is %d bytes taking %d: want 8 clusters (4 of them tables), holes", fi.Size(), st.Blocks*512)
			}
			// Writes into made tables, across two of them, and into one
			// qemu makes (L1 index 5).
			qemuIO(t, p, "write -q -P 0x22 64K 64K", fmt.Sprintf("write -q -P 0x33 %d 128K", 3*table-64<<10),
				fmt.Sprintf("write -q -P 0x44 %d 64K", 5*table+2<<20))
			back := "0x00"
			if tc.backing != "" {
				back = "0x11"
			}
			qemuIO(t, p, "read -q -P 0x22 64K 64K", fmt.Sprintf("read -q -P 0x33 %d 128K", 3*table-64<<10),
				fmt.Sprintf("read -q -P 0x44 %d 64K", 5*table+2<<20), "read -q -P "+back+" 0 64K",
				fmt.Sprintf("read -q -P %s %d 1M", back, 5*table), fmt.Sprintf("read -q -P 0 %d 64K", 7*table))
			if out := qemuImg(t, "check", p); !strings.Contains(out, "No errors were found") {
				t.Fatalf("qemu-img check after the writes: %s", out)
			}
		})
	}
	for _, r := range []Range{{1 << 30, 512}, {512, math.MaxInt64}, {-512, 1024}, {1<<30 - 512, 1024}} {
		if err := Create(filepath.Join(dir, "x.qcow2"), 1<<30, "", r); err == nil || !strings.Contains(err.Error(), "outside a disk") {
			t.Errorf("range %+v of a 1 GiB disk: %v", r, err)
		}
	}
}

// TestCreateServed: an image Create makes, with its tables, served
// writable by qemu-nbd as the transfer serves it (qemu.StartQemuNBD) and
// written through NBD — data, all-zero payloads (in a made table, in one
// qemu makes, at the file's end), NBD zeroes and trims — reads back what
// was written and is clean for qemu-img check, and proven so by Prove.
func TestCreateServed(t *testing.T) {
	dir := t.TempDir()
	const gib = int64(1) << 30
	img := filepath.Join(dir, "a,b.qcow2") // a comma: written twice in the options
	if err := Create(img, 600*gib, "", Range{0, gib}, Range{300 * gib, gib}); err != nil {
		t.Fatal(err)
	}
	exp, err := qemu.StartQemuNBD(t.Context(), qemu.QemuNBDOptions{Image: img, Format: "qcow2", Dir: filepath.Join(dir, "nbd")})
	if err != nil {
		t.Fatal(err)
	}
	defer exp.Close()
	io := func(cmds ...string) {
		t.Helper()
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		out, err := exec.Command("qemu-io", append(args, exp.URI())...).CombinedOutput()
		if err != nil || strings.Contains(string(out), "fail") || strings.Contains(string(out), "error") {
			t.Fatalf("qemu-io %v: %v: %s", cmds, err, out)
		}
	}
	writes := []string{
		"write -q -P 0 0 2M", // zeros into a new cluster of a made table
		"write -q -P 0x11 2M 64K",
		fmt.Sprintf("write -q -P 0 %d 2M", 512*gib), // zeros where qemu makes the table
		fmt.Sprintf("write -q -P 0x22 %d 192K", 300*gib+4<<20),
		fmt.Sprintf("write -q -z %d 64K", 300*gib+4<<20), // an NBD zero over data
		"discard -q 2M 2M",
		fmt.Sprintf("write -q -P 0 %d 4M", 599*gib), // zeros at the disk's end
		"flush",
	}
	io(writes...)
	io("read -q -P 0 0 2M", "read -q -P 0 2M 2M", fmt.Sprintf("read -q -P 0 %d 2M", 512*gib),
		fmt.Sprintf("read -q -P 0 %d 64K", 300*gib+4<<20), fmt.Sprintf("read -q -P 0x22 %d 128K", 300*gib+4<<20+64<<10),
		fmt.Sprintf("read -q -P 0 %d 4M", 599*gib))
	if err := exp.Close(); err != nil {
		t.Fatal(err)
	}
	if res := proveAsQemu(t, img, true); res == nil || !res.Clean() {
		t.Errorf("qemu-img check: %+v", res)
	}
}
