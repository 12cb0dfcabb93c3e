package source

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/lab/labapi"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		source string
		want   Opener
	}{{"", vddkOpener{}}, {"vddk", vddkOpener{}}, {"lab", labOpener{}}} {
		o, err := New(vsphere.Profile{Name: "p", Source: tc.source})
		if err != nil || o != tc.want {
			t.Errorf("New(source %q) = %T, %v, want %T", tc.source, o, err, tc.want)
		}
	}
	if _, err := New(vsphere.Profile{Name: "p", Source: "nfs"}); err == nil || !strings.Contains(err.Error(), "nfs") {
		t.Errorf("New(source nfs) = %v, want an error naming it", err)
	}
}

func TestVDDKOptions(t *testing.T) {
	const (
		tp     = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01"
		secret = "s3cret-Pa55"
	)
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "vc.password")
	if err := os.WriteFile(pwFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	profile := vsphere.Profile{Name: "prod", URL: "https://vc.example.com/sdk", User: "backup@vsphere.local",
		PasswordFile: pwFile, Thumbprint: tp}
	disk := vsphere.Disk{Key: 2000, Capacity: 10 << 30, FileName: "[datastore 1] web01/web01.vmdk", ChangeID: "52 aa/4"}
	req := Request{Profile: profile, VMRef: "vm-62", SnapshotRef: "snapshot-123", Disk: disk, Dir: filepath.Join(dir, "src")}
	common := []string{"user=backup@vsphere.local", "password=+" + pwFile, "thumbprint=" + tp, "vm=moref=vm-62",
		"snapshot=snapshot-123", "file=[datastore 1] web01/web01.vmdk"}
	retry := []string{"retries=3", "retry-delay=1"}
	cat := func(parts ...[]string) []string { return slices.Concat(parts...) }

	withPort, withLib := profile, profile
	withPort.URL = "https://10.0.0.5:8443/sdk"
	withLib.VDDKLibDir, withLib.Transports = "/opt/vmware-vix-disklib-distrib", "nbdssl:nbd"
	noTP, noPw, noUser, badURL := profile, profile, profile, profile
	noTP.Thumbprint, noTP.Insecure = "", true
	noPw.PasswordFile = ""
	noUser.User = ""
	badURL.URL = "https:///sdk"

	with := func(p vsphere.Profile, f func(*Request)) Request {
		r := req
		r.Profile = p
		if f != nil {
			f(&r)
		}
		return r
	}
	for _, tc := range []struct {
		name   string
		req    Request
		params []string
		err    string // substring of the error; empty: success
	}{
		{"defaults", req, cat([]string{"server=vc.example.com"}, common, retry), ""},
		{"port", with(withPort, nil), cat([]string{"server=10.0.0.5", "port=8443"}, common, retry), ""},
		{"libdir and transports", with(withLib, nil),
			cat([]string{"server=vc.example.com"}, common, []string{"libdir=/opt/vmware-vix-disklib-distrib", "transports=nbdssl:nbd"}, retry), ""},
		{"no thumbprint", with(noTP, nil), nil, "thumbprint"},
		{"no password file", with(noPw, nil), nil, "password_file"},
		{"no user", with(noUser, nil), nil, "user"},
		{"no host", with(badURL, nil), nil, "no host"},
		{"no snapshot", with(profile, func(r *Request) { r.SnapshotRef = "" }), nil, "snapshot moref"},
		{"no VM", with(profile, func(r *Request) { r.VMRef = "" }), nil, "VM moref"},
		{"no file", with(profile, func(r *Request) { r.Disk.FileName = "" }), nil, "disk file name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := VDDKOptions(tc.req)
			if tc.err != "" {
				if !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("VDDKOptions = %v, want ErrBadRequest mentioning %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if o.Plugin != "vddk" || !o.ReadOnly || o.Dir != req.Dir || !slices.Equal(o.Filters, []string{"retry", "cacheextents"}) {
				t.Errorf("options = %+v", o)
			}
			if !slices.Equal(o.Params, tc.params) {
				t.Errorf("params\n got %q\nwant %q", o.Params, tc.params)
			}
			argv := o.Args("/run/x/nbd.sock")
			want := cat([]string{"--foreground", "--exit-with-parent", "--unix", "/run/x/nbd.sock", "--readonly", "--threads", "8",
				"--filter=retry", "--filter=cacheextents", "vddk"}, tc.params)
			if !slices.Equal(argv, want) {
				t.Errorf("argv\n got %q\nwant %q", argv, want)
			}
			for _, a := range argv {
				if strings.Contains(a, secret) {
					t.Errorf("argv holds the password: %q", a)
				}
			}
		})
	}
}

