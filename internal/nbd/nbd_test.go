package nbd_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/cbtflow/cbtflow/internal/nbd"
	"github.com/cbtflow/cbtflow/testkit/nbdtest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

func connect(t *testing.T, uri string) *nbd.Handle {
	t.Helper()
	h, err := nbd.Connect(uri)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed | 1
	}
	return b
}

func TestSyncRoundTrip(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	srv := nbdtest.StartNbdkit(t, dir, "memory", "64M")
	h := connect(t, srv.URI)

	size, err := h.Size()
	if err != nil || size != 64<<20 {
		t.Fatalf("Size = %d, %v; want 64 MiB", size, err)
	}
	for name, f := range map[string]func() (bool, error){
		"zero": h.CanZero, "flush": h.CanFlush, "multi-conn": h.CanMultiConn, "trim": h.CanTrim,
	} {
		if ok, err := f(); err != nil || !ok {
			t.Errorf("can %s = %v, %v; want true (nbdkit memory)", name, ok, err)
		}
	}
	if ok, err := h.CanMetaContext(nbd.MetaBaseAllocation); err != nil || !ok {
		t.Errorf("CanMetaContext(base:allocation) = %v, %v", ok, err)
	}
	if ro, err := h.IsReadOnly(); err != nil || ro {
		t.Errorf("IsReadOnly = %v, %v", ro, err)
	}

	want := pattern(1<<20, 3)
	if err := h.Pwrite(want, 5<<20, 0); err != nil {
		t.Fatal(err)
	}
	if err := h.Zero(5<<20+4096, 8192, 0); err != nil {
		t.Fatal(err)
	}
	clear(want[4096 : 4096+8192])
	if err := h.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if err := h.Pread(got, 5<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read data differs from written data")
	}
	// Close twice: the second is a no-op.
	h.Close()
	h.Close()
}

// drive polls h until every cookie in want completed, and returns errors by
// cookie.
func drive(t *testing.T, h *nbd.Handle, want map[nbd.Cookie]bool) map[nbd.Cookie]*nbd.Error {
	t.Helper()
	errs := map[nbd.Cookie]*nbd.Error{}
	out := make([]nbd.Completion, 16)
	deadline := time.Now().Add(20 * time.Second)
	for len(want) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d commands did not complete", len(want))
		}
		if _, err := nbd.PollHandles([]*nbd.Handle{h}, -1, time.Second); err != nil {
			t.Fatalf("poll: %v", err)
		}
		n := h.AioDrain(out)
		for _, c := range out[:n] {
			if !want[c.Cookie] {
				t.Fatalf("unexpected cookie %d", c.Cookie)
			}
			delete(want, c.Cookie)
			if c.Err != nil {
				errs[c.Cookie] = c.Err
			}
		}
	}
	return errs
}

