package activities_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/qemu"
)

// ServeExport serves a restore point's chain over NBD on TCP (qemu-nbd,
// read-only), equal to the point's disk, under a lease in the catalog
// that covers the chain, until canceled: then qemu-nbd is gone and so is
// the lease. A damaged chain, an unknown point and a bad address fail
// non-retryably, naming what was wrong, and leave no lease.
func TestServeExport(t *testing.T) {
	c := newCatalogFixture(t)
	c.begin(t, "b1", catVMUUID)
	d1 := c.image(t, "b1", 2000, nil)
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 4M", d1.Path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	d1.SizeBytes, d1.SHA256 = fileSum(t, d1.Path)
	if err := c.commit(t, "b1", d1); err != nil {
		t.Fatal(err)
	}
	c.begin(t, "b2", catVMUUID)
	d2 := c.image(t, "b2", 2000, &d1)
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0xcd 3M 2M", "-c", "write -z 1M 1M", d2.Path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v: %s", err, out)
	}
	d2.SizeBytes, d2.SHA256 = fileSum(t, d2.Path)
	if err := c.commit(t, "b2", d2); err != nil {
		t.Fatal(err)
	}
	r := &activities.Restorer{Catalog: c.cat, Repo: c.repo}
	logger := slog.New(slog.NewTextHandler(t.Output(), nil))

	// Served until canceled, on the address given.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	env := newActivityEnv(t, logger, r)
	env.SetWorkerOptions(worker.Options{BackgroundActivityContext: ctx})
	addr := freeAddr(t)
	done := make(chan error, 1)
	go func() {
		_, err := env.ExecuteActivity(r.ServeExport, activities.ServeExportInput{ExportID: "export/b2/2000", BackupID: "b2", DiskKey: 2000, Listen: addr})
		done <- err
	}()
	deadline := time.Now().Add(time.Minute)
	for !answers(addr) {
		select {
		case err := <-done:
			t.Fatalf("ServeExport ended before it served: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing serves %s after a minute", addr)
		}
	}
	uri := "nbd://" + addr
	if diff, err := qemu.Compare(ctxT(t, time.Minute), uri, "raw", d2.Path, "qcow2"); err != nil || diff != "" {
		t.Errorf("the export differs from the point's disk: %q %v", diff, err)
	}
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 1 0 512", uri).CombinedOutput(); err == nil && !strings.Contains(string(out), "failed") {
		t.Errorf("a write through the export succeeded: %s", out)
	}
	if got := exported(t, c); strings.Join(got, " ") != "b1:export/b2/2000 b2:export/b2/2000" {
		t.Errorf("points the lease covers: %v, want b1 and b2", got)
	}
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Errorf("ServeExport canceled: no error, want canceled")
		}
	case <-time.After(time.Minute):
		t.Fatal("ServeExport did not end within a minute of its cancel")
	}
	if answers(addr) {
		t.Errorf("%s still answers after the cancel", addr)
	}
	if got := exported(t, c); len(got) != 0 {
		t.Errorf("leases after the cancel: %v", got)
	}

	// What no retry mends.
	env = newActivityEnv(t, logger, r)
	for _, x := range []struct {
		in      activities.ServeExportInput
		typ     string
		mention []string
	}{
		{activities.ServeExportInput{ExportID: "e", BackupID: "nope", DiskKey: 2000}, activities.ErrTypeNoRestorePoint, []string{"backup nope has no restore point of disk 2000"}},
		{activities.ServeExportInput{ExportID: "e", BackupID: "b2", DiskKey: 99}, activities.ErrTypeNoRestorePoint, []string{"disk 99"}},
		{activities.ServeExportInput{ExportID: "e", BackupID: "b2", DiskKey: 2000, Listen: "nowhere"}, activities.ErrTypeInvalidInput, []string{`listen address "nowhere" is not HOST:PORT`}},
	} {
		_, err := env.ExecuteActivity(r.ServeExport, x.in)
		wantAppError(t, err, x.typ, x.mention...)
	}
	// A truncated image under the point is refused by name, cheaply (no
	// hash): its size is not the one recorded.
	if err := os.Truncate(d1.Path, d1.SizeBytes-512); err != nil {
		t.Fatal(err)
	}
	_, err := env.ExecuteActivity(r.ServeExport, activities.ServeExportInput{ExportID: "e", BackupID: "b2", DiskKey: 2000})
	wantAppError(t, err, activities.ErrTypeRestorePointDamaged, d1.Path, "bytes")
	if got := exported(t, c); len(got) != 0 {
		t.Errorf("leases after the failures: %v", got)
	}
}

