package vsphere

import (
	"context"
	"fmt"

	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// QueryChangedAreas pages through QueryChangedDiskAreas for disk key of a
// snapshot and calls fn with every changed area, in ascending order and
// without overlaps, clipped to capacity. changeID "*" asks for the
// allocated areas (a full backup); a stored change ID asks for the areas
// changed since it.
//
// It starts at offset 0 and continues from the end of the range each
// answer describes (startOffset+length; from the end of its last area
// when that lies further) until capacity is covered: one call for a disk
// whose answer covers it whole. An answer that does not move forward is an error,
// not an endless loop. A vSphere fault is returned as *CBTError, with
// FirstQuery set when it answered the first call; an error from fn is
// returned as is.
func (c *Client) QueryChangedAreas(ctx context.Context, vmRef, snapRef string, key int32, capacity int64, changeID string, fn func(offset, length int64) error) error {
	if changeID == "" {
		return fmt.Errorf("vsphere: changed areas of disk %d of %s: empty change ID (use \"*\" for all allocated areas)", key, snapRef)
	}
	if capacity <= 0 {
		return fmt.Errorf("vsphere: changed areas of disk %d of %s: capacity %d", key, snapRef, capacity)
	}
	snap := snapshotRef(snapRef)
	req := types.QueryChangedDiskAreas{
		This:      types.ManagedObjectReference{Type: "VirtualMachine", Value: vmRef},
		Snapshot:  &snap,
		DeviceKey: key,
		ChangeId:  changeID,
	}
	calls := 0
	query := func(start int64) (types.DiskChangeInfo, error) {
		req.StartOffset = start
		res, err := methods.QueryChangedDiskAreas(ctx, c.vim, &req)
		calls++
		if err != nil {
			if f := vimFault(err); f != nil {
				msg := ""
				if soap.IsSoapFault(err) {
					msg = soap.ToSoapFault(err).String
				}
				if msg == "" {
					msg = fmt.Sprintf("disk %d of snapshot %s of %s, change ID %q, offset %d", key, snapRef, vmRef, changeID, start)
				}
				return types.DiskChangeInfo{}, &CBTError{Fault: faultName(f), FirstQuery: calls == 1, Msg: msg}
			}
			return types.DiskChangeInfo{}, fmt.Errorf("vsphere: QueryChangedDiskAreas(disk %d of snapshot %s of %s, offset %d): %w", key, snapRef, vmRef, start, err)
		}
		return res.Returnval, nil
	}
	what := fmt.Sprintf("disk %d of snapshot %s", key, snapRef)
	return pageChangedAreas(what, capacity, query, fn)
}

// pageChangedAreas is the paging loop of QueryChangedAreas over any query
// function; what names the disk in errors.
func pageChangedAreas(what string, capacity int64, query func(start int64) (types.DiskChangeInfo, error), fn func(offset, length int64) error) error {
	var (
		start int64 // next offset to ask from
		done  int64 // end of the last area passed to fn
	)
	for start < capacity {
		info, err := query(start)
		if err != nil {
			return err
		}
		// The answer lists every changed area of the range it describes,
		// [StartOffset, StartOffset+Length) (vSphere's DiskChangeInfo):
		// the next query starts past that range, which for an answer
		// that covers the rest of the disk ends the paging without a
		// query that could only come back empty. A range that begins past
		// the offset asked leaves the bytes before it undescribed: an
		// error, never a gap in the backup. An area that begins past the
		// range is left to the next query, which describes what lies
		// before it. An answer without a length (none of vSphere's) is
		// taken to describe up to the end of its last area.
		if info.StartOffset > start {
			return fmt.Errorf("vsphere: QueryChangedDiskAreas(%s, offset %d): the answer describes the disk from offset %d on, past the offset asked",
				what, start, info.StartOffset)
		}
		described := info.Length > 0
		rangeEnd := info.StartOffset + info.Length
		next := start
		if described {
			next = max(next, rangeEnd)
		}
		for _, a := range info.ChangedArea {
			if a.Length < 0 || a.Start < 0 {
				return fmt.Errorf("vsphere: QueryChangedDiskAreas(%s, offset %d): bad area [%d, +%d)", what, start, a.Start, a.Length)
			}
			if described && a.Start >= rangeEnd {
				continue
			}
			s, e := max(a.Start, done), min(a.Start+a.Length, capacity)
			if e > s {
				if err := fn(s, e-s); err != nil {
					return err
				}
				done = e
			}
			next = max(next, a.Start+a.Length)
		}
		if next <= start {
			return fmt.Errorf("vsphere: QueryChangedDiskAreas(%s, offset %d): the answer (start %d, length %d, %d areas) does not move forward",
				what, start, info.StartOffset, info.Length, len(info.ChangedArea))
		}
		start = next
	}
	return nil
}
