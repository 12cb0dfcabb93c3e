// Package integrity proves that the QCOW2 images of a disk's chain are the
// images that were committed, before a backup builds an overlay on them.
//
// The proof is cheap when nothing changed: each image's size, inode, mtime
// and ctime are recorded when its proof is known (at commit, or after a
// full re-read); while they are the same, the file was not written, so it
// is not re-read. Any difference (a copied or remounted repository, a
// touched file) costs one full read of that image against its proof (its
// seal or its SHA-256, see seal.go), after which the new stamp can be
// recorded. The backing link in every image's QCOW2 header is read each
// time (one small read) and must name the next image of the chain as the
// catalog recorded it; a sealed image's digest file must be there (a
// stat), since its seal cannot be proven without it.
//
// The package reads files (and the images' mappings, through qemu-img);
// it knows nothing of the catalog's storage or of Temporal. Restores
// verify the full proof of every image regardless (internal/restore).
package integrity

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/cbtflow/cbtflow/internal/digest"
)

// Stamp identifies a file's content cheaply (see the package comment).
// The zero Stamp is unknown and never matches.
type Stamp struct {
	Inode   int64
	MtimeNs int64
	CtimeNs int64
}

func (s Stamp) known() bool { return s != Stamp{} }

// StampOf returns the size and stamp of the file at path.
func StampOf(path string) (int64, Stamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, Stamp{}, err
	}
	return fi.Size(), stampOf(fi), nil
}

// StampOfInfo is the stamp of a file already stat'ed.
func StampOfInfo(fi os.FileInfo) Stamp { return stampOf(fi) }

func stampOf(fi os.FileInfo) Stamp {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return Stamp{}
	}
	return Stamp{Inode: int64(st.Ino), MtimeNs: st.Mtim.Nano(), CtimeNs: st.Ctim.Nano()}
}

// Image is one image of a chain as the catalog recorded it.
type Image struct {
	Path string // absolute
	Size int64
	// SHA256 is the proof recorded at commit: the file's hex SHA-256, or
	// its seal (IsSeal).
	SHA256 string
	Stamp  Stamp
	// Backing is the absolute path of the image this one builds on, ""
	// for a full image.
	Backing string
}

// Damage says why an image is not the one recorded; no retry changes it.
type Damage struct {
	Path   string
	Reason string
}

func (d *Damage) Error() string { return fmt.Sprintf("image %s: %s", d.Path, d.Reason) }

// ErrFolderMissing is wrapped when the folder that should hold an image
// does not exist: more likely an unmounted or misconfigured repository
// than a damaged chain, so it is not reported as Damage.
var ErrFolderMissing = errors.New("integrity: the image's folder does not exist")

// Outcome is what Check found for one sound image.
type Outcome struct {
	// Hashed is true when the stamp differed and the image was re-read
	// in full; Stamp is then the one to record.
	Hashed bool
	Stamp  Stamp
}

// Check proves one image unchanged since it was recorded. A *Damage error
// names what differs; other errors (I/O, a canceled ctx) say nothing
// about the image. beat, when set, is called every few seconds while the
// image is re-read.
func Check(ctx context.Context, im Image, beat func()) (Outcome, error) {
	fi, err := os.Stat(im.Path)
	if errors.Is(err, os.ErrNotExist) {
		if _, derr := os.Stat(filepath.Dir(im.Path)); errors.Is(derr, os.ErrNotExist) {
			return Outcome{}, fmt.Errorf("%w: %s", ErrFolderMissing, filepath.Dir(im.Path))
		}
		return Outcome{}, &Damage{im.Path, "missing"}
	}
	if err != nil {
		return Outcome{}, err
	}
	if !fi.Mode().IsRegular() {
		return Outcome{}, &Damage{im.Path, fmt.Sprintf("is a %s, not a regular file", fi.Mode().Type())}
	}
	if fi.Size() != im.Size {
		return Outcome{}, &Damage{im.Path, fmt.Sprintf("is %d bytes, %d were recorded at commit", fi.Size(), im.Size)}
	}
	if err := checkBacking(im); err != nil {
		return Outcome{}, err
	}
	if IsSeal(im.SHA256) {
		// The seal is proven with the digest file beside the image: one
		// that is gone makes every point built on the image unrestorable,
		// stamp or no stamp.
		dpath := digest.PathOf(im.Path)
		if _, err := os.Stat(dpath); errors.Is(err, os.ErrNotExist) {
			return Outcome{}, &Damage{im.Path, fmt.Sprintf("its digest file %s, which its seal covers, is missing", dpath)}
		} else if err != nil {
			return Outcome{}, err
		}
	}
	st := stampOf(fi)
	if st.known() && st == im.Stamp {
		return Outcome{Stamp: st}, nil
	}
	var hashBeat func(int64)
	if beat != nil {
		hashBeat = func(int64) { beat() }
	}
	if err := Verify(ctx, im.Path, im.SHA256, hashBeat); err != nil {
		return Outcome{}, err
	}
	// Stat again: the stamp to record is the one the hash proved.
	fi2, err := os.Stat(im.Path)
	if err != nil {
		return Outcome{}, err
	}
	if st2 := stampOf(fi2); st2 != st {
		return Outcome{}, fmt.Errorf("integrity: %s changed while it was being hashed", im.Path)
	}
	return Outcome{Hashed: true, Stamp: st}, nil
}

