//go:build cbtflow_faultpoints

package faultpoint_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
)

// holdAsync runs faultpoint.Hold in ctx carrying Dir(dir) and returns a
// channel closed when it returns.
func holdAsync(ctx context.Context, dir string, p faultpoint.Point) <-chan struct{} {
	done := make(chan struct{})
	go func() { faultpoint.Hold(faultpoint.With(ctx, faultpoint.Dir(dir)), p); close(done) }()
	return done
}

func returns(t *testing.T, done <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatalf("Hold did not return: %s", what)
	}
}

// Both sides of the folder protocol: an unarmed point holds nothing; an
// armed one is reached with this process's pid and holds until Release;
// a released point holds nothing; Wait on a point nobody reaches ends with
// its context and names the point.
func TestGatesDriveDir(t *testing.T) {
	g := faultpoint.Gates{Dir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	returns(t, holdAsync(ctx, g.Dir, faultpoint.BeforeCommit), "at a point never armed")
	if g.Reached(faultpoint.BeforeCommit) {
		t.Fatal("an unarmed point was reported as reached")
	}

	if err := g.Arm(faultpoint.BeforeCommit); err != nil {
		t.Fatal(err)
	}
	done := holdAsync(ctx, g.Dir, faultpoint.BeforeCommit)
	pid, err := g.Wait(ctx, faultpoint.BeforeCommit)
	if err != nil {
		t.Fatal(err)
	}
	if pid != os.Getpid() || !g.Reached(faultpoint.BeforeCommit) {
		t.Errorf("reached by pid %d (reached %v), want %d", pid, g.Reached(faultpoint.BeforeCommit), os.Getpid())
	}
	select {
	case <-done:
		t.Fatal("the activity went on while the point was armed")
	case <-time.After(100 * time.Millisecond):
	}
	if err := g.Release(faultpoint.BeforeCommit); err != nil {
		t.Fatal(err)
	}
	returns(t, done, "after Release")
	if g.Reached(faultpoint.BeforeCommit) {
		t.Error("Release left the reached marker")
	}
	returns(t, holdAsync(ctx, g.Dir, faultpoint.BeforeCommit), "at a released point")

	short, cancel2 := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel2()
	if _, err := g.Wait(short, faultpoint.AfterCommit); err == nil || !strings.Contains(err.Error(), faultpoint.AfterCommit) {
		t.Errorf("Wait on a point nobody reaches: %v", err)
	}
}

// An armed point holds until the activity's context ends, even when
// nobody releases it: a canceled activity is never stuck there.
func TestHoldEndsWithItsContext(t *testing.T) {
	g := faultpoint.Gates{Dir: t.TempDir()}
	if err := g.Arm(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := holdAsync(ctx, g.Dir, faultpoint.MidTransfer)
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	if _, err := g.Wait(wctx, faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	cancel()
	returns(t, done, "after its context was canceled")
}

// A context without a Holder holds nowhere and is not Active, even at an
// armed point: only a worker (or test) that installs a Holder has fault
// points.
func TestHoldWithoutHolder(t *testing.T) {
	ctx := context.Background()
	if faultpoint.Active(ctx) {
		t.Fatal("a bare context is Active")
	}
	if !faultpoint.Active(faultpoint.With(ctx, faultpoint.Dir(t.TempDir()))) {
		t.Fatal("a context With a Holder is not Active")
	}
	done := make(chan struct{})
	go func() { faultpoint.Hold(ctx, faultpoint.MidTransfer); close(done) }()
	returns(t, done, "without a Holder")
}

// FromEnv installs the folder of EnvDir, and nothing when it is unset.
func TestFromEnv(t *testing.T) {
	t.Setenv(faultpoint.EnvDir, "")
	if ctx, dir := faultpoint.FromEnv(context.Background()); dir != "" || faultpoint.Active(ctx) {
		t.Errorf("EnvDir unset: folder %q, active %v", dir, faultpoint.Active(ctx))
	}
	want := t.TempDir()
	t.Setenv(faultpoint.EnvDir, want)
	ctx, dir := faultpoint.FromEnv(context.Background())
	if dir != want || !faultpoint.Active(ctx) {
		t.Errorf("EnvDir=%s: folder %q, active %v", want, dir, faultpoint.Active(ctx))
	}
}
