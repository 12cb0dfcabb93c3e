package edgecases

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
)

const (
	KiB = 1 << 10
	MiB = 1 << 20
	GiB = 1 << 30
)

// stamped returns the change IDs the lab stamped on disk key when it took
// the snapshot of backup id.
func stamped(l *lab.Lab, backupID string, key int32) []string {
	var out []string
	for _, st := range l.ChangeIDLog() {
		if st.SnapshotName == activities.SnapshotPrefix+backupID && st.DiskKey == key {
			out = append(out, st.ChangeID)
		}
	}
	return out
}

// procsOf lists the live qemu-nbd, nbdkit and qemu-img processes of a
// backup of a VM: those naming one of the backup's images (the backup ID
// is in their names) or the frozen images of the VM's snapshots in this
// lab. It waits up to a few seconds for them to go.
func procsOf(l *lab.Lab, vmRef, backupID string) []stack.Proc {
	frozen := filepath.Join(l.Dir(), "snapshots", vmRef+"-")
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []stack.Proc
		for _, p := range stack.ProcsMentioning(backupID, frozen) {
			if strings.Contains(p.Cmd, "qemu-nbd") || strings.Contains(p.Cmd, "nbdkit") || strings.Contains(p.Cmd, "qemu-img") {
				left = append(left, p)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// imageChain describes a QCOW2 and its backing chain, top first.
func imageChain(ctx context.Context, t testing.TB, path string) []qemu.ImageInfo {
	t.Helper()
	chain, err := qemu.Info(ctx, path)
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	return chain
}

// chainFiles returns the absolute file names of a chain, top first.
func chainFiles(chain []qemu.ImageInfo) []string {
	out := make([]string, 0, len(chain))
	for _, c := range chain {
		f := c.Filename
		if !filepath.IsAbs(f) {
			f, _ = filepath.Abs(f)
		}
		out = append(out, filepath.Clean(f))
	}
	return out
}