func TestAsyncRoundTrip(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	srv := nbdtest.StartQemuNBD(t, dir, "-f", "raw", "-e", "2", mkRaw(t, dir, 64<<20))
	h := connect(t, srv.URI)
	// A unix socket: the send buffer is raised (the writes below then go
	// out in fewer pieces); this changes nothing else.
	if ok, err := h.SetSendBuffer(4 << 20); err != nil || !ok {
		t.Errorf("SetSendBuffer on a unix socket = %v, %v; want true", ok, err)
	}

	const req = 256 << 10
	const nreq = 32
	buf := nbd.NewBuffer(req * nreq)
	defer buf.Free()
	copy(buf.Bytes(), pattern(buf.Len(), 9))

	pending := map[nbd.Cookie]bool{}
	for i := 0; i < nreq; i++ {
		c, err := h.AioPwrite(buf, i*req, req, int64(i)*req, 0)
		if err != nil {
			t.Fatal(err)
		}
		pending[c] = true
	}
	if n, err := h.AioInFlight(); err != nil || n == 0 {
		t.Errorf("AioInFlight = %d, %v; want > 0", n, err)
	}
	if errs := drive(t, h, pending); len(errs) > 0 {
		t.Fatalf("writes failed: %v", errs)
	}
	c, err := h.AioZero(req, req, 0)
	if err != nil {
		t.Fatal(err)
	}
	f, err := h.AioFlush()
	if err != nil {
		t.Fatal(err)
	}
	// Drive these two with nbd_poll and per-cookie retirement.
	for _, ck := range []nbd.Cookie{c, f} {
		for {
			done, err := h.AioCommandCompleted(ck)
			if err != nil {
				t.Fatalf("command %d: %v", ck, err)
			}
			if done {
				break
			}
			if err := h.Poll(time.Second); err != nil {
				t.Fatal(err)
			}
		}
	}
	if ck, err := h.AioPeekCommandCompleted(); err == nil && ck != 0 {
		t.Errorf("peek after retiring everything = %d", ck)
	}

	rb := nbd.NewBuffer(req * nreq)
	defer rb.Free()
	pending = map[nbd.Cookie]bool{}
	for i := 0; i < nreq; i++ {
		c, err := h.AioPread(rb, i*req, req, int64(i)*req)
		if err != nil {
			t.Fatal(err)
		}
		pending[c] = true
	}
	if errs := drive(t, h, pending); len(errs) > 0 {
		t.Fatalf("reads failed: %v", errs)
	}
	want := buf.Bytes()
	clear(want[req : 2*req])
	if !bytes.Equal(rb.Bytes(), want) {
		t.Fatal("async read-back differs")
	}
}

func mkRaw(t *testing.T, dir string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "disk.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBlockStatusSparse(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	p := mkRaw(t, dir, 16<<20)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Data at [2M,3M) and [8M,8M+64K); the rest is a hole.
	if _, err := f.WriteAt(pattern(1<<20, 1), 2<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(pattern(64<<10, 2), 8<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()

	for name, start := range map[string]func() *nbdtest.Server{
		"nbdkit-file": func() *nbdtest.Server { return nbdtest.StartNbdkit(t, dir, "-r", "file", p) },
		"qemu-nbd-raw": func() *nbdtest.Server {
			return nbdtest.StartQemuNBD(t, dir, "-r", "-f", "raw", p)
		},
	} {
		t.Run(name, func(t *testing.T) {
			srv := start()
			defer srv.Stop()
			h := connect(t, srv.URI)
			defer h.Close()
			var got []nbd.Extent
			for off := int64(0); off < 16<<20; {
				exts, err := h.BlockStatus(off, 16<<20-off)
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, exts...)
				last := exts[len(exts)-1]
				off = last.Offset + last.Length
			}
			// Merge neighbours with equal flags: servers may split.
			var m []nbd.Extent
			for _, e := range got {
				if n := len(m); n > 0 && m[n-1].Flags == e.Flags && m[n-1].Offset+m[n-1].Length == e.Offset {
					m[n-1].Length += e.Length
					continue
				}
				m = append(m, e)
			}
			hz := nbd.StateHole | nbd.StateZero
			want := []nbd.Extent{
				{0, 2 << 20, hz}, {2 << 20, 1 << 20, 0}, {3 << 20, 5 << 20, hz},
				{8 << 20, 64 << 10, 0}, {8<<20 + 64<<10, 8<<20 - 64<<10, hz},
			}
			if len(m) != len(want) {
				t.Fatalf("extents = %+v; want %+v", m, want)
			}
			for i := range m {
				if m[i] != want[i] {
					t.Fatalf("extents = %+v; want %+v", m, want)
				}
			}
			if !m[0].Hole() || !m[0].Zero() || m[1].Hole() || m[1].Zero() {
				t.Error("Hole/Zero accessors disagree with flags")
			}
		})
	}
}

func TestErrorsNameOpAndOffset(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)

	if _, err := nbd.Connect("nbd+unix:///?socket=" + filepath.Join(dir, "nothing.sock")); err == nil {
		t.Fatal("connect to a missing socket succeeded")
	} else if !strings.Contains(err.Error(), "connect") || !strings.Contains(err.Error(), "nothing.sock") {
		t.Errorf("connect error %q does not name the operation and URI", err)
	}

	srv := nbdtest.StartNbdkit(t, dir, "memory", "1M")
	h := connect(t, srv.URI)
	b := make([]byte, 4096)
	err := h.Pread(b, 1<<20)
	var ne *nbd.Error
	if !errors.As(err, &ne) || ne.Op != "pread" || ne.Offset != 1<<20 || ne.Msg == "" {
		t.Fatalf("read past the end: %#v", err)
	}
	if !strings.Contains(err.Error(), "pread at offset 1048576") {
		t.Errorf("error %q does not name op and offset", err)
	}

	// A server-side EIO, synchronous and asynchronous.
	bad := nbdtest.StartNbdkit(t, dir, "--filter=error", "memory", "1M", "error=EIO", "error-pread-rate=100%")
	hb := connect(t, bad.URI)
	err = hb.Pread(b, 12288)
	if !errors.As(err, &ne) || ne.Offset != 12288 || !errors.Is(err, syscall.EIO) {
		t.Fatalf("pread on EIO server: %v (errno %v)", err, ne)
	}
	if !strings.Contains(err.Error(), "12288") {
		t.Errorf("error %q does not name the offset", err)
	}
	buf := nbd.NewBuffer(4096)
	defer buf.Free()
	c, err := hb.AioPread(buf, 0, 4096, 8192)
	if err != nil {
		t.Fatal(err)
	}
	errs := drive(t, hb, map[nbd.Cookie]bool{c: true})
	if e := errs[c]; e == nil || e.Errno != syscall.EIO {
		t.Fatalf("async pread on EIO server: %v", errs)
	}
	// Async argument errors are reported at once with op and offset.
	if _, err := h.AioPread(buf, 0, 4096, 1<<20); err == nil || !strings.Contains(err.Error(), "aio_pread at offset 1048576") {
		t.Errorf("aio_pread past the end: %v", err)
	}
}

