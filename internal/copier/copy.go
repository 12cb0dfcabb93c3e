package copier

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/nbd"
)

// Copy copies opts.Extents from opts.Source to opts.Target (or into
// opts.Image) and returns what it did. It ends with a flush of the target
// (an NBD FLUSH, or the image's Flush): when it returns without error,
// every extent is durable. On error, the last Progress.ResumePoint reported
// is a valid Options.ResumeFrom for a new attempt. Cancelling ctx stops the
// copy promptly; connections are always closed before Copy returns.
//
// A request that fails is retried opts.Retries times; an error that
// persists is returned wrapping the *nbd.Error, which names the operation
// and the offset. A failed connection (server gone) is not retried: the
// caller resumes with a new connection.
func Copy(ctx context.Context, opts Options) (*Result, error) {
	opts.setDefaults()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	if opts.Image != nil {
		g := opts.Image.Granularity()
		end := int64(0)
		if n := len(opts.Extents); n > 0 {
			end = opts.Extents[n-1].End()
		}
		opts.Extents = widen(opts.Extents, g, opts.Image.Size())
		opts.SparseSize = max(opts.SparseSize/int(g), 1) * int(g)
		// A resume point past the last extent (off the subclusters, where
		// that extent ended) is past the widened one too.
		if n := len(opts.Extents); n > 0 && opts.ResumeFrom >= end {
			opts.ResumeFrom = max(opts.ResumeFrom, opts.Extents[n-1].End())
		}
	}
	opts.RequestSize = fittedRequestSize(opts)
	c := &copier{opts: opts, start: time.Now()}
	defer c.freeBuffers() // after the handles are closed (defers run in reverse)

	var err error
	if c.waker, err = newWaker(ctx); err != nil {
		return nil, err
	}
	defer c.waker.close()
	if c.src, err = nbd.Connect(opts.Source); err != nil {
		return nil, fmt.Errorf("copier: source: %w", err)
	}
	c.srcs = []*nbd.Handle{c.src}
	defer c.closeHandles()
	// More source connections only where the server promises that they all
	// see one image (multi-conn); reads are spread over them, so a server
	// that sends one reply at a time per connection (nbdkit) keeps several
	// replies going. A copy of little data reads over one (multiConnBytes).
	if opts.SourceConnections > 1 && dataBytes(opts.Extents, opts.ResumeFrom) >= multiConnBytes {
		if ok, err := c.src.CanMultiConn(); err == nil && ok {
			for len(c.srcs) < opts.SourceConnections {
				h, err := nbd.Connect(opts.Source)
				if err != nil {
					return nil, fmt.Errorf("copier: source connection %d: %w", len(c.srcs)+1, err)
				}
				c.srcs = append(c.srcs, h)
			}
		}
	}
	if opts.Image != nil {
		c.image = newImageTarget(opts.Image, c.waker, 4*opts.InFlight)
		c.tgt = c.image
	} else {
		if c.dst, err = nbd.Connect(opts.Target); err != nil {
			return nil, fmt.Errorf("copier: target: %w", err)
		}
		c.tgt = nbdTarget{c.dst}
		// Hand a whole write request to the kernel at once: with the
		// default ~200 KiB send buffer of a unix socket, a 2 MiB write
		// goes out in ten pieces, each a poll wake-up waiting for the
		// server to read. Best effort: the kernel caps the size, and TCP
		// keeps its autotuning.
		_, _ = c.dst.SetSendBuffer(targetSendBuffer)
	}
	if err := c.check(); err != nil {
		return nil, err
	}
	if opts.Digests != nil {
		c.startHashers()
		defer c.stopHashers() // before the buffers they read are freed
	}
	if err := c.run(ctx); err != nil {
		c.report()
		return nil, err
	}
	c.report()
	return &Result{
		Read: c.prog.Read, Written: c.prog.Written, Zeroed: c.prog.Zeroed, Skipped: c.prog.Skipped,
		Retried: c.prog.Retried, Flushes: c.flushes, ResumePoint: c.prog.ResumePoint,
		Duration: time.Since(c.start),
	}, nil
}

