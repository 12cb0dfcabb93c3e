package main

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// simulatorPackages are what the production worker must not link: the
// lab (internal/lab, test and demo infrastructure that production never
// runs) and govmomi's vCenter simulator under it. The lab's endpoint
// contract, internal/lab/labapi, is allowed: the lab disk source needs it.
var simulatorPackages = []string{
	"github.com/vmware/govmomi/simulator",
	"github.com/cbtflow/cbtflow/internal/lab",
}

// linksSimulator returns the packages of deps that are, or are under, one
// of simulatorPackages (internal/lab/labapi excepted).
func linksSimulator(deps []string) []string {
	var bad []string
	for _, d := range deps {
		if d == "github.com/cbtflow/cbtflow/internal/lab/labapi" {
			continue
		}
		for _, p := range simulatorPackages {
			if d == p || strings.HasPrefix(d, p+"/") {
				bad = append(bad, d)
			}
		}
	}
	return bad
}

// goListDeps lists the packages pkg links, as `go list -deps` does for a
// build without tags (the release build).
func goListDeps(t *testing.T, pkg string) []string {
	t.Helper()
	gobin, err := exec.LookPath("go") // go test puts GOROOT/bin on the PATH
	if err != nil {
		t.Fatalf("the go command is needed: %v", err)
	}
	cmd := exec.Command(gobin, "list", "-deps", pkg)
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("go list -deps %s: %v: %s", pkg, err, stderr)
	}
	return strings.Fields(string(out))
}

// TestWorkerDoesNotLinkSimulator: the worker binary links neither the lab
// nor govmomi's simulator (issue 8). The same check run on the lab itself
// must find the simulator, so an empty answer means the worker is clean,
// not that the check cannot see.
func TestWorkerDoesNotLinkSimulator(t *testing.T) {
	deps := goListDeps(t, ".")
	if !slices.Contains(deps, "github.com/cbtflow/cbtflow/worker") || !slices.Contains(deps, "github.com/cbtflow/cbtflow/internal/source") {
		t.Fatalf("go list -deps . does not list the worker and its lab source: %q", deps)
	}
	if bad := linksSimulator(deps); len(bad) > 0 {
		t.Errorf("the worker links the lab or the vCenter simulator: %q (find who imports them with `go list -deps -f '{{.ImportPath}}: {{.Imports}}' ./worker`)", bad)
	}
	if bad := linksSimulator(goListDeps(t, "../internal/lab")); !slices.Contains(bad, "github.com/vmware/govmomi/simulator") {
		t.Errorf("the check does not see the simulator in internal/lab itself: %q", bad)
	}
}
