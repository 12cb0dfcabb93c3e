package activities

import (
	"errors"
	"strings"
	"syscall"

	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/source"
	"github.com/cbtflow/cbtflow/internal/vsphere"
)

// permanent turns errors that no retry can fix into non-retryable
// ApplicationErrors with a type constant; other errors pass unchanged and
// are retried within the activity's time limit — except an unreachable
// vCenter, which stays retryable but gets its type (ErrTypeUnreachable),
// so the failure that ends the retries says what it was.
func permanent(err error) error {
	if err == nil {
		return nil
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		return err
	}
	if t := permanentType(err); t != "" {
		msg := err.Error()
		if t == ErrTypeCatalogUnusable {
			msg = "the catalog database cannot serve cbtflow (dropped, or without cbtflow's tables; a worker restarted against a new database creates them): " + msg
		}
		return temporal.NewNonRetryableApplicationError(msg, t, err)
	}
	if errors.Is(err, vsphere.ErrUnreachable) {
		return temporal.NewApplicationErrorWithCause(err.Error(), ErrTypeUnreachable, err)
	}
	return err
}

func permanentType(err error) string {
	switch {
	case errors.Is(err, vsphere.ErrProfileNotFound), errors.Is(err, vsphere.ErrNoDefaultProfile):
		return ErrTypeProfileNotFound
	case errors.Is(err, vsphere.ErrVMNotFound):
		return ErrTypeVMNotFound
	case errors.Is(err, vsphere.ErrLogin):
		return ErrTypeLogin
	case errors.Is(err, vsphere.ErrCertificate):
		return ErrTypeCertificate
	case errors.Is(err, vsphere.ErrAmbiguousVM):
		return ErrTypeAmbiguousVM
	case errors.Is(err, source.ErrBadRequest):
		return ErrTypeInvalidInput
	case errors.Is(err, vsphere.ErrSnapshotNotFound):
		return ErrTypeSnapshotGone
	case errors.Is(err, catalog.ErrCommitted):
		return ErrTypeCommitted
	case errors.Is(err, catalog.ErrFailed):
		return ErrTypeBackupFailed
	case catalog.Unusable(err):
		return ErrTypeCatalogUnusable
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return ErrTypeNoSpace
	case errors.Is(err, syscall.EROFS):
		return ErrTypeReadOnly
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return ErrTypePermission
	}
	// External programs (qemu-img) report these only as text.
	msg := err.Error()
	switch {
	case strings.Contains(msg, "No space left on device"), strings.Contains(msg, "Disk quota exceeded"):
		return ErrTypeNoSpace
	case strings.Contains(msg, "Read-only file system"):
		return ErrTypeReadOnly
	case strings.Contains(msg, "Permission denied"):
		return ErrTypePermission
	}
	return ""
}
