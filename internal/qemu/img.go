package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// QemuImg is the qemu-img program run by this package; tests may point it
// elsewhere.
var QemuImg = "qemu-img"

// ImageOptions is the layout of every image a backup creates: 2 MiB
// clusters, each of 32 subclusters of 64 KiB (extended L2 entries, QCOW2
// since qemu 5.2).
//
// Why: qemu allocates an L2 table for each region of the disk a write
// first touches, and writes it, with the L1 entry and the refcounts before
// it, synchronously and one at a time. With 64 KiB clusters an L2 table
// maps 512 MiB, so 1 GiB of data spread over a 2 TiB disk (as a file
// system spreads its metadata) made about a thousand of them: measured,
// 1024 writes of 64 KiB spread over 2 TiB took 2.6 s into a fresh image,
// 0.2 s over 10 GiB. With 2 MiB clusters and extended L2 entries a table
// maps 256 GiB: 0.3 s. The subclusters keep small writes small: a 64 KiB
// write of an incremental allocates its 64 KiB subcluster, without
// copying the rest of its 2 MiB cluster from the backing file (or writing
// zeros into it in a full image); the cluster's other subclusters stay
// holes in the file. So an image's file is sparse, its size up to 32
// times the bytes it holds for scattered 64 KiB writes, while the space
// it takes is what was written and its metadata (qemu writes an L2 table
// and a refcount block whole, 2 MiB each, whose zeros the transfer then
// frees: internal/integrity.Compact). The seal and a merge's copy skip
// the holes; a whole-file SHA-256 (a merged image's, a transfer's
// without a digest file) reads them as zeros. A merge by convert writes
// qemu-img's default layout (64 KiB clusters, no holes to speak of).
const ImageOptions = "cluster_size=2M,extended_l2=on"

// CreateArgs returns the qemu-img argv (without the program name) that
// creates a fresh QCOW2 image of size bytes at path.
func CreateArgs(path string, size int64) []string {
	return []string{"create", "-q", "-f", "qcow2", "-o", ImageOptions, path, strconv.FormatInt(size, 10)}
}

// OverlayArgs returns the qemu-img argv that creates a QCOW2 overlay at
// path on top of backing. The backing file is named relative to the
// overlay's directory, so a repository can be moved or mounted elsewhere;
// qemu-img resolves a relative backing name against the overlay's folder.
func OverlayArgs(path, backing string) ([]string, error) {
	rel, err := RelativeBacking(path, backing)
	if err != nil {
		return nil, err
	}
	return []string{"create", "-q", "-f", "qcow2", "-o", ImageOptions, "-b", rel, "-F", "qcow2", path}, nil
}

// RelativeBacking names backing relative to the folder of the overlay at
// path, as the overlays of a repository name their backing files.
func RelativeBacking(path, backing string) (string, error) {
	absPath, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	absBacking, err := filepath.Abs(backing)
	if err != nil {
		return "", err
	}
	rel, err := filepath.Rel(filepath.Dir(absPath), absBacking)
	if err != nil {
		return "", fmt.Errorf("qemu: backing file %s cannot be named relative to %s: %w", backing, path, err)
	}
	return rel, nil
}

// Create makes a fresh QCOW2 image of size bytes at path. It refuses to
// overwrite an existing file.
func Create(ctx context.Context, path string, size int64) error {
	if size <= 0 {
		return fmt.Errorf("qemu: create %s: size must be positive, got %d", path, size)
	}
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("qemu: create %s: file exists", path)
	}
	_, err := runImg(ctx, CreateArgs(path, size))
	return err
}

// CreateOverlay makes a QCOW2 overlay at path whose backing file is backing
// (a QCOW2), named relatively. It refuses to overwrite an existing file.
func CreateOverlay(ctx context.Context, path, backing string) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("qemu: create overlay %s: file exists", path)
	}
	if _, err := os.Stat(backing); err != nil {
		return fmt.Errorf("qemu: create overlay %s: backing file: %w", path, err)
	}
	args, err := OverlayArgs(path, backing)
	if err != nil {
		return err
	}
	_, err = runImg(ctx, args)
	return err
}

// ImageInfo is one image of a chain as qemu-img info describes it.
type ImageInfo struct {
	Filename              string `json:"filename"`
	Format                string `json:"format"`
	VirtualSize           int64  `json:"virtual-size"`
	ActualSize            int64  `json:"actual-size"`
	ClusterSize           int64  `json:"cluster-size"`
	DirtyFlag             bool   `json:"dirty-flag"`
	BackingFilename       string `json:"backing-filename"`
	FullBackingFilename   string `json:"full-backing-filename"`
	BackingFilenameFormat string `json:"backing-filename-format"`
}

// InfoArgs returns the qemu-img argv that describes path and its whole
// backing chain as JSON. -U lets it read an image a server holds open.
func InfoArgs(path string) []string {
	return []string{"info", "--output=json", "--backing-chain", "-U", path}
}

// Info describes the image at path and its backing chain, top first.
func Info(ctx context.Context, path string) ([]ImageInfo, error) {
	out, err := runImg(ctx, InfoArgs(path))
	if err != nil {
		return nil, err
	}
	return ParseInfo(out)
}

// ParseInfo parses the JSON of `qemu-img info --output=json
// --backing-chain`, which is an array, top image first.
func ParseInfo(out []byte) ([]ImageInfo, error) {
	var chain []ImageInfo
	if err := json.Unmarshal(out, &chain); err != nil {
		return nil, fmt.Errorf("qemu: parse qemu-img info: %w", err)
	}
	if len(chain) == 0 {
		return nil, errors.New("qemu: qemu-img info returned no image")
	}
	return chain, nil
}

