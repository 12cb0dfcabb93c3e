package cli

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

// `starter restore` writes a regular file or, with --to-device, a block
// device, and nothing else: an existing file is refused without --force
// (and left as it was) and replaced with it; a directory, a link to one,
// a FIFO, a socket, /dev/null, a missing folder and a block device given
// to --to are refused by name before anything is converted, and leave no
// file behind; a block device is written in place, zeros included.
func TestRestoreTargets(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	const vm = "DC0_H0_VM1"
	l := s.Lab()
	disks, err := l.Disks(vm)
	if err != nil || len(disks) != 1 {
		t.Fatalf("lab VM %s: %+v %v", vm, disks, err)
	}
	key := disks[0].Key
	stacktest.WriteDisk(t, l, vm, key, 1<<20, stacktest.Pattern(3, 8<<20))
	stacktest.WriteDisk(t, l, vm, key, 3<<30, stacktest.Pattern(4, 2<<20))
	r := run(ctx, t, s, "backup", vm, "--full", "--wait", "--json")
	var b stacktest.BackupJSON
	if r.ExitCode != 0 {
		t.Fatalf("backup: %s", r)
	}
	if err := stacktest.DecodeOne(r.Stdout, &b); err != nil {
		t.Fatal(err)
	}
	data := t.TempDir()
	capture := filepath.Join(data, "capture.raw")
	stacktest.Capture(t, l, vm, key, capture)
	capacity, err := l.DiskCapacity(vm, key)
	if err != nil {
		t.Fatal(err)
	}
	restore := func(flag, target string, extra ...string) stack.StarterResult {
		t.Helper()
		return run(ctx, t, s, append([]string{"restore", b.BackupID, "--disk", itoa(key), flag, target}, extra...)...)
	}

	// The folder restores are written to, with one node of every kind.
	out := filepath.Join(data, "out")
	p := func(name string) string { return filepath.Join(out, name) }
	for _, err := range []error{
		os.Mkdir(out, 0o755),
		os.Mkdir(p("dir"), 0o755),
		os.Symlink(p("dir"), p("link-to-dir")),
		unix.Mkfifo(p("fifo"), 0o644),
		os.WriteFile(p("disk.raw"), []byte("an older restore, to keep"), 0o644),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	sock, err := net.Listen("unix", p("socket"))
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	entries := func() []string {
		t.Helper()
		var names []string
		for _, d := range []string{out, p("dir")} {
			es, err := os.ReadDir(d)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range es {
				names = append(names, filepath.Join(d, e.Name()))
			}
		}
		return names
	}
	before := entries()

	// An existing file without --force: refused, left as it was.
	r = restore("--to", p("disk.raw"))
	if r.ExitCode != 1 || !strings.Contains(r.Stderr, p("disk.raw")+" exists (a regular file of 25 bytes); give --force to replace it") {
		t.Errorf("restore over an existing file without --force: want exit 1 and a message naming it, got %s", r)
	}
	if got, err := os.ReadFile(p("disk.raw")); err != nil || string(got) != "an older restore, to keep" {
		t.Errorf("a refused restore changed the existing file: %q %v", got, err)
	}

	// Every other kind of node is refused up front, by name. The catalog
	// is not even opened: "before anything is converted" holds whatever
	// the size of the chain.
	smallDev := loopDevice(t, 8<<20, 0xee)
	for _, c := range []struct {
		flag, target, want string
	}{
		{"--to", p("dir"), p("dir") + " is a directory: give the path of a file to write, e.g. " + p("dir/disk.raw")},
		{"--to", p("link-to-dir"), p("link-to-dir") + " is a symbolic link to " + p("dir") + ", a directory"},
		{"--to", p("fifo"), p("fifo") + " is a named pipe (FIFO), not a regular file: refused"},
		{"--to", p("socket"), p("socket") + " is a socket, not a regular file: refused"},
		{"--to", "/dev/null", "/dev/null is a character device, not a regular file: refused"},
		{"--to", p("no/such/folder/disk.raw"), "cannot write " + p("no/such/folder/disk.raw") + ": its folder " + p("no/such/folder") + " does not exist"},
		{"--to", smallDev, smallDev + " is a block device: write a block device in place with --to-device, not --to"},
		{"--to-device", "/dev/null", "/dev/null is a character device, not a block device"},
		{"--to-device", p("disk.raw"), p("disk.raw") + " is a regular file, not a block device (write a file with --to)"},
		{"--to-device", p("dir"), p("dir") + " is a directory, not a block device"},
	} {
		for _, force := range []bool{false, true} {
			var extra []string
			if force && c.flag == "--to" {
				extra = []string{"--force"}
			}
			r := restore(c.flag, c.target, extra...)
			if r.ExitCode != 1 || !strings.Contains(r.Stderr, "starter: restore: "+c.want) {
				t.Errorf("restore %s %s %v: want exit 1 and %q, got %s", c.flag, c.target, extra, c.want, r)
			}
		}
	}
	// A block device smaller than the disk: refused by size, untouched.
	r = restore("--to-device", smallDev)
	if want := "block device " + smallDev + " holds 8388608 bytes, the disk is " + itoa(capacity) + " bytes"; r.ExitCode != 1 || !strings.Contains(r.Stderr, want) {
		t.Errorf("restore onto a small device: want exit 1 and %q, got %s", want, r)
	}
	if got := readAll(t, smallDev); !bytes.Equal(got, bytes.Repeat([]byte{0xee}, 8<<20)) {
		t.Error("a refused restore wrote the small device")
	}
	if fi, err := os.Stat("/dev/null"); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		t.Errorf("/dev/null after the refused restores: %v %v", fi, err)
	}
	if after := entries(); !slices.Equal(after, before) {
		t.Errorf("refused restores left files: before %v, after %v", before, after)
	}

	// With --force, the existing file is replaced by the disk.
	r = restore("--to", p("disk.raw"), "--force")
	if r.ExitCode != 0 {
		t.Fatalf("restore --force: %s", r)
	}
	if diff, err := stacktest.SameContent(p("disk.raw"), capture); err != nil || diff != "" {
		t.Errorf("restore --force: the file differs from the disk: %s %v", diff, err)
	}
	// And a new file needs no --force.
	r = restore("--to", p("new.raw"))
	if r.ExitCode != 0 {
		t.Fatalf("restore to a new file: %s", r)
	}
	if diff, err := stacktest.SameContent(p("new.raw"), capture); err != nil || diff != "" {
		t.Errorf("restore to a new file: it differs from the disk: %s %v", diff, err)
	}

	// A block device of the disk's size, full of other data where the
	// disk has data and where it reads zeros: written in place, every
	// byte. The loop device's backing file then holds what the device
	// does.
	dev, backing := loopDeviceFile(t, capacity, map[int64]byte{0: 0xee, 2 << 20: 0xdd, 2 << 30: 0xcc, capacity - 1<<20: 0xbb})
	r = restore("--to-device", dev)
	if r.ExitCode != 0 {
		t.Fatalf("restore --to-device: %s", r)
	}
	if diff, err := stacktest.SameContent(backing, capture); err != nil || diff != "" {
		t.Errorf("restore --to-device: the device differs from the disk: %s %v", diff, err)
	}
}

func itoa[T int32 | int64](n T) string { return strconv.FormatInt(int64(n), 10) }

// loopDevice attaches a loop device of size bytes (a multiple of 1 MiB),
// all fill.
func loopDevice(t *testing.T, size int64, fill byte) string {
	t.Helper()
	fills := map[int64]byte{}
	for off := int64(0); off < size; off += 1 << 20 {
		fills[off] = fill
	}
	dev, _ := loopDeviceFile(t, size, fills)
	return dev
}

// loopDeviceFile attaches a loop device over a sparse file of size bytes
// that holds 1 MiB of each fill byte at each offset, detached when t
// ends, and returns the device and the file.
func loopDeviceFile(t *testing.T, size int64, fills map[int64]byte) (dev, backing string) {
	t.Helper()
	backing = filepath.Join(t.TempDir(), "loop.img")
	f, err := os.Create(backing)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range fills {
		if _, err := f.WriteAt(bytes.Repeat([]byte{b}, int(min(1<<20, size-off))), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", backing).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup (the test needs root and loop devices): %v: %s", err, out)
	}
	dev = strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	return dev, backing
}

func readAll(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
