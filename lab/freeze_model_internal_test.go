package lab

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"testing"
)

// Random writes, punches, growths, freezes and releases of one disk
// against an in-memory model: every held image keeps the content and
// allocation of its freeze, the live disk is the model, the change areas
// of each freeze cover every block that differs from the previous freeze,
// and nothing is left in the snapshots folder at the end.
func TestFreezeModel(t *testing.T) {
	for seed := range int64(24) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			d, dir := newTestDisk(t)
			if seed%4 == 3 {
				shm, err := os.MkdirTemp("/dev/shm", "cbtflow-lab-test-")
				if err != nil {
					t.Fatalf("a folder on tmpfs for the copy fallback: %v", err)
				}
				t.Cleanup(func() { os.RemoveAll(shm) })
				dir = shm
			}
			// A small disk, its capacity no multiple of the block size.
			d.mu.Lock()
			d.capacity = 0
			d.dirty, d.touched = nil, nil
			if err := d.resize(int64(1+rng.Intn(20))*BlockSize + int64(rng.Intn(64))*1024); err != nil {
				t.Fatal(err)
			}
			d.takeDirty()
			d.series = newSeries()
			d.mu.Unlock()
			model := make([]byte, d.capacity)
			type held struct {
				img   *frozenImage
				want  []byte
				alloc []Extent
			}
			var hs []held
			prev := append([]byte(nil), model...)
			for step := range 120 {
				capacity := int64(len(model))
				switch op := rng.Intn(10); {
				case op < 4:
					off := rng.Int63n(capacity)
					p := randomData(rng, int(min(1+rng.Int63n(3*BlockSize), capacity-off)))
					if rng.Intn(4) == 0 {
						clear(p)
					}
					d.testWrite(t, off, p)
					copy(model[off:], p)
				case op < 5:
					off := rng.Int63n(capacity)
					n := min(1+rng.Int63n(3*BlockSize), capacity-off)
					d.testPunch(t, off, n)
					clear(model[off : off+n])
				case op < 6 && rng.Intn(3) == 0:
					grown := capacity + int64(1+rng.Intn(80))*1024
					d.mu.Lock()
					err := d.resize(grown)
					d.mu.Unlock()
					if err != nil {
						t.Fatal(err)
					}
					model = append(model, make([]byte, grown-capacity)...)
				case op < 8:
					img := d.testFreeze(t, dir)
					want := append([]byte(nil), model...)
					hs = append(hs, held{img, want, liveAllocated(t, d)})
					// The change areas of this freeze cover every block
					// that differs from the previous freeze's content.
					changed := d.series.changes[len(d.series.changes)-1]
					for b := range blocks(int64(len(want))) {
						s, e := b*BlockSize, min((b+1)*BlockSize, int64(len(want)))
						var old []byte
						if s < int64(len(prev)) {
							old = prev[s:min(e, int64(len(prev)))]
						}
						if bytes.Equal(old, want[s:e]) && int64(len(prev)) >= e {
							continue
						}
						covered := false
						for _, x := range changed {
							if x.Offset <= s && e <= x.End() {
								covered = true
							}
						}
						if !covered {
							t.Fatalf("step %d: block %d changed since the previous freeze but not in its areas %v", step, b, changed)
						}
					}
					prev = want
				default:
					if len(hs) == 0 {
						continue
					}
					i := rng.Intn(len(hs))
					d.testRelease(t, hs[i].img)
					hs = append(hs[:i], hs[i+1:]...)
				}
				if !bytes.Equal(d.content(t), model) {
					t.Fatalf("step %d: the live disk differs from the model", step)
				}
				for i, h := range hs {
					sameImage(t, fmt.Sprintf("step %d, held image %d", step, i), d, h.img, h.want, h.alloc)
				}
				if t.Failed() {
					t.FailNow()
				}
			}
			for _, h := range hs {
				d.testRelease(t, h.img)
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 0 {
				t.Errorf("snapshots folder after every release: %v", entries)
			}
		})
	}
}
