package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/retention"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// repoDB returns a fresh catalog database with known restore points:
// DC0_H0_VM0 (its own policy) has three, the newest built on a damaged
// one, DC0_H0_VM1 (the default policy) one, and "gone" only a failed
// backup; one prune of DC0_H0_VM0 freed 3 MiB. It returns the URL and the
// images' paths relative to the repository.
func repoDB(t *testing.T) (string, []string) {
	t.Helper()
	url := testutil.Database(t)
	ctx := context.Background()
	cat, err := catalog.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)

	var images []string
	t0 := time.Date(2026, 11, 20, 2, 0, 0, 0, time.UTC)
	point := func(uuid, name, id string, day int, backing string, sizes ...int64) {
		t.Helper()
		if err := cat.Begin(ctx, catalog.Backup{ID: id, Profile: "lab", VMUUID: uuid, VMName: name, Mode: "auto"}); err != nil {
			t.Fatal(err)
		}
		var disks []catalog.Disk
		for i, s := range sizes {
			mode := catalog.ModeFull
			if backing != "" {
				mode = catalog.ModeIncremental
			}
			key := int32(204 + i)
			p := fmt.Sprintf("lab/%s/%d/%s.qcow2", uuid, key, id)
			images = append(images, p)
			disks = append(disks, catalog.Disk{Key: key, Capacity: 10 << 30, Mode: mode, Path: p, BackingBackupID: backing,
				ChangeID: "c-" + id, SizeBytes: s, SHA256: strings.Repeat("a", 64)})
		}
		if err := cat.Commit(ctx, id, disks); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Exec(ctx, `UPDATE backups SET started_at = $2 WHERE id = $1`, id, t0.AddDate(0, 0, day)); err != nil {
			t.Fatal(err)
		}
	}
	point("u-0", "DC0_H0_VM0", "b1", 0, "", 9<<20, 7<<20)
	point("u-0", "DC0_H0_VM0", "b2", 1, "b1", 2<<20, 3<<20)
	point("u-0", "DC0_H0_VM0", "b3", 2, "b2", 1<<20, 1<<20)
	if _, err := cat.MarkDamaged(ctx, "b2", 205, "image truncated"); err != nil {
		t.Fatal(err)
	}
	point("u-1", "DC0_H0_VM1", "c1", 3, "", 512<<10)
	if err := cat.Begin(ctx, catalog.Backup{ID: "f1", Profile: "lab", VMUUID: "u-2", VMName: "gone", Mode: "auto"}); err != nil {
		t.Fatal(err)
	}
	if err := cat.Fail(ctx, "f1", "VM not found"); err != nil {
		t.Fatal(err)
	}
	if err := cat.SetPolicy(ctx, catalog.VMRef{}, retention.Policy{KeepDaily: 7}); err != nil {
		t.Fatal(err)
	}
	if err := cat.SetPolicy(ctx, catalog.VMRef{Profile: "lab", UUID: "u-0"}, retention.Policy{KeepLast: 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := cat.Prune(ctx, catalog.PruneRecord{ID: "p1", Profile: "lab", VMUUID: "u-0", BytesFreed: 3 << 20}, nil); err != nil {
		t.Fatal(err)
	}
	return url, images
}

// repoCmdRun runs `starter repo ARGS --database-url URL --repository
// ROOT` in process and returns its stdout and error.
func repoCmdRun(t *testing.T, url, root string, args ...string) (string, error) {
	t.Helper()
	r := runIn(t, append([]string{"repo"}, append(args, "--database-url", url, "--repository", root)...)...)
	return r.stdout, r.err
}

// The keys of `starter repo --json`, a contract the README documents.
var (
	repoKeys       = []string{"prunes", "repository", "total", "vms"}
	repoSpaceKeys  = []string{"free_bytes", "path", "reachable", "size_bytes"} // and "reason" when not reachable
	repoVMKeys     = []string{"damaged_points", "newest", "oldest", "profile", "restore_points", "retention_source", "used_bytes", "vm", "vm_uuid"}
	repoTotalKeys  = []string{"damaged_points", "newest", "oldest", "restore_points", "used_bytes", "vms"}
	repoPrunesKeys = []string{"bytes_freed", "count"}
)

func TestRepoHuman(t *testing.T) {
	url, images := repoDB(t)
	root := filepath.Join(t.TempDir(), "not-mounted")
	out, err := repoCmdRun(t, url, root)
	if err != nil {
		t.Fatal(err)
	}
	want := `VM          PROFILE  UUID   POINTS  DAMAGED  OLDEST                NEWEST                USED       RETENTION
DC0_H0_VM0  lab      u-0    3       2        2026-11-20T02:00:00Z  2026-11-22T02:00:00Z  23.0 MiB   vm
DC0_H0_VM1  lab      u-1    1       0        2026-11-23T02:00:00Z  2026-11-23T02:00:00Z  512.0 KiB  default
gone        lab      u-2    0       0        -                     -                     0 B        default
TOTAL                3 VMs  4       2        2026-11-20T02:00:00Z  2026-11-23T02:00:00Z  23.5 MiB
repository ROOT: free space unknown: not reachable from here: stat ROOT: no such file or directory
prunes: 1 so far, 3.0 MiB freed
`
	if want = strings.ReplaceAll(want, "ROOT", root); out != want {
		t.Errorf("starter repo:\n%s\nwant:\n%s", out, want)
	}

	// A reachable repository (one that holds a newest image) says how
	// much is free.
	root = t.TempDir()
	img := filepath.Join(root, images[len(images)-1])
	if err := os.MkdirAll(filepath.Dir(img), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, []byte("qcow2"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = repoCmdRun(t, url, root)
	if err != nil {
		t.Fatal(err)
	}
	free := regexp.MustCompile(`(?m)^repository ` + regexp.QuoteMeta(root) + `: [0-9.]+ [KMGTPE]?i?B free of [0-9.]+ [KMGTPE]?i?B$`)
	if !free.MatchString(out) {
		t.Errorf("starter repo with the repository reachable:\n%s", out)
	}
}

type repoJSON struct {
	Repository struct {
		Path      string `json:"path"`
		Reachable bool   `json:"reachable"`
		FreeBytes *int64 `json:"free_bytes"`
		SizeBytes *int64 `json:"size_bytes"`
		Reason    string `json:"reason"`
	} `json:"repository"`
	VMs []struct {
		VM              string     `json:"vm"`
		VMUUID          string     `json:"vm_uuid"`
		Profile         string     `json:"profile"`
		RestorePoints   int64      `json:"restore_points"`
		DamagedPoints   int64      `json:"damaged_points"`
		Oldest          *time.Time `json:"oldest"`
		Newest          *time.Time `json:"newest"`
		UsedBytes       int64      `json:"used_bytes"`
		RetentionSource string     `json:"retention_source"`
	} `json:"vms"`
	Total struct {
		VMs           int        `json:"vms"`
		RestorePoints int64      `json:"restore_points"`
		DamagedPoints int64      `json:"damaged_points"`
		Oldest        *time.Time `json:"oldest"`
		Newest        *time.Time `json:"newest"`
		UsedBytes     int64      `json:"used_bytes"`
	} `json:"total"`
	Prunes struct {
		Count      int64 `json:"count"`
		BytesFreed int64 `json:"bytes_freed"`
	} `json:"prunes"`
}

func parseRepo(t *testing.T, s string) (repoJSON, map[string]json.RawMessage) {
	t.Helper()
	var o repoJSON
	var raw map[string]json.RawMessage
	if err := json.Unmarshal([]byte(s), &o); err != nil {
		t.Fatalf("%v: %s", err, s)
	}
	if err := json.Unmarshal([]byte(s), &raw); err != nil {
		t.Fatal(err)
	}
	return o, raw
}

func keysOf(t *testing.T, raw json.RawMessage) []string {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("%v: %s", err, raw)
	}
	return slices.Sorted(maps.Keys(m))
}

func TestRepoJSON(t *testing.T) {
	url, images := repoDB(t)
	root := t.TempDir()
	// The worker's repository, as the starter sees it from the same host.
	for _, p := range images {
		f := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, []byte("qcow2"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s, err := repoCmdRun(t, url, root, "--json")
	if err != nil {
		t.Fatal(err)
	}
	o, raw := parseRepo(t, s)
	if got := slices.Sorted(maps.Keys(raw)); !slices.Equal(got, repoKeys) {
		t.Errorf("keys %q, want %q", got, repoKeys)
	}
	if got := keysOf(t, raw["repository"]); !slices.Equal(got, repoSpaceKeys) {
		t.Errorf("repository keys %q, want %q", got, repoSpaceKeys)
	}
	if got := keysOf(t, raw["total"]); !slices.Equal(got, repoTotalKeys) {
		t.Errorf("total keys %q, want %q", got, repoTotalKeys)
	}
	if got := keysOf(t, raw["prunes"]); !slices.Equal(got, repoPrunesKeys) {
		t.Errorf("prunes keys %q, want %q", got, repoPrunesKeys)
	}
	var vms []json.RawMessage
	if err := json.Unmarshal(raw["vms"], &vms); err != nil {
		t.Fatal(err)
	}
	for _, v := range vms {
		if got := keysOf(t, v); !slices.Equal(got, repoVMKeys) {
			t.Errorf("VM keys %q, want %q", got, repoVMKeys)
		}
	}

	r := o.Repository
	if r.Path != root || !r.Reachable || r.Reason != "" || r.FreeBytes == nil || r.SizeBytes == nil ||
		*r.FreeBytes <= 0 || *r.FreeBytes > *r.SizeBytes {
		t.Errorf("repository %+v, want %s reachable with 0 < free <= size", r, root)
	}
	day := func(i int) time.Time { return time.Date(2026, 11, 20+i, 2, 0, 0, 0, time.UTC) }
	want := []struct {
		vm, uuid        string
		points, damaged int64
		oldest, newest  int // days after t0; -1 none
		bytes           int64
		retention       string
	}{
		{"DC0_H0_VM0", "u-0", 3, 2, 0, 2, 23 << 20, "vm"},
		{"DC0_H0_VM1", "u-1", 1, 0, 3, 3, 512 << 10, "default"},
		{"gone", "u-2", 0, 0, -1, -1, 0, "default"},
	}
	if len(o.VMs) != len(want) {
		t.Fatalf("vms %+v, want %d", o.VMs, len(want))
	}
	at := func(i int) *time.Time {
		if i < 0 {
			return nil
		}
		d := day(i)
		return &d
	}
	same := func(a, b *time.Time) bool { return (a == nil) == (b == nil) && (a == nil || a.Equal(*b)) }
	for i, w := range want {
		v := o.VMs[i]
		if v.VM != w.vm || v.VMUUID != w.uuid || v.Profile != "lab" || v.RestorePoints != w.points || v.DamagedPoints != w.damaged ||
			!same(v.Oldest, at(w.oldest)) || !same(v.Newest, at(w.newest)) || v.UsedBytes != w.bytes || v.RetentionSource != w.retention {
			t.Errorf("VM %d: %+v, want %+v", i, v, w)
		}
	}
	tot := o.Total
	if tot.VMs != 3 || tot.RestorePoints != 4 || tot.DamagedPoints != 2 || tot.UsedBytes != 23<<20+512<<10 ||
		!same(tot.Oldest, at(0)) || !same(tot.Newest, at(3)) {
		t.Errorf("total %+v", tot)
	}
	if o.Prunes.Count != 1 || o.Prunes.BytesFreed != 3<<20 {
		t.Errorf("prunes %+v, want 1 and 3 MiB", o.Prunes)
	}

	// A folder of the same path that holds none of the images is not the
	// repository: no free space, and why.
	other := t.TempDir()
	o, raw = parseRepo(t, mustRepo(t, url, other, "--json"))
	if r := o.Repository; r.Reachable || r.FreeBytes != nil || r.SizeBytes != nil ||
		!strings.Contains(r.Reason, other+" holds none of the catalog's newest images") {
		t.Errorf("a folder without the images: %+v", r)
	}
	if got, want := keysOf(t, raw["repository"]), append(slices.Clone(repoSpaceKeys), "reason"); !slices.Equal(got, slices.Sorted(slices.Values(want))) {
		t.Errorf("repository keys when not reachable %q, want %q", got, want)
	}
	// A missing folder: the stat error says why.
	o, _ = parseRepo(t, mustRepo(t, url, filepath.Join(other, "missing"), "--json"))
	if r := o.Repository; r.Reachable || r.FreeBytes != nil || !strings.Contains(r.Reason, "no such file or directory") {
		t.Errorf("a missing folder: %+v", r)
	}
	if _, err := os.Stat(filepath.Join(other, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("starter repo created the repository folder: %v", err)
	}

	// An empty catalog: "vms" is [], the times null, any folder is fine.
	empty := testutil.Database(t)
	s = mustRepo(t, empty, other, "--json")
	o, _ = parseRepo(t, s)
	if !strings.Contains(s, `"vms":[]`) || o.Total.Oldest != nil || o.Total.VMs != 0 || !o.Repository.Reachable || o.Prunes.Count != 0 {
		t.Errorf("empty catalog: %s", s)
	}
}

func mustRepo(t *testing.T, url, root string, args ...string) string {
	t.Helper()
	out, err := repoCmdRun(t, url, root, args...)
	if err != nil {
		t.Fatalf("repo %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func TestRepoUsage(t *testing.T) {
	_, err := repoCmdRun(t, "postgres:///unused", t.TempDir(), "extra")
	if exitCode(err) != 2 || !strings.Contains(err.Error(), `repo: give no arguments, got 1 ("extra")`) {
		t.Errorf("repo extra: %v, want a usage error", err)
	}
}

// The README's row of `starter repo` and its section name every key of
// the JSON.
func TestRepoREADME(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(readme, []byte("### The repository's usage"))
	if i < 0 {
		t.Fatal("README.md has no section \"The repository's usage\"")
	}
	sec := readme[i:]
	if j := bytes.Index(sec[1:], []byte("\n#")); j >= 0 {
		sec = sec[:j+1]
	}
	for _, ks := range [][]string{repoKeys, repoSpaceKeys, {"reason"}, repoVMKeys, repoTotalKeys, repoPrunesKeys} {
		for _, k := range ks {
			if !bytes.Contains(sec, []byte("`"+k+"`")) {
				t.Errorf("README.md's section on `starter repo` does not name `%s`", k)
			}
		}
	}
}
