package space

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const (
	mib = 1 << 20
	// repoSize is the repository's tmpfs: room for a full backup of 16
	// MiB (16 MiB + 5% + the 64 MiB margin of its one disk), not for one
	// of 96 MiB, nor for an incremental of 80 MiB on top of the 16.
	repoSize = 128 * mib
	vmName   = "DC0_H0_VM1"
)

// TestRepositorySpace backs one single-disk VM up into a repository on a
// 128 MiB tmpfs:
//
//  1. with 96 MiB written, the full backup fails before the snapshot:
//     RepositoryFull, its message naming the repository, the need (with
//     the disk's allocated bytes) and the free space; the VM never had a
//     snapshot and the repository holds no new file;
//  2. with those 96 MiB punched out and 16 MiB written, the full backup
//     completes;
//  3. with 80 MiB more written, the incremental passes the check before
//     the snapshot (no earlier incremental to estimate from) and fails
//     the exact one after its CBT query: its snapshot is removed and no
//     image written.
func TestRepositorySpace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("mounting the repository's tmpfs needs root (CI runs as root; run make test as root)")
	}
	dir := filepath.Join(t.TempDir(), "state")
	repo := filepath.Join(dir, "repository")
	mountTmpfs(t, repo, repoSize)
	s := stacktest.New(t, stack.Options{Dir: dir})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	l := s.Lab()
	vm, err := l.VM(vmName)
	if err != nil {
		t.Fatal(err)
	}
	if len(vm.Disks) != 1 || vm.Disks[0].Capacity < 128*mib {
		t.Fatalf("%s has disks %+v, the test wants one of at least 128 MiB", vmName, vm.Disks)
	}
	key := vm.Disks[0].Key

	// 1. Too much for a full backup: nothing happens to the VM.
	before := files(t, repo)
	stacktest.WriteDisk(t, l, vmName, key, 0, stacktest.Pattern(1, 96*mib))
	b, msg := backupFails(ctx, t, s)
	for _, want := range []string{
		"repository " + repo + " has ", " free; the backup of VM " + vmName + " needs about ",
		fmt.Sprintf("disk %d: full, 96 MiB allocated", key), "plus a margin of ", "checked before the snapshot",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("1: the error lacks %q:\n%s", want, msg)
		}
	}
	free, needed := numbers(t, msg)
	if free > repoSize || needed < 96*mib || needed > 97*mib {
		t.Errorf("1: the error says %d bytes free (the tmpfs has %d) and %d bytes needed (96 MiB written):\n%s", free, repoSize, needed, msg)
	}
	noSnapshot(ctx, t, l, vm.Ref, "1")
	if stamps := stampsOf(l, vm.Ref); len(stamps) != 0 {
		t.Errorf("1: the VM had a snapshot taken: the lab stamped %v", stamps)
	}
	if after := files(t, repo); !slices.Equal(after, before) {
		t.Errorf("1: the repository held %v and holds %v after the failed backup %s", before, after, b.BackupID)
	}

	// 2. What fits is backed up.
	if err := l.PunchHole(vmName, key, 0, 96*mib); err != nil {
		t.Fatal(err)
	}
	stacktest.WriteDisk(t, l, vmName, key, 0, stacktest.Pattern(2, 16*mib))
	res, err := s.Starter(ctx, "backup", vmName, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ok stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &ok); err != nil || res.ExitCode != 0 || ok.Status != workflows.ReportCompleted {
		t.Fatalf("2: a backup of 16 MiB into the %d MiB repository: %v\n%s", repoSize/mib, err, res)
	}
	if d := ok.Disk(t, key); d.Mode != workflows.ModeFull || d.ChangedBytes != 16*mib {
		t.Errorf("2: disk %+v, want a full of 16 MiB", d)
	}
	noSnapshot(ctx, t, l, vm.Ref, "2")

	// 3. The incremental's exact changed bytes do not fit.
	before = files(t, repo)
	stamped := len(stampsOf(l, vm.Ref))
	stacktest.WriteDisk(t, l, vmName, key, 16*mib, stacktest.Pattern(3, 80*mib))
	_, msg = backupFails(ctx, t, s)
	for _, want := range []string{
		"repository " + repo + " has ", " free; the backup of VM " + vmName + " needs 80 MiB (",
		fmt.Sprintf("disk %d: incremental, 80 MiB changed", key), "checked after the CBT query",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("3: the error lacks %q:\n%s", want, msg)
		}
	}
	if free, needed := numbers(t, msg); needed != 80*mib || free > repoSize-16*mib {
		t.Errorf("3: the error says %d bytes free and %d needed:\n%s", free, needed, msg)
	}
	if n := len(stampsOf(l, vm.Ref)); n != stamped+1 {
		t.Errorf("3: %d snapshots taken, want the one whose CBT query told the exact bytes", n-stamped)
	}
	noSnapshot(ctx, t, l, vm.Ref, "3")
	if after := files(t, repo); !slices.Equal(after, before) {
		t.Errorf("3: the repository held %v and holds %v after the failed incremental", before, after)
	}
}

