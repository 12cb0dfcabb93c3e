package stack

import (
	"bytes"
	"context"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
)

// faultPointTraces are what a binary with fault points holds: the
// package's symbols, and the strings only its code uses.
type faultPointTraces struct {
	symbols []string // symbols of internal/faultpoint
	strs    []string // EnvDir, the point names, the worker's log line
}

func tracesIn(t *testing.T, path string) faultPointTraces {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var tr faultPointTraces
	for _, s := range syms {
		if strings.Contains(s.Name, "cbtflow/internal/faultpoint.") {
			tr.symbols = append(tr.symbols, s.Name)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range append([]string{faultpoint.EnvDir, "fault points enabled"}, faultpoint.All...) {
		if bytes.Contains(b, []byte(s)) {
			tr.strs = append(tr.strs, s)
		}
	}
	return tr
}

// TestReleaseBuildHasNoFaultPoints: `go build ./worker ./starter` without
// tags (make build) yields binaries without any fault-point code, symbol
// or string, and Start refuses such a worker for a stack with fault
// points; the harness's worker (BuildBinaries) has them all, which also
// proves that the search above finds them when they are there.
func TestReleaseBuildHasNoFaultPoints(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	goBin, err := goTool()
	if err != nil {
		t.Fatal(err)
	}
	rel := t.TempDir()
	out, err := exec.CommandContext(ctx, goBin, "build", "-o", rel+string(filepath.Separator),
		"github.com/cbtflow/cbtflow/worker", "github.com/cbtflow/cbtflow/starter").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, name := range []string{"worker", "starter"} {
		path := filepath.Join(rel, name)
		if tr := tracesIn(t, path); len(tr.symbols)+len(tr.strs) != 0 {
			t.Errorf("release %s has fault points: symbols %v, strings %q", name, tr.symbols, tr.strs)
		}
		if tagged, err := hasFaultPoints(path); tagged || err != nil {
			t.Errorf("release %s: built with %s %v (%v)", name, faultpoint.Tag, tagged, err)
		}
	}
	if err := checkFaultPoints(filepath.Join(rel, "worker")); err == nil || !strings.Contains(err.Error(), faultpoint.Tag) {
		t.Errorf("a release worker for a stack with fault points: %v, want a refusal naming the tag", err)
	}

	t.Setenv(EnvWorkerBin, "")
	t.Setenv(EnvStarterBin, "")
	b, err := BuildBinaries(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	tr := tracesIn(t, b.Worker)
	if want := 2 + len(faultpoint.All); len(tr.symbols) == 0 || len(tr.strs) != want {
		t.Errorf("the harness's worker lacks fault points: symbols %v, strings %q (want all %d)", tr.symbols, tr.strs, want)
	}
	if err := checkFaultPoints(b.Worker); err != nil {
		t.Errorf("the harness's worker: %v", err)
	}
}