func TestLabOptions(t *testing.T) {
	// Enough threads on each connection for the most reads the copier
	// keeps on one: the connection with the fewest in flight gets the next.
	if LabReadThreads*copier.DefaultSourceConnections < copier.DefaultInFlight {
		t.Fatalf("LabReadThreads %d × %d connections < %d reads in flight", LabReadThreads, copier.DefaultSourceConnections, copier.DefaultInFlight)
	}
	img := labapi.ImageInfo{Path: "/lab/snap.img", Capacity: 1 << 30}
	o, err := LabOptions(img, "/run/src")
	if err != nil {
		t.Fatal(err)
	}
	got := o.Args("/run/src/nbd.sock")
	want := []string{"--foreground", "--exit-with-parent", "--unix", "/run/src/nbd.sock", "--readonly", "--threads", "3", "file", "file=/lab/snap.img"}
	if !slices.Equal(got, want) {
		t.Errorf("without filters: %q\nwant %q", got, want)
	}
	if o.Dir != "/run/src" || !o.ReadOnly {
		t.Errorf("options %+v: want Dir /run/src, read-only", o)
	}
	img.Filters = []labapi.Filter{
		{Filter: "error", Params: []string{"error=EIO", "error-pread-rate=5%"}},
		{Filter: "delay", Params: []string{"delay-read=10ms"}},
	}
	if o, err = LabOptions(img, "/run/src"); err != nil {
		t.Fatal(err)
	}
	got = o.Args("/run/src/nbd.sock")
	want = []string{"--foreground", "--exit-with-parent", "--unix", "/run/src/nbd.sock", "--readonly", "--threads", "3",
		"--filter=error", "--filter=delay", "file", "file=/lab/snap.img", "error=EIO", "error-pread-rate=5%", "delay-read=10ms"}
	if !slices.Equal(got, want) {
		t.Errorf("with filters: %q\nwant %q", got, want)
	}

	// The lab may only inject faults: any other filter, or a parameter of
	// another filter, is refused before nbdkit runs.
	for _, fs := range [][]labapi.Filter{
		{{Filter: "log", Params: []string{"logfile=/etc/passwd"}}},
		{{Filter: "error", Params: []string{"delay-read=1s"}}},
		{{Filter: "error", Params: []string{"error=EIO --run=sh"}}},
	} {
		img.Filters = fs
		if o, err := LabOptions(img, "/run/src"); !errors.Is(err, ErrBadRequest) {
			t.Errorf("LabOptions with filters %+v = %q, %v; want ErrBadRequest", fs, o.Args("s"), err)
		}
	}
}

