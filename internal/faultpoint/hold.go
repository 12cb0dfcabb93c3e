//go:build cbtflow_faultpoints

package faultpoint

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"
)

// Enabled reports whether this build holds at fault points: true only
// under the tag cbtflow_faultpoints.
const Enabled = true

// Holder holds an activity at a fault point, or lets it pass; it returns
// when the activity may go on. It must return when ctx ends.
type Holder interface {
	Hold(ctx context.Context, p Point)
}

// HolderFunc is a Holder made of a function.
type HolderFunc func(ctx context.Context, p Point)

// Hold implements Holder.
func (f HolderFunc) Hold(ctx context.Context, p Point) { f(ctx, p) }

type holderKey struct{}

// With returns a context whose activities hold at fault points as h
// decides. A worker passes it as its BackgroundActivityContext, which
// every activity's context derives from: the fault points reach all of
// its activities without a field in the production structs, and two
// workers (or two test environments) in one process keep theirs apart.
func With(ctx context.Context, h Holder) context.Context {
	return context.WithValue(ctx, holderKey{}, h)
}

// Hold holds the activity whose context is ctx at p, when its context
// carries a Holder (With); otherwise it returns at once.
func Hold(ctx context.Context, p Point) {
	if h, ok := ctx.Value(holderKey{}).(Holder); ok && h != nil {
		h.Hold(ctx, p)
	}
}

// Active reports whether ctx carries a Holder: an activity that holds
// at a point midway (TransferDisk at MidTransfer) reports its progress
// often enough to notice that it got there.
func Active(ctx context.Context) bool {
	h, ok := ctx.Value(holderKey{}).(Holder)
	return ok && h != nil
}

// Dir is the worker side of the folder protocol: it holds at p while the
// gate file DIR/<p> exists, after writing its pid into DIR/<p>.reached
// (see Gates). The worker uses it when EnvDir names a folder (FromEnv).
type Dir string

// Hold implements Holder.
func (d Dir) Hold(ctx context.Context, p Point) {
	dir := string(d)
	if check(dir, p) != nil {
		return
	}
	if _, err := os.Stat(gate(dir, p)); err != nil {
		return
	}
	// Written after the gate was seen, so the harness's Wait never
	// returns for an activity that then passes.
	_ = os.WriteFile(reached(dir, p), fmt.Appendf(nil, "%d\n", os.Getpid()), 0o644)
	for {
		if _, err := os.Stat(gate(dir, p)); errors.Is(err, os.ErrNotExist) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(poll):
		}
	}
}

// FromEnv returns ctx with a Dir holder when the process's EnvDir names a
// folder, and the folder ("" and ctx itself when it is unset).
func FromEnv(ctx context.Context) (context.Context, string) {
	dir := os.Getenv(EnvDir)
	if dir == "" {
		return ctx, ""
	}
	return With(ctx, Dir(dir)), dir
}
