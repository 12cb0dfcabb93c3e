// Package verify tests `starter verify` and the Verify workflow on a
// whole stack: restore points verified against the catalog and the block
// digests their backups recorded, and a damaged one named.
package verify

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const (
	vm  = "DC0_H0_VM0"
	MiB = 1 << 20
)

func TestVerify(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	run := func(args ...string) stack.StarterResult {
		t.Helper()
		r, err := s.Starter(ctx, args...)
		if err != nil {
			t.Fatalf("starter %v: %v", args, err)
		}
		return r
	}
	backup := func() stacktest.BackupJSON {
		t.Helper()
		var b stacktest.BackupJSON
		if r := run("backup", vm, "--wait", "--json"); r.ExitCode != 0 || stacktest.DecodeOne(r.Stdout, &b) != nil {
			t.Fatalf("backup: %s", r)
		}
		return b
	}
	stacktest.WriteDisk(t, s.Lab(), vm, 204, 0, stacktest.Pattern(1, 8*MiB))
	stacktest.WriteDisk(t, s.Lab(), vm, 205, 3*MiB, stacktest.Pattern(2, 2*MiB))
	full := backup()
	stacktest.WriteDisk(t, s.Lab(), vm, 204, 2*MiB, stacktest.Pattern(3, MiB))
	incr := backup()

	// Every image has its digest file beside it.
	for _, b := range []stacktest.BackupJSON{full, incr} {
		for _, d := range b.Disks {
			if _, err := os.Stat(d.Path + digest.Suffix); err != nil {
				t.Errorf("backup %s disk %d: no digest file beside %s: %v", b.BackupID, d.Key, d.Path, err)
			}
		}
	}

	if r := run("verify", vm); r.ExitCode != 0 || strings.Count(r.Stdout, ": verified") != 2 || !strings.Contains(r.Stdout, incr.BackupID) {
		t.Errorf("verify %s (its newest point, both disks): %s", vm, r)
	}
	var res workflows.VerifyResult
	if r := run("verify", full.BackupID, "--json"); r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &res) != nil || !res.OK ||
		len(res.Points) != 2 || res.Points[0].CheckedBytes == 0 {
		t.Errorf("verify %s --json: %s", full.BackupID, r)
	}
	if r := run("verify", "--all"); r.ExitCode != 0 || !strings.Contains(r.Stdout, incr.BackupID) {
		t.Errorf("verify --all: %s", r)
	}
	for _, args := range [][]string{{"verify"}, {"verify", vm, "--all"}} {
		if r := run(args...); r.ExitCode != 2 {
			t.Errorf("starter %v: want a usage error (2), got %s", args, r)
		}
	}
	if r := run("verify", "NOPE_VM"); r.ExitCode != 1 || !strings.Contains(r.Stderr, "NOPE_VM has no restore point") {
		t.Errorf("verify NOPE_VM: %s", r)
	}

	// starter list shows each point's newest verification.
	var list []struct {
		BackupID string `json:"backup_id"`
		Verified *struct {
			At time.Time `json:"at"`
			OK bool      `json:"ok"`
		} `json:"verified"`
	}
	if r := run("list", vm, "--json"); r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &list) != nil || len(list) != 2 {
		t.Fatalf("list: %s", r)
	}
	for _, e := range list {
		if e.Verified == nil || !e.Verified.OK || e.Verified.At.IsZero() {
			t.Errorf("list: %s verified %+v, want ok with a time", e.BackupID, e.Verified)
		}
	}

	// The worker's metrics: the VM's newest verification, sound.
	soundAt := waitVerificationMetric(t, s.MetricsURL(), vm, 1, 0)

	// The full image's digest file gone: the incremental's verification
	// names it.
	gone := full.Disk(t, 204).Path + digest.Suffix
	if err := os.Remove(gone); err != nil {
		t.Fatal(err)
	}
	r := run("verify", incr.BackupID)
	if r.ExitCode != 1 || !strings.Contains(r.Stdout, "DAMAGED") || !strings.Contains(r.Stdout, filepath.Base(gone)) {
		t.Errorf("verify %s with the digest file of its full image gone: want exit 1 naming %s, got %s", incr.BackupID, filepath.Base(gone), r)
	}
	if r := run("list", vm); r.ExitCode != 0 || !strings.Contains(r.Stdout, "DAMAGED") ||
		!strings.Contains(r.Stdout, incr.BackupID+" failed its verification") || !strings.Contains(r.Stdout, filepath.Base(gone)) {
		t.Errorf("list after the failed verification: %s", r)
	}
	// The metrics follow: the newest verification, damaged, and later.
	if at := waitVerificationMetric(t, s.MetricsURL(), vm, 0, soundAt); at < soundAt {
		t.Errorf("the damaged verification's time %v is before the sound one's %v", at, soundAt)
	}
}

// waitVerificationMetric scrapes the worker's metrics until the VM's
// cbtflow_verification_ok is want and its newest verification's time is
// at least after (the catalog's metrics are read at most every 10 s: a
// scrape may serve an older reading), for at most a minute, and returns
// that time (unix seconds).
func waitVerificationMetric(t *testing.T, url, vmName string, want, after float64) float64 {
	t.Helper()
	label := fmt.Sprintf("vm=%q", vmName)
	var last string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		ok, at, help := -1.0, -1.0, 0
		for _, line := range strings.Split(string(body), "\n") {
			if strings.HasPrefix(line, "# HELP cbtflow_verification_ok ") || strings.HasPrefix(line, "# HELP cbtflow_newest_verification_timestamp_seconds ") {
				help++
			}
			if !strings.Contains(line, label) {
				continue
			}
			i := strings.LastIndexByte(line, ' ')
			v, err := strconv.ParseFloat(line[i+1:], 64)
			switch {
			case err != nil:
			case strings.HasPrefix(line, "cbtflow_verification_ok{"):
				ok = v
			case strings.HasPrefix(line, "cbtflow_newest_verification_timestamp_seconds{"):
				at = v
			}
		}
		last = fmt.Sprintf("cbtflow_verification_ok %v, cbtflow_newest_verification_timestamp_seconds %v, %d help texts", ok, at, help)
		if ok == want && at >= after && at > 0 && help == 2 {
			if age := time.Since(time.UnixMilli(int64(at * 1000))); age < -time.Minute || age > time.Hour {
				t.Errorf("%s's newest verification is %s old, want within the hour", vmName, age)
			}
			return at
		}
		if time.Now().After(deadline) {
			t.Fatalf("the worker's metrics of %s never showed verification_ok %v after %v: last %s", vmName, want, after, last)
		}
	}
}
