package copier

import (
	"sync"
	"time"

	"github.com/cbtflow/cbtflow/internal/nbd"
)

// A copy's request buffers come from a pool of the process and go back to
// it when the copy ends (once its connections are closed and its image
// writers and hashers stopped: nothing reads or fills them any more).
//
// A fresh buffer costs its page faults, and the kernel zeroes every page
// it faults in: a 2 MiB buffer on a huge page (nbd.NewBuffer) is zeroed
// whole on its first byte. A worker that runs one short copy after
// another (the incrementals of many disks) zeroed 16 MiB per copy for a
// few MiB of data, a tenth of its CPU in a bench round of 40 such
// copies. Kept buffers are faulted in once.
//
// What the pool keeps is bounded (poolMaxBytes: the buffers of
// DefaultMaxCopies copies with the default options; a copy's buffers
// beyond it are freed), and it keeps nothing for long: poolIdle after the
// last copy ended, it frees every buffer, so a worker that has nothing to
// copy gives the memory back.
type bufferPool struct {
	mu    sync.Mutex
	free  map[int][]*nbd.Buffer // by size
	bytes int64
	idle  *time.Timer // frees everything; armed while the pool holds buffers
}

// DefaultMaxCopies is the number of copies whose buffers the pool keeps.
const DefaultMaxCopies = 4

const (
	poolMaxBytes = DefaultMaxCopies * DefaultInFlight * DefaultRequestSize
	poolIdle     = time.Minute
)

var buffers = &bufferPool{free: map[int][]*nbd.Buffer{}}

// get returns a buffer of n zeroed bytes: a kept one, else a new one.
//
// Zeroed, because reads no longer zero their buffers first (see
// internal/nbd): libnbd takes a read as complete when its reply's chunks
// add up to its length, without checking that they cover it, so a
// faulty server could leave bytes of the buffer as they were. Those must
// never be another copy's, another VM's, data: clearing 16 MiB per copy
// costs a millisecond (a copy of small extents has small buffers: see
// fittedRequestSize).
func (p *bufferPool) get(n int) *nbd.Buffer {
	p.mu.Lock()
	if l := p.free[n]; len(l) > 0 {
		b := l[len(l)-1]
		p.free[n] = l[:len(l)-1]
		p.bytes -= int64(n)
		p.mu.Unlock()
		clear(b.Bytes())
		return b
	}
	p.mu.Unlock()
	return nbd.NewBuffer(n)
}

// put keeps b for a later copy, or frees it when the pool is full. b must
// not be in use any more.
func (p *bufferPool) put(b *nbd.Buffer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := b.Len()
	if p.bytes+int64(n) > poolMaxBytes {
		b.Free()
		return
	}
	p.free[n] = append(p.free[n], b)
	p.bytes += int64(n)
	if p.idle == nil {
		p.idle = time.AfterFunc(poolIdle, p.drain)
	} else {
		p.idle.Reset(poolIdle)
	}
}

// drain frees every kept buffer.
func (p *bufferPool) drain() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for n, l := range p.free {
		for _, b := range l {
			b.Free()
		}
		delete(p.free, n)
	}
	p.bytes = 0
}