// multiConnBytes is the least data a copy reads over more than one
// source connection. Below it the other connections bring no speed (4 MiB
// of 64 KiB areas from nbdkit's file plugin: 9 ms over one connection or
// three) and cost their handshakes and the server's threads for them
// (copier and nbdkit together: about 40% less CPU over one; an
// incremental round of 40 such copies pays it 40 times); with vddk each is
// a session with the ESXi host besides.
const multiConnBytes = 32 << 20

// dataBytes is what extents hold past from (a resume point).
func dataBytes(extents []Extent, from int64) int64 {
	var n int64
	for _, e := range extents {
		if e.End() > from {
			n += e.End() - max(e.Offset, from)
		}
	}
	return n
}

// fittedRequestSize is the request size of a copy: o.RequestSize, or,
// when every extent is smaller, the largest extent rounded up to a unit
// (of zero detection, SparseSize, at least 64 KiB, and whole subclusters
// of the image) times a power of two. A chunk never spans extents, so no
// request of the copy is larger, and its InFlight buffers need be no
// larger either: a copy of
// scattered 64 KiB areas (an incremental) takes 8 buffers of 64 KiB, not
// 8 of 2 MiB, which its process had to fault in and zero (16 MiB, on huge
// pages that the kernel may first compact memory for: a fresh process
// waited 30 ms for that in about a third of its copies), and the pool
// clears on every reuse.
func fittedRequestSize(o Options) int {
	var longest int64
	for _, e := range o.Extents {
		longest = max(longest, e.Length)
	}
	unit := int64(max(o.SparseSize, 64<<10))
	if o.Image != nil {
		g := o.Image.Granularity()
		unit = (unit + g - 1) / g * g
	}
	// Powers of two of the unit: a few sizes, whose buffers the pool can
	// hand from one copy to the next.
	need := unit
	for need < longest {
		need *= 2
	}
	if need >= int64(o.RequestSize) {
		return o.RequestSize
	}
	return int(need)
}

func (o *Options) setDefaults() {
	if o.RequestSize <= 0 {
		o.RequestSize = DefaultRequestSize
	}
	if o.InFlight <= 0 {
		o.InFlight = DefaultInFlight
	}
	if o.SourceConnections <= 0 {
		o.SourceConnections = DefaultSourceConnections
	}
	if o.SparseSize <= 0 {
		o.SparseSize = DefaultSparseSize
	}
	if o.Retries == 0 {
		o.Retries = DefaultRetries
	} else if o.Retries < 0 {
		o.Retries = 0
	}
	if o.RetryBackoff <= 0 {
		o.RetryBackoff = DefaultRetryBackoff
	}
	if o.FlushInterval <= 0 {
		o.FlushInterval = DefaultFlushInterval
	}
	if o.ProgressInterval <= 0 {
		o.ProgressInterval = DefaultProgressInterval
	}
}

func (o *Options) validate() error {
	if o.Target != "" && o.Image != nil {
		return errors.New("copier: both a target URI and an image: give one")
	}
	if o.Source == "" || (o.Target == "" && o.Image == nil) {
		return errors.New("copier: a source URI and a target URI or an image are required")
	}
	if o.SourceConnections > maxSourceConnections {
		return fmt.Errorf("copier: %d source connections, at most %d", o.SourceConnections, maxSourceConnections)
	}
	if o.RequestSize > 32<<20 {
		return fmt.Errorf("copier: request size %d above the NBD limit of 32 MiB", o.RequestSize)
	}
	prev := int64(0)
	for i, e := range o.Extents {
		if e.Offset < 0 || e.Length <= 0 {
			return fmt.Errorf("copier: extent %d (offset %d length %d) is empty or negative", i, e.Offset, e.Length)
		}
		if e.Offset < prev {
			return fmt.Errorf("copier: extent %d at offset %d overlaps or precedes the one before it", i, e.Offset)
		}
		prev = e.End()
	}
	if o.ResumeFrom < 0 {
		return fmt.Errorf("copier: negative resume point %d", o.ResumeFrom)
	}
	if o.Image != nil {
		if g := o.Image.Granularity(); o.ResumeFrom%g != 0 && o.ResumeFrom < prev {
			return fmt.Errorf("copier: resume point %d is not on the image's subclusters of %d bytes", o.ResumeFrom, g)
		}
		if o.RequestSize%int(o.Image.Granularity()) != 0 {
			return fmt.Errorf("copier: request size %d is not whole subclusters of %d bytes", o.RequestSize, o.Image.Granularity())
		}
	}
	return nil
}

