package stack_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

// TestMoveTemporalDB moves a database with a hot journal from the state
// folder into a tmpfs folder and back: the state folder names it by a
// symbolic link, then holds it again; a stale journal beside the
// destination goes, and a link into a folder that is gone is dropped.
func TestMoveTemporalDB(t *testing.T) {
	state, shm := t.TempDir(), t.TempDir()
	name := filepath.Join(state, "temporal.db")
	write := func(p, s string) {
		t.Helper()
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	read := func(p string) string {
		t.Helper()
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	entries := func(dir string) []string {
		t.Helper()
		es, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range es {
			out = append(out, e.Name())
		}
		return out
	}
	// Nothing yet: nothing to move, a link to where it will be.
	if err := stack.MoveTemporalDB(state, shm); err != nil {
		t.Fatal(err)
	}
	if to, err := os.Readlink(name); err != nil || to != filepath.Join(shm, "temporal.db") {
		t.Fatalf("link %q %v", to, err)
	}
	if err := os.Remove(name); err != nil {
		t.Fatal(err)
	}

	write(name, "db1")
	write(name+"-journal", "journal1")
	write(filepath.Join(shm, "temporal.db-wal"), "stale")
	if err := stack.MoveTemporalDB(state, shm); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(name); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("state folder's temporal.db: %v %v, want a symbolic link", fi, err)
	}
	if got := entries(state); !slices.Equal(got, []string{"temporal.db"}) {
		t.Errorf("state folder: %v", got)
	}
	if got := entries(shm); !slices.Equal(got, []string{"temporal.db", "temporal.db-journal"}) {
		t.Errorf("tmpfs folder: %v", got)
	}
	if read(name) != "db1" || read(filepath.Join(shm, "temporal.db-journal")) != "journal1" {
		t.Error("contents differ")
	}
	// Again: already there.
	if err := stack.MoveTemporalDB(state, shm); err != nil {
		t.Fatal(err)
	}

	// Back, the server having changed it.
	write(filepath.Join(shm, "temporal.db"), "db2")
	if err := os.Remove(filepath.Join(shm, "temporal.db-journal")); err != nil {
		t.Fatal(err)
	}
	write(filepath.Join(state, "temporal.db-journal"), "stale")
	if err := stack.MoveTemporalDB(state, state); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(name); err != nil || !fi.Mode().IsRegular() || read(name) != "db2" {
		t.Fatalf("state folder's temporal.db: %v %v, want a file holding db2", fi, err)
	}
	if got := entries(state); !slices.Equal(got, []string{"temporal.db"}) {
		t.Errorf("state folder: %v", got)
	}
	// Again: already there.
	if err := stack.MoveTemporalDB(state, state); err != nil || read(name) != "db2" {
		t.Fatal(err)
	}

	// A link into a folder that is gone.
	if err := os.Remove(name); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(state, "gone", "temporal.db"), name); err != nil {
		t.Fatal(err)
	}
	if err := stack.MoveTemporalDB(state, state); err != nil {
		t.Fatal(err)
	}
	if got := entries(state); len(got) != 0 {
		t.Errorf("state folder: %v, want it empty", got)
	}
}

// TestTemporalDBPlaces runs three stacks one after the other on one
// state folder: with the database in the (test's) tmpfs, then without a
// tmpfs (it stays on disk, stack.log says so), then in the tmpfs again.
// A workflow started on the first is on each; each Close leaves the
// database in the state folder and the tmpfs empty.
func TestTemporalDBPlaces(t *testing.T) {
	shm := t.TempDir()
	defer stack.SetTemporalDBTmpfs(shm)()
	dir := filepath.Join(t.TempDir(), "state")
	name := filepath.Join(dir, "temporal.db")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var runID string
	for i, tmpfs := range []bool{true, false, true} {
		if tmpfs {
			stack.SetTemporalDBTmpfs(shm)
		} else {
			stack.SetTemporalDBTmpfs(filepath.Join(shm, "missing"))
		}
		s, err := stack.Start(ctx, stack.Options{Dir: dir, DatabaseURL: "postgres://unused", Binaries: stacktest.Binaries(t), NoWorker: true})
		if err != nil {
			t.Fatal(err)
		}
		func() {
			defer func() {
				if err := s.Close(); err != nil {
					t.Error(err)
				}
			}()
			db := s.TemporalDB()
			fi, err := os.Lstat(name)
			if err != nil {
				t.Fatal(err)
			}
			if tmpfs {
				if filepath.Dir(filepath.Dir(db)) != shm {
					t.Errorf("stack %d: database %s, want it in a folder in %s", i, db, shm)
				}
				if to, err := os.Readlink(name); err != nil || to != db {
					t.Errorf("stack %d: %s links to %q (%v), want %s", i, name, to, err, db)
				}
			} else {
				if db != name || !fi.Mode().IsRegular() {
					t.Errorf("stack %d: database %s (%v), want the file %s", i, db, fi.Mode(), name)
				}
				b, _ := os.ReadFile(filepath.Join(dir, "stack.log"))
				if !strings.Contains(string(b), "stays on disk") {
					t.Errorf("stack %d: stack.log does not say the database stays on disk:\n%s", i, b)
				}
			}
			if i == 0 {
				run, err := s.Client().ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: "db-test", TaskQueue: "db-test-nobody"}, "NoSuchWorkflow")
				if err != nil {
					t.Fatal(err)
				}
				runID = run.GetRunID()
			}
			if _, err := s.Client().DescribeWorkflow(ctx, "db-test", runID); err != nil {
				t.Errorf("stack %d: the workflow of the first is lost: %v", i, err)
			}
		}()
		if fi, err := os.Lstat(name); err != nil || !fi.Mode().IsRegular() {
			t.Errorf("after stack %d: %s is %v (%v), want a file", i, name, fi, err)
		}
		if es, err := os.ReadDir(shm); err != nil || len(es) != 0 {
			t.Errorf("after stack %d: tmpfs holds %v (%v)", i, es, err)
		}
		if t.Failed() {
			return
		}
	}
}

// TestTemporalDBFailedStart: a stack whose Temporal does not start
// leaves nothing in the tmpfs.
func TestTemporalDBFailedStart(t *testing.T) {
	shm := t.TempDir()
	defer stack.SetTemporalDBTmpfs(shm)()
	bins := stacktest.Binaries(t)
	bins.Temporal = "/bin/false"
	_, err := stack.Start(context.Background(), stack.Options{Dir: filepath.Join(t.TempDir(), "state"), DatabaseURL: "postgres://unused", Binaries: bins})
	if err == nil || !strings.Contains(err.Error(), "Temporal did not start") {
		t.Fatalf("Start: %v, want Temporal not to start", err)
	}
	if es, err := os.ReadDir(shm); err != nil || len(es) != 0 {
		t.Errorf("tmpfs holds %v (%v)", es, err)
	}
}
