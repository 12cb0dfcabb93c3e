package main

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/internal/vsphere"
)

// A default profile (--profile, CBTFLOW_PROFILE) that the profiles file
// does not hold stops the worker at start, naming it, before it takes any
// backup it would send to the wrong vCenter or fail late.
func TestWorkerRefusesUnknownDefaultProfile(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "vcenters.json")
	if err := os.WriteFile(file, []byte(`{"profiles": {"vcenter": {"url": "https://vcenter.example.com/sdk",
		"user": "backup@vsphere.local", "password_file": "pw", "insecure": true}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	err := run(log, []string{"--vcenters", file, "--repository", filepath.Join(dir, "repo"), "--metrics-addr", "",
		"--profile", "lab"})
	if !errors.Is(err, vsphere.ErrProfileNotFound) || !strings.Contains(err.Error(), `"lab"`) || !strings.Contains(err.Error(), "vcenter") {
		t.Errorf("run with --profile lab = %v, want ErrProfileNotFound naming lab and the configured vcenter", err)
	}
}
