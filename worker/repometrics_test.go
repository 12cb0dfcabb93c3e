package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	prom "github.com/prometheus/client_golang/prometheus"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// metricsCatalog returns a catalog holding known rows: vm-a has three
// restore points (1000+200, 30, 7 bytes), vm-b one (64 bytes), vm-c only
// a failed backup; a prune of vm-a freed 4096 bytes and one of vm-b none.
// vm-a's a2 was verified sound, then a3 damaged; vm-b's b1 sound; vm-c
// was never verified.
func metricsCatalog(t *testing.T) *catalog.Catalog {
	t.Helper()
	ctx := context.Background()
	cat, err := catalog.Open(ctx, testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	point := func(uuid, name, id, backing string, sizes ...int64) {
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
			disks = append(disks, catalog.Disk{Key: key, Capacity: 1 << 30, Mode: mode, Path: fmt.Sprintf("lab/%s/%d/%s.qcow2", uuid, key, id),
				BackingBackupID: backing, ChangeID: "c-" + id, SizeBytes: s, SHA256: strings.Repeat("a", 64)})
		}
		if err := cat.Commit(ctx, id, disks); err != nil {
			t.Fatal(err)
		}
	}
	point("u-a", "vm-a", "a1", "", 1000, 200)
	point("u-a", "vm-a", "a2", "a1", 30)
	point("u-a", "vm-a", "a3", "a2", 7)
	point("u-b", "vm-b", "b1", "", 64)
	if err := cat.Begin(ctx, catalog.Backup{ID: "c1", Profile: "lab", VMUUID: "u-c", VMName: "vm-c", Mode: "auto"}); err != nil {
		t.Fatal(err)
	}
	if err := cat.Fail(ctx, "c1", "boom"); err != nil {
		t.Fatal(err)
	}
	for _, v := range []struct {
		id      string
		ok      bool
		problem string
	}{{"a2", true, ""}, {"a3", false, "a3.qcow2: truncated"}, {"b1", true, ""}} {
		if err := cat.RecordVerification(ctx, v.id, 204, v.ok, v.problem); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cat.Prune(ctx, catalog.PruneRecord{ID: "p1", Profile: "lab", VMUUID: "u-a", BytesFreed: 4096}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := cat.Prune(ctx, catalog.PruneRecord{ID: "p2", Profile: "lab", VMUUID: "u-b"}, nil); err != nil {
		t.Fatal(err)
	}
	return cat
}

// scrape GETs a /metrics URL and returns its samples by series, as the
// text format writes them (labels sorted by name).
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %s\n%s", url, resp.Status, body)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("sample %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// helpTexts GETs a /metrics URL and returns its help texts by metric.
func helpTexts(t *testing.T, url string) map[string]string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, "# HELP "); ok {
			name, text, _ := strings.Cut(rest, " ")
			out[name] = text
		}
	}
	return out
}

