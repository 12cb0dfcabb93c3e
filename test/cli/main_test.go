package cli

import (
	"context"
	"testing"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

// run runs the starter with args, failing t when it could not run.
func run(ctx context.Context, t *testing.T, s *stack.Stack, args ...string) stack.StarterResult {
	t.Helper()
	r, err := s.Starter(ctx, args...)
	if err != nil {
		t.Fatalf("starter %v: %v\n%s", args, err, r)
	}
	return r
}

// list returns `starter list VM --json`.
func list(ctx context.Context, t *testing.T, s *stack.Stack, vm string) []stacktest.ListJSON {
	t.Helper()
	r := run(ctx, t, s, "list", vm, "--json")
	var out []stacktest.ListJSON
	if r.ExitCode != 0 {
		t.Fatalf("starter list: %s", r)
	}
	if err := stacktest.DecodeOne(r.Stdout, &out); err != nil {
		t.Fatal(err)
	}
	return out
}
