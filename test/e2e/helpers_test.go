package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

// checkBackupContract checks the shape of `backup --wait --json`'s output
// field by field, beyond what decoding into stacktest.BackupJSON would
// accept.
func checkBackupContract(t *testing.T, res stack.StarterResult, repo string) stacktest.BackupJSON {
	t.Helper()
	if res.ExitCode != 0 {
		t.Fatalf("backup failed: %s", res)
	}
	var raw map[string]any
	if err := stacktest.DecodeOne(res.Stdout, &raw); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"backup_id", "vm", "vm_uuid", "status"} {
		if s, ok := raw[k].(string); !ok || s == "" {
			t.Errorf("backup JSON: %q is %v, want a non-empty string", k, raw[k])
		}
	}
	disks, ok := raw["disks"].([]any)
	if !ok || len(disks) == 0 {
		t.Fatalf("backup JSON: disks is %v, want a non-empty array", raw["disks"])
	}
	for i, d := range disks {
		m, ok := d.(map[string]any)
		if !ok {
			t.Fatalf("backup JSON: disks[%d] is not an object", i)
		}
		if k, ok := m["key"].(float64); !ok || k != float64(int64(k)) || k <= 0 {
			t.Errorf("backup JSON: disks[%d].key is %v, want a positive integer", i, m["key"])
		}
		for _, f := range []string{"changed_bytes", "written_bytes"} {
			if n, ok := m[f].(float64); !ok || n < 0 || n != float64(int64(n)) {
				t.Errorf("backup JSON: disks[%d].%s is %v, want an integer >= 0", i, f, m[f])
			}
		}
		for _, f := range []string{"mode", "path", "change_id"} {
			if s, ok := m[f].(string); !ok || s == "" {
				t.Errorf("backup JSON: disks[%d].%s is %v, want a non-empty string", i, f, m[f])
			}
		}
	}
	var b stacktest.BackupJSON
	if err := json.Unmarshal([]byte(res.Stdout), &b); err != nil {
		t.Fatal(err)
	}
	if b.Status != "completed" {
		t.Errorf("backup JSON: status %q, want completed", b.Status)
	}
	for _, d := range b.Disks {
		if !filepath.IsAbs(d.Path) || !strings.HasPrefix(d.Path, repo+string(filepath.Separator)) {
			t.Errorf("disk %d: path %q is not an absolute path in the repository %s", d.Key, d.Path, repo)
		}
		if _, err := os.Stat(d.Path); err != nil {
			t.Errorf("disk %d: %v", d.Key, err)
		}
	}
	return b
}