type opKind uint8

const (
	opRead opKind = iota
	opWrite
	opZero
	opFlush
)

var opNames = [...]string{opRead: "pread", opWrite: "pwrite", opZero: "zero", opFlush: "flush"}

// op is one NBD command of a request, kept to retry it and to name it in
// errors.
type op struct {
	kind     opKind
	conn     int      // source connection of a read
	req      *request // nil for a flush
	off, n   int64
	bufOff   int
	attempts int
	due      time.Time // when a retry may be sent
}

// request is a chunk on its way: read into buf, then written out in one or
// more commands (data runs written, zero runs zeroed or skipped).
type request struct {
	buf     *nbd.Buffer
	span    *span
	off, n  int64
	pending int // target commands in flight
}

type copier struct {
	opts     Options
	start    time.Time
	src, dst *nbd.Handle   // dst: an NBD target's connection
	srcs     []*nbd.Handle // src first; more when the source allows multi-conn
	tgt      target
	image    *imageTarget // when the copier writes the image itself
	srcBusy  []int        // reads in flight per source connection
	waker    *waker

	// The digests of what is read are taken by hashers, off the loop:
	// hashJobs to them, hashed back (each wakes the poll).
	hashJobs chan hashJob
	hashed   chan hashResult
	hashers  sync.WaitGroup

	bufs    []*nbd.Buffer
	free    []*request
	plan    *planner
	track   tracker
	srcOps  []map[nbd.Cookie]*op // per source connection
	dstOps  map[nbd.Cookie]*op
	retry   []*op
	runs    []run // the zero runs of the read being handled (digests)
	busy    int   // requests not in free
	lastEnd int64

	flushOp       *op // the flush in flight
	flushMark     int64
	lastFlush     time.Time
	sinceFlush    int64
	flushes       int64
	finalFlushed  bool
	prog          Progress
	lastProgress  time.Time
	progressDirty bool
}

// closeHandles lets commands still in flight after an error finish
// (briefly, on every connection at once) so the servers see a clean
// disconnect, then closes the handles.
func (c *copier) closeHandles() {
	if c.image != nil {
		c.image.stop()
	}
	hs := append([]*nbd.Handle(nil), c.srcs...)
	if c.dst != nil {
		hs = append(hs, c.dst)
	}
	nbd.WaitIdle(hs, closeGrace)
	for _, h := range hs {
		h.Close()
	}
}

// maxSourceConnections keeps every connection in one poll (nbd.PollHandles
// takes 8 handles).
const maxSourceConnections = 7

// targetSendBuffer is the send buffer asked for on a unix-socket target.
const targetSendBuffer = 4 << 20

// closeGrace bounds how long an aborted copy waits for its last replies.
const closeGrace = 2 * time.Second

// freeBuffers hands the buffers back to the pool: it runs once nothing
// reads or fills them (see Copy's defers).
func (c *copier) freeBuffers() {
	for _, b := range c.bufs {
		buffers.put(b)
	}
	c.bufs = nil
}

