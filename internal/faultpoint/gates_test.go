package faultpoint_test

import (
	"context"
	"testing"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
)

// Gates refuse a point or folder that is not one plain file in a folder:
// a typo must not arm a file elsewhere.
func TestGatesRefuseBadPoints(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		dir string
		p   faultpoint.Point
	}{
		{dir, ""}, {dir, "../x"}, {dir, `a\b`}, {dir, ".hidden"}, {"", faultpoint.MidTransfer},
	} {
		g := faultpoint.Gates{Dir: tc.dir}
		if err := g.Arm(tc.p); err == nil {
			t.Errorf("Arm(%q) in %q: no error", tc.p, tc.dir)
		}
		if err := g.Release(tc.p); err == nil {
			t.Errorf("Release(%q) in %q: no error", tc.p, tc.dir)
		}
		if _, err := g.Wait(context.Background(), tc.p); err == nil {
			t.Errorf("Wait(%q) in %q: no error", tc.p, tc.dir)
		}
	}
}
