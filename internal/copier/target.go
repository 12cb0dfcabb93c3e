package copier

import (
	"errors"
	"fmt"
	"sync"
	"syscall"

	"github.com/cbtflow/cbtflow/internal/nbd"
	"github.com/cbtflow/cbtflow/internal/qcow2"
)

// target is where a copy writes: an NBD server's export, or a QCOW2
// image the copier writes itself (Options.Image). Commands are sent from
// the copy's loop and complete later, in any order: drain retires them.
type target interface {
	size() (int64, error)
	// check says whether the target can flush, and zero when overlay.
	check(overlay bool) error
	pwrite(buf *nbd.Buffer, bufOff, n int, off int64) (nbd.Cookie, error)
	zero(off, n int64) (nbd.Cookie, error)
	flush() (nbd.Cookie, error)
	drain(out []nbd.Completion) int
	// dead says no command can succeed any more.
	dead() bool
}

// nbdTarget is an NBD connection: its completions wake the copy's poll.
type nbdTarget struct{ h *nbd.Handle }

func (t nbdTarget) size() (int64, error) { return t.h.Size() }

func (t nbdTarget) check(overlay bool) error {
	if ok, err := t.h.CanFlush(); err != nil || !ok {
		return fmt.Errorf("copier: target cannot flush (%v): no durable resume point possible", err)
	}
	if overlay {
		if ok, err := t.h.CanZero(); err != nil || !ok {
			return fmt.Errorf("copier: overlay target cannot write zeroes (%v)", err)
		}
	}
	return nil
}

func (t nbdTarget) pwrite(buf *nbd.Buffer, bufOff, n int, off int64) (nbd.Cookie, error) {
	return t.h.AioPwrite(buf, bufOff, n, off, 0)
}
func (t nbdTarget) zero(off, n int64) (nbd.Cookie, error) { return t.h.AioZero(off, n, 0) }
func (t nbdTarget) flush() (nbd.Cookie, error)            { return t.h.AioFlush() }
func (t nbdTarget) drain(out []nbd.Completion) int        { return t.h.AioDrain(out) }
func (t nbdTarget) dead() bool                            { return t.h.IsDead() }

// imageTarget writes a QCOW2 image in process: writes and flushes run on
// a few goroutines (a write into a file blocks), zeroes at once (they
// change metadata in memory); each completion wakes the copy's poll.
type imageTarget struct {
	w     *qcow2.Writer
	waker *waker
	jobs  chan imageJob
	wg    sync.WaitGroup

	mu   sync.Mutex
	done []nbd.Completion
	last nbd.Cookie
}

type imageJob struct {
	ck    nbd.Cookie
	flush bool
	b     []byte
	off   int64
}

// imageWriters is how many writes into the image run at once: enough
// to keep the disk's queue busy while the loop reads on.
const imageWriters = 4

func newImageTarget(w *qcow2.Writer, k *waker, queue int) *imageTarget {
	t := &imageTarget{w: w, waker: k, jobs: make(chan imageJob, queue)}
	for range imageWriters {
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			for j := range t.jobs {
				var err error
				if j.flush {
					err = w.Flush()
				} else {
					err = w.Write(j.b, j.off)
				}
				t.complete(j.ck, err)
			}
		}()
	}
	return t
}

// stop lets the writes sent finish and waits for them: after it, no
// buffer is read any more.
func (t *imageTarget) stop() {
	close(t.jobs)
	t.wg.Wait()
}

func (t *imageTarget) cookie() nbd.Cookie {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.last++
	return t.last
}

func (t *imageTarget) complete(ck nbd.Cookie, err error) {
	d := nbd.Completion{Cookie: ck}
	if err != nil {
		d.Err = &nbd.Error{Offset: -1, Msg: err.Error()}
		var errno syscall.Errno
		if errors.As(err, &errno) {
			d.Err.Errno = errno
		}
	}
	t.mu.Lock()
	t.done = append(t.done, d)
	t.mu.Unlock()
	t.waker.wake()
}

func (t *imageTarget) size() (int64, error) { return t.w.Size(), nil }
func (t *imageTarget) check(bool) error     { return nil }

func (t *imageTarget) pwrite(buf *nbd.Buffer, bufOff, n int, off int64) (nbd.Cookie, error) {
	ck := t.cookie()
	t.jobs <- imageJob{ck: ck, b: buf.Bytes()[bufOff : bufOff+n], off: off}
	return ck, nil
}

func (t *imageTarget) zero(off, n int64) (nbd.Cookie, error) {
	ck := t.cookie()
	t.complete(ck, t.w.Zero(off, n))
	return ck, nil
}

func (t *imageTarget) flush() (nbd.Cookie, error) {
	ck := t.cookie()
	t.jobs <- imageJob{ck: ck, flush: true}
	return ck, nil
}

func (t *imageTarget) drain(out []nbd.Completion) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := copy(out, t.done)
	t.done = t.done[:copy(t.done, t.done[n:])]
	return n
}

func (t *imageTarget) dead() bool { return t.w.Err() != nil }
