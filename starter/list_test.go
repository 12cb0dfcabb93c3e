package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
)

// TestListRejectsUnknownStatus: a typo in --status is a usage error naming
// the valid statuses, not an empty listing (issue 10); it is refused
// before any database is opened.
func TestListRejectsUnknownStatus(t *testing.T) {
	e := &env{stdout: io.Discard, stderr: io.Discard, log: slog.New(slog.DiscardHandler), getenv: func(string) string { return "" }}
	err := commands["list"].run(context.Background(), e, []string{"--status", "comitted", "--database-url", "postgres://127.0.0.1:1/none"})
	var usage usageError
	if !errors.As(err, &usage) || !strings.Contains(err.Error(), `"comitted"`) || !strings.Contains(err.Error(), "running, committed or failed") {
		t.Fatalf("list --status comitted: %v, want a usage error naming it and the valid statuses", err)
	}
}
