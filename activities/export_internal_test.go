package activities

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/catalog"
)

// A renewal that the database does not answer is given up when the
// lease's margin runs out, not when the call returns: an export whose
// catalog hangs stops serving before its lease expires under a prune.
func TestRenewLeaseBoundedByTheLease(t *testing.T) {
	ctx := context.Background()
	hang := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }
	renewed := time.Now().Add(-150 * time.Millisecond)
	start := time.Now()
	got, stop, err := renewLease(ctx, renewed, 200*time.Millisecond, hang)
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("a hanging renewal returned after %s, want within the lease's margin (50ms)", took)
	}
	if !stop || err == nil || !got.Equal(renewed) {
		t.Errorf("hanging renewal past the margin: %s %v %v, want stop with an error, renewed unchanged", got, stop, err)
	}

	// A failure within the margin is tried again; a lease that is gone
	// stops the export at once; a renewal counts from before the call.
	failed := func(context.Context) error { return errors.New("connection refused") }
	if got, stop, err := renewLease(ctx, time.Now(), time.Minute, failed); stop || err == nil || got.After(time.Now()) {
		t.Errorf("failure within the margin: %s %v %v, want no stop and the error", got, stop, err)
	}
	gone := func(context.Context) error { return fmt.Errorf("no lease: %w", catalog.ErrNotFound) }
	if _, stop, err := renewLease(ctx, time.Now(), time.Minute, gone); !stop || !errors.Is(err, catalog.ErrNotFound) {
		t.Errorf("lease gone: %v %v, want stop with ErrNotFound", stop, err)
	}
	before := time.Now()
	slow := func(context.Context) error { time.Sleep(50 * time.Millisecond); return nil }
	if got, stop, err := renewLease(ctx, time.Now(), time.Minute, slow); stop || err != nil || got.Before(before) || !got.Before(before.Add(40*time.Millisecond)) {
		t.Errorf("slow renewal: %s (called at %s) %v %v, want the instant before the call", got, before, stop, err)
	}
	if _, stop, err := renewLease(ctx, time.Now().Add(-time.Minute), time.Second, slow); !stop || err == nil {
		t.Errorf("renewal after the margin passed: %v %v, want stop", stop, err)
	}
}
