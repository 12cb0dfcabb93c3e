package prune

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// TestMaxChain is issue 9's acceptance for --max-chain: with a policy's
// max-chain 3, a disk's chain holds at most three images. Backups 1 to 3
// are full, incremental, incremental; the 4th is a full one for every
// disk, with a note naming the limit in the backup's result, and full in
// `starter list`; the 5th is an incremental on the 4th again. Every point
// restores as it was backed up.
func TestMaxChain(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	l := s.Lab()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	dir := t.TempDir()

	var points []point
	var reports []stacktest.BackupJSON
	for i := 1; i <= 5; i++ {
		for _, k := range keys {
			stacktest.WriteDisk(t, l, vm, k, 0, stacktest.Pattern(uint64(300*i)+uint64(k), 512*1024))
			stacktest.WriteDisk(t, l, vm, k, int64(i)*16*MiB, stacktest.Pattern(uint64(400*i)+uint64(k), MiB))
		}
		p, r := backupReport(ctx, t, s, dir, fmt.Sprintf("m%d", i))
		points, reports = append(points, p), append(reports, r)
		if i == 1 {
			// A policy is set on a VM the catalog knows: after its first
			// backup.
			res, err := s.Starter(ctx, "retention", "set", vm, "--keep-last", "10", "--max-chain", "3")
			if err != nil || res.ExitCode != 0 {
				t.Fatalf("retention set: %v %s", err, res)
			}
		}
	}

	want := []string{workflows.ModeFull, workflows.ModeIncremental, workflows.ModeIncremental, workflows.ModeFull, workflows.ModeIncremental}
	for i, r := range reports {
		for _, k := range keys {
			d := r.Disk(t, k)
			if d.Mode != want[i] {
				t.Errorf("backup %d (%s) disk %d is %s, want %s (note %q)", i+1, r.BackupID, k, d.Mode, want[i], d.Note)
			}
			if i == 3 && !(strings.Contains(d.Note, "chain has 3 images") && strings.Contains(d.Note, "limit 3")) {
				t.Errorf("backup 4 (%s) disk %d: note %q, want one naming the chain's 3 images and the limit 3", r.BackupID, k, d.Note)
			}
			if (i == 1 || i == 2 || i == 4) && d.Note != "" {
				t.Errorf("backup %d (%s) disk %d, an incremental, has the note %q", i+1, r.BackupID, k, d.Note)
			}
		}
	}

	// `starter list` shows the modes, and the catalog the chains: the 4th
	// starts a new one, the 5th builds on it.
	res, err := s.Starter(ctx, "list", vm, "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("list: %v %s", err, res)
	}
	var list []stacktest.ListJSON
	if err := stacktest.DecodeOne(res.Stdout, &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != len(points) {
		t.Fatalf("list shows %d backups, want %d: %+v", len(list), len(points), list)
	}
	for j, e := range list {
		i := len(points) - 1 - j // newest first
		if e.BackupID != points[i].id || !e.Restorable {
			t.Errorf("list entry %d: %s (restorable %v), want %s", j, e.BackupID, e.Restorable, points[i].id)
			continue
		}
		for _, d := range e.Disks {
			if d.Mode != want[i] {
				t.Errorf("list: %s disk %d is %s, want %s", e.BackupID, d.Key, d.Mode, want[i])
			}
		}
		if len(e.Disks) != len(keys) {
			t.Errorf("list: %s has %d disks, want %d", e.BackupID, len(e.Disks), len(keys))
		}
	}
	backing := backingOf(ctx, t, s)
	for _, k := range keys {
		for i, on := range []string{"", points[0].id, points[1].id, "", points[3].id} {
			if got := backing[fmt.Sprintf("%s/%d", points[i].id, k)]; got != on {
				t.Errorf("catalog: backup %d (%s) disk %d builds on %q, want %q", i+1, points[i].id, k, got, on)
			}
		}
	}
	for _, p := range points[2:] {
		restoresAsBackedUp(ctx, t, s, dir, p)
	}
}

// backupReport captures the disks and backs the VM up, like backup, and
// returns the backup's report too; it checks no mode.
func backupReport(ctx context.Context, t *testing.T, s *stack.Stack, dir, name string) (point, stacktest.BackupJSON) {
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
	if b.Status != workflows.ReportCompleted {
		t.Fatalf("%s: backup %s: %s", name, b.Status, b.Error)
	}
	p.id = b.BackupID
	return p, b
}