// backupFails runs a backup of the VM that must fail with the space
// check's error, and returns its report and that error.
func backupFails(ctx context.Context, t *testing.T, s *stack.Stack) (stacktest.BackupJSON, string) {
	t.Helper()
	bctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	res, err := s.Starter(bctx, "backup", vmName, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var b stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &b); err != nil {
		t.Fatal(err)
	}
	if res.ExitCode == 0 || b.Status != workflows.ReportFailed || !strings.HasPrefix(b.Error, "repository ") {
		t.Fatalf("backup %+v, want one failed by the space check\n%s", b, res)
	}
	t.Logf("the backup failed: %s", b.Error)
	return b, b.Error
}

var (
	freeRE   = regexp.MustCompile(`has [0-9.]+ [A-Za-z]+ \(([0-9]+) bytes\) free`)
	neededRE = regexp.MustCompile(`needs (?:about )?[0-9.]+ [A-Za-z]+ \(([0-9]+) bytes: `)
)

// numbers reads the free and needed bytes from a space check's message.
func numbers(t *testing.T, msg string) (free, needed int64) {
	t.Helper()
	f, n := freeRE.FindStringSubmatch(msg), neededRE.FindStringSubmatch(msg)
	if f == nil || n == nil {
		t.Fatalf("the error names no free or needed bytes:\n%s", msg)
	}
	free, _ = strconv.ParseInt(f[1], 10, 64)
	needed, _ = strconv.ParseInt(n[1], 10, 64)
	return free, needed
}

func noSnapshot(ctx context.Context, t *testing.T, l *lab.Lab, ref, step string) {
	t.Helper()
	snaps, err := stacktest.Snapshots(ctx, l, ref)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 0 {
		t.Errorf("%s: snapshots left on the VM: %v", step, snaps)
	}
}

// stampsOf lists the snapshots the lab stamped change IDs for on the VM:
// every snapshot of a VM with CBT on.
func stampsOf(l *lab.Lab, ref string) []string {
	var out []string
	for _, st := range l.ChangeIDLog() {
		if st.VMRef == ref {
			out = append(out, st.Snapshot)
		}
	}
	return out
}

// files lists the regular files below root.
func files(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// mountTmpfs mounts a tmpfs of size bytes at dir for the test, and
// unmounts it when the test ends (after the stack's cleanup, registered
// later).
func mountTmpfs(t *testing.T, dir string, size int64) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Fatalf("mount a tmpfs at %s: %v", dir, err)
	}
	t.Cleanup(func() {
		err := unix.Unmount(dir, 0)
		if errors.Is(err, syscall.EBUSY) {
			err = unix.Unmount(dir, unix.MNT_DETACH)
		}
		if err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
}
