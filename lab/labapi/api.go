package labapi

import (
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"
)

// Prefix is where the lab endpoints live on the lab's HTTPS server, next
// to the vSphere API at /sdk.
const Prefix = "/cbtflow-lab/v1"

// Errors of the lab's Go API and its endpoints; test with errors.Is. The
// lab answers each with its code (ErrorBody.Code), and Client turns the
// code back into the same sentinel.
var (
	ErrUnknownVM       = errors.New("unknown VM")
	ErrUnknownDisk     = errors.New("unknown disk")
	ErrUnknownSnapshot = errors.New("unknown snapshot")
	ErrOutOfRange      = errors.New("outside the disk")
	ErrImage           = errors.New("snapshot image unavailable")
	ErrHasSnapshots    = errors.New("VM has snapshots")
	ErrBadCapacity     = errors.New("bad disk capacity")
	ErrBadName         = errors.New("bad VM name")
	ErrVMExists        = errors.New("VM name taken")
	ErrPoweredOn       = errors.New("VM is not powered off")
)

// Error codes of ErrorBody that no sentinel has: a request the lab cannot
// read, and the lab's own failure.
const (
	CodeBadRequest = "bad_request"
	CodeInternal   = "internal"
)

// errorCodes maps each sentinel to its code and HTTP status, for both
// sides of the wire.
var errorCodes = []struct {
	err    error
	code   string
	status int
}{
	{ErrUnknownVM, "unknown_vm", http.StatusNotFound},
	{ErrUnknownDisk, "unknown_disk", http.StatusNotFound},
	{ErrUnknownSnapshot, "unknown_snapshot", http.StatusNotFound},
	{ErrOutOfRange, "out_of_range", http.StatusBadRequest},
	{ErrImage, "image_unavailable", http.StatusConflict},
	{ErrHasSnapshots, "has_snapshots", http.StatusConflict},
	{ErrBadCapacity, "bad_capacity", http.StatusBadRequest},
	{ErrBadName, "bad_name", http.StatusBadRequest},
	{ErrVMExists, "vm_exists", http.StatusConflict},
	{ErrPoweredOn, "powered_on", http.StatusConflict},
}

// Classify returns the code and HTTP status the lab answers err with:
// those of the first sentinel err wraps, else CodeInternal and 500.
func Classify(err error) (code string, status int) {
	for _, c := range errorCodes {
		if errors.Is(err, c.err) {
			return c.code, c.status
		}
	}
	return CodeInternal, http.StatusInternalServerError
}

// sentinel returns the error of a code, nil for a code without one.
func sentinel(code string) error {
	for _, c := range errorCodes {
		if c.code == code {
			return c.err
		}
	}
	return nil
}

// ErrorBody is the answer of a failed request.
type ErrorBody struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// Extent is a byte range of a disk.
type Extent struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// End returns the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// DiskInfo describes a tracked disk of a VM.
type DiskInfo struct {
	VM       string `json:"vm"`
	VMRef    string `json:"vmRef"`
	Key      int32  `json:"key"`
	Capacity int64  `json:"capacity"`
	FileName string `json:"fileName"` // backing file in the live config
	ChangeID string `json:"changeId"` // in the live config; empty until a snapshot with CBT on
}

// ImageInfo locates the frozen image of a snapshot's disk.
type ImageInfo struct {
	Path     string `json:"path"`
	Capacity int64  `json:"capacity"`
	ChangeID string `json:"changeId"` // empty when CBT was off
	VM       string `json:"vm"`
	Snapshot string `json:"snapshot"`
	Key      int32  `json:"key"`
	// Filters are the nbdkit filters a reader puts in front of the image,
	// in order: the lab's fault settings (e.g. EIO on some reads), set by
	// whoever started the lab. They live here, not in cbtflow's vCenter
	// profiles, because only the lab's tests inject faults into a source.
	Filters []Filter `json:"filters,omitempty"`
}

// VMInfo describes a VM.
type VMInfo struct {
	Name  string     `json:"name"` // as stored: "/" escaped as "%2f" (see lab.EscapeName)
	Ref   string     `json:"ref"`
	Disks []DiskInfo `json:"disks"`
}

// Stamp is one change ID the lab gave a disk when a snapshot was taken.
type Stamp struct {
	Time         time.Time `json:"time"`
	VM           string    `json:"vm"`    // VM name
	VMRef        string    `json:"vmRef"` // VM moref value, e.g. vm-62
	Snapshot     string    `json:"snapshot"`
	SnapshotName string    `json:"snapshotName"`
	DiskKey      int32     `json:"diskKey"`
	ChangeID     string    `json:"changeId"`
}

// WrittenBody is the answer of a disk write.
type WrittenBody struct {
	Written int64 `json:"written"`
}

// CBTBody switches change tracking of a VM.
type CBTBody struct {
	Enabled bool `json:"enabled"`
}

// PowerBody switches a VM on or off.
type PowerBody struct {
	On bool `json:"on"`
}

// CreateVMBody asks for a new VM.
type CreateVMBody struct {
	Name  string  `json:"name"`
	Disks []int64 `json:"disks"` // capacities in bytes, one disk each
}

// CapacityBody carries a disk capacity in bytes (AddDisk, GrowDisk).
type CapacityBody struct {
	Capacity int64 `json:"capacity"`
}

// Filter is one nbdkit filter in front of a frozen image: a filter of
// FaultFilters and its KEY=VALUE parameters, whose keys belong to that
// filter (its name, or its name and a dash), e.g. {"filter": "error",
// "params": ["error=EIO", "error-pread-rate=5%"]}.
type Filter struct {
	Filter string   `json:"filter"`
	Params []string `json:"params,omitempty"`
}

// FaultFilters are the nbdkit filters a lab may put in front of its
// images: they inject faults or latency and touch nothing else, so a
// reader that applies what the lab says never reads other data or runs
// other code.
var FaultFilters = []string{"error", "delay"}

var filterParamRE = regexp.MustCompile(`^[a-z][a-z0-9-]*=[^\s\x00]+$`)

// CheckFilters refuses a filter outside FaultFilters and a parameter that
// is not KEY=VALUE with a key of its filter; the error names each.
func CheckFilters(fs []Filter) error {
	var errs []error
	for i, f := range fs {
		if !slices.Contains(FaultFilters, f.Filter) {
			errs = append(errs, fmt.Errorf("lab filter %d: %q is not one of %v", i, f.Filter, FaultFilters))
			continue
		}
		for _, kv := range f.Params {
			key, _, _ := strings.Cut(kv, "=")
			if !filterParamRE.MatchString(kv) || (key != f.Filter && !strings.HasPrefix(key, f.Filter+"-")) {
				errs = append(errs, fmt.Errorf("lab filter %d (%s): parameter %q is not KEY=VALUE with a key of that filter", i, f.Filter, kv))
			}
		}
	}
	return errors.Join(errs...)
}
