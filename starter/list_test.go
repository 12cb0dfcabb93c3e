package main

import (
	"strings"
	"testing"
)

// TestListRejectsUnknownStatus: a typo in --status is a usage error naming
// the valid statuses, not an empty listing (issue 10); it is refused
// before any database is opened.
func TestListRejectsUnknownStatus(t *testing.T) {
	r := runIn(t, "list", "--status", "comitted", "--database-url", "postgres://127.0.0.1:1/none")
	if r.code != 2 || !strings.Contains(r.stderr, `"comitted"`) || !strings.Contains(r.stderr, "running, committed or failed") {
		t.Fatalf("list --status comitted: exit %d, stderr %s; want exit 2 and a message naming it and the valid statuses", r.code, r.stderr)
	}
}
