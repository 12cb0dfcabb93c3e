package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	yaml "go.yaml.in/yaml/v3"
)

// The monitoring that docker-compose.yml deploys beside the worker:
// Prometheus with cbtflow's alert rules, Grafana with cbtflow's dashboard.
// These tests fail when either names a metric or a label the worker does
// not export, and when the compose file and the provisioning files it
// mounts do not fit together. The paths are the repository's, from
// worker/ (where go test runs).
const (
	composeFile     = "../docker-compose.yml"
	dashboardFile   = "../deploy/grafana/dashboards/cbtflow.json"
	prometheusFile  = "../deploy/prometheus/prometheus.yml"
	alertRulesFile  = "../deploy/prometheus/rules/cbtflow.yml"
	grafanaDSFolder = "../deploy/grafana/provisioning/datasources"
)

// exportedMetrics is what the worker's /metrics serves: each metric
// family's type, and the label names its series carry.
type exportedMetrics struct {
	types  map[string]string          // family → counter, gauge, histogram, ...
	labels map[string]map[string]bool // sample name (histograms: _bucket, _sum, _count) → label names
}

// workerMetrics starts the worker's metrics endpoint as run does
// (startMetrics, on a catalog with restore points), records one of every
// backup event the activities report (metrics with labels have no series
// until then), and reads what the endpoint serves.
func workerMetrics(t *testing.T) exportedMetrics {
	t.Helper()
	cat := metricsCatalog(t)
	ms, err := startMetrics("127.0.0.1:0", cat, t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ms.Close(context.Background()) })
	// What the worker's activities report through activities.Metrics. A
	// metric added to metrics.Backup with labels needs its event here.
	ms.Backup.DiskTransferred("full", 3<<20, 2<<20, 1<<20, 3*time.Second)
	ms.Backup.DiskTransferred("incremental", 1<<20, 1<<20, 0, time.Second)
	ms.Backup.BackupCommitted(time.Minute, 4<<20)
	ms.Backup.SnapshotRemoved(time.Minute)
	ms.Backup.ActivityFailed("TransferDisk", "RepositoryFull", false)
	ms.Backup.ActivityFailed("CreateSnapshot", "other", true)

	resp, err := http.Get("http://" + ms.Addr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, body)
	}
	m := exportedMetrics{types: map[string]string{}, labels: map[string]map[string]bool{}}
	labelName := regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"`)
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			m.types[name] = typ
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, lbls := line, ""
		if i, j := strings.IndexByte(line, '{'), strings.LastIndexByte(line, '}'); i > 0 && j > i {
			name, lbls = line[:i], line[i+1:j]
		} else {
			name, _, _ = strings.Cut(line, " ")
		}
		if m.labels[name] == nil {
			m.labels[name] = map[string]bool{}
		}
		for _, l := range labelName.FindAllStringSubmatch(lbls, -1) {
			m.labels[name][l[1]] = true
		}
	}
	// The test itself must see what it checks against.
	for _, want := range []string{"cbtflow_transfer_read_bytes_total", "cbtflow_backup_duration_seconds",
		"cbtflow_activity_failures_total", "cbtflow_newest_restore_point_timestamp_seconds"} {
		if m.types[want] == "" {
			t.Fatalf("the worker's /metrics has no %s; served:\n%s", want, body)
		}
	}
	return m
}

// sampleNames are the names a query may use of a family: a histogram's
// (or summary's) _bucket, _sum and _count, another family's own name.
func (m exportedMetrics) sampleNames(family string) []string {
	switch m.types[family] {
	case "histogram":
		return []string{family + "_bucket", family + "_sum", family + "_count"}
	case "summary":
		return []string{family, family + "_sum", family + "_count"}
	}
	return []string{family}
}

// check returns what is wrong with a name a query uses: a family the
// worker does not export, or a histogram named without its suffix.
func (m exportedMetrics) check(name string) string {
	for fam := range m.types {
		if slices.Contains(m.sampleNames(fam), name) {
			return ""
		}
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok && m.types[base] != "" {
			return fmt.Sprintf("%s: %s is a %s, which has no %s", name, base, m.types[base], suffix)
		}
	}
	if t := m.types[name]; t == "histogram" || t == "summary" {
		return fmt.Sprintf("%s is a %s: query its _bucket, _sum or _count", name, t)
	}
	return fmt.Sprintf("%s is not a metric the worker exports", name)
}

