package prune

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const (
	vm  = lab.SecondDiskVM
	MiB = 1 << 20
	GiB = 1 << 30
)

var keys = []int32{204, 205}

// point is one backup and the disks' content at its time.
type point struct {
	id   string
	caps map[int32]string
}

// backup captures the disks, backs the VM up and checks the mode.
func backup(ctx context.Context, t *testing.T, s *stack.Stack, dir, name, wantMode string) point {
	t.Helper()
	p := point{caps: map[int32]string{}}
	for _, k := range keys {
		p.caps[k] = filepath.Join(dir, fmt.Sprintf("%s-%d.raw", name, k))
		stacktest.Capture(t, s.Lab(), vm, k, p.caps[k])
	}
	res, err := s.Starter(ctx, "backup", vm, "--wait", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("%s: backup: %v %s", name, err, res)
	}
	var b stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &b); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if m := b.Disk(t, k).Mode; m != wantMode {
			t.Errorf("%s: disk %d is %s, want %s", name, k, m, wantMode)
		}
	}
	p.id = b.BackupID
	return p
}

// restoresAsBackedUp restores every disk of p and compares it with the
// capture taken at its backup.
func restoresAsBackedUp(ctx context.Context, t *testing.T, s *stack.Stack, dir string, p point) {
	t.Helper()
	for _, k := range keys {
		out := filepath.Join(dir, fmt.Sprintf("restored-%s-%d.raw", p.id, k))
		res, err := s.Starter(ctx, "restore", p.id, "--disk", fmt.Sprint(k), "--to", out)
		if err != nil || res.ExitCode != 0 {
			t.Errorf("restore %s disk %d: %v %s", p.id, k, err, res)
			continue
		}
		if diff, err := stacktest.SameContent(p.caps[k], out); err != nil || diff != "" {
			t.Errorf("restore point %s disk %d differs from the disk at backup time: %s %v", p.id, k, diff, err)
		}
		os.Remove(out)
	}
}

// vmFiles returns the VM's files in the repository and their total
// allocated size.
func vmFiles(t *testing.T, root string) ([]string, int64) {
	t.Helper()
	var files []string
	var total int64
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		// The space the files take: images are sparse.
		total += fi.Sys().(*syscall.Stat_t).Blocks * 512
		// An image's digest file (internal/digest) goes with its image;
		// one without its image is listed.
		if img, ok := strings.CutSuffix(path, digest.Suffix); ok {
			if _, err := os.Stat(img); err == nil {
				return nil
			}
		}
		files = append(files, path)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files, total
}