// TestReadsDoNotPreZero: libnbd zeroes a read's buffer before it sends the
// read unless told not to (nbd_set_pread_initialize), a guard for callers
// that use a buffer whose read failed; the copier never does, and that
// memset was a quarter of its CPU. A failed read must leave the buffer as
// it was.
func TestReadsDoNotPreZero(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	testutil.CheckNoSockets(t, dir)
	bad := nbdtest.StartNbdkit(t, dir, "--filter=error", "memory", "1M", "error=EIO", "error-pread-rate=100%")
	h := connect(t, bad.URI)
	was := pattern(4096, 3)
	b := bytes.Clone(was)
	if err := h.Pread(b, 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("pread on EIO server: %v", err)
	}
	if !bytes.Equal(b, was) {
		t.Error("a failed synchronous read changed its buffer: libnbd pre-zeroes reads")
	}
	buf := nbd.NewBuffer(4096)
	defer buf.Free()
	copy(buf.Bytes(), was)
	c, err := h.AioPread(buf, 0, 4096, 0)
	if err != nil {
		t.Fatal(err)
	}
	if errs := drive(t, h, map[nbd.Cookie]bool{c: true}); errs[c] == nil {
		t.Fatal("async pread on EIO server succeeded")
	}
	if !bytes.Equal(buf.Bytes(), was) {
		t.Error("a failed asynchronous read changed its buffer: libnbd pre-zeroes reads")
	}
}

// TestBufferAlignment: every buffer can be written with O_DIRECT, and one
// of a huge page or more starts on a huge page (the kernel then backs it
// with huge pages where it can: fewer faults, and O_DIRECT pins fewer
// pages).
func TestBufferAlignment(t *testing.T) {
	for _, n := range []int{1, 4096, 64 << 10, 2 << 20, 4 << 20} {
		b := nbd.NewBuffer(n)
		addr := uintptr(unsafe.Pointer(&b.Bytes()[0]))
		want := uintptr(nbd.BufferAlign)
		if n >= 2<<20 {
			want = 2 << 20
		}
		if addr%want != 0 {
			t.Errorf("NewBuffer(%d) at %#x: not on a %d-byte boundary", n, addr, want)
		}
		b.Bytes()[n-1] = 1 // the whole buffer is ours
		b.Free()
	}
}
