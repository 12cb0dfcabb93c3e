// Package stacktest starts a cbtflow stack (package stack) for one Go test:
// its own state folder, free ports, its own PostgreSQL database, and checks
// when the test ends that no process is left behind. It is imported only
// from _test.go files.
//
// The worker and the starter are built once per test binary; call Main
// from TestMain so that the build folder is removed at the end:
//
//	func TestMain(m *testing.M) { stacktest.Main(m) }
//
// It also holds the helpers the tests that drive a whole stack share: lab
// disk data (Pattern, WriteDisk, Capture, FlipByte), the sparse-aware
// comparison of a restored disk with its capture (SameContent), the
// starter's JSON output (DecodeOne, BackupJSON, ListJSON), Temporal's view
// of the workflows (ListWorkflows, History, ProtoContains) and vSphere's
// view of the snapshots (Snapshots).
package stacktest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

var (
	buildOnce sync.Once
	buildDir  string
	built     stack.Binaries
	buildErr  error
)

// Main runs the tests and removes the binaries built for them.
func Main(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		_ = os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// Binaries returns the programs of the stack, building the worker and the
// starter on the first call (see stack.BuildBinaries). It fails the test
// when the Temporal CLI is missing or the build fails: it never skips.
func Binaries(t testing.TB) stack.Binaries {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "cbtflow-bin-")
		if buildErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		built, buildErr = stack.BuildBinaries(ctx, buildDir)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

// New starts a stack for t on a fresh database in a temporary state folder
// and closes it when t ends, failing t when something is left behind. It
// registers testutil.CheckNoChildren first, so call it before other
// cleanups that should run while the stack still runs. When t fails, the
// tails of the worker's and Temporal's logs are logged.
func New(t testing.TB, opts stack.Options) *stack.Stack {
	t.Helper()
	testutil.CheckNoChildren(t)
	opts.Binaries = Binaries(t)
	if opts.DatabaseURL == "" {
		opts.DatabaseURL = testutil.Database(t)
	}
	if opts.Dir == "" {
		opts.Dir = filepath.Join(t.TempDir(), "state")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	s, err := stack.Start(ctx, opts)
	if err != nil {
		logTails(t, opts.Dir)
		t.Fatal(err)
	}
	t.Logf("stack up in %s: temporal %s (database %s), state %s", time.Since(start).Round(time.Millisecond), s.TemporalAddress(), s.TemporalDB(), s.Dir())
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			logTails(t, s.Dir())
		}
	})
	return s
}

// logTails logs the last lines of the stack's logs.
func logTails(t testing.TB, dir string) {
	t.Helper()
	for _, name := range []string{"worker.log", "temporal.log", "lab.log"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || len(b) == 0 {
			continue
		}
		lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		var sb strings.Builder
		for _, l := range lines {
			sb.Write(l)
			sb.WriteByte('\n')
		}
		t.Logf("last lines of %s:\n%s", name, sb.String())
	}
}
