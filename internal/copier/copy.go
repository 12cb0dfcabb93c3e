package copier

import (
	"context"
	"errors"
)

// Copy copies opts.Extents from opts.Source to opts.Target and returns what
// it did. It ends with a FLUSH of the target: when it returns without error,
// every extent is durable. On error, the last Progress.ResumePoint reported
// is a valid Options.ResumeFrom for a new attempt. Cancelling ctx stops the
// copy promptly; connections are always closed before Copy returns.
func Copy(ctx context.Context, opts Options) (*Result, error) {
	return nil, errors.New("copier: not implemented yet")
}