// TestKeepLastTwo is issue 9's acceptance: six backups with different
// data, keep-last 2, prune: exactly the two newest points remain, both
// restore as they were backed up, the repository shrinks to about their
// data, and the next backup is an incremental that restores identical.
func TestKeepLastTwo(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	l := s.Lab()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	dir := t.TempDir()

	var points []point
	for i := 1; i <= 6; i++ {
		// Each backup writes its own data: some new areas, some over the
		// previous backups' data, and zeros over old data.
		for _, k := range keys {
			stacktest.WriteDisk(t, l, vm, k, int64(i)*64*MiB, stacktest.Pattern(uint64(10*i)+uint64(k), 3*MiB))
			stacktest.WriteDisk(t, l, vm, k, 0, stacktest.Pattern(uint64(100*i)+uint64(k), MiB))
			if i > 1 {
				stacktest.WriteDisk(t, l, vm, k, int64(i-1)*64*MiB+MiB, make([]byte, 512*1024))
			}
		}
		mode := workflows.ModeIncremental
		if i == 1 {
			mode = workflows.ModeFull
		}
		points = append(points, backup(ctx, t, s, dir, fmt.Sprintf("b%d", i), mode))
	}
	root := s.Repository()
	_, before := vmFiles(t, root)

	res, err := s.Starter(ctx, "retention", "set", vm, "--keep-last", "2")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("retention set: %v %s", err, res)
	}

	// A dry run says what would go and removes nothing.
	res, err = s.Starter(ctx, "prune", vm, "--dry-run", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("prune --dry-run: %v %s", err, res)
	}
	var dry workflows.PruneResult
	if err := stacktest.DecodeOne(res.Stdout, &dry); err != nil {
		t.Fatal(err)
	}
	want := []string{points[3].id, points[2].id, points[1].id, points[0].id}
	if len(dry.VMs) != 1 || !slices.Equal(removedIDs(dry.VMs[0]), want) || !dry.DryRun || dry.VMs[0].Status != workflows.PruneStatusDryRun {
		t.Fatalf("dry run: %+v, want %v removed", dry, want)
	}
	if _, after := vmFiles(t, root); after != before {
		t.Errorf("the dry run changed the repository: %d → %d bytes", before, after)
	}

	res, err = s.Starter(ctx, "prune", vm, "--wait", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("prune: %v %s", err, res)
	}
	var pr workflows.PruneResult
	if err := stacktest.DecodeOne(res.Stdout, &pr); err != nil {
		t.Fatal(err)
	}
	if len(pr.VMs) != 1 || !slices.Equal(removedIDs(pr.VMs[0]), want) || pr.BytesFreed <= 0 || pr.VMs[0].Status != workflows.PruneStatusPruned {
		t.Fatalf("prune: %+v, want %v removed and bytes freed", pr, want)
	}
	kept := pr.VMs[0].Kept
	if len(kept) != 2 || kept[0].BackupID != points[5].id || kept[1].BackupID != points[4].id ||
		!slices.Contains(kept[0].Rules, "last 1") || !slices.Contains(kept[1].Rules, "last 2") {
		t.Errorf("kept %+v, want %s (last 1) and %s (last 2)", kept, points[5].id, points[4].id)
	}
	if len(pr.VMs[0].Merged) != len(keys) {
		t.Errorf("merged images %+v, want one per disk of %s", pr.VMs[0].Merged, points[4].id)
	}

	// The catalog lists exactly the two newest points.
	res, err = s.Starter(ctx, "list", vm, "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("list: %v %s", err, res)
	}
	var list []stacktest.ListJSON
	if err := stacktest.DecodeOne(res.Stdout, &list); err != nil {
		t.Fatal(err)
	}
	var listed []string
	for _, b := range list {
		listed = append(listed, b.BackupID)
	}
	if !slices.Equal(listed, []string{points[5].id, points[4].id}) {
		t.Errorf("list after the prune: %v, want %s %s", listed, points[5].id, points[4].id)
	}
	for _, p := range points[4:] {
		restoresAsBackedUp(ctx, t, s, dir, p)
	}

	// The repository holds the two points' data: no file of a removed
	// point, no temporary image, and less than before.
	files, after := vmFiles(t, root)
	for _, f := range files {
		for _, p := range points[:4] {
			if strings.Contains(filepath.Base(f), p.id) {
				t.Errorf("file of removed point %s left: %s", p.id, f)
			}
		}
		if strings.HasPrefix(filepath.Base(f), ".") {
			t.Errorf("temporary file left: %s", f)
		}
	}
	if len(files) != 2*len(keys) {
		t.Errorf("%d files in the repository, want %d: %v", len(files), 2*len(keys), files)
	}
	// The two points hold: per disk 1 MiB at 0 and 3 MiB at each of six
	// offsets (zeros inside), so about 19 MiB per disk plus the newest's
	// incremental; anything near the six points' sum means nothing shrank.
	if after >= before || after > 2*(24*MiB)+8*MiB {
		t.Errorf("repository %d bytes after the prune (%d before), want about the two points' data", after, before)
	}
	t.Logf("repository: %d bytes before, %d after; prune freed %d", before, after, pr.BytesFreed)

	// The next backup continues the chain.
	for _, k := range keys {
		stacktest.WriteDisk(t, l, vm, k, 7*64*MiB, stacktest.Pattern(uint64(700)+uint64(k), 2*MiB))
	}
	next := backup(ctx, t, s, dir, "b7", workflows.ModeIncremental)
	restoresAsBackedUp(ctx, t, s, dir, next)
}

func removedIDs(vm workflows.PruneVMResult) []string {
	var ids []string
	for _, r := range vm.Removed {
		ids = append(ids, r.BackupID)
	}
	return ids
}
