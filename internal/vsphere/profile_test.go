package vsphere

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestProfileRefusesLabSourceFilters: the lab's fault settings left the
// production profile schema (they are the lab's own, labapi.Filter). A
// profiles file that still sets lab_source_filters is refused with an
// error naming the field, not read with the faults silently dropped; the
// same lab profile without it loads.
func TestProfileRefusesLabSourceFilters(t *testing.T) {
	dir := t.TempDir()
	load := func(name, fields string) (map[string]Profile, error) {
		p := filepath.Join(dir, name+".json")
		content := `{"profiles": {"p1": {"url": "https://127.0.0.1:8989/sdk", "user": "u", "password_file": "pw", "insecure": true` + fields + `}}}`
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return LoadProfiles(p)
	}
	if ps, err := load("plain", `, "source": "lab"`); err != nil || ps["p1"].Source != SourceLab {
		t.Fatalf("the lab profile without filters: %+v, %v", ps, err)
	}
	for _, fields := range []string{
		`, "source": "lab", "lab_source_filters": [{"filter": "error", "params": ["error=EIO", "error-pread-rate=5%"]}]`,
		`, "source": "lab", "lab_source_filters": []`,
		`, "lab_source_filters": [{"filter": "error"}]`,
	} {
		ps, err := load("filters", fields)
		if err == nil || !strings.Contains(err.Error(), `unknown field "lab_source_filters"`) || !strings.Contains(err.Error(), "filters.json") {
			t.Errorf("profile with %s: got %+v, %v; want an error naming the file and the unknown field lab_source_filters", fields, ps, err)
		}
	}
}
