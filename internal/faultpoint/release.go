//go:build !cbtflow_faultpoints

package faultpoint

import "context"

// Enabled reports whether this build holds at fault points: false, as in
// every release build.
const Enabled = false

// Hold does nothing in a release build; the compiler inlines it away, so
// the binary keeps no trace of the fault points.
func Hold(context.Context, Point) {}

// Active is false in a release build.
func Active(context.Context) bool { return false }

// FromEnv returns ctx as it is in a release build: EnvDir is not read.
func FromEnv(ctx context.Context) (context.Context, string) { return ctx, "" }
