package source

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// TestVDDKWriteOptions: the write mode is the read mode's argv without
// --readonly, snapshot= and cacheextents; the password stays in its file.
func TestVDDKWriteOptions(t *testing.T) {
	const (
		tp     = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01"
		secret = "s3cret-Pa55"
	)
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "vc.password")
	if err := os.WriteFile(pwFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	profile := vsphere.Profile{Name: "prod", URL: "https://vc.example.com:8443/sdk", User: "backup@vsphere.local",
		PasswordFile: pwFile, Thumbprint: strings.ToLower(tp), VDDKLibDir: "/opt/vddk", Transports: "nbdssl"}
	req := WriteRequest{Profile: profile, VMRef: "vm-62", Dir: filepath.Join(dir, "w"),
		Disk: vsphere.Disk{Key: 2000, Capacity: 10 << 30, FileName: "[datastore 1] web01/web01-000001.vmdk"}}
	o, err := VDDKWriteOptions(req)
	if err != nil {
		t.Fatal(err)
	}
	argv := o.Args("/run/x/nbd.sock")
	want := []string{"--foreground", "--exit-with-parent", "--unix", "/run/x/nbd.sock", "--filter=retry", "vddk",
		"server=vc.example.com", "port=8443", "user=backup@vsphere.local", "password=+" + pwFile, "thumbprint=" + tp,
		"vm=moref=vm-62", "file=[datastore 1] web01/web01-000001.vmdk", "libdir=/opt/vddk", "transports=nbdssl",
		"retries=3", "retry-delay=1"}
	if !slices.Equal(argv, want) {
		t.Errorf("argv\n got %q\nwant %q", argv, want)
	}
	if o.ReadOnly || o.Dir != req.Dir {
		t.Errorf("options %+v: want writable, Dir %s", o, req.Dir)
	}
	for _, a := range argv {
		if strings.Contains(a, secret) || strings.HasPrefix(a, "snapshot=") || a == "--readonly" {
			t.Errorf("argv holds %q", a)
		}
	}
	for name, f := range map[string]func(*WriteRequest){
		"VM moref":       func(r *WriteRequest) { r.VMRef = "" },
		"disk file name": func(r *WriteRequest) { r.Disk.FileName = "" },
		"disk capacity":  func(r *WriteRequest) { r.Disk.Capacity = 0 },
		"password_file":  func(r *WriteRequest) { r.Profile.PasswordFile = "" },
	} {
		r := req
		f(&r)
		if _, err := VDDKWriteOptions(r); !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), name) {
			t.Errorf("VDDKWriteOptions without %s = %v, want ErrBadRequest naming it", name, err)
		}
	}
}

// TestLabWriteOpener writes through the lab's live image of a powered-off
// VM and reads the data back through the lab; a powered-on VM is refused.
func TestLabWriteOpener(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	l, err := lab.Start(ctx, lab.Options{Dir: filepath.Join(dir, "lab"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	profile := vsphere.Profile{Name: "lab", URL: l.URL().String(), Thumbprint: l.Thumbprint(), Source: vsphere.SourceLab}
	info, err := l.VM(lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	d := info.Disks[0]
	req := WriteRequest{Profile: profile, VMRef: info.Ref, Dir: filepath.Join(dir, "w"),
		Disk: vsphere.Disk{Key: d.Key, Capacity: d.Capacity, FileName: d.FileName}}
	w, err := NewWriter(profile)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.OpenWrite(ctx, req); !errors.Is(err, ErrPoweredOn) || !strings.Contains(err.Error(), "powered") {
		t.Fatalf("OpenWrite of a powered-on VM = %v, want ErrPoweredOn", err)
	}
	if err := l.SetPower(info.Ref, false); err != nil {
		t.Fatal(err)
	}
	e, err := w.OpenWrite(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	data := bytes.Repeat([]byte("restored "), 1000)
	src := filepath.Join(dir, "data")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	// nbdcopy copies equal sizes: a sparse file of the disk's size.
	img := filepath.Join(dir, "img.raw")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(d.Capacity); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if b, err := exec.CommandContext(ctx, "nbdcopy", img, e.URI()).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy: %v: %s", err, b)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if _, err := l.ReadDiskRange(info.Ref, d.Key, 1<<20, int64(len(data)), &got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Errorf("the lab reads %q..., want what was written", got.Bytes()[:32])
	}
	bad := req
	bad.Disk.Capacity++
	if _, err := w.OpenWrite(ctx, bad); !errors.Is(err, ErrBadRequest) {
		t.Errorf("OpenWrite(wrong capacity) = %v, want ErrBadRequest", err)
	}
}
