package workflows

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The result of `starter backup --json` is defined once, by BackupReport
// and DiskResult: the starter prints them, the harnesses (testkit) and the
// demo decode them. There were four copies, and a copy drifts (the
// harness's had no seconds, the demo's no change ID). This test reads
// every Go file of the module, tests included, and fails on a struct that
// declares
//   - a disk's byte counts (json "changed_bytes" or "written_bytes")
//     outside this package and activities, whose activity inputs and
//     results a DiskResult is built from;
//   - both "workflow_id" and "disks" (a backup report) outside this
//     package.
//
// A struct that decodes the report's JSON uses BackupReport (or
// testkit/stacktest.BackupJSON, which embeds it) instead.
func TestBackupReportDefinedOnce(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root not found from the workflows package: %v", err)
	}
	fset := token.NewFileSet()
	var copies []string
	seen := 0 // structs of this package with the disk's byte counts
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(name, ".go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, filepath.Dir(path))
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		ast.Inspect(f, func(n ast.Node) bool {
			st, ok := n.(*ast.StructType)
			if !ok {
				return true
			}
			keys := jsonKeys(st)
			where := fset.Position(st.Pos())
			if rel2, err := filepath.Rel(root, where.Filename); err == nil {
				where.Filename = rel2
			}
			bytes := slices.Contains(keys, "changed_bytes") || slices.Contains(keys, "written_bytes")
			switch {
			case bytes && rel == "workflows":
				seen++
			case bytes && rel != "activities":
				copies = append(copies, where.String()+": a copy of workflows.DiskResult (json changed_bytes or written_bytes)")
			}
			if rel != "workflows" && slices.Contains(keys, "workflow_id") && slices.Contains(keys, "disks") {
				copies = append(copies, where.String()+": a copy of workflows.BackupReport (json workflow_id and disks)")
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen == 0 {
		t.Fatal("found no struct with json changed_bytes in workflows: the test no longer reads the package")
	}
	for _, c := range copies {
		t.Error(c)
	}
}

// jsonKeys are the JSON names of a struct's fields that have a json tag.
func jsonKeys(st *ast.StructType) []string {
	var keys []string
	for _, field := range st.Fields.List {
		if field.Tag == nil {
			continue
		}
		tag, err := strconv.Unquote(field.Tag.Value)
		if err != nil {
			continue
		}
		name, _, _ := strings.Cut(reflect.StructTag(tag).Get("json"), ",")
		if name != "" && name != "-" {
			keys = append(keys, name)
		}
	}
	return keys
}

// FindDisk finds a disk by key, and only that one.
func TestBackupReportFindDisk(t *testing.T) {
	r := BackupReport{Disks: []DiskResult{{Key: 2000, Path: "a"}, {Key: 2001, Path: "b"}}}
	if d, ok := r.FindDisk(2001); !ok || d.Path != "b" {
		t.Errorf("FindDisk(2001) = %+v, %v", d, ok)
	}
	if d, ok := r.FindDisk(2002); ok {
		t.Errorf("FindDisk(2002) = %+v, found", d)
	}
}
