package vsphere

import (
	"errors"
	"fmt"
	"reflect"

	"github.com/vmware/govmomi/vim25/types"
)

// Errors returned by this package, wrapped with context naming what was
// wrong; test with errors.Is.
var (
	// ErrProfileNotFound: no vCenter profile of that name is configured.
	ErrProfileNotFound = errors.New("vCenter profile not found")
	// ErrNoDefaultProfile: a call named no profile, none is configured as
	// the default, and there is more than one to choose from.
	ErrNoDefaultProfile = errors.New("no default vCenter profile")
	// ErrVMNotFound: no VM matches the name, path, moref or UUID.
	ErrVMNotFound = errors.New("VM not found")
	// ErrAmbiguousVM: a VM name matches more than one VM; use the
	// inventory path or the moref.
	ErrAmbiguousVM = errors.New("VM name is ambiguous")
	// ErrLogin: vCenter refused the profile's user name or password
	// (InvalidLogin), or the password file cannot be read. Permanent until
	// the operator fixes the profile.
	ErrLogin = errors.New("vCenter login failed")
	// ErrUnreachable: vCenter cannot be reached (DNS, TCP, TLS handshake,
	// HTTP errors). Usually transient.
	ErrUnreachable = errors.New("vCenter unreachable")
	// ErrCertificate: the server's certificate does not match the profile's
	// thumbprint, or is not trusted. Permanent until the operator fixes the
	// profile (or someone stops intercepting the connection).
	ErrCertificate = errors.New("vCenter certificate rejected")
	// ErrSnapshotNotFound: the snapshot does not exist (any more). A
	// *CBTError with Fault "NotFound" matches it too.
	ErrSnapshotNotFound = errors.New("snapshot not found")
)

// CBTError is a vSphere fault returned by QueryChangedDiskAreas.
//
// FirstQuery is true when the fault answered the first call of the paging
// loop (start offset 0). An "InvalidArgument" or "FileFault" there, for a
// stored change ID, means the disk's change tracking was reset: the caller
// falls back to a full backup of the disk. A fault later in the paging
// fails the disk.
type CBTError struct {
	Fault      string // vSphere fault type: "InvalidArgument", "FileFault", "NotFound", ...
	FirstQuery bool
	Msg        string // the fault's message
}

// Error names the fault, whether it answered the first query, and its message.
func (e *CBTError) Error() string {
	when := "first query"
	if !e.FirstQuery {
		when = "while paging"
	}
	if e.Msg == "" {
		return fmt.Sprintf("vsphere: QueryChangedDiskAreas: %s fault (%s)", e.Fault, when)
	}
	return fmt.Sprintf("vsphere: QueryChangedDiskAreas: %s fault (%s): %s", e.Fault, when, e.Msg)
}

// Is makes a NotFound fault (the snapshot is gone) match ErrSnapshotNotFound.
func (e *CBTError) Is(target error) bool {
	return target == ErrSnapshotNotFound && e.Fault == "NotFound"
}

// vimFault returns the vSphere fault in err (a SOAP fault or a failed
// task), or nil.
func vimFault(err error) types.BaseMethodFault {
	var hf interface{ Fault() types.BaseMethodFault }
	if err == nil || !errors.As(err, &hf) {
		return nil
	}
	return hf.Fault()
}

// faultName is the vSphere type name of a fault, e.g. "InvalidArgument".
func faultName(f types.BaseMethodFault) string {
	t := reflect.TypeOf(f)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t.Name()
}

// isFault reports whether err carries a vSphere fault of the same type as
// target.
func isFault(err error, target types.BaseMethodFault) bool {
	f := vimFault(err)
	return f != nil && faultName(f) == faultName(target)
}
