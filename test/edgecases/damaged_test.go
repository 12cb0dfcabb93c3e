package edgecases

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

// TestDamagedChains: what an administrator's bad day does to the
// repository and the catalog between two backups. Each scenario, on a VM
// of its own with two disks, takes a full and two incremental backups,
// damages the middle restore point of the first disk, and backs up again:
// that backup completes in bounded time (the harness's 2 minutes) with the
// damaged disk as a full backup and a warning naming the damaged image or
// row and why, while the healthy second disk stays incremental; the
// damaged point and the one built on it are listed as damaged and not
// restorable, and a restore of them is refused; every other restore point
// restores byte for byte; no snapshot, process or orphan image is left.
// Then the repository is moved to another folder: backups and restores go
// on from the catalog's relative paths.
func TestDamagedChains(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	t.Run("group", func(t *testing.T) {
		t.Run("MiddleImageTruncated", func(t *testing.T) {
			t.Parallel()
			damagedChain(ctx, t, s, "dmg-truncated", "bytes, ", func(t *testing.T, mid string) {
				fi, err := os.Stat(mid)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.Truncate(mid, fi.Size()/2); err != nil {
					t.Fatal(err)
				}
			})
		})
		t.Run("MiddleImageReplaced", func(t *testing.T) {
			t.Parallel()
			damagedChain(ctx, t, s, "dmg-replaced", "SHA-256", func(t *testing.T, mid string) {
				// Another file of the same size, with the old times: only
				// the content (and the inode) tells.
				fi, err := os.Stat(mid)
				if err != nil {
					t.Fatal(err)
				}
				b, err := os.ReadFile(mid)
				if err != nil {
					t.Fatal(err)
				}
				b[len(b)/2] ^= 0x5a
				if err := os.WriteFile(mid+".new", b, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Chtimes(mid+".new", fi.ModTime(), fi.ModTime()); err != nil {
					t.Fatal(err)
				}
				if err := os.Rename(mid+".new", mid); err != nil {
					t.Fatal(err)
				}
			})
		})
		t.Run("MiddleImageDeleted", func(t *testing.T) {
			t.Parallel()
			damagedChain(ctx, t, s, "dmg-deleted", "missing", func(t *testing.T, mid string) {
				if err := os.Remove(mid); err != nil {
					t.Fatal(err)
				}
			})
		})
		t.Run("MiddleCatalogRowDeleted", func(t *testing.T) {
			t.Parallel()
			damagedChain(ctx, t, s, "dmg-row", "has no row for disk", func(t *testing.T, mid string) {
				id := strings.TrimSuffix(filepath.Base(mid), ".qcow2")
				key := filepath.Base(filepath.Dir(mid))
				conn, err := pgx.Connect(ctx, s.DatabaseURL())
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close(ctx)
				tag, err := conn.Exec(ctx, `DELETE FROM backup_disks WHERE backup_id = $1 AND disk_key = $2`, id, key)
				if err != nil || tag.RowsAffected() != 1 {
					t.Fatalf("delete the row of %s disk %s: %v %v", id, key, tag, err)
				}
			})
		})
	})
	if t.Failed() {
		return
	}
	t.Run("RepositoryMoved", func(t *testing.T) { repositoryMoved(ctx, t, s) })
	if left := s.Leftovers(); len(left) > 0 {
		t.Errorf("processes of the stack still running after the backups: %v", left)
	}
}

// damagedChain runs one scenario: damage gets the absolute path of the
// middle image of the VM's first disk; reason is part of the warning.
func damagedChain(ctx context.Context, t *testing.T, s *stack.Stack, name, reason string, damage func(t *testing.T, mid string)) {
	l := s.Lab()
	createVM(t, s, name, 256*MiB, 256*MiB)
	v := newVM(ctx, t, s, name)
	keys := v.keys(t)
	bad, good := keys[0], keys[1]

	stacktest.WriteDisk(t, l, v.ref, bad, 0, stacktest.Pattern(31, 2*MiB))
	stacktest.WriteDisk(t, l, v.ref, good, 8*MiB, stacktest.Pattern(32, 2*MiB))
	b1 := v.backup(t, "b1", all(keys, full))
	stacktest.WriteDisk(t, l, v.ref, bad, 64*MiB, stacktest.Pattern(33, MiB))
	stacktest.WriteDisk(t, l, v.ref, good, 64*MiB, stacktest.Pattern(34, MiB))
	b2 := v.backup(t, "b2", all(keys, incr))
	stacktest.WriteDisk(t, l, v.ref, bad, 128*MiB, stacktest.Pattern(35, MiB))
	b3 := v.backup(t, "b3", all(keys, incr))

	mid := b2.b.Disk(t, bad).Path
	damage(t, mid)

	stacktest.WriteDisk(t, l, v.ref, bad, 192*MiB, stacktest.Pattern(36, MiB))
	stacktest.WriteDisk(t, l, v.ref, good, 192*MiB, stacktest.Pattern(37, MiB))
	start := time.Now()
	b4 := v.backup(t, "b4", map[int32]string{bad: full, good: incr})
	took := time.Since(start)
	wantWarning(t, "b4", b4.b, fmt.Sprintf("disk %d", bad), "chain damaged", reason, b2.b.BackupID, "full backup")
	if d := b4.b.Disk(t, bad); !strings.Contains(d.Note, "chain damaged") {
		t.Errorf("b4 disk %d: note %q, want one saying the chain is damaged", bad, d.Note)
	}
	t.Logf("%s: the backup after the damage took %s", name, took.Round(time.Millisecond))

	// The catalog: b2 and b3 are damaged on the bad disk, listed, not
	// restorable; b1 and b4 are sound. (With b2's row deleted, b2 simply
	// has no such disk any more; b3, built on it, is marked.)
	rowGone := strings.Contains(reason, "no row")
	list := listOf(t, v)
	for _, tk := range []taken{b2, b3} {
		e, ok := list[tk.b.BackupID]
		if !ok {
			t.Errorf("list: %s (%s) is missing: a damaged point is never dropped", tk.label, tk.b.BackupID)
			continue
		}
		if rowGone && tk.label == "b2" {
			for _, d := range e.Disks {
				if d.Key == bad {
					t.Errorf("list: b2 has disk %d, whose row was deleted", bad)
				}
			}
			continue
		}
		if e.Restorable || e.Status != "committed" {
			t.Errorf("list: %s is %s, restorable %v; want committed and not restorable", tk.label, e.Status, e.Restorable)
		}
		for _, d := range e.Disks {
			if d.Key == bad && d.Damaged == "" {
				t.Errorf("list: %s disk %d is not marked damaged", tk.label, d.Key)
			}
			if d.Key == good && d.Damaged != "" {
				t.Errorf("list: %s disk %d (healthy) is marked damaged: %s", tk.label, d.Key, d.Damaged)
			}
		}
	}
	for _, tk := range []taken{b1, b4} {
		if e := list[tk.b.BackupID]; !e.Restorable {
			t.Errorf("list: %s is not restorable: %+v", tk.label, e)
		}
	}
	// The text listing says damaged, with the reason.
	res, err := s.Starter(ctx, "list", v.name)
	if err != nil || res.ExitCode != 0 || !strings.Contains(res.Stdout, "damaged") ||
		!strings.Contains(res.Stdout, b3.b.BackupID+fmt.Sprintf(" disk %d is damaged", bad)) {
		t.Errorf("starter list does not show the damaged points: %v %s", err, res)
	}

	// A damaged point is refused by name; everything else restores.
	for _, tk := range []taken{b2, b3} {
		out := filepath.Join(v.data, "refused-"+tk.label+".raw")
		res, err := s.Starter(ctx, "restore", tk.b.BackupID, "--disk", itoa(bad), "--to", out)
		want := "damaged"
		if rowGone && tk.label == "b2" {
			want = "has no disk"
		}
		if err != nil || res.ExitCode != 1 || !strings.Contains(res.Stderr, want) {
			t.Errorf("restore of damaged %s disk %d: %v %s; want exit 1 naming the damage", tk.label, bad, err, res)
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("restore of damaged %s left %s", tk.label, out)
			os.Remove(out)
		}
		v.restoreCompare(t, tk, good)
	}
	for _, tk := range []taken{b1, b4} {
		for _, k := range keys {
			v.restoreCompare(t, tk, k)
		}
	}
	// b5 builds on b4 again: the chain is sound from here on.
	stacktest.WriteDisk(t, l, v.ref, bad, 32*MiB, stacktest.Pattern(38, MiB))
	b5 := v.backup(t, "b5", all(keys, incr))
	wantNoWarnings(t, "b5", b5.b)
	v.restoreCompare(t, b5, bad)
	noOrphanImages(t, s, v)
}

// listOf returns `starter list VM --json` by backup ID.
func listOf(t *testing.T, v *vmUnder) map[string]stacktest.ListJSON {
	t.Helper()
	res, err := v.s.Starter(v.ctx, "list", v.name, "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("list %s: %v %s", v.name, err, res)
	}
	var list []stacktest.ListJSON
	if err := stacktest.DecodeOne(res.Stdout, &list); err != nil {
		t.Fatal(err)
	}
	out := map[string]stacktest.ListJSON{}
	for _, e := range list {
		out[e.BackupID] = e
	}
	return out
}

// noOrphanImages checks that every image of the VM in the repository
// belongs to a backup taken (no partial image is left behind).
func noOrphanImages(t *testing.T, s *stack.Stack, v *vmUnder) {
	t.Helper()
	want := map[string]bool{}
	for _, tk := range v.taken {
		for _, d := range tk.b.Disks {
			// The image and its digest file (internal/digest).
			want[filepath.Clean(d.Path)] = true
			want[filepath.Clean(d.Path)+digest.Suffix] = true
		}
	}
	uuid := v.taken[0].b.VMUUID
	files, err := filepath.Glob(filepath.Join(s.Repository(), "*", uuid, "*", "*"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !want[filepath.Clean(f)] {
			t.Errorf("orphan file in the repository: %s", f)
		}
	}
}

// repositoryMoved: the repository folder moves (another mount point);
// the worker and the CLI are pointed at the new place, and backups and
// restores go on from the catalog's relative paths.
func repositoryMoved(ctx context.Context, t *testing.T, s *stack.Stack) {
	l := s.Lab()
	createVM(t, s, "dmg-moved", 256*MiB)
	v := newVM(ctx, t, s, "dmg-moved")
	keys := v.keys(t)
	stacktest.WriteDisk(t, l, v.ref, keys[0], 0, stacktest.Pattern(41, 2*MiB))
	v.backup(t, "b1", all(keys, full))
	stacktest.WriteDisk(t, l, v.ref, keys[0], 32*MiB, stacktest.Pattern(42, MiB))
	v.backup(t, "b2", all(keys, incr))

	old := s.Repository()
	moved := filepath.Join(filepath.Dir(old), "repository-moved")
	if err := s.MoveRepository(ctx, moved); err != nil {
		t.Fatal(err)
	}
	// The earlier results name the old place: follow the move.
	for i := range v.taken {
		for j := range v.taken[i].b.Disks {
			d := &v.taken[i].b.Disks[j]
			d.Path = filepath.Join(moved, strings.TrimPrefix(d.Path, old+string(filepath.Separator)))
		}
	}
	stacktest.WriteDisk(t, l, v.ref, keys[0], 64*MiB, stacktest.Pattern(43, MiB))
	b3 := v.backup(t, "b3", all(keys, incr))
	wantNoWarnings(t, "b3", b3.b)
	if !strings.HasPrefix(b3.b.Disk(t, keys[0]).Path, moved) {
		t.Errorf("b3 was written to %s, not under the moved repository %s", b3.b.Disk(t, keys[0]).Path, moved)
	}
	v.checkCatalog(t)
	v.restoreAll(t)
}