func TestLabOpener(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	for _, tool := range []string{"nbdcopy", "qemu-img", "nbdkit"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed: %v", tool, err)
		}
	}

	l, err := lab.Start(ctx, lab.Options{Dir: filepath.Join(dir, "lab"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	pwFile := filepath.Join(dir, "password")
	if err := os.WriteFile(pwFile, []byte(l.Password()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	profile := vsphere.Profile{Name: "lab", URL: l.URL().String(), User: l.User(), PasswordFile: pwFile,
		Thumbprint: l.Thumbprint(), Source: vsphere.SourceLab}
	sessions := vsphere.NewSessions(map[string]vsphere.Profile{"lab": profile}, slog.New(slog.NewTextHandler(t.Output(), nil)))
	defer sessions.Close(context.Background())
	c, err := sessions.Client(ctx, "lab")
	if err != nil {
		t.Fatal(err)
	}
	vm, err := c.FindVM(ctx, lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	key := vm.Disks[1].Key
	capacity := vm.Disks[1].Capacity

	// What the guest wrote before the snapshot, mirrored into expected.raw.
	expected := filepath.Join(dir, "expected.raw")
	ef, err := os.Create(expected)
	if err != nil {
		t.Fatal(err)
	}
	if err := ef.Truncate(capacity); err != nil {
		t.Fatal(err)
	}
	write := func(off int64, data []byte, mirror bool) {
		t.Helper()
		if _, err := l.WriteDisk(vm.Name, key, off, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		if mirror {
			if _, err := ef.WriteAt(data, off); err != nil {
				t.Fatal(err)
			}
		}
	}
	old := bytes.Repeat([]byte("before-snapshot "), 1<<16) // 1 MiB
	write(0, old, true)
	write(5<<30, old[:300<<10], true)
	write(capacity-(1<<20), old, true)
	if err := ef.Close(); err != nil {
		t.Fatal(err)
	}

	snap, err := c.CreateSnapshot(ctx, vm, "cbtflow-source-test")
	if err != nil {
		t.Fatal(err)
	}
	defer c.RemoveSnapshot(context.Background(), vm.Ref, snap.Ref)
	// The guest keeps writing after the snapshot: the source must not see it.
	newer := bytes.Repeat([]byte("AFTER-snapshot! "), 1<<16)
	write(0, newer, false)
	write(3<<30, newer, false)

	o, err := New(profile)
	if err != nil {
		t.Fatal(err)
	}
	req := Request{Profile: profile, VMRef: vm.Ref, SnapshotRef: snap.Ref, Disk: snap.Disks[1], Dir: filepath.Join(dir, "src")}
	for attempt := range 2 { // a retried attempt reuses the Dir
		// The lab's answer comes over a connection kept from the attempt
		// before (labClients): no TLS handshake per transfer.
		var conns, reused int
		traced := httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(ci httptrace.GotConnInfo) {
			conns++
			if ci.Reused {
				reused++
			}
		}})
		e, err := o.Open(traced, req)
		if err != nil {
			t.Fatalf("Open (attempt %d): %v", attempt, err)
		}
		if conns != 1 || (attempt > 0 && reused != 1) {
			t.Errorf("Open (attempt %d) asked the lab over %d connections, %d of them kept from before: want 1, kept after the first Open", attempt, conns, reused)
		}
		out := filepath.Join(dir, "out.raw")
		_ = os.Remove(out)
		if b, err := exec.CommandContext(ctx, "nbdcopy", e.URI(), out).CombinedOutput(); err != nil {
			e.Close()
			t.Fatalf("nbdcopy: %v: %s", err, b)
		}
		if b, err := exec.CommandContext(ctx, "qemu-img", "compare", "-f", "raw", "-F", "raw", expected, out).CombinedOutput(); err != nil {
			e.Close()
			t.Fatalf("the source differs from the disk at snapshot time: %v: %s", err, b)
		}
		// And the live disk has moved on: the comparison can tell.
		var live bytes.Buffer
		if _, err := l.ReadDiskRange(vm.Name, key, 0, 16, &live); err != nil || live.String() != "AFTER-snapshot! " {
			t.Fatalf("live disk starts with %q, %v", live.String(), err)
		}
		if err := e.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}

	// The lab's source filters, named by its endpoint: EIO on every read
	// reaches the reader as EIO; on none of them (error-file absent),
	// reads pass.
	gate := filepath.Join(dir, "eio-on")
	if err := l.SetSourceFilters([]labapi.Filter{{Filter: "error",
		Params: []string{"error=EIO", "error-pread-rate=100%", "error-pread-file=" + gate}}}); err != nil {
		t.Fatal(err)
	}
	copyOnce := func(what string) error {
		t.Helper()
		e, err := o.Open(ctx, req)
		if err != nil {
			t.Fatalf("Open (%s): %v", what, err)
		}
		defer e.Close()
		out := filepath.Join(dir, "faulty.raw")
		_ = os.Remove(out)
		b, err := exec.CommandContext(ctx, "nbdcopy", e.URI(), out).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, b)
		}
		return nil
	}
	if err := copyOnce("faults off"); err != nil {
		t.Errorf("nbdcopy through the error filter with its error file absent: %v", err)
	}
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := copyOnce("faults on"); err == nil || !strings.Contains(err.Error(), "Input/output error") {
		t.Errorf("nbdcopy through the error filter at 100%% EIO: %v, want an Input/output error", err)
	}

	// The wrong disk key or an unknown snapshot: clear errors.
	bad := req
	bad.SnapshotRef = "snapshot-999999"
	if _, err := o.Open(ctx, bad); !errors.Is(err, vsphere.ErrSnapshotNotFound) || !strings.Contains(err.Error(), "snapshot-999999") {
		t.Errorf("Open(unknown snapshot) = %v", err)
	}
	bad = req
	bad.Disk.Capacity++
	if _, err := o.Open(ctx, bad); !errors.Is(err, ErrBadRequest) {
		t.Errorf("Open(wrong capacity) = %v, want ErrBadRequest", err)
	}
}