func TestRepositoryMetrics(t *testing.T) {
	cat := metricsCatalog(t)
	root := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	ms, err := startMetrics("127.0.0.1:0", cat, root, log)
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close(context.Background())
	// The SDK's metrics (the tally scope) are served on the same endpoint.
	ms.Scope.Counter("sdk_probe").Inc(1)
	url := "http://" + ms.Addr() + "/metrics"

	before, err := repository.SpaceOf(root)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]float64
	deadline := time.Now().Add(10 * time.Second)
	for got = scrape(t, url); got["cbtflow_sdk_probe"] == 0 && time.Now().Before(deadline); got = scrape(t, url) {
		time.Sleep(200 * time.Millisecond) // the scope reports every second
	}
	sp, err := repository.SpaceOf(root)
	if err != nil {
		t.Fatal(err)
	}
	for series, want := range map[string]float64{
		"cbtflow_sdk_probe":               1,
		"cbtflow_prune_bytes_freed_total": 4096,
		"cbtflow_prunes_total":            2,
		`cbtflow_restore_points{profile="lab",vm="vm-a",vm_uuid="u-a"}`:  3,
		`cbtflow_restore_points{profile="lab",vm="vm-b",vm_uuid="u-b"}`:  1,
		`cbtflow_restore_points{profile="lab",vm="vm-c",vm_uuid="u-c"}`:  0,
		"cbtflow_repository_used_bytes":                                  1000 + 200 + 30 + 7 + 64,
		"cbtflow_repository_size_bytes":                                  float64(sp.Size),
		"cbtflow_catalog_up":                                             1,
		`cbtflow_verification_ok{profile="lab",vm="vm-a",vm_uuid="u-a"}`: 0,
		`cbtflow_verification_ok{profile="lab",vm="vm-b",vm_uuid="u-b"}`: 1,
	} {
		if v, ok := got[series]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", series, v, ok, want)
		}
	}
	// Free space moves with whatever else writes there (other tests): it
	// is read between before and sp, give or take 256 MiB.
	lo, hi := float64(min(before.Free, sp.Free)-256<<20), float64(max(before.Free, sp.Free)+256<<20)
	if free, ok := got["cbtflow_repository_free_bytes"]; !ok || free <= 0 || free > float64(sp.Size) || free < lo || free > hi {
		t.Errorf("cbtflow_repository_free_bytes = %v (present %v), want between %d and %d", free, ok, before.Free, sp.Free)
	}
	if _, ok := got["go_goroutines"]; !ok {
		t.Error("the Go runtime's metrics are gone from /metrics")
	}
	// Each VM with a committed point has its newest point's time; a VM
	// without one has no series.
	for _, vm := range []string{`profile="lab",vm="vm-a",vm_uuid="u-a"`, `profile="lab",vm="vm-b",vm_uuid="u-b"`} {
		v, ok := got["cbtflow_newest_restore_point_timestamp_seconds{"+vm+"}"]
		if age := time.Since(time.UnixMilli(int64(v * 1000))); !ok || age < -time.Minute || age > time.Hour {
			t.Errorf("cbtflow_newest_restore_point_timestamp_seconds{%s} = %v (present %v), want within the last hour", vm, v, ok)
		}
	}
	if v, ok := got[`cbtflow_newest_restore_point_timestamp_seconds{profile="lab",vm="vm-c",vm_uuid="u-c"}`]; ok {
		t.Errorf("vm-c has no restore point, yet a newest point at %v", v)
	}
	// Each verified VM has its newest verification's time and outcome; a
	// VM never verified has neither.
	for _, vm := range []string{`profile="lab",vm="vm-a",vm_uuid="u-a"`, `profile="lab",vm="vm-b",vm_uuid="u-b"`} {
		v, ok := got["cbtflow_newest_verification_timestamp_seconds{"+vm+"}"]
		if age := time.Since(time.UnixMilli(int64(v * 1000))); !ok || age < -time.Minute || age > time.Hour {
			t.Errorf("cbtflow_newest_verification_timestamp_seconds{%s} = %v (present %v), want within the last hour", vm, v, ok)
		}
	}
	for _, name := range []string{"cbtflow_newest_verification_timestamp_seconds", "cbtflow_verification_ok"} {
		if v, ok := got[name+`{profile="lab",vm="vm-c",vm_uuid="u-c"}`]; ok {
			t.Errorf("vm-c was never verified, yet %s is %v", name, v)
		}
	}
	// The backups' metrics are served with help texts of their own.
	ms.Backup.DiskTransferred("full", 3, 2, 1, time.Second)
	help := helpTexts(t, url)
	for _, name := range []string{"cbtflow_transfer_written_bytes_total", "cbtflow_transfer_duration_seconds",
		"cbtflow_newest_restore_point_timestamp_seconds", "cbtflow_restore_points",
		"cbtflow_newest_verification_timestamp_seconds", "cbtflow_verification_ok"} {
		if h := help[name]; h == "" || strings.Contains(h, name) {
			t.Errorf("help text of %s: %q", name, h)
		}
	}
	if v := scrape(t, url)[`cbtflow_transfer_written_bytes_total{mode="full"}`]; v != 2 {
		t.Errorf("cbtflow_transfer_written_bytes_total{mode=\"full\"} = %v, want 2", v)
	}

	// A second scrape within the reading's age is served the same reading,
	// and a new reading sees a new prune.
	if _, err := cat.Prune(context.Background(), catalog.PruneRecord{ID: "p3", Profile: "lab", VMUUID: "u-b", BytesFreed: 10}, nil); err != nil {
		t.Fatal(err)
	}
	if v := scrape(t, url)["cbtflow_prune_bytes_freed_total"]; v != 4096 {
		t.Errorf("prune bytes freed within the reading's age: %v, want 4096 (cached)", v)
	}
	c := newRepoCollector(cat, root, log)
	if v := collect(t, c)["cbtflow_prune_bytes_freed_total"]; v != 4106 {
		t.Errorf("prune bytes freed after another prune: %v, want 4106", v)
	}
}

