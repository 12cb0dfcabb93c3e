package restore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// nodes makes one path of every kind a restore target can be in dir.
func nodes(t *testing.T, dir string) map[string]string {
	t.Helper()
	p := func(name string) string { return filepath.Join(dir, name) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(p("file"), []byte("keep me"), 0o644))
	must(os.Mkdir(p("dir"), 0o755))
	must(os.Symlink(p("dir"), p("link-to-dir")))
	must(os.Symlink(p("file"), p("link-to-file")))
	must(os.Symlink(p("nowhere"), p("dangling")))
	must(unix.Mkfifo(p("fifo"), 0o644))
	l, err := net.Listen("unix", p("socket"))
	must(err)
	t.Cleanup(func() { l.Close() })
	// Device nodes of the kernel's own numbers: loop0 (block 7,0) and
	// null (char 1,3). Classifying them only stats them.
	must(unix.Mknod(p("blockdev"), unix.S_IFBLK|0o600, int(unix.Mkdev(7, 0))))
	must(unix.Mknod(p("chardev"), unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))))
	must(os.Symlink(p("blockdev"), p("link-to-blockdev")))
	return map[string]string{
		"missing":          p("new.raw"),
		"no folder":        p("no/such/folder/new.raw"),
		"under a file":     p("file/new.raw"),
		"file":             p("file"),
		"dir":              p("dir"),
		"dir/":             p("dir") + "/",
		"link-to-dir":      p("link-to-dir"),
		"link-to-file":     p("link-to-file"),
		"dangling":         p("dangling"),
		"fifo":             p("fifo"),
		"socket":           p("socket"),
		"blockdev":         p("blockdev"),
		"link-to-blockdev": p("link-to-blockdev"),
		"chardev":          p("chardev"),
		"/dev/null":        "/dev/null",
	}
}

func TestClassifyTarget(t *testing.T) {
	dir := t.TempDir()
	paths := nodes(t, dir)
	for _, c := range []struct {
		name     string
		kind     Kind
		symlink  bool
		resolved string // "" for the path itself
	}{
		{"missing", KindMissing, false, ""},
		{"no folder", KindNoFolder, false, ""},
		{"under a file", KindNoFolder, false, ""},
		{"file", KindRegular, false, ""},
		{"dir", KindDirectory, false, ""},
		{"dir/", KindDirectory, false, ""},
		{"link-to-dir", KindDirectory, true, filepath.Join(dir, "dir")},
		{"link-to-file", KindRegular, true, filepath.Join(dir, "file")},
		{"dangling", KindDangling, true, ""},
		{"fifo", KindFIFO, false, ""},
		{"socket", KindSocket, false, ""},
		{"blockdev", KindBlockDevice, false, ""},
		{"link-to-blockdev", KindBlockDevice, true, filepath.Join(dir, "blockdev")},
		{"chardev", KindCharDevice, false, ""},
		{"/dev/null", KindCharDevice, false, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := paths[c.name]
			got, err := ClassifyTarget(path)
			if err != nil {
				t.Fatal(err)
			}
			want := c.resolved
			if want == "" {
				want = path
			}
			if got.Kind != c.kind || got.Symlink != c.symlink || got.Resolved != want {
				t.Errorf("ClassifyTarget(%s) = %+v, want kind %q, symlink %v, resolved %s", path, got, c.kind, c.symlink, want)
			}
			if c.kind == KindRegular && got.Size != int64(len("keep me")) {
				t.Errorf("size %d, want %d", got.Size, len("keep me"))
			}
		})
	}
}