// CheckResult is the outcome of qemu-img check on one image.
type CheckResult struct {
	Filename       string `json:"filename"`
	Format         string `json:"format"`
	CheckErrors    int64  `json:"check-errors"`
	Corruptions    int64  `json:"corruptions"`
	Leaks          int64  `json:"leaks"`
	ImageEndOffset int64  `json:"image-end-offset"`
	TotalClusters  int64  `json:"total-clusters"`
}

// Clean reports whether the check found neither corruptions nor errors.
// Leaked clusters waste space but lose no data, so they do not count.
func (r *CheckResult) Clean() bool { return r.CheckErrors == 0 && r.Corruptions == 0 }

// CheckArgs returns the qemu-img argv that checks a QCOW2 image's metadata.
func CheckArgs(path string) []string {
	return []string{"check", "--output=json", "-f", "qcow2", path}
}

// Check runs qemu-img check on one QCOW2 image. A damaged image is not an
// error: the result says so (Clean); an error means the check could not run.
//
// qemu-img check opens the image's backing chain, and spins for ever on a
// chain that comes back to an image of it (qemu 7.2; damage, or a hostile
// file in the repository): the chain is read first with qemu-img info,
// which refuses such a chain, naming the file that loops (as it refuses
// a backing file that is missing, where the check would fail the same way).
func Check(ctx context.Context, path string) (*CheckResult, error) {
	if _, err := Info(ctx, path); err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, QemuImg, CheckArgs(path)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	// Exit codes 2 (corruptions) and 3 (leaks) still print a full report.
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && (exit.ExitCode() == 2 || exit.ExitCode() == 3)) {
		return nil, cmdError("qemu-img check", path, err, stderr.Bytes())
	}
	var r CheckResult
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		return nil, fmt.Errorf("qemu: parse qemu-img check of %s: %w", path, err)
	}
	return &r, nil
}

func virtualSize(ctx context.Context, path string) (int64, error) {
	out, err := runImg(ctx, []string{"info", "--output=json", "-U", path})
	if err != nil {
		return 0, err
	}
	var info ImageInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return 0, fmt.Errorf("qemu: parse qemu-img info of %s: %w", path, err)
	}
	return info.VirtualSize, nil
}

// CompareArgs returns the qemu-img argv that compares the content of image
// a (format af) with image b (format bf). It is not strict (-s): strict
// mode also compares allocation, and a sparse copy allocates differently.
func CompareArgs(a, af, b, bf string) []string {
	return []string{"compare", "-U", "-f", af, "-F", bf, a, b}
}

// Compare compares the guest-visible content of two images (a QCOW2 is read
// through its whole chain). It returns "" when they are identical, and a
// description of the first difference otherwise. Images of different
// virtual sizes differ.
func Compare(ctx context.Context, a, af, b, bf string) (string, error) {
	sa, err := virtualSize(ctx, a)
	if err != nil {
		return "", err
	}
	sb, err := virtualSize(ctx, b)
	if err != nil {
		return "", err
	}
	if sa != sb {
		return fmt.Sprintf("size mismatch: %s is %d bytes, %s is %d bytes", a, sa, b, sb), nil
	}
	cmd := exec.CommandContext(ctx, QemuImg, CompareArgs(a, af, b, bf)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	if err == nil {
		return "", nil
	}
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 1 {
		diff := strings.TrimSpace(stdout.String() + " " + stderr.String())
		if diff == "" {
			diff = "images differ"
		}
		return diff, nil
	}
	return "", cmdError("qemu-img compare", a+" "+b, err, stderr.Bytes())
}

// ConvertOptions describes one qemu-img convert.
type ConvertOptions struct {
	Source       string // a file or an NBD URI
	SourceFormat string // "raw", "qcow2"
	Target       string
	TargetFormat string // "raw", "qcow2"
	// OutOfOrder allows out-of-order writes (-W), faster for a fresh target.
	OutOfOrder bool
	// Coroutines is the number of parallel coroutines (-m); 0 keeps qemu's default.
	Coroutines int
	// NoCreate writes into an existing target (-n).
	NoCreate bool
}

// ConvertArgs returns the qemu-img argv for o. The target is sparse (qemu
// skips zero runs by default).
func ConvertArgs(o ConvertOptions) []string {
	args := []string{"convert", "-f", o.SourceFormat, "-O", o.TargetFormat}
	if o.OutOfOrder {
		args = append(args, "-W")
	}
	if o.Coroutines > 0 {
		args = append(args, "-m", strconv.Itoa(o.Coroutines))
	}
	if o.NoCreate {
		args = append(args, "-n")
	}
	return append(args, o.Source, o.Target)
}

// Convert runs qemu-img convert.
func Convert(ctx context.Context, o ConvertOptions) error {
	if o.SourceFormat == "" || o.TargetFormat == "" {
		return errors.New("qemu: convert needs both formats")
	}
	_, err := runImg(ctx, ConvertArgs(o))
	return err
}

func runImg(ctx context.Context, args []string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, QemuImg, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, cmdError("qemu-img "+args[0], strings.Join(args[1:], " "), err, stderr.Bytes())
	}
	return stdout.Bytes(), nil
}

func cmdError(what, subject string, err error, stderr []byte) error {
	msg := strings.TrimSpace(string(stderr))
	if msg == "" {
		return fmt.Errorf("qemu: %s %s: %w", what, subject, err)
	}
	return fmt.Errorf("qemu: %s %s: %w: %s", what, subject, err, msg)
}