// checkBacking compares the backing file named in the QCOW2 header with
// the one recorded.
func checkBacking(im Image) error {
	name, err := BackingFile(im.Path)
	if err != nil {
		var d *Damage
		if errors.As(err, &d) {
			return err
		}
		return fmt.Errorf("integrity: %w", err)
	}
	switch {
	case name == "" && im.Backing == "":
		return nil
	case name == "":
		return &Damage{im.Path, fmt.Sprintf("has no backing file, the catalog recorded %s", im.Backing)}
	case im.Backing == "":
		return &Damage{im.Path, fmt.Sprintf("has backing file %q, the catalog recorded a full image", name)}
	}
	got := name
	if !filepath.IsAbs(got) {
		got = filepath.Join(filepath.Dir(im.Path), got)
	}
	if filepath.Clean(got) != filepath.Clean(im.Backing) {
		return &Damage{im.Path, fmt.Sprintf("has backing file %q, the catalog recorded %s", name, im.Backing)}
	}
	return nil
}

// BackingFile reads the backing file name from a QCOW2 header ("" when
// there is none). A file that is not QCOW2 (v2 or v3) is Damage.
func BackingFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return backingOf(f, path)
}

// backingOf is BackingFile of the file f, open at path.
func backingOf(f *os.File, path string) (string, error) {
	var h [20]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		if errors.Is(err, io.EOF) {
			return "", &Damage{path, "is too short for a QCOW2 header"}
		}
		return "", err
	}
	if string(h[:4]) != "QFI\xfb" {
		return "", &Damage{path, "is not a QCOW2 image (bad magic)"}
	}
	if v := binary.BigEndian.Uint32(h[4:8]); v != 2 && v != 3 {
		return "", &Damage{path, fmt.Sprintf("has QCOW2 version %d", v)}
	}
	off := binary.BigEndian.Uint64(h[8:16])
	n := binary.BigEndian.Uint32(h[16:20])
	if off == 0 || n == 0 {
		return "", nil
	}
	if n > 1023 { // QCOW2's limit
		return "", &Damage{path, fmt.Sprintf("has a backing file name of %d bytes", n)}
	}
	name := make([]byte, n)
	if _, err := f.ReadAt(name, int64(off)); err != nil {
		if errors.Is(err, io.EOF) {
			return "", &Damage{path, "its backing file name lies past the end of the file"}
		}
		return "", err // an I/O error says nothing about the image
	}
	return string(name), nil
}

// Hash returns the size and hex SHA-256 of a file, stopping when ctx
// ends; beat, when set, is called about every second with the bytes read
// so far (an activity's heartbeat, and its progress).
func Hash(ctx context.Context, path string, beat func(done int64)) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	var n int64
	last := time.Now()
	for {
		if err := ctx.Err(); err != nil {
			return 0, "", err
		}
		k, err := f.Read(buf)
		h.Write(buf[:k])
		n += int64(k)
		if err == io.EOF {
			break
		}
		if err != nil {
			return 0, "", err
		}
		if beat != nil && time.Since(last) >= time.Second {
			beat(n)
			last = time.Now()
		}
	}
	return n, hex.EncodeToString(h.Sum(nil)), nil
}

// CheckChain checks a chain (given top first) from its full image up and
// stops at the lowest damaged image: the *Damage error names it, and index
// is its position; every image above it builds on it. sound, when set, is
// called for each image proven sound before the next is checked, so that
// a stamp proven by a long re-read is recorded at once (and a retry does
// not read it again); its error ends the check. A non-Damage error leaves
// index -1.
func CheckChain(ctx context.Context, chain []Image, beat func(), sound func(i int, out Outcome) error) (index int, err error) {
	for i := len(chain) - 1; i >= 0; i-- {
		out, err := Check(ctx, chain[i], beat)
		if err != nil {
			var d *Damage
			if errors.As(err, &d) {
				return i, err
			}
			return -1, err
		}
		if sound != nil {
			if err := sound(i, out); err != nil {
				return -1, err
			}
		}
	}
	return -1, nil
}