func TestCheckTarget(t *testing.T) {
	dir := t.TempDir()
	paths := nodes(t, dir)
	for _, c := range []struct {
		name          string
		force, device bool
		want          string // "" when accepted; else every ";"-separated part is in the error
	}{
		{"missing", false, false, ""},
		{"missing", true, false, ""},
		{"file", true, false, ""},
		{"link-to-file", true, false, ""},
		{"file", false, false, "exists (a regular file of 7 bytes); give --force"},
		{"link-to-file", false, false, "exists (a symbolic link to " + filepath.Join(dir, "file") + ", a regular file"},
		{"no folder", false, false, "its folder " + filepath.Join(dir, "no/such/folder") + " does not exist"},
		{"under a file", true, false, "its folder " + filepath.Join(dir, "file") + " does not exist or is not a folder"},
		{"dir", false, false, "is a directory: give the path of a file"},
		{"dir", true, false, "is a directory"},
		{"dir/", true, false, "is a directory"},
		{"link-to-dir", true, false, "is a symbolic link to " + filepath.Join(dir, "dir") + ", a directory"},
		{"dangling", true, false, "is a symbolic link to " + filepath.Join(dir, "nowhere") + ", which does not exist"},
		{"fifo", true, false, "is a named pipe (FIFO), not a regular file"},
		{"socket", true, false, "is a socket, not a regular file"},
		{"chardev", true, false, "is a character device, not a regular file"},
		{"/dev/null", true, false, "/dev/null is a character device"},
		{"blockdev", true, false, "is a block device: write a block device in place with --to-device"},
		{"blockdev", false, true, ""},
		{"link-to-blockdev", false, true, ""},
		{"missing", false, true, "device " + filepath.Join(dir, "new.raw") + " does not exist"},
		{"file", false, true, "is a regular file, not a block device (write a file with --to)"},
		{"dir", false, true, "is a directory, not a block device"},
		{"/dev/null", false, true, "/dev/null is a character device, not a block device"},
		{"fifo", false, true, "is a named pipe (FIFO), not a block device"},
	} {
		path := paths[c.name]
		_, err := CheckTarget(Options{To: path, Force: c.force, Device: c.device})
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s (force %v, device %v): refused: %v", c.name, c.force, c.device, err)
		case c.want != "" && err == nil:
			t.Errorf("%s (force %v, device %v): accepted, want %q", c.name, c.force, c.device, c.want)
		case c.want != "":
			msg := err.Error()
			if !strings.Contains(msg, path) {
				t.Errorf("%s: %q does not name the path %s", c.name, msg, path)
			}
			for _, part := range strings.Split(c.want, ";") {
				if !strings.Contains(msg, part) {
					t.Errorf("%s (force %v, device %v): %q, want it to contain %q", c.name, c.force, c.device, msg, part)
				}
			}
		}
	}
	if _, err := CheckTarget(Options{}); err == nil {
		t.Error("an empty target was accepted")
	}
	// Nothing was touched by checking.
	if b, err := os.ReadFile(paths["file"]); err != nil || string(b) != "keep me" {
		t.Errorf("file after the checks: %q %v", b, err)
	}
}

func TestConvertArgv(t *testing.T) {
	for _, c := range []struct {
		name   string
		o      qemu.ConvertOptions
		argv   []string
		device bool
	}{
		{"file raw", convertOptions("/r/b2.qcow2", "/out/.d.raw.partial-1", "raw", false),
			[]string{"convert", "-f", "qcow2", "-O", "raw", "/r/b2.qcow2", "/out/.d.raw.partial-1"}, false},
		{"file qcow2", convertOptions("/r/b2.qcow2", "/out/.d.qcow2.partial-1", "qcow2", false),
			[]string{"convert", "-f", "qcow2", "-O", "qcow2", "/r/b2.qcow2", "/out/.d.qcow2.partial-1"}, false},
		// -n: the device is written in place, never created or truncated;
		// and no --target-is-zero: its zero areas must be written.
		{"device", convertOptions("/r/b2.qcow2", "/dev/sdx", "raw", true),
			[]string{"convert", "-f", "qcow2", "-O", "raw", "-n", "/r/b2.qcow2", "/dev/sdx"}, true},
	} {
		if got := qemu.ConvertArgs(c.o); !slices.Equal(got, c.argv) {
			t.Errorf("%s: argv %q, want %q", c.name, got, c.argv)
		}
	}
}

// chain makes a 16 MiB disk as a two-image chain in dir and returns the
// top image and the disk's content.
func chain(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	ctx := context.Background()
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
	want := make([]byte, 16*mib)
	for i := range 4 * mib {
		want[i] = 0xaa
	}
	for i := 2 * mib; i < 3*mib; i++ {
		want[i] = 0xbb
	}
	clear(want[3*mib : 4*mib])
	return over, want
}

