package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// buildStarter builds this command into a temporary directory.
func buildStarter(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "starter")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func runStarter(t *testing.T, bin string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Env = append(os.Environ(), "CBTFLOW_LAB_URL=")
	err := cmd.Run()
	return stderr.String(), err
}

func TestLabServeWriteRead(t *testing.T) {
	testutil.CheckNoChildren(t)
	bin := buildStarter(t)
	dir := filepath.Join(t.TempDir(), "lab")

	serve := exec.Command(bin, "lab", "serve", "--listen", "127.0.0.1:0", "--dir", dir)
	var serveErr bytes.Buffer
	serve.Stderr = &serveErr
	stdout, err := serve.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	exited := false
	t.Cleanup(func() {
		if !exited {
			_ = serve.Process.Kill()
			_ = serve.Wait()
		}
	})

	// The single JSON line.
	lines := make(chan string, 1)
	rd := bufio.NewReader(stdout)
	go func() {
		line, _ := rd.ReadString('\n')
		lines <- line
	}()
	var line string
	select {
	case line = <-lines:
	case <-time.After(30 * time.Second):
		t.Fatalf("no line from lab serve; stderr:\n%s", serveErr.String())
	}
	var info struct {
		URL        string `json:"url"`
		Thumbprint string `json:"thumbprint"`
	}
	dec := json.NewDecoder(strings.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&info); err != nil {
		t.Fatalf("serve printed %q: %v", line, err)
	}
	u, err := url.Parse(info.URL)
	if err != nil || u.Scheme != "https" || u.Path != "/sdk" || u.User != nil || strings.HasSuffix(u.Host, ":0") {
		t.Fatalf("url %q", info.URL)
	}

	// The thumbprint is the certificate's.
	conn, err := tls.Dial("tcp", u.Host, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	got := soap.ThumbprintSHA1(conn.ConnectionState().PeerCertificates[0])
	conn.Close()
	if got != info.Thumbprint {
		t.Errorf("thumbprint %s, certificate has %s", info.Thumbprint, got)
	}

	// The generated password file works, a wrong password does not, and
	// the password never shows on stdout or stderr.
	pw, err := os.ReadFile(filepath.Join(dir, "password"))
	if err != nil {
		t.Fatal(err)
	}
	password := strings.TrimSpace(string(pw))
	if fi, _ := os.Stat(filepath.Join(dir, "password")); fi.Mode().Perm() != 0o600 {
		t.Errorf("password file mode %v", fi.Mode())
	}
	login := func(pass string) error {
		sc := soap.NewClient(u, false)
		sc.SetThumbprint(u.Host, info.Thumbprint)
		defer sc.CloseIdleConnections()
		c, err := vim25.NewClient(context.Background(), sc)
		if err != nil {
			return err
		}
		return session.NewManager(c).Login(context.Background(), url.UserPassword("administrator@vsphere.local", pass))
	}
	if err := login(password); err != nil {
		t.Errorf("login with the generated password: %v", err)
	}
	if err := login(password + "x"); !fault.Is(err, &types.InvalidLogin{}) {
		t.Errorf("wrong password: %v", err)
	}

	// Write, then read back.
	const vm, key, capacity = "DC0_H0_VM0", "205", int64(10 << 30)
	offset := int64(5<<20 + 123)
	data := make([]byte, 300<<10)
	_, _ = rand.Read(data)
	in := filepath.Join(t.TempDir(), "in")
	if err := os.WriteFile(in, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if stderr, err := runStarter(t, bin, "lab", "write", "--lab", info.URL, "--vm", vm, "--disk", key,
		"--offset", strconv.FormatInt(offset, 10), "--from", in); err != nil {
		t.Fatalf("lab write: %v\n%s", err, stderr)
	}
	out := filepath.Join(t.TempDir(), "out.raw")
	cmd := exec.Command(bin, "lab", "read", "--vm", vm, "--disk", key, "--to", out)
	cmd.Env = append(os.Environ(), "CBTFLOW_LAB_URL="+info.URL) // --lab from the environment
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("lab read: %v\n%s", err, b)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != capacity {
		t.Errorf("output size %d, want capacity %d", st.Size, capacity)
	}
	if alloc := st.Blocks * 512; alloc > 2<<20 {
		t.Errorf("output not sparse: %d bytes allocated", alloc)
	}
	back := make([]byte, len(data))
	if _, err := f.ReadAt(back, offset); err != nil || !bytes.Equal(back, data) {
		t.Errorf("read back differs from what was written (%v)", err)
	}
	// Around the data: zeros, and nothing else allocated.
	if data, err := f.Seek(0, 3); err != nil || data > offset {
		t.Errorf("first data at %d (%v), want <= %d", data, err, offset)
	}
	if hole, err := f.Seek(offset, 4); err != nil || hole < offset+int64(len(data)) {
		t.Errorf("hole at %d (%v)", hole, err)
	}
	before := make([]byte, 123)
	if _, err := f.ReadAt(before, 5<<20); err != nil || !bytes.Equal(before, make([]byte, 123)) {
		t.Errorf("bytes before the write are not zero (%v)", err)
	}

	// Clear errors, non-zero exit.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"lab", "write", "--lab", info.URL, "--vm", "NoSuchVM", "--disk", key, "--from", in}, `unknown VM "NoSuchVM"`},
		{[]string{"lab", "write", "--lab", info.URL, "--vm", vm, "--disk", "999", "--from", in}, "unknown disk 999"},
		{[]string{"lab", "write", "--lab", info.URL, "--vm", vm, "--disk", key, "--offset", strconv.FormatInt(capacity, 10), "--from", in}, "beyond the capacity"},
		{[]string{"lab", "read", "--lab", info.URL, "--vm", "NoSuchVM", "--disk", key, "--to", out}, `unknown VM "NoSuchVM"`},
		{[]string{"lab", "write", "--vm", vm, "--disk", key, "--from", in}, "CBTFLOW_LAB_URL"},
		{[]string{"lab", "nope"}, `unknown command "nope" for "starter lab"`},
	} {
		stderr, err := runStarter(t, bin, tc.args...)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() == 0 {
			t.Errorf("%v: exit %v, want non-zero", tc.args, err)
		}
		if !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: stderr %q, want it to say %q", tc.args, stderr, tc.want)
		}
	}
	// The failed read left the earlier output alone.
	if fi, err := os.Stat(out); err != nil || fi.Size() != capacity {
		t.Errorf("output after a failed read: %v", err)
	}

	// SIGTERM: clean exit, nothing more on stdout, lab files cleaned.
	if err := serve.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(rd)
	waitErr := make(chan error, 1)
	go func() { waitErr <- serve.Wait() }()
	select {
	case err := <-waitErr:
		exited = true
		if err != nil {
			t.Errorf("lab serve exit: %v\n%s", err, serveErr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("lab serve did not exit after SIGTERM")
	}
	if len(rest) != 0 {
		t.Errorf("more on stdout after the JSON line: %q", rest)
	}
	if strings.Contains(serveErr.String(), password) {
		t.Error("the password shows in the logs")
	}
	for _, gone := range []string{"snapshots", "vcsim"} {
		if _, err := os.Stat(filepath.Join(dir, gone)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after exit: %v", gone, err)
		}
	}
	if m, _ := filepath.Glob(filepath.Join(dir, "disks", "*-205.raw")); len(m) != 1 {
		t.Errorf("disk image in the given dir not kept: %v", m)
	}
}
