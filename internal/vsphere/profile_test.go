package vsphere

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestLabSourceFilters: the test-only lab_source_filters field is read for
// a lab profile, and refused on a production (vddk) profile, for a filter
// outside the fault filters, or with a parameter of another filter.
func TestLabSourceFilters(t *testing.T) {
	dir := t.TempDir()
	load := func(name, fields string) (map[string]Profile, error) {
		p := filepath.Join(dir, name+".json")
		content := `{"profiles": {"p1": {"url": "https://127.0.0.1:8989/sdk", "user": "u", "password_file": "pw", "insecure": true, ` + fields + `}}}`
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return LoadProfiles(p)
	}
	ps, err := load("good", `"source": "lab", "lab_source_filters": [
		{"filter": "error", "params": ["error=EIO", "error-pread-rate=5%", "error-file=/tmp/eio on"]},
		{"filter": "delay", "params": ["delay-read=10ms"]}]`)
	if err == nil {
		t.Fatalf("a parameter value with a space was accepted: %+v", ps)
	}
	ps, err = load("good", `"source": "lab", "lab_source_filters": [
		{"filter": "error", "params": ["error=EIO", "error-pread-rate=5%", "error-file=/tmp/eio-on"]},
		{"filter": "delay", "params": ["delay-read=10ms"]}]`)
	if err != nil {
		t.Fatal(err)
	}
	want := []LabSourceFilter{
		{Filter: "error", Params: []string{"error=EIO", "error-pread-rate=5%", "error-file=/tmp/eio-on"}},
		{Filter: "delay", Params: []string{"delay-read=10ms"}},
	}
	if got := ps["p1"].LabSourceFilters; !reflect.DeepEqual(got, want) {
		t.Errorf("filters = %+v, want %+v", got, want)
	}

	for _, tc := range []struct {
		name, fields string
		want         string
	}{
		{"vddk source", `"lab_source_filters": [{"filter": "error", "params": ["error=EIO"]}]`, `only for source "lab"`},
		{"explicit vddk", `"source": "vddk", "lab_source_filters": [{"filter": "error"}]`, `only for source "lab"`},
		{"other filter", `"source": "lab", "lab_source_filters": [{"filter": "log", "params": ["logfile=/etc/passwd"]}]`, `"log" is not one of`},
		{"foreign param", `"source": "lab", "lab_source_filters": [{"filter": "error", "params": ["delay-read=1s"]}]`, `"delay-read=1s"`},
		{"prefix only", `"source": "lab", "lab_source_filters": [{"filter": "error", "params": ["errors=EIO"]}]`, `"errors=EIO"`},
		{"not key=value", `"source": "lab", "lab_source_filters": [{"filter": "error", "params": ["error"]}]`, `"error"`},
		{"empty value", `"source": "lab", "lab_source_filters": [{"filter": "error", "params": ["error-rate="]}]`, `"error-rate="`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := load(strings.ReplaceAll(tc.name, " ", "_"), tc.fields)
			if err == nil || !strings.Contains(err.Error(), "lab_source_filters") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error about lab_source_filters naming %s", err, tc.want)
			}
		})
	}
}