// check reads sizes and capabilities and builds the pipeline.
func (c *copier) check() error {
	o := &c.opts
	for _, e := range o.Extents {
		c.prog.Total += e.Length
		if e.Offset < o.ResumeFrom {
			c.prog.Done += min(e.End(), o.ResumeFrom) - e.Offset
		}
	}
	if n := len(o.Extents); n > 0 {
		c.lastEnd = o.Extents[n-1].End()
	}
	c.prog.ResumePoint = max(o.ResumeFrom, 0)
	srcSize, err := c.src.Size()
	if err != nil {
		return fmt.Errorf("copier: source: %w", err)
	}
	// An image's subclusters are copied whole, up to its end: it must end
	// where the disk does.
	if o.Image != nil && srcSize != o.Image.Size() {
		return fmt.Errorf("copier: the image holds a disk of %d bytes, the source has %d", o.Image.Size(), srcSize)
	}
	tgtSize, err := c.tgt.size()
	if err != nil {
		return fmt.Errorf("copier: target: %w", err)
	}
	for _, side := range []struct {
		name string
		size int64
	}{{"source", srcSize}, {"target", tgtSize}} {
		if side.size < c.lastEnd {
			return fmt.Errorf("copier: %s has %d bytes, extents end at %d", side.name, side.size, c.lastEnd)
		}
	}
	if err := c.tgt.check(o.Overlay); err != nil {
		return err
	}
	var status statusFunc
	if ok, err := c.src.CanMetaContext(nbd.MetaBaseAllocation); err == nil && ok {
		status = c.src.BlockStatus
	}
	c.plan = newPlanner(o.Extents, o.ResumeFrom, int64(o.RequestSize), status)
	if o.Image != nil {
		c.plan.align = o.Image.Granularity()
	}
	for i := 0; i < o.InFlight; i++ {
		b := buffers.get(o.RequestSize)
		c.bufs = append(c.bufs, b)
		c.free = append(c.free, &request{buf: b})
	}
	for range c.srcs {
		c.srcOps = append(c.srcOps, make(map[nbd.Cookie]*op, o.InFlight))
	}
	c.srcBusy = make([]int, len(c.srcs))
	c.dstOps = make(map[nbd.Cookie]*op, 4*o.InFlight)
	c.lastFlush = time.Now()
	c.lastProgress = time.Now()
	return nil
}

// run is the event loop: plan and send requests while there is room, wait
// on both sockets, and react to completions, until the final flush.
func (c *copier) run(ctx context.Context) error {
	hs := append([]*nbd.Handle(nil), c.srcs...)
	if c.dst != nil {
		hs = append(hs, c.dst) // an image's completions wake the waker
	}
	done := make([]nbd.Completion, 64)
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("copier: %w", err)
		}
		c.takeHashed()
		if err := c.fill(); err != nil {
			return err
		}
		now := time.Now()
		if err := c.sendRetries(now); err != nil {
			return err
		}
		finished, err := c.maybeFlush(now)
		if err != nil {
			return err
		}
		if finished {
			return nil
		}
		c.maybeReport(now)

		woken, err := nbd.PollHandles(hs, c.waker.r, c.timeout(now))
		if err != nil {
			var pe *nbd.PollError
			if errors.As(err, &pe) && pe.Index >= 0 {
				side := "source"
				if pe.Index == len(c.srcs) {
					side = "target"
				}
				return fmt.Errorf("copier: %s connection failed: %w", side, err)
			}
			return fmt.Errorf("copier: %w", err)
		}
		if woken {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("copier: %w", err)
			}
			c.waker.drain() // a hasher's result, taken at the loop's top
		}
		for more := true; more; {
			more = false
			for i, h := range c.srcs {
				n := h.AioDrain(done)
				for _, d := range done[:n] {
					if err := c.srcDone(i, d); err != nil {
						return err
					}
				}
				more = more || n == len(done)
			}
			m := c.tgt.drain(done)
			for _, d := range done[:m] {
				if err := c.dstDone(d); err != nil {
					return err
				}
			}
			more = more || m == len(done)
		}
		for _, h := range c.srcs {
			if h.IsDead() {
				return errors.New("copier: source connection died")
			}
		}
		if c.tgt.dead() {
			if c.image != nil {
				return fmt.Errorf("copier: image: %w", c.image.w.Err())
			}
			return errors.New("copier: target connection died")
		}
	}
}

// timeout is how long poll may sleep: until the next retry, periodic flush
// or progress report is due; completions wake it earlier.
func (c *copier) timeout(now time.Time) time.Duration {
	t := time.Second
	// A flush or report that is overdue waits for the next completion,
	// which wakes the poll anyway: no busy loop while a server is slow.
	if f := c.opts.FlushInterval - now.Sub(c.lastFlush); f > 0 && c.flushOp == nil {
		t = min(t, f)
	}
	if p := c.opts.ProgressInterval - now.Sub(c.lastProgress); p > 0 && c.progressDirty && c.opts.Progress != nil {
		t = min(t, p)
	}
	for _, o := range c.retry {
		t = min(t, o.due.Sub(now))
	}
	return max(t, time.Millisecond)
}