var (
	metricNameRE = regexp.MustCompile(`\bcbtflow_[a-zA-Z0-9_]*[a-zA-Z0-9]\b`)
	selectorRE   = regexp.MustCompile(`\b(cbtflow_[a-zA-Z0-9_]+)\s*\{([^}]*)\}`)
	matcherRE    = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	groupingRE   = regexp.MustCompile(`\b(?:by|without|on|ignoring)\s*\(([^)]*)\)`)
	// jobRE finds the scrape jobs a rule names.
	jobRE = regexp.MustCompile(`\bjob\s*=\s*"([^"]*)"`)
)

// checkQuery returns what is wrong with a PromQL expression: cbtflow_*
// names the worker does not export, labels its selectors or groupings use
// that none of its cbtflow_* metrics carry (le only with a _bucket;
// Prometheus' own job and instance always).
func (m exportedMetrics) checkQuery(expr string) []string {
	var bad []string
	names := metricNameRE.FindAllString(expr, -1)
	for _, n := range names {
		if msg := m.check(n); msg != "" {
			bad = append(bad, msg)
		}
	}
	carried := func(label string, among []string) bool {
		if label == "job" || label == "instance" {
			return true
		}
		for _, n := range among {
			if m.labels[n][label] {
				return true
			}
		}
		return false
	}
	for _, sel := range selectorRE.FindAllStringSubmatch(expr, -1) {
		for _, l := range matcherRE.FindAllStringSubmatch(sel[2], -1) {
			if !carried(l[1], []string{sel[1]}) {
				bad = append(bad, fmt.Sprintf("%s has no label %q", sel[1], l[1]))
			}
		}
	}
	if len(names) > 0 {
		for _, g := range groupingRE.FindAllStringSubmatch(expr, -1) {
			for _, l := range strings.Split(g[1], ",") {
				if l = strings.TrimSpace(l); l != "" && !carried(l, names) {
					bad = append(bad, fmt.Sprintf("groups by %q, which none of %v carries", l, names))
				}
			}
		}
	}
	return bad
}

// dashboardQueries returns every PromQL expression of the dashboard
// (targets' expr, variables' query) and every other string of it that
// names a cbtflow_* metric (descriptions), by where it is.
func dashboardQueries(t *testing.T) (exprs, texts map[string]string) {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d any
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	exprs, texts = map[string]string{}, map[string]string{}
	var walk func(at string, v any)
	walk = func(at string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && (k == "expr" || (k == "query" && strings.Contains(at, "templating"))) {
					exprs[at+"."+k] = s
					continue
				}
				walk(at+"."+k, x)
			}
		case []any:
			for i, x := range v {
				walk(fmt.Sprintf("%s[%d]", at, i), x)
			}
		case string:
			if metricNameRE.MatchString(v) {
				texts[at] = v
			}
		}
	}
	walk("", d)
	return exprs, texts
}

// alertRules is the part of a Prometheus rules file the tests read.
type alertRules struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func readYAML(t *testing.T, file string, v any) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

// TestDashboardAndAlertsUseExportedMetrics: the Grafana dashboard and the
// Prometheus alert rules name only metrics, and labels, that the worker's
// /metrics serves.
func TestDashboardAndAlertsUseExportedMetrics(t *testing.T) {
	m := workerMetrics(t)

	exprs, texts := dashboardQueries(t)
	if len(exprs) < 10 {
		t.Fatalf("%s: %d PromQL expressions found, want the dashboard's (targets' expr)", dashboardFile, len(exprs))
	}
	for at, e := range exprs {
		if !metricNameRE.MatchString(e) {
			t.Errorf("%s%s: %q names no cbtflow metric", dashboardFile, at, e)
		}
		for _, msg := range m.checkQuery(e) {
			t.Errorf("%s%s: %q: %s", dashboardFile, at, e, msg)
		}
	}
	for at, s := range texts {
		for _, n := range metricNameRE.FindAllString(s, -1) {
			// Prose may name a histogram by its family.
			if msg := m.check(n); msg != "" && m.types[n] == "" {
				t.Errorf("%s%s: %s", dashboardFile, at, msg)
			}
		}
	}

	var rules alertRules
	readYAML(t, alertRulesFile, &rules)
	var prom struct {
		ScrapeConfigs []struct {
			JobName string `yaml:"job_name"`
		} `yaml:"scrape_configs"`
	}
	readYAML(t, prometheusFile, &prom)
	var jobs []string
	for _, sc := range prom.ScrapeConfigs {
		jobs = append(jobs, sc.JobName)
	}
	durationRE := regexp.MustCompile(`^([0-9]+(ms|s|m|h|d|w|y))+$`)
	labelRefRE := regexp.MustCompile(`\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)`)
	n := 0
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			n++
			name := r.Alert + r.Record
			if name == "" || r.Expr == "" {
				t.Errorf("%s, group %s: a rule without a name or an expression: %+v", alertRulesFile, g.Name, r)
				continue
			}
			if r.For != "" && !durationRE.MatchString(r.For) {
				t.Errorf("%s: %s: for %q is not a duration", alertRulesFile, name, r.For)
			}
			for _, msg := range m.checkQuery(r.Expr) {
				t.Errorf("%s: %s: %q: %s", alertRulesFile, name, r.Expr, msg)
			}
			for _, j := range jobRE.FindAllStringSubmatch(r.Expr, -1) {
				if !slices.Contains(jobs, j[1]) {
					t.Errorf("%s: %s: job %q is none of %s's scrape jobs %v", alertRulesFile, name, j[1], prometheusFile, jobs)
				}
			}
			// An aggregation keeps only the labels it groups by: the
			// annotations may name no other.
			if g := groupingRE.FindStringSubmatch(r.Expr); g != nil && strings.Contains(r.Expr, " by ") {
				kept := strings.Split(strings.ReplaceAll(g[1], " ", ""), ",")
				for _, a := range r.Annotations {
					for _, ref := range labelRefRE.FindAllStringSubmatch(a, -1) {
						if !slices.Contains(kept, ref[1]) {
							t.Errorf("%s: %s: an annotation names $labels.%s, which %q does not keep", alertRulesFile, name, ref[1], r.Expr)
						}
					}
				}
			}
		}
	}
	if n == 0 {
		t.Fatalf("%s: no rules", alertRulesFile)
	}
}

