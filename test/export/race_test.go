package export

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// An export that starts after a prune planned (the prune held before its
// merge) of a point the prune is about to rewrite: the prune's catalog
// transaction refuses, the VM is skipped with a message naming the
// export, nothing changes, and the export keeps serving the point's disk;
// once the export stops, the next prune goes through.
func TestExportStartedDuringPrune(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	l := s.Lab()
	disks, err := l.Disks(vm)
	if err != nil || len(disks) != 1 {
		t.Fatalf("lab VM %s: %+v %v", vm, disks, err)
	}
	key := disks[0].Key
	k := strconv.Itoa(int(key))
	dir := t.TempDir()
	var points []point
	for i := 1; i <= 3; i++ {
		stacktest.WriteDisk(t, l, vm, key, int64(i)*8*MiB, stacktest.Pattern(uint64(i)*17, 2*MiB))
		mode := workflows.ModeIncremental
		if i == 1 {
			mode = workflows.ModeFull
		}
		points = append(points, backup(ctx, t, s, key, dir, "p"+strconv.Itoa(i), mode))
	}
	newest := points[2]
	if res, err := s.Starter(ctx, "retention", "set", vm, "--keep-last", "1"); err != nil || res.ExitCode != 0 {
		t.Fatalf("retention set: %v %s", err, res)
	}

	// The prune plans (the two older points go, the newest is merged into
	// a full image) and holds before its merge.
	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.BeforeMerge); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = gates.Release(faultpoint.BeforeMerge) }()
	pruning, err := s.StartStarter("prune", vm, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gates.Wait(ctx, faultpoint.BeforeMerge); err != nil {
		t.Fatal(err)
	}
	// Now the newest point is exported: its lease covers the whole chain.
	res, err := s.Starter(ctx, "export", newest.id, "--disk", k, "--detach", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("export during the prune: %v %s", err, res)
	}
	var x exported
	if err := json.Unmarshal([]byte(res.Stdout), &x); err != nil || len(x.Images) != 3 {
		t.Fatalf("export --json: %v %+v", err, x)
	}
	if err := gates.Release(faultpoint.BeforeMerge); err != nil {
		t.Fatal(err)
	}
	pres, err := pruning.Wait(ctx)
	if err != nil {
		t.Fatalf("prune: %v %s", err, pres)
	}
	var pr workflows.PruneResult
	if err := stacktest.DecodeOne(pres.Stdout, &pr); err != nil || len(pr.VMs) != 1 {
		t.Fatalf("prune: %v %s", err, pres)
	}
	vmRes := pr.VMs[0]
	wid := workflows.ExportWorkflowID(newest.id, key)
	if pres.ExitCode != 1 || vmRes.Status != workflows.PruneStatusSkipped || len(vmRes.Removed) != 0 || len(vmRes.PlannedRemoved) != 2 ||
		!strings.Contains(vmRes.Error, "is read by export "+wid) || pr.BytesFreed != 0 {
		t.Errorf("a prune that met an export started after its plan: exit %d, %+v; want the VM skipped naming %s, nothing removed", pres.ExitCode, vmRes, wid)
	}
	// Nothing changed: every point is still there, and the export and a
	// restore of each point show its disk.
	sameAsCapture(ctx, t, "nbdcopy", x.URI, filepath.Join(dir, "served.raw"), newest.capture)
	for _, p := range points {
		out := filepath.Join(dir, p.id+".out")
		if res, err := s.Starter(ctx, "restore", p.id, "--disk", k, "--to", out); err != nil || res.ExitCode != 0 {
			t.Fatalf("restore of %s after the skipped prune: %v %s", p.id, err, res)
		}
		if diff, err := stacktest.SameContent(out, p.capture); err != nil || diff != "" {
			t.Errorf("%s after the skipped prune differs from the disk at its backup: %s %v", p.id, diff, err)
		}
	}

	// Once the export stops, the next prune removes the two older points.
	if res, err := s.Starter(ctx, "export", "stop", newest.id, "--disk", k); err != nil || res.ExitCode != 0 {
		t.Fatalf("export stop: %v %s", err, res)
	}
	after := prune(ctx, t, s)
	if after.Status != workflows.PruneStatusPruned || len(after.Removed) != 2 {
		t.Errorf("prune after the export stopped: %+v, want the two older points removed", after)
	}
	out := filepath.Join(dir, "newest.out")
	if res, err := s.Starter(ctx, "restore", newest.id, "--disk", k, "--to", out); err != nil || res.ExitCode != 0 {
		t.Fatalf("restore of %s after the prune: %v %s", newest.id, err, res)
	}
	if diff, err := stacktest.SameContent(out, newest.capture); err != nil || diff != "" {
		t.Errorf("%s after the prune differs from the disk at its backup: %s %v", newest.id, diff, err)
	}
}
