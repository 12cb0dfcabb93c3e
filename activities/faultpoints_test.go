package activities_test

import (
	"testing"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
)

// The tests that hold activities at fault points (midcopy_test.go,
// transfercheck_test.go) are built only with -tags cbtflow_faultpoints,
// which make test sets: without it they would not run, silently, so this
// test fails instead.
func TestFaultPointsBuiltIn(t *testing.T) {
	if !faultpoint.Enabled {
		t.Fatal("built without -tags cbtflow_faultpoints: the fault-point tests of this package did not run (make test sets the tag)")
	}
}
