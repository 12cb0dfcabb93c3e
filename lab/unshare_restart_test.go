package lab_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/cbtflow/cbtflow/lab"
)

// A lab that died while it moved a live image away from a snapshot's
// (disk.unshare) leaves "<live image>.unshare" in disks/: a restarted lab
// on the same Dir removes it with the other leftovers, whether or not the
// disk is still in the inventory.
func TestRestartRemovesUnshareLeftovers(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	l1, err := lab.Start(context.Background(), lab.Options{Dir: dir, Password: password})
	if err != nil {
		t.Fatal(err)
	}
	ref, err := l1.CreateVM("temp", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := l1.Close(); err != nil {
		t.Fatal(err)
	}
	lives, _ := filepath.Glob(filepath.Join(dir, "disks", "*.raw"))
	if len(lives) == 0 {
		t.Fatal("no live image")
	}
	var leftovers []string
	for _, p := range lives {
		if err := os.WriteFile(p+".unshare", []byte("half a copy"), 0o600); err != nil {
			t.Fatal(err)
		}
		leftovers = append(leftovers, p+".unshare")
	}
	startLab(t, lab.Options{Dir: dir})
	for _, p := range leftovers {
		noPath(t, "after the restart ("+ref+" was the earlier lab's)", p)
	}
}
