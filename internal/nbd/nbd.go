// Package nbd is a thin cgo binding over the system libnbd: what cbtflow's
// copier needs to talk to NBD servers (nbdkit, qemu-nbd) — connect by URI,
// size and capabilities, synchronous and asynchronous reads, writes, zeroes
// and flushes, and block status (base:allocation).
//
// It is not a general libnbd binding and holds no policy (retries, chunking,
// zero handling live in package copier).
//
// Errors are *Error values that carry the operation, the offset and libnbd's
// message and errno, read on the OS thread of the failing call. Buffers
// handed to asynchronous calls must stay valid until the command completes,
// so they are C memory (Buffer), never Go memory. Handles are not garbage
// collected: Close every Handle.
package nbd

/*
#cgo pkg-config: libnbd
#include "helpers.h"
*/
import "C"

import (
	"fmt"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// Flags modify a write or zero command (LIBNBD_CMD_FLAG_*).
type Flags uint32

// Command flags.
const (
	FlagFUA      Flags = C.LIBNBD_CMD_FLAG_FUA       // durable before the reply
	FlagNoHole   Flags = C.LIBNBD_CMD_FLAG_NO_HOLE   // zero: keep the area allocated
	FlagFastZero Flags = C.LIBNBD_CMD_FLAG_FAST_ZERO // zero: fail rather than write slowly
)

// Direction tells which way a handle's state machine waits on its socket
// (nbd_aio_get_direction).
type Direction uint

// Directions; DirRead|DirWrite means both.
const (
	DirRead  Direction = C.LIBNBD_AIO_DIRECTION_READ
	DirWrite Direction = C.LIBNBD_AIO_DIRECTION_WRITE
)

// Block status flags of the base:allocation context.
const (
	StateHole uint32 = C.LIBNBD_STATE_HOLE // not allocated
	StateZero uint32 = C.LIBNBD_STATE_ZERO // reads as zeros
)

// MetaBaseAllocation is the meta context that Connect requests.
const MetaBaseAllocation = "base:allocation"

// Error is a failed libnbd call.
type Error struct {
	Op     string        // libnbd operation, e.g. "pread", "connect"
	Offset int64         // byte offset of the request, -1 when it has none
	Length int64         // byte count of the request, 0 when it has none
	Errno  syscall.Errno // libnbd's errno, 0 when libnbd set none
	Msg    string        // libnbd's message
}

// Error formats the operation, offset and libnbd's message.
func (e *Error) Error() string {
	s := "nbd " + e.Op
	if e.Offset >= 0 {
		s += fmt.Sprintf(" at offset %d", e.Offset)
		if e.Length > 0 {
			s += fmt.Sprintf(" length %d", e.Length)
		}
	}
	s += ": " + e.Msg
	if e.Errno != 0 {
		s += fmt.Sprintf(" (%s)", e.Errno.Error())
	}
	return s
}

// Unwrap returns the errno, so errors.Is(err, syscall.EIO) works.
func (e *Error) Unwrap() error {
	if e.Errno == 0 {
		return nil
	}
	return e.Errno
}

// mkerr converts a failed helper result and frees its message.
func mkerr(r C.cbt_ret, op string, off, n int64) *Error {
	e := &Error{Op: op, Offset: off, Length: n, Errno: syscall.Errno(r.err), Msg: "unknown error"}
	if r.msg != nil {
		e.Msg = C.GoString(r.msg)
		C.free(unsafe.Pointer(r.msg))
	}
	return e
}

// Handle is one connection to an NBD server. Its methods may be called from
// several goroutines (libnbd locks the handle), but not concurrently with
// Close.
type Handle struct {
	h    *C.struct_nbd_handle
	once sync.Once

	drainMu  sync.Mutex
	drainBuf *C.cbt_done // C scratch space for AioDrain
}

const drainMax = 64

// Connect opens a connection to the NBD server at uri (nbd://, nbd+unix://,
// nbds://, …). It requests the base:allocation meta context first, so
// BlockStatus works where the server supports it.
func Connect(uri string) (*Handle, error) {
	var r C.cbt_ret
	ch := C.cbt_create(&r)
	if ch == nil {
		return nil, mkerr(r, "create", -1, 0)
	}
	h := &Handle{h: ch}
	curi := C.CString(uri)
	defer C.free(unsafe.Pointer(curi))
	cmeta := C.CString(MetaBaseAllocation)
	defer C.free(unsafe.Pointer(cmeta))
	if r := C.cbt_connect_uri(h.h, curi, cmeta); r.r == -1 {
		err := mkerr(r, "connect "+uri, -1, 0)
		h.Close()
		return nil, err
	}
	h.drainBuf = (*C.cbt_done)(C.calloc(drainMax, C.sizeof_cbt_done))
	return h, nil
}

// Close disconnects (cleanly when nothing is in flight) and frees the
// handle. It is idempotent. Buffers of commands still in flight may be
// freed only after Close.
func (h *Handle) Close() error {
	h.once.Do(func() {
		C.cbt_close(h.h)
		h.h = nil
		if h.drainBuf != nil {
			C.free(unsafe.Pointer(h.drainBuf))
			h.drainBuf = nil
		}
	})
	return nil
}

func (h *Handle) boolean(r C.cbt_ret, op string) (bool, error) {
	if r.r == -1 {
		return false, mkerr(r, op, -1, 0)
	}
	return r.r == 1, nil
}

// Size returns the export size in bytes.
func (h *Handle) Size() (int64, error) {
	r := C.cbt_get_size(h.h)
	if r.r == -1 {
		return 0, mkerr(r, "get_size", -1, 0)
	}
	return int64(r.r), nil
}

// CanZero reports whether the server supports WRITE_ZEROES.
func (h *Handle) CanZero() (bool, error) { return h.boolean(C.cbt_can_zero(h.h), "can_zero") }

// CanFastZero reports whether the server supports the FAST_ZERO flag.
func (h *Handle) CanFastZero() (bool, error) {
	return h.boolean(C.cbt_can_fast_zero(h.h), "can_fast_zero")
}

// CanFlush reports whether the server supports FLUSH.
func (h *Handle) CanFlush() (bool, error) { return h.boolean(C.cbt_can_flush(h.h), "can_flush") }

// CanTrim reports whether the server supports TRIM.
func (h *Handle) CanTrim() (bool, error) { return h.boolean(C.cbt_can_trim(h.h), "can_trim") }

// CanMultiConn reports whether several connections to the export see one
// consistent image (a FLUSH on one covers writes on all).
func (h *Handle) CanMultiConn() (bool, error) {
	return h.boolean(C.cbt_can_multi_conn(h.h), "can_multi_conn")
}

// IsReadOnly reports whether the export refuses writes.
func (h *Handle) IsReadOnly() (bool, error) {
	return h.boolean(C.cbt_is_read_only(h.h), "is_read_only")
}

// CanMetaContext reports whether the server agreed to the meta context
// (e.g. MetaBaseAllocation) during the handshake.
func (h *Handle) CanMetaContext(name string) (bool, error) {
	c := C.CString(name)
	defer C.free(unsafe.Pointer(c))
	return h.boolean(C.cbt_can_meta_context(h.h, c), "can_meta_context")
}

// Pread fills b from offset off (synchronous).
func (h *Handle) Pread(b []byte, off int64) error {
	if len(b) == 0 {
		return nil
	}
	// Go memory is fine for a synchronous call: it is only used during it.
	r := C.cbt_pread(h.h, unsafe.Pointer(&b[0]), C.size_t(len(b)), C.uint64_t(off))
	if r.r == -1 {
		return mkerr(r, "pread", off, int64(len(b)))
	}
	return nil
}

// Pwrite writes b at offset off (synchronous).
func (h *Handle) Pwrite(b []byte, off int64, flags Flags) error {
	if len(b) == 0 {
		return nil
	}
	r := C.cbt_pwrite(h.h, unsafe.Pointer(&b[0]), C.size_t(len(b)), C.uint64_t(off), C.uint32_t(flags))
	if r.r == -1 {
		return mkerr(r, "pwrite", off, int64(len(b)))
	}
	return nil
}

// Zero writes n zero bytes at offset off with WRITE_ZEROES (synchronous).
func (h *Handle) Zero(off, n int64, flags Flags) error {
	r := C.cbt_zero(h.h, C.uint64_t(n), C.uint64_t(off), C.uint32_t(flags))
	if r.r == -1 {
		return mkerr(r, "zero", off, n)
	}
	return nil
}

// Flush makes every write completed before it durable (synchronous).
func (h *Handle) Flush() error {
	if r := C.cbt_flush(h.h); r.r == -1 {
		return mkerr(r, "flush", -1, 0)
	}
	return nil
}

// Extent is one entry of a block status answer.
type Extent struct {
	Offset, Length int64
	Flags          uint32 // StateHole, StateZero
}

// Hole reports whether the extent is not allocated.
func (e Extent) Hole() bool { return e.Flags&StateHole != 0 }

// Zero reports whether the extent reads as zeros.
func (e Extent) Zero() bool { return e.Flags&StateZero != 0 }

// BlockStatus returns the base:allocation map of [off, off+n). The server
// may answer for less than n bytes (never zero bytes) and the last extent
// is clipped to off+n. n must fit in 32 bits.
func (h *Handle) BlockStatus(off, n int64) ([]Extent, error) {
	var x C.cbt_extents
	defer func() {
		if x.e != nil {
			C.free(unsafe.Pointer(x.e))
		}
	}()
	// x is Go memory holding only a C pointer: allowed for the call.
	r := C.cbt_block_status(h.h, C.uint64_t(n), C.uint64_t(off), &x)
	if r.r == -1 {
		return nil, mkerr(r, "block_status", off, n)
	}
	pairs := unsafe.Slice((*uint32)(unsafe.Pointer(x.e)), int(x.n))
	out := make([]Extent, 0, len(pairs)/2)
	pos, end := off, off+n
	for i := 0; i+1 < len(pairs) && pos < end; i += 2 {
		l := int64(pairs[i])
		if pos+l > end {
			l = end - pos
		}
		if l <= 0 {
			continue
		}
		out = append(out, Extent{Offset: pos, Length: l, Flags: pairs[i+1]})
		pos += l
	}
	if len(out) == 0 {
		return nil, &Error{Op: "block_status", Offset: off, Length: n, Errno: syscall.EPROTO, Msg: "server returned no extents"}
	}
	return out, nil
}

// SetSendBuffer raises the socket's send buffer to n bytes when the
// connection is a unix socket, so one large write request is handed to the
// kernel in one go instead of in pieces of the default ~200 KiB, each
// waiting for the server to read. The kernel caps n at net.core.wmem_max.
// TCP connections keep the kernel's autotuning; it reports false for them.
func (h *Handle) SetSendBuffer(n int) (bool, error) {
	r := C.cbt_set_sndbuf(h.h, C.int(n))
	if r.r == -1 {
		return false, mkerr(r, "setsockopt SO_SNDBUF", -1, 0)
	}
	return r.r == 1, nil
}

// Buffer is C memory for asynchronous calls: libnbd reads into and writes
// from it after the call returns, which Go memory does not allow.
type Buffer struct {
	p unsafe.Pointer
	n int
}

// NewBuffer allocates n bytes of zeroed C memory, on a 4 KiB boundary (so that
// the buffer can be written to a file opened with O_DIRECT); a buffer of
// a huge page (2 MiB) or more starts on a huge page and asks the kernel
// to back it with huge pages (MADV_HUGEPAGE; where transparent huge
// pages are off, it gets small ones). For the copier's 2 MiB buffers
// that is 1 page fault instead of 512, and an O_DIRECT write of one pins
// one page: measured on a 1 GiB copy into an image, a quarter less time.
// Free it after the last command using it completed (or its handle was
// closed).
func NewBuffer(n int) *Buffer {
	var p unsafe.Pointer
	align := C.size_t(BufferAlign)
	if n >= hugePage {
		align = hugePage
	}
	if C.posix_memalign(&p, align, C.size_t(max(n, 1))) != 0 || p == nil {
		panic("nbd: out of memory")
	}
	if n >= hugePage {
		C.madvise(p, C.size_t(n), C.MADV_HUGEPAGE)
	}
	// Memory malloc reuses holds what it held: another copy's data.
	C.memset(p, 0, C.size_t(max(n, 1)))
	return &Buffer{p: p, n: n}
}

// BufferAlign is the alignment of NewBuffer's memory.
const BufferAlign = 4096

// hugePage is the size of an x86-64 (and arm64 4K-page) huge page.
const hugePage = 2 << 20

// Bytes returns the buffer as a slice over the C memory. It is invalid after
// Free.
func (b *Buffer) Bytes() []byte { return unsafe.Slice((*byte)(b.p), b.n) }

// Len returns the buffer's size.
func (b *Buffer) Len() int { return b.n }

// Free releases the memory. It is idempotent.
func (b *Buffer) Free() {
	if b.p != nil {
		C.free(b.p)
		b.p = nil
		b.n = 0
	}
}

func (b *Buffer) at(bufOff, n int) unsafe.Pointer {
	if b.p == nil || bufOff < 0 || n <= 0 || bufOff+n > b.n {
		panic(fmt.Sprintf("nbd: buffer range [%d,+%d) outside %d bytes", bufOff, n, b.n))
	}
	return unsafe.Add(b.p, bufOff)
}

// Cookie identifies an asynchronous command.
type Cookie int64

// AioPread starts reading n bytes at off into buf[bufOff:bufOff+n].
func (h *Handle) AioPread(buf *Buffer, bufOff, n int, off int64) (Cookie, error) {
	r := C.cbt_aio_pread(h.h, buf.at(bufOff, n), C.size_t(n), C.uint64_t(off))
	if r.r == -1 {
		return 0, mkerr(r, "aio_pread", off, int64(n))
	}
	return Cookie(r.r), nil
}

// AioPwrite starts writing buf[bufOff:bufOff+n] at off.
func (h *Handle) AioPwrite(buf *Buffer, bufOff, n int, off int64, flags Flags) (Cookie, error) {
	r := C.cbt_aio_pwrite(h.h, buf.at(bufOff, n), C.size_t(n), C.uint64_t(off), C.uint32_t(flags))
	if r.r == -1 {
		return 0, mkerr(r, "aio_pwrite", off, int64(n))
	}
	return Cookie(r.r), nil
}

// AioZero starts a WRITE_ZEROES of n bytes at off.
func (h *Handle) AioZero(off, n int64, flags Flags) (Cookie, error) {
	r := C.cbt_aio_zero(h.h, C.uint64_t(n), C.uint64_t(off), C.uint32_t(flags))
	if r.r == -1 {
		return 0, mkerr(r, "aio_zero", off, n)
	}
	return Cookie(r.r), nil
}

// AioFlush starts a FLUSH. It covers the writes completed before it was
// issued, not those still in flight.
func (h *Handle) AioFlush() (Cookie, error) {
	r := C.cbt_aio_flush(h.h)
	if r.r == -1 {
		return 0, mkerr(r, "aio_flush", -1, 0)
	}
	return Cookie(r.r), nil
}

// AioGetFd returns the socket to poll.
func (h *Handle) AioGetFd() (int, error) {
	r := C.cbt_aio_get_fd(h.h)
	if r.r == -1 {
		return -1, mkerr(r, "aio_get_fd", -1, 0)
	}
	return int(r.r), nil
}

// AioGetDirection tells which way to poll the socket.
func (h *Handle) AioGetDirection() Direction {
	return Direction(C.nbd_aio_get_direction(h.h))
}

// AioNotifyRead tells the handle its socket is readable.
func (h *Handle) AioNotifyRead() error {
	if r := C.cbt_aio_notify_read(h.h); r.r == -1 {
		return mkerr(r, "aio_notify_read", -1, 0)
	}
	return nil
}

// AioNotifyWrite tells the handle its socket is writable.
func (h *Handle) AioNotifyWrite() error {
	if r := C.cbt_aio_notify_write(h.h); r.r == -1 {
		return mkerr(r, "aio_notify_write", -1, 0)
	}
	return nil
}

// AioInFlight returns the number of commands sent or queued and not yet
// completed.
func (h *Handle) AioInFlight() (int, error) {
	r := C.cbt_aio_in_flight(h.h)
	if r.r == -1 {
		return 0, mkerr(r, "aio_in_flight", -1, 0)
	}
	return int(r.r), nil
}

// AioPeekCommandCompleted returns a completed, not yet retired command, or 0
// when none has completed.
func (h *Handle) AioPeekCommandCompleted() (Cookie, error) {
	r := C.cbt_aio_peek(h.h)
	if r.r == -1 {
		return 0, mkerr(r, "aio_peek_command_completed", -1, 0)
	}
	return Cookie(r.r), nil
}

// AioCommandCompleted retires c if it completed: true and nil on success,
// true and the command's error on failure, false while it runs.
func (h *Handle) AioCommandCompleted(c Cookie) (bool, error) {
	r := C.cbt_aio_command_completed(h.h, C.uint64_t(c))
	if r.r == -1 {
		return true, mkerr(r, "aio_command_completed", -1, 0)
	}
	return r.r == 1, nil
}

// Completion is a retired command. Err is set when the command failed; its
// Op and Offset are generic, the caller knows the request behind Cookie.
type Completion struct {
	Cookie Cookie
	Err    *Error
}

// AioDrain retires completed commands into out, as many as fit, in one cgo
// call, and returns how many it retired.
func (h *Handle) AioDrain(out []Completion) int {
	h.drainMu.Lock()
	defer h.drainMu.Unlock()
	max := len(out)
	if max > drainMax {
		max = drainMax
	}
	n := int(C.cbt_drain(h.h, h.drainBuf, C.int(max)))
	done := unsafe.Slice(h.drainBuf, drainMax)
	for i := 0; i < n; i++ {
		d := &done[i]
		out[i] = Completion{Cookie: Cookie(d.cookie)}
		if d.err != 0 || d.msg != nil {
			out[i].Err = mkerr(C.cbt_ret{r: -1, err: d.err, msg: d.msg}, "command", -1, 0)
			d.msg = nil
		}
	}
	return n
}

// IsDead reports whether the connection failed (server gone, protocol
// error): no command on it can succeed any more.
func (h *Handle) IsDead() bool {
	return C.nbd_aio_is_dead(h.h) == 1 || C.nbd_aio_is_closed(h.h) == 1
}

// Poll runs the handle's state machine until something happens or timeout
// passes (nbd_poll). A negative timeout waits for ever. EINTR is no error.
func (h *Handle) Poll(timeout time.Duration) error {
	if r := C.cbt_poll_one(h.h, C.int(ms(timeout))); r.r == -1 {
		return mkerr(r, "poll", -1, 0)
	}
	return nil
}

func ms(d time.Duration) int {
	if d < 0 {
		return -1
	}
	m := (d + time.Millisecond - 1) / time.Millisecond
	if m > 1<<30 {
		m = 1 << 30
	}
	return int(m)
}

// PollError is a failure of PollHandles on one of its handles.
type PollError struct {
	Index int    // index of the handle in the slice, -1 for poll itself
	Err   *Error // what failed
}

// Error formats the underlying error.
func (e *PollError) Error() string { return e.Err.Error() }

// Unwrap returns the libnbd error.
func (e *PollError) Unwrap() error { return e.Err }

// PollHandles waits until one of the handles' sockets (or wakeFd, when ≥ 0)
// is ready or timeout passes, then lets each handle process its socket. It
// returns true when wakeFd became readable (the caller drains it). EINTR
// counts as a timeout. At most 8 handles.
func PollHandles(hs []*Handle, wakeFd int, timeout time.Duration) (bool, error) {
	var arr [8]*C.struct_nbd_handle
	if len(hs) > len(arr) {
		panic("nbd: PollHandles takes at most 8 handles")
	}
	for i, h := range hs {
		arr[i] = h.h
	}
	var failed C.int
	r := C.cbt_poll(&arr[0], C.int(len(hs)), C.int(wakeFd), C.int(ms(timeout)), &failed)
	if r.r == -1 {
		return false, &PollError{Index: int(failed), Err: mkerr(r, "poll", -1, 0)}
	}
	return r.r == 1, nil
}

// WaitIdle runs the handle until no command is in flight, retiring (and
// discarding) what completes, for at most timeout. It reports whether the
// handle became idle. Call it before Close after an aborted pipeline: a
// clean disconnect with nothing in flight is kinder to servers than a reset
// in the middle of replies (nbdkit 1.32 aborts on that).
func (h *Handle) WaitIdle(timeout time.Duration) bool {
	return WaitIdle([]*Handle{h}, timeout)
}

// WaitIdle is Handle.WaitIdle for several handles at once, with one
// deadline for all (at most 8 handles). It reports whether every handle
// became idle; a dead handle is given up on.
func WaitIdle(hs []*Handle, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	out := make([]Completion, drainMax)
	busy := make([]*Handle, 0, len(hs))
	for {
		busy = busy[:0]
		ok := true
		for _, h := range hs {
			for h.AioDrain(out) > 0 {
			}
			if h.IsDead() {
				ok = false
				continue
			}
			n, err := h.AioInFlight()
			if err != nil {
				ok = false
				continue
			}
			if n > 0 {
				busy = append(busy, h)
			}
		}
		if len(busy) == 0 {
			return ok
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		if _, err := PollHandles(busy, -1, left); err != nil {
			return false
		}
	}
}
