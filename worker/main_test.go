package main

import (
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
)

// TestFaultPointsBuiltIn: TestMaxTransfers (maxtransfers_test.go) holds
// transfers at a fault point, so it is built only with -tags
// cbtflow_faultpoints, which make test sets; without the tag it would not
// run, silently, so this test fails instead.
func TestFaultPointsBuiltIn(t *testing.T) {
	if !faultpoint.Enabled {
		t.Fatal("built without -tags cbtflow_faultpoints: TestMaxTransfers did not run (make test sets the tag)")
	}
}

// TestMaxTransfersAtLeastOne: a worker that could copy nothing refuses to
// start, before it connects anywhere.
func TestMaxTransfersAtLeastOne(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, v := range []string{"0", "-2"} {
		err := run(log, []string{"--max-transfers", v})
		if err == nil || !strings.Contains(err.Error(), "--max-transfers "+v) {
			t.Errorf("worker --max-transfers %s: %v, want a refusal naming the flag", v, err)
		}
	}
}