// freeAddr is a 127.0.0.1 address with a port free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func answers(addr string) bool {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	conn.Close()
	return true
}

// exported lists "point:lease" for the fixture VM's live leases, sorted.
func exported(t *testing.T, c *catalogFixture) []string {
	t.Helper()
	got, err := c.cat.ExportedPoints(ctxT(t, time.Minute), profileLab, catVMUUID)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for id, leases := range got {
		for _, l := range leases {
			out = append(out, id+":"+l)
		}
	}
	slices.Sort(out)
	return out
}

// A retry listens again on the port an earlier attempt chose, and carries
// it on when it fails before serving (the port still taken, e.g. by the
// qemu-nbd of an attempt that has not noticed it was replaced): the next
// attempt still serves at the URI the operator was given.
func TestServeExportRetryKeepsThePort(t *testing.T) {
	c := newCatalogFixture(t)
	c.begin(t, "b1", catVMUUID)
	d1 := c.image(t, "b1", 2000, nil)
	d1.SizeBytes, d1.SHA256 = fileSum(t, d1.Path)
	if err := c.commit(t, "b1", d1); err != nil {
		t.Fatal(err)
	}
	r := &activities.Restorer{Catalog: c.cat, Repo: c.repo}
	logger := slog.New(slog.NewTextHandler(t.Output(), nil))
	in := activities.ServeExportInput{ExportID: "export/b1/2000", BackupID: "b1", DiskKey: 2000}

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	addr := taken.Addr().String()
	_, port, _ := net.SplitHostPort(addr)

	// The attempt after one that served at addr: the port is taken, so it
	// fails (retryably), and its last heartbeat names the port.
	var mu sync.Mutex
	var last activities.ExportProgress
	beats := func(_ *activity.Info, d converter.EncodedValues) {
		var p activities.ExportProgress
		if d.Get(&p) == nil {
			mu.Lock()
			last = p
			mu.Unlock()
		}
	}
	env := newActivityEnv(t, logger, r)
	env.SetOnActivityHeartbeatListener(beats)
	env.SetHeartbeatDetails(activities.ExportProgress{Stage: activities.ExportStageServing, URI: "nbd://" + addr, Address: addr, Port: port})
	_, err = env.ExecuteActivity(r.ServeExport, in)
	var app *temporal.ApplicationError
	if err == nil || errors.As(err, &app) && app.NonRetryable() {
		t.Fatalf("an attempt whose port is taken: %v, want a retryable failure", err)
	}
	mu.Lock()
	carried := last
	mu.Unlock()
	if carried.Port != port {
		t.Fatalf("the failed attempt's last heartbeat %+v does not carry port %s on", carried, port)
	}
	if got := exported(t, c); len(got) != 0 {
		t.Errorf("leases after the failed attempt: %v", got)
	}

	// The next attempt, the port free again, serves at the same URI.
	taken.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	env = newActivityEnv(t, logger, r)
	env.SetWorkerOptions(worker.Options{BackgroundActivityContext: ctx})
	env.SetHeartbeatDetails(carried)
	done := make(chan error, 1)
	go func() {
		_, err := env.ExecuteActivity(r.ServeExport, in)
		done <- err
	}()
	deadline := time.Now().Add(time.Minute)
	for !answers(addr) {
		select {
		case err := <-done:
			t.Fatalf("the next attempt ended before it served at %s: %v", addr, err)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing serves %s after a minute", addr)
		}
	}
	if diff, err := qemu.Compare(ctxT(t, time.Minute), "nbd://"+addr, "raw", d1.Path, "qcow2"); err != nil || diff != "" {
		t.Errorf("the export differs from the point's disk: %q %v", diff, err)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("ServeExport did not end within a minute of its cancel")
	}
}