// collect gathers one collector alone, as a scrape of it would.
func collect(t *testing.T, c prom.Collector) map[string]float64 {
	t.Helper()
	reg := prom.NewRegistry()
	reg.MustRegister(c)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			series := mf.GetName()
			if len(labels) > 0 {
				series += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.GetCounter() != nil:
				out[series] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				out[series] = m.GetGauge().GetValue()
			}
		}
	}
	return out
}

// The series of cbtflow_restore_points are bounded: the VMs beyond the
// bound are summed in one series.
func TestRestorePointsSeriesBounded(t *testing.T) {
	cat := metricsCatalog(t)
	c := newRepoCollector(cat, t.TempDir(), slog.New(slog.DiscardHandler))
	c.maxVMs = 1
	got := collect(t, c)
	var series []string
	for s := range got {
		if strings.HasPrefix(s, "cbtflow_restore_points{") {
			series = append(series, s)
		}
	}
	if len(series) != 2 || got[`cbtflow_restore_points{profile="lab",vm="vm-a",vm_uuid="u-a"}`] != 3 ||
		got[`cbtflow_restore_points{profile="_other",vm="_other",vm_uuid="_other"}`] != 1 {
		t.Errorf("restore point series with a bound of 1: %v", got)
	}
	if got[`cbtflow_newest_restore_point_timestamp_seconds{profile="lab",vm="vm-a",vm_uuid="u-a"}`] <= 0 ||
		got[`cbtflow_newest_restore_point_timestamp_seconds{profile="_other",vm="_other",vm_uuid="_other"}`] <= 0 {
		t.Errorf("newest restore point series with a bound of 1: %v", got)
	}
	if v, ok := got[`cbtflow_verification_ok{profile="lab",vm="vm-a",vm_uuid="u-a"}`]; !ok || v != 0 {
		t.Errorf("vm-a's verification with a bound of 1: %v (present %v), want 0", v, ok)
	}
	if got[`cbtflow_verification_ok{profile="_other",vm="_other",vm_uuid="_other"}`] != 1 ||
		got[`cbtflow_newest_verification_timestamp_seconds{profile="_other",vm="_other",vm_uuid="_other"}`] <= 0 {
		t.Errorf("the others' verification with a bound of 1 (vm-b's, sound): %v", got)
	}
	if got["cbtflow_repository_used_bytes"] != 1301 {
		t.Errorf("used bytes %v, want every VM's: 1301", got["cbtflow_repository_used_bytes"])
	}
}

// A catalog that cannot be read leaves its metrics out and says so; the
// repository's space and the rest of the endpoint stay.
func TestRepositoryMetricsCatalogDown(t *testing.T) {
	cat := metricsCatalog(t)
	cat.Close()
	root := t.TempDir()
	ms, err := startMetrics("127.0.0.1:0", cat, root, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close(context.Background())
	got := scrape(t, "http://"+ms.Addr()+"/metrics")
	if got["cbtflow_catalog_up"] != 0 {
		t.Errorf("cbtflow_catalog_up = %v, want 0", got["cbtflow_catalog_up"])
	}
	for _, gone := range []string{"cbtflow_prune_bytes_freed_total", "cbtflow_repository_used_bytes", "cbtflow_verification_ok"} {
		if _, ok := got[gone]; ok {
			t.Errorf("%s is served from a catalog that cannot be read", gone)
		}
	}
	if got["cbtflow_repository_free_bytes"] <= 0 {
		t.Errorf("cbtflow_repository_free_bytes = %v without the catalog, want the free space", got["cbtflow_repository_free_bytes"])
	}
}