// fill plans chunks while a request is free.
func (c *copier) fill() error {
	for len(c.free) > 0 {
		ch, ok := c.plan.next()
		if !ok {
			return nil
		}
		if ch.zero && c.opts.Digests != nil {
			c.opts.Digests.Add(digest.Zero(ch.off, ch.n))
		}
		if ch.zero && !c.opts.Overlay {
			// A fresh image reads as zeros already.
			c.prog.Skipped += ch.n
			c.prog.Done += ch.n
			c.progressDirty = true
			continue
		}
		r := c.free[len(c.free)-1]
		c.free = c.free[:len(c.free)-1]
		c.busy++
		r.off, r.n, r.pending = ch.off, ch.n, 0
		r.span = c.track.add(ch.off)
		if ch.zero {
			if err := c.send(&op{kind: opZero, req: r, off: ch.off, n: ch.n}); err != nil {
				return err
			}
			continue
		}
		if err := c.send(&op{kind: opRead, req: r, off: ch.off, n: ch.n}); err != nil {
			return err
		}
	}
	return nil
}

// send issues o on its connection.
func (c *copier) send(o *op) error {
	var ck nbd.Cookie
	var err error
	switch o.kind {
	case opRead:
		// The connection with the fewest reads in flight.
		o.conn = 0
		for i, n := range c.srcBusy {
			if n < c.srcBusy[o.conn] {
				o.conn = i
			}
		}
		ck, err = c.srcs[o.conn].AioPread(o.req.buf, 0, int(o.n), o.off)
		if err == nil {
			c.srcOps[o.conn][ck] = o
			c.srcBusy[o.conn]++
		}
		return c.sendErr(o, err)
	case opWrite:
		ck, err = c.tgt.pwrite(o.req.buf, o.bufOff, int(o.n), o.off)
	case opZero:
		ck, err = c.tgt.zero(o.off, o.n)
	case opFlush:
		ck, err = c.tgt.flush()
	}
	if err == nil {
		c.dstOps[ck] = o
		if o.req != nil && o.attempts == 0 {
			o.req.pending++
		}
	}
	return c.sendErr(o, err)
}

func (c *copier) sendErr(o *op, err error) error {
	if err == nil {
		return nil
	}
	side := "target"
	if o.kind == opRead {
		side = "source"
	}
	return fmt.Errorf("copier: %s %s at offset %d: %w", side, opNames[o.kind], o.off, err)
}

// failed decides between a retry and giving up on a failed command.
func (c *copier) failed(o *op, e *nbd.Error, dead bool) error {
	e.Op = opNames[o.kind]
	e.Offset, e.Length = o.off, o.n
	if o.kind == opFlush {
		e.Offset, e.Length = -1, 0
	}
	o.attempts++
	if o.attempts > c.opts.Retries || dead {
		side := "target"
		if o.kind == opRead {
			side = "source"
		}
		return fmt.Errorf("copier: %s failed after %d attempts: %w", side, o.attempts, e)
	}
	c.prog.Retried++
	o.due = time.Now().Add(c.opts.RetryBackoff << (o.attempts - 1))
	c.retry = append(c.retry, o)
	return nil
}

func (c *copier) sendRetries(now time.Time) error {
	kept := c.retry[:0]
	var due []*op
	for _, o := range c.retry {
		if now.Before(o.due) {
			kept = append(kept, o)
		} else {
			due = append(due, o)
		}
	}
	c.retry = kept
	for _, o := range due {
		if err := c.send(o); err != nil {
			return err
		}
	}
	return nil
}

