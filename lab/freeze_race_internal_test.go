package lab

import (
	"bytes"
	"io"
	"math/rand"
	"os"
	"sync"
	"testing"
)

// Writes, punches, reads and extents race freezes and releases: every
// image equals the live disk as read under the same lock as its freeze.
func TestFreezeRace(t *testing.T) {
	d, dir := newTestDisk(t)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(g)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				off := rng.Int63n(testCapacity - 2*BlockSize)
				if rng.Intn(3) == 0 {
					if err := d.punch(off, BlockSize); err != nil {
						t.Error(err)
						return
					}
				} else if _, err := d.writeAt(randomData(rng, BlockSize), off); err != nil {
					t.Error(err)
					return
				}
				if _, err := d.readRange(off, BlockSize, io.Discard); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	type held struct {
		img  *frozenImage
		want []byte
	}
	var hs []held
	rng := rand.New(rand.NewSource(9))
	for range 40 {
		d.mu.Lock()
		img, err := d.freeze(dir)
		var want []byte
		if err == nil {
			want = make([]byte, d.capacity)
			_, err = d.f.ReadAt(want, 0)
		}
		d.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		hs = append(hs, held{img, want})
		if len(hs) > 3 {
			i := rng.Intn(len(hs))
			d.testRelease(t, hs[i].img)
			hs = append(hs[:i], hs[i+1:]...)
		}
		for _, h := range hs {
			got, err := os.ReadFile(h.img.path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, h.want) {
				t.Fatalf("image %s changed after its freeze", h.img.path)
			}
		}
	}
	close(stop)
	wg.Wait()
	for _, h := range hs {
		d.testRelease(t, h.img)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("snapshots folder after every release: %v", entries)
	}
}