// TestDashboardIsGrafanas: the dashboard is one Grafana can provision: a
// uid and a title, panels with unique ids and a place on the grid, every
// query on the provisioned Prometheus data source.
func TestDashboardIsGrafanas(t *testing.T) {
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	type ref struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	}
	var d struct {
		UID    string `json:"uid"`
		Title  string `json:"title"`
		Panels []struct {
			ID         int    `json:"id"`
			Type       string `json:"type"`
			Title      string `json:"title"`
			Datasource ref    `json:"datasource"`
			GridPos    struct {
				X, Y, W, H int
			} `json:"gridPos"`
			Targets []struct {
				RefID      string `json:"refId"`
				Expr       string `json:"expr"`
				Datasource ref    `json:"datasource"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if d.UID == "" || d.Title == "" || len(d.Panels) == 0 {
		t.Fatalf("%s: uid %q, title %q, %d panels: want all three", dashboardFile, d.UID, d.Title, len(d.Panels))
	}
	var ds struct {
		Datasources []struct {
			Name string `yaml:"name"`
			UID  string `yaml:"uid"`
			Type string `yaml:"type"`
			URL  string `yaml:"url"`
		} `yaml:"datasources"`
	}
	readYAML(t, filepath.Join(grafanaDSFolder, "prometheus.yml"), &ds)
	if len(ds.Datasources) != 1 || ds.Datasources[0].Type != "prometheus" || ds.Datasources[0].UID == "" {
		t.Fatalf("%s/prometheus.yml: %+v, want one prometheus data source with a uid", grafanaDSFolder, ds.Datasources)
	}
	want := ref{Type: "prometheus", UID: ds.Datasources[0].UID}
	ids := map[int]string{}
	for _, p := range d.Panels {
		if other, dup := ids[p.ID]; dup {
			t.Errorf("panels %q and %q share id %d", other, p.Title, p.ID)
		}
		ids[p.ID] = p.Title
		if p.Title == "" || p.Type == "" || p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %d: title %q, type %q, gridPos %+v: want a title, a type and a place on the 24-column grid", p.ID, p.Title, p.Type, p.GridPos)
		}
		if p.Datasource != want {
			t.Errorf("panel %q: data source %+v, want the provisioned %+v", p.Title, p.Datasource, want)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			if q.Expr == "" || q.RefID == "" || q.Datasource != want {
				t.Errorf("panel %q: query %+v: want an expr and a refId on %+v", p.Title, q, want)
			}
		}
	}
}

// compose is the part of docker-compose.yml the tests read.
type compose struct {
	Services map[string]struct {
		Image       string         `yaml:"image"`
		Build       any            `yaml:"build"`
		Command     []string       `yaml:"command"`
		Environment map[string]any `yaml:"environment"`
		Secrets     []string       `yaml:"secrets"`
		Volumes     []string       `yaml:"volumes"`
		Ports       []string       `yaml:"ports"`
	} `yaml:"services"`
	Volumes map[string]any `yaml:"volumes"`
	Secrets map[string]struct {
		File string `yaml:"file"`
	} `yaml:"secrets"`
}

// hostPath maps a path inside a service's container to the file of the
// repository a bind mount (./SRC:DST[:ro]) puts there; "" when none does.
func hostPath(volumes []string, p string) string {
	best, host := "", ""
	for _, v := range volumes {
		parts := strings.Split(v, ":")
		if len(parts) < 2 || !strings.HasPrefix(parts[0], "./") {
			continue
		}
		dst := path.Clean(parts[1])
		if (p == dst || strings.HasPrefix(p, dst+"/")) && len(dst) > len(best) {
			best, host = dst, filepath.Join("..", parts[0], strings.TrimPrefix(p, dst))
		}
	}
	return host
}

// TestComposeMonitoring: docker-compose.yml runs Prometheus and Grafana on
// the files of the repository, and they fit together: Prometheus scrapes
// the worker where it serves its metrics and loads the alert rules;
// Grafana gets its data source (Prometheus, where it listens) and the
// dashboard; every file the stack mounts from the repository exists;
// images are pinned, ports on the loopback, passwords only in secret
// files.
func TestComposeMonitoring(t *testing.T) {
	var c compose
	readYAML(t, composeFile, &c)
	for _, s := range []string{"worker", "prometheus", "grafana"} {
		if _, ok := c.Services[s]; !ok {
			t.Fatalf("%s has no service %s", composeFile, s)
		}
	}
	env := func(service, name string) string {
		v, ok := c.Services[service].Environment[name]
		if !ok {
			return ""
		}
		return fmt.Sprint(v)
	}

	// The whole file: pinned images, loopback ports, mounts that exist,
	// secrets from files, no password in the environment.
	operatorFiles := []string{"./deploy/vcenters.json"} // README: created before the first start
	for name, s := range c.Services {
		if s.Build == nil {
			if _, tag, ok := strings.Cut(s.Image, ":"); !ok || tag == "" || tag == "latest" {
				t.Errorf("service %s: image %q is not pinned to a version", name, s.Image)
			}
		}
		for _, p := range s.Ports {
			if !strings.HasPrefix(p, "127.0.0.1:") {
				t.Errorf("service %s: port %q is published beyond the loopback", name, p)
			}
		}
		for _, v := range s.Volumes {
			src, _, _ := strings.Cut(v, ":")
			if !strings.HasPrefix(src, "./") || slices.Contains(operatorFiles, src) {
				continue
			}
			if _, err := os.Stat(filepath.Join("..", src)); err != nil {
				t.Errorf("service %s mounts %s, which the repository lacks: %v", name, src, err)
			}
		}
		for k, v := range s.Environment {
			val := fmt.Sprint(v)
			if strings.Contains(strings.ToUpper(k), "PASSWORD") {
				secret, ok := strings.CutPrefix(val, "/run/secrets/")
				if !strings.HasSuffix(k, "_FILE") || !ok || !slices.Contains(s.Secrets, secret) {
					t.Errorf("service %s: %s=%q: a password must come from a secret file (NAME_FILE=/run/secrets/SECRET, the secret listed by the service)", name, k, val)
				}
			}
			if u, err := url.Parse(val); err == nil && u.User != nil {
				if _, set := u.User.Password(); set {
					t.Errorf("service %s: %s holds a password in its URL", name, k)
				}
			}
		}
		for _, sec := range s.Secrets {
			if _, ok := c.Secrets[sec]; !ok {
				t.Errorf("service %s uses secret %s, which the file does not define", name, sec)
			}
		}
	}
	for name, s := range c.Secrets {
		if !strings.HasPrefix(s.File, "./deploy/secrets/") {
			t.Errorf("secret %s: file %q is outside deploy/secrets/ (which git ignores)", name, s.File)
		}
	}

	// Prometheus: its configuration and rules, and its targets.
	prom := c.Services["prometheus"]
	configFile := "/etc/prometheus/prometheus.yml" // the image's default
	listen := "9090"
	for _, a := range prom.Command {
		if v, ok := strings.CutPrefix(a, "--config.file="); ok {
			configFile = v
		}
		if v, ok := strings.CutPrefix(a, "--web.listen-address="); ok {
			_, listen, _ = net.SplitHostPort(v)
		}
	}
	if got := hostPath(prom.Volumes, configFile); filepath.Clean(got) != filepath.Clean(prometheusFile) {
		t.Errorf("prometheus reads %s, mounted from %q, want %s", configFile, got, prometheusFile)
	}
	var pc struct {
		RuleFiles     []string `yaml:"rule_files"`
		ScrapeConfigs []struct {
			JobName       string `yaml:"job_name"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	readYAML(t, prometheusFile, &pc)
	var ruleFiles []string
	for _, rf := range pc.RuleFiles {
		if !path.IsAbs(rf) {
			rf = path.Join(path.Dir(configFile), rf)
		}
		host := hostPath(prom.Volumes, rf)
		matches, _ := filepath.Glob(host)
		if host == "" || len(matches) == 0 {
			t.Errorf("%s: rule_files %s: no file of the repository is mounted there (%q)", prometheusFile, rf, host)
		}
		for _, m := range matches {
			ruleFiles = append(ruleFiles, filepath.Clean(m))
			var r alertRules
			readYAML(t, m, &r)
		}
	}
	if !slices.Contains(ruleFiles, filepath.Clean(alertRulesFile)) {
		t.Errorf("Prometheus loads the rule files %v, not %s", ruleFiles, alertRulesFile)
	}
	_, workerPort, err := net.SplitHostPort(env("worker", "CBTFLOW_METRICS_ADDR"))
	if err != nil {
		t.Fatalf("worker: CBTFLOW_METRICS_ADDR %q: %v", env("worker", "CBTFLOW_METRICS_ADDR"), err)
	}
	scraped := false
	for _, sc := range pc.ScrapeConfigs {
		for _, st := range sc.StaticConfigs {
			scraped = scraped || slices.Contains(st.Targets, net.JoinHostPort("worker", workerPort))
		}
	}
	if !scraped {
		t.Errorf("%s does not scrape worker:%s, where the worker serves its metrics (CBTFLOW_METRICS_ADDR)", prometheusFile, workerPort)
	}

	// Grafana: the provisioning folder, its data source on Prometheus,
	// the dashboards' folder holding cbtflow.json, the admin password.
	graf := c.Services["grafana"]
	provisioning := env("grafana", "GF_PATHS_PROVISIONING")
	if provisioning == "" {
		provisioning = "/etc/grafana/provisioning" // the image's default
	}
	if got := hostPath(graf.Volumes, provisioning); filepath.Clean(got) != filepath.Clean("../deploy/grafana/provisioning") {
		t.Errorf("grafana reads its provisioning from %s, mounted from %q, want deploy/grafana/provisioning", provisioning, got)
	}
	var ds struct {
		Datasources []struct {
			URL string `yaml:"url"`
		} `yaml:"datasources"`
	}
	readYAML(t, filepath.Join(grafanaDSFolder, "prometheus.yml"), &ds)
	for _, d := range ds.Datasources {
		u, err := url.Parse(d.URL)
		if err != nil || u.Hostname() != "prometheus" || u.Port() != listen {
			t.Errorf("Grafana's data source %q is not the prometheus service on its port %s", d.URL, listen)
		}
	}
	var providers struct {
		Providers []struct {
			Options struct {
				Path string `yaml:"path"`
			} `yaml:"options"`
		} `yaml:"providers"`
	}
	readYAML(t, "../deploy/grafana/provisioning/dashboards/cbtflow.yml", &providers)
	found := false
	for _, p := range providers.Providers {
		host := hostPath(graf.Volumes, p.Options.Path)
		if host == "" {
			t.Errorf("dashboards provider path %s: no folder of the repository is mounted there", p.Options.Path)
			continue
		}
		if _, err := os.Stat(filepath.Join(host, filepath.Base(dashboardFile))); err == nil &&
			filepath.Clean(filepath.Join(host, filepath.Base(dashboardFile))) == filepath.Clean(dashboardFile) {
			found = true
		}
	}
	if !found {
		t.Errorf("no dashboards provider loads %s", dashboardFile)
	}
	if home := env("grafana", "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"); home != "" {
		if got := hostPath(graf.Volumes, home); got == "" || filepath.Clean(got) != filepath.Clean(dashboardFile) {
			t.Errorf("grafana's home dashboard %s is mounted from %q, want %s", home, got, dashboardFile)
		}
	}
	if env("grafana", "GF_SECURITY_ADMIN_PASSWORD__FILE") == "" {
		t.Errorf("grafana: no GF_SECURITY_ADMIN_PASSWORD__FILE: the admin password would be Grafana's default")
	}
	for _, v := range []string{"prometheus", "grafana"} {
		for _, vol := range c.Services[v].Volumes {
			src, _, _ := strings.Cut(vol, ":")
			if !strings.HasPrefix(src, ".") && !strings.HasPrefix(src, "/") && !strings.HasPrefix(src, "$") {
				if _, ok := c.Volumes[src]; !ok {
					t.Errorf("service %s uses volume %s, which the file does not define", v, src)
				}
			}
		}
	}
}
