package qemu

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestStartWhileEarlierAttemptRemovesDir: a transfer names its servers'
// folder, and an earlier attempt of it removes that folder, empty, when
// it ends; if that happens while a retry's server starts there, the
// start makes the folder again and succeeds.
func TestStartWhileEarlierAttemptRemovesDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "b1-2000-s")
	removed := 0
	testHookStarting = func(d string) {
		if removed == 0 && d == dir {
			removed++
			if err := unix.Rmdir(d); err != nil {
				t.Errorf("removing the empty folder: %v", err)
			}
		}
	}
	t.Cleanup(func() { testHookStarting = nil })
	e, err := StartNbdkit(context.Background(), NbdkitOptions{Plugin: "memory", Params: []string{"size=1M"}, Dir: dir})
	if err != nil {
		t.Fatalf("the server did not start after its folder vanished: %v", err)
	}
	if removed != 1 {
		t.Fatalf("the folder was removed %d times; the test wants once", removed)
	}
	if !Greets("unix", filepath.Join(dir, socketName)) {
		t.Error("the restarted server does not answer on its socket")
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if left, err := os.ReadDir(dir); err != nil || len(left) != 0 {
		t.Errorf("the folder holds %v after Close (%v)", left, err)
	}
}
