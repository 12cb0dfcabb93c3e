package copier

// PoisonKeptBuffers fills every buffer the pool keeps with b, as stale
// data of another copy would, and returns how many it filled.
func PoisonKeptBuffers(b byte) int {
	buffers.mu.Lock()
	defer buffers.mu.Unlock()
	n := 0
	for _, l := range buffers.free {
		for _, buf := range l {
			bs := buf.Bytes()
			for i := range bs {
				bs[i] = b
			}
			n++
		}
	}
	return n
}
