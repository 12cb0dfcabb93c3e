package stacktest

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FilesOf lists the paths below root (a repository) that belong to a
// backup: its images, and its staging folder and what is in it.
func FilesOf(t testing.TB, root, backupID string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if strings.Contains(p, backupID) {
			out = append(out, p)
		}
		return nil
	})
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return out
}
