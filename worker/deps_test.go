package main

import (
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// simulatorPackages are what the production worker must not link: the
// lab (package lab: the simulator for tests and the demo, that production never
// runs) and govmomi's vCenter simulator under it. The lab's endpoint
// contract, lab/labapi, is allowed: the lab disk source needs it.
var simulatorPackages = []string{
	"github.com/vmware/govmomi/simulator",
	"github.com/cbtflow/cbtflow/lab",
}

// linksSimulator returns the packages of deps that are, or are under, one
// of simulatorPackages (lab/labapi excepted).
func linksSimulator(deps []string) []string {
	var bad []string
	for _, d := range deps {
		if d == "github.com/cbtflow/cbtflow/lab/labapi" {
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
	if bad := linksSimulator(goListDeps(t, "../lab")); !slices.Contains(bad, "github.com/vmware/govmomi/simulator") {
		t.Errorf("the check does not see the simulator in lab itself: %q", bad)
	}
}

// TestReleaseBinariesLinkNoTestCode: neither release binary links a test
// suite, a test harness or a tool (test/, testkit/, cmd/). The same check on
// a suite must see the harness, so an empty answer is not blindness.
func TestReleaseBinariesLinkNoTestCode(t *testing.T) {
	const module = "github.com/cbtflow/cbtflow/"
	testCode := func(deps []string) []string {
		var bad []string
		for _, d := range deps {
			for _, dir := range []string{"test/", "testkit/", "cmd/"} {
				if strings.HasPrefix(d, module+dir) {
					bad = append(bad, d)
				}
			}
		}
		return bad
	}
	for _, pkg := range []string{".", "../starter"} {
		if bad := testCode(goListDeps(t, pkg)); len(bad) > 0 {
			t.Errorf("%s links test code: %q", pkg, bad)
		}
	}
	if bad := testCode(goListDeps(t, "../testkit/stacktest")); !slices.Contains(bad, module+"testkit/stack") {
		t.Errorf("the check does not see testkit/stack in testkit/stacktest: %q", bad)
	}
}

// TestInternalHoldsOnlyProduction: every package under internal/ has
// non-test Go files in the release build; a package of _test.go files only
// is a test suite, and suites live under test/ (issue 8).
func TestInternalHoldsOnlyProduction(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed: %v", err)
	}
	out, err := exec.Command(gobin, "list", "-e", "-f", "{{.ImportPath}} {{len .GoFiles}} {{len .CgoFiles}} {{len .TestGoFiles}} {{len .XTestGoFiles}}", "../internal/...").Output()
	if err != nil {
		t.Fatalf("go list ../internal/...: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) < 10 {
		t.Fatalf("go list ../internal/... lists %d packages, want the pipeline's (at least 10): %q", len(lines), out)
	}
	for _, l := range lines {
		var pkg string
		var gofiles, cgofiles, tests, xtests int
		if _, err := fmt.Sscan(l, &pkg, &gofiles, &cgofiles, &tests, &xtests); err != nil {
			t.Fatalf("go list line %q: %v", l, err)
		}
		if gofiles+cgofiles == 0 {
			t.Errorf("%s has no production Go files (%d test files): a test suite belongs under test/, a harness under testkit/", pkg, tests+xtests)
		}
	}
}
