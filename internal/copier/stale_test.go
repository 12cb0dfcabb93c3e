package copier_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"testing"

	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/nbd"
	"github.com/cbtflow/cbtflow/testkit/nbdtest"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// lyingServer serves a read-only disk of size bytes at sock whose reads
// are answered with structured OFFSET_DATA chunks that add up to the
// request's length but all sit at its first 4 KiB (overlapping), then
// DONE: libnbd takes such a read as complete although most of its buffer
// was never written.
func lyingServer(t *testing.T, sock string, size uint64) {
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go serveLying(c, size)
		}
	}()
}

func serveLying(c net.Conn, size uint64) {
	defer c.Close()
	be := binary.BigEndian
	w := func(v ...any) {
		for _, x := range v {
			_ = binary.Write(c, be, x)
		}
	}
	// Newstyle fixed handshake.
	w(uint64(0x4e42444d41474943), uint64(0x49484156454F5054), uint16(3))
	var cflags uint32
	if binary.Read(c, be, &cflags) != nil {
		return
	}
	const repMagic = uint64(0x0003e889045565a9)
	for done := false; !done; {
		var hdr struct {
			Magic    uint64
			Opt, Len uint32
		}
		if binary.Read(c, be, &hdr) != nil {
			return
		}
		if _, err := io.CopyN(io.Discard, c, int64(hdr.Len)); err != nil {
			return
		}
		switch hdr.Opt {
		case 8, 10: // STRUCTURED_REPLY, SET_META_CONTEXT: ack (no context)
			w(repMagic, hdr.Opt, uint32(1), uint32(0))
		case 7, 6: // GO, INFO: the export's size, read-only, flags
			w(repMagic, hdr.Opt, uint32(3), uint32(12), uint16(0), size, uint16(1|2))
			w(repMagic, hdr.Opt, uint32(1), uint32(0))
			done = hdr.Opt == 7
		case 2: // ABORT
			return
		default:
			w(repMagic, hdr.Opt, uint32(0x80000001), uint32(0))
		}
	}
	data := bytes.Repeat([]byte{0x11}, 4096)
	for {
		var rq struct {
			Magic       uint32
			Flags, Type uint16
			Cookie, Off uint64
			Len         uint32
		}
		if binary.Read(c, be, &rq) != nil {
			return
		}
		switch rq.Type {
		case 0: // READ
			for o := uint32(0); o < rq.Len; o += 4096 {
				fl := uint16(0)
				if o+4096 >= rq.Len {
					fl = 1 // DONE
				}
				n := min(uint32(len(data)), rq.Len-o)
				w(uint32(0x668e33ef), fl, uint16(1), rq.Cookie, uint32(8+n), rq.Off) // always at the read's offset
				_, _ = c.Write(data[:n])
			}
		case 2: // DISC
			return
		default:
			w(uint32(0x67446698), uint32(22), rq.Cookie) // EINVAL
		}
	}
}

// TestNoBytesOfAnotherCopy: a copy's buffers come from the copies before
// it; whatever its source answers, no byte of theirs reaches its target.
func TestNoBytesOfAnotherCopy(t *testing.T) {
	testutil.CheckNoChildren(t)
	dir := t.TempDir()
	const size = 1 << 20
	pat := nbdtest.StartNbdkit(t, dir, "-r", "pattern", "1M")
	tgt1 := nbdtest.StartNbdkit(t, dir, "memory", "1M")
	if _, err := copier.Copy(context.Background(), copier.Options{Source: pat.URI, Target: tgt1.URI,
		Extents: []copier.Extent{{Offset: 0, Length: size}}}); err != nil {
		t.Fatal(err)
	}
	if copier.PoisonKeptBuffers(0xee) == 0 {
		t.Fatal("no buffer kept from the first copy")
	}
	sock := filepath.Join(dir, "lying.sock")
	lyingServer(t, sock, size)
	tgt := nbdtest.StartNbdkit(t, dir, "memory", "1M")
	if _, err := copier.Copy(context.Background(), copier.Options{Source: "nbd+unix:///?socket=" + sock, Target: tgt.URI,
		Extents: []copier.Extent{{Offset: 0, Length: size}}}); err != nil {
		t.Logf("the copy failed (the reply refused): %v", err)
		return
	}
	h, err := nbd.Connect(tgt.URI)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	got := make([]byte, size)
	if err := h.Pread(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := bytes.IndexByte(got, 0xee); i >= 0 {
		t.Fatalf("the target holds bytes of an earlier copy's buffer from offset %d (%d of %d bytes)", i, bytes.Count(got, []byte{0xee}), size)
	}
}