// A file target: written when missing, refused when it exists unless
// Force (then replaced whole), and no temporary file is left either way.
func TestWriteFileTarget(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := context.Background()
	dir := t.TempDir()
	top, want := chain(t, dir)
	out := filepath.Join(dir, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	leftovers := func() {
		t.Helper()
		if left, _ := filepath.Glob(filepath.Join(out, ".*partial*")); len(left) != 0 {
			t.Errorf("temporary files left: %v", left)
		}
	}
	f := filepath.Join(out, "disk.raw")
	if err := writeTarget(ctx, top, 16*mib, Options{To: f, Format: "raw"}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(f); !bytes.Equal(got, want) {
		t.Fatal("restored file differs from the disk")
	}

	if err := os.WriteFile(f, []byte("older restore"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := writeTarget(ctx, top, 16*mib, Options{To: f, Format: "raw"})
	if err == nil || !strings.Contains(err.Error(), f+" exists") {
		t.Errorf("existing file without Force: %v", err)
	}
	if got, _ := os.ReadFile(f); string(got) != "older restore" {
		t.Errorf("a refused restore changed the existing file: %d bytes", len(got))
	}
	leftovers()
	if err := writeTarget(ctx, top, 16*mib, Options{To: f, Format: "raw", Force: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(f); !bytes.Equal(got, want) {
		t.Error("Force did not replace the file with the disk")
	}

	// A link to a file: the file it names is replaced, the link stays.
	link := filepath.Join(out, "link.raw")
	real := filepath.Join(out, "real.raw")
	if err := os.WriteFile(real, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if err := writeTarget(ctx, top, 16*mib, Options{To: link, Format: "raw", Force: true}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the link was replaced: %v %v", fi, err)
	}
	if got, _ := os.ReadFile(real); !bytes.Equal(got, want) {
		t.Error("the file the link names does not hold the disk")
	}

	// A folder and /dev/null: refused before qemu-img runs.
	for _, to := range []string{out, "/dev/null"} {
		err := writeTarget(ctx, top, 16*mib, Options{To: to, Format: "raw", Force: true})
		if err == nil || !strings.Contains(err.Error(), to+" is a ") {
			t.Errorf("%s: %v", to, err)
		}
	}
	leftovers()

	// Without Force, a target that appears during the conversion is not
	// replaced.
	late := filepath.Join(out, "late.raw")
	if err := renameNoReplace(f, late); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := renameNoReplace(late, f); !errors.Is(err, os.ErrExist) {
		t.Errorf("rename onto an existing file: %v, want ErrExist", err)
	}
}

// loopDevice attaches a loop device over a file of size bytes filled
// with fill, and detaches it when t ends.
func loopDevice(t *testing.T, size int64, fill byte) string {
	t.Helper()
	backing := filepath.Join(t.TempDir(), "loop.img")
	if err := os.WriteFile(backing, bytes.Repeat([]byte{fill}, int(size)), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", backing).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup (the test needs root and loop devices): %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

func readDevice(t *testing.T, dev string, n int64) []byte {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := io.ReadFull(f, b); err != nil {
		t.Fatal(err)
	}
	return b
}

// A block device is written in place: every byte up to the disk's size
// equals the disk, the zero areas included, whatever the device held.
func TestWriteDeviceTarget(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := context.Background()
	dir := t.TempDir()
	top, want := chain(t, dir)

	dev := loopDevice(t, 20*mib, 0xee)
	if err := writeTarget(ctx, top, 16*mib, Options{To: dev, Device: true, Format: "raw"}); err != nil {
		t.Fatal(err)
	}
	got := readDevice(t, dev, 16*mib)
	if i := firstDiff(got, want); i >= 0 {
		t.Errorf("device differs from the disk at byte %d: %#x, want %#x", i, got[i], want[i])
	}

	// Too small, qcow2, a file through Device, a device through a file
	// target: refused, and the device is left as it was.
	small := loopDevice(t, 8*mib, 0xee)
	for _, c := range []struct {
		o    Options
		want string
	}{
		{Options{To: small, Device: true, Format: "raw"}, "block device " + small + " holds 8388608 bytes, the disk is 16777216 bytes"},
		{Options{To: small, Device: true, Format: "qcow2"}, "a block device is written raw, not qcow2"},
		{Options{To: small, Format: "raw", Force: true}, small + " is a block device: write a block device in place with --to-device"},
		{Options{To: "/dev/null", Device: true, Format: "raw"}, "/dev/null is a character device, not a block device"},
		{Options{To: filepath.Join(dir, "b1.qcow2"), Device: true, Format: "raw"}, "is a regular file, not a block device"},
	} {
		err := writeTarget(ctx, top, 16*mib, c.o)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.o, err, c.want)
		}
	}
	if got := readDevice(t, small, 8*mib); !bytes.Equal(got, bytes.Repeat([]byte{0xee}, 8*mib)) {
		t.Error("a refused restore wrote the device")
	}

	// A device held exclusively (as a mounted one is) is refused.
	held, err := os.OpenFile(dev, os.O_RDONLY|unix.O_EXCL, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = writeTarget(ctx, top, 16*mib, Options{To: dev, Device: true, Format: "raw"})
	held.Close()
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("a device in use: %v", err)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}
