package stacktest

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/workflows"
)

// BackupJSON is the object `starter backup --json` prints: the
// contract's one definition, workflows.BackupReport, with a test's Disk.
type BackupJSON struct {
	workflows.BackupReport
}

// DiskJSON is one disk of a BackupJSON.
type DiskJSON = workflows.DiskResult

// Disk returns the result of disk key, failing t when there is none.
func (b BackupJSON) Disk(t testing.TB, key int32) DiskJSON {
	t.Helper()
	d, ok := b.FindDisk(key)
	if !ok {
		t.Fatalf("backup %s has no disk %d: %+v", b.BackupID, key, b.Disks)
	}
	return d
}

// ListJSON is one entry of `starter list --json`.
type ListJSON struct {
	BackupID   string `json:"backup_id"`
	VM         string `json:"vm"`
	VMUUID     string `json:"vm_uuid"`
	Status     string `json:"status"`
	Restorable bool   `json:"restorable"`
	Disks      []struct {
		Key       int32  `json:"key"`
		Mode      string `json:"mode"`
		Path      string `json:"path"`
		SizeBytes int64  `json:"size_bytes"`
		ChangeID  string `json:"change_id"`
		Damaged   string `json:"damaged"`
	} `json:"disks"`
}

// DecodeOne decodes stdout into v; stdout must hold exactly one JSON
// value.
func DecodeOne(stdout string, v any) error {
	dec := json.NewDecoder(strings.NewReader(stdout))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("stdout is not one JSON value: %w\n%s", err, stdout)
	}
	var extra json.RawMessage
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return fmt.Errorf("stdout holds more than one JSON value:\n%s", stdout)
	}
	return nil
}