// srcDone handles a finished read: it checks the data for zero blocks and
// sends the writes (or zeroes) for it.
func (c *copier) srcDone(conn int, d nbd.Completion) error {
	o := c.srcOps[conn][d.Cookie]
	delete(c.srcOps[conn], d.Cookie)
	if o == nil {
		return fmt.Errorf("copier: unknown source cookie %d", d.Cookie)
	}
	c.srcBusy[conn]--
	if d.Err != nil {
		return c.failed(o, d.Err, c.srcs[conn].IsDead())
	}
	r := o.req
	c.prog.Read += r.n
	var err error
	data := r.buf.Bytes()[:r.n]
	c.runs = c.runs[:0]
	zeroRuns(data, r.off, c.opts.SparseSize, func(start, n int, zero bool) {
		if c.opts.Digests != nil {
			c.runs = append(c.runs, run{start: start, n: n, zero: zero})
		}
		if err != nil {
			return
		}
		off := r.off + int64(start)
		switch {
		case !zero:
			err = c.send(&op{kind: opWrite, req: r, off: off, n: int64(n), bufOff: start})
		case c.opts.Overlay:
			// The backing file must not show through.
			err = c.send(&op{kind: opZero, req: r, off: off, n: int64(n)})
		default:
			c.prog.Skipped += int64(n)
		}
	})
	if err != nil {
		return err
	}
	if c.opts.Digests != nil {
		// The writes are on their way: a hasher takes the digests while
		// the target works and the loop sends more. The request finishes
		// (its buffer reused, the resume point free to pass it) only
		// once they are back.
		r.pending++
		c.hashJobs <- hashJob{req: r, data: data, runs: append([]run(nil), c.runs...)}
	}
	if r.pending == 0 {
		c.finish(r)
	}
	return nil
}

// run is a zero or data run of a request's buffer, as zeroRuns found it.
type run struct {
	start, n int
	zero     bool
}

// digestRuns gives sink the records of data, read from the disk at off:
// one per piece between digest.BlockSize boundaries, a zero record when
// one zero run holds the whole piece, the piece's digest (made with alg)
// otherwise.
func digestRuns(sink *recordList, alg digest.Algorithm, data []byte, off int64, runs []run) {
	ri := 0
	for start := 0; start < len(data); {
		n := digest.BlockSize - int((off+int64(start))%digest.BlockSize)
		n = min(n, len(data)-start)
		for ri < len(runs) && runs[ri].start+runs[ri].n <= start {
			ri++
		}
		if ri < len(runs) && runs[ri].zero && runs[ri].start+runs[ri].n >= start+n {
			sink.Add(digest.Zero(off+int64(start), int64(n)))
		} else {
			sink.Add(digest.Data(alg, off+int64(start), data[start:start+n]))
		}
		start += n
	}
}

// hashJob is a read's data to take the digests of; hashResult its
// records.
type hashJob struct {
	req  *request
	data []byte
	runs []run
}

type hashResult struct {
	req     *request
	records recordList
}

// recordList collects records.
type recordList []digest.Record

func (l *recordList) Add(r digest.Record) { *l = append(*l, r) }

// startHashers starts a hasher per CPU (at most 4). The channels hold a
// job and a result for every request at once, so neither side blocks.
func (c *copier) startHashers() {
	c.hashJobs = make(chan hashJob, len(c.bufs))
	c.hashed = make(chan hashResult, len(c.bufs))
	alg := c.opts.Digests.Algorithm()
	for range min(runtime.NumCPU(), 4) {
		c.hashers.Add(1)
		go func() {
			defer c.hashers.Done()
			for j := range c.hashJobs {
				var recs recordList
				digestRuns(&recs, alg, j.data, j.req.off, j.runs)
				c.hashed <- hashResult{req: j.req, records: recs}
				c.waker.wake()
			}
		}()
	}
}

// stopHashers lets the hashers end the jobs they have and waits for them.
func (c *copier) stopHashers() {
	close(c.hashJobs)
	c.hashers.Wait()
}

// takeHashed adds the records the hashers are done with and finishes
// their requests whose commands are done too.
func (c *copier) takeHashed() {
	for {
		select {
		case h := <-c.hashed:
			for _, rec := range h.records {
				c.opts.Digests.Add(rec)
			}
			h.req.pending--
			if h.req.pending == 0 {
				c.finish(h.req)
			}
		default:
			return
		}
	}
}

// dstDone handles a finished write, zero or flush.
func (c *copier) dstDone(d nbd.Completion) error {
	o := c.dstOps[d.Cookie]
	delete(c.dstOps, d.Cookie)
	if o == nil {
		return fmt.Errorf("copier: unknown target cookie %d", d.Cookie)
	}
	if d.Err != nil {
		return c.failed(o, d.Err, c.tgt.dead())
	}
	switch o.kind {
	case opFlush:
		c.flushOp = nil
		c.flushes++
		if c.flushMark > c.prog.ResumePoint {
			// The digests of what the flush made durable are made durable
			// before the resume point that covers them is reported.
			if c.opts.Digests != nil {
				if err := c.opts.Digests.Commit(c.flushMark); err != nil {
					return fmt.Errorf("copier: digests: %w", err)
				}
			}
			c.prog.ResumePoint = c.flushMark
			c.progressDirty = true
			c.report()
		}
		if c.flushMark >= c.lastEnd && c.plan.i >= len(c.plan.exts) && c.busy == 0 {
			c.finalFlushed = true
		}
		return nil
	case opWrite:
		c.prog.Written += o.n
	case opZero:
		c.prog.Zeroed += o.n
	}
	c.sinceFlush += o.n
	r := o.req
	r.pending--
	if r.pending == 0 {
		c.finish(r)
	}
	return nil
}

// finish returns a request whose commands all completed.
func (c *copier) finish(r *request) {
	r.span.done = true
	c.prog.Done += r.n
	c.progressDirty = true
	c.busy--
	c.free = append(c.free, r)
}

// maybeFlush sends a flush when one is due and reports whether the copy is
// complete (the final flush succeeded).
func (c *copier) maybeFlush(now time.Time) (bool, error) {
	if c.finalFlushed {
		return true, nil
	}
	if c.flushOp != nil {
		return false, nil
	}
	for _, o := range c.retry {
		if o.kind == opFlush {
			return false, nil // a failed flush waits for its retry
		}
	}
	low := c.track.low(c.plan.position())
	end := c.busy == 0 && len(c.free) > 0 && c.plan.i >= len(c.plan.exts)
	if end && len(c.opts.Extents) == 0 {
		low = c.prog.ResumePoint
	}
	due := end ||
		(low > c.prog.ResumePoint && (now.Sub(c.lastFlush) >= c.opts.FlushInterval ||
			(c.opts.FlushBytes > 0 && c.sinceFlush >= c.opts.FlushBytes)))
	if !due {
		return false, nil
	}
	// The flush covers what completed before it is sent: low is computed
	// from completed requests only.
	c.flushMark = max(low, c.prog.ResumePoint)
	if end {
		c.flushMark = max(c.lastEnd, c.prog.ResumePoint)
	}
	c.lastFlush = now
	c.sinceFlush = 0
	c.flushOp = &op{kind: opFlush, off: -1}
	return false, c.send(c.flushOp)
}

func (c *copier) maybeReport(now time.Time) {
	if c.progressDirty && now.Sub(c.lastProgress) >= c.opts.ProgressInterval {
		c.report()
	}
}

func (c *copier) report() {
	c.lastProgress = time.Now()
	c.progressDirty = false
	if c.opts.Progress != nil {
		c.opts.Progress(c.prog)
	}
}

// waker is a pipe whose read end the copy's poll watches: it becomes
// readable when ctx is done, or when a hasher has a result.
type waker struct {
	r, w   int
	mu     sync.Mutex
	closed bool
	stop   func() bool
}

// newWaker returns a waker that wakes when ctx is done, so the poll wakes
// at once instead of polling the context.
func newWaker(ctx context.Context) (*waker, error) {
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_NONBLOCK|syscall.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("copier: pipe: %w", err)
	}
	k := &waker{r: p[0], w: p[1]}
	k.stop = context.AfterFunc(ctx, k.wake)
	return k, nil
}

// wake makes the read end readable (a full pipe already is).
func (k *waker) wake() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.closed {
		_, _ = syscall.Write(k.w, []byte{1})
	}
}

// drain empties the pipe, so the next poll sleeps until the next wake.
func (k *waker) drain() {
	var b [64]byte
	for {
		if n, err := syscall.Read(k.r, b[:]); n <= 0 || err != nil {
			return
		}
	}
}

func (k *waker) close() {
	k.stop()
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closed = true
	syscall.Close(k.r)
	syscall.Close(k.w)
}
