package lab

import (
	"os"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// RefreshStorageInfo refreshes the VM's file layout as the simulator
// does, then makes each disk's extent files report what the lab's disk
// image really holds, as vSphere reports a thin disk: the image's
// allocated bytes on the first extent of the disk's chain (the lab keeps
// a disk's whole content in one image, so its deltas hold nothing). A
// backup reads layoutEx after this call to learn how much a full backup
// of each disk writes. Called with the VM locked.
func (w *cbtVM) RefreshStorageInfo(ctx *simulator.Context, req *types.RefreshStorageInfo) soap.HasFault {
	res := w.VirtualMachine.RefreshStorageInfo(ctx, req)
	if res.Fault() != nil || w.LayoutEx == nil {
		return res
	}
	files := map[int32]int{}
	for i, f := range w.LayoutEx.File {
		files[f.Key] = i
	}
	for _, dev := range w.Config.Hardware.Device {
		vd, backing := flatDisk(dev)
		if backing == nil {
			continue
		}
		allocated, err := w.lab.allocatedBytes(w.Self.Value, vd.Key, capacityOf(vd))
		if err != nil {
			w.lab.log.Warn("allocated size of a disk image unknown", "vm", w.Name, "disk", vd.Key, "err", err)
			continue
		}
		for _, d := range w.LayoutEx.Disk {
			if d.Key != vd.Key {
				continue
			}
			first := true
			for _, unit := range d.Chain {
				for _, k := range unit.FileKey {
					i, ok := files[k]
					if !ok || w.LayoutEx.File[i].Type != string(types.VirtualMachineFileLayoutExFileTypeDiskExtent) {
						continue
					}
					size := int64(0)
					if first {
						size, first = allocated, false
					}
					w.LayoutEx.File[i].Size, w.LayoutEx.File[i].UniqueSize = size, size
				}
			}
		}
	}
	return res
}

// allocatedBytes is the allocated size of a disk's live image (its blocks
// on the lab's file system), creating the image on first use as a
// snapshot does.
func (l *Lab) allocatedBytes(vmRef string, key int32, capacity int64) (int64, error) {
	d, err := l.disk(vmRef, key, capacity)
	if err != nil {
		return 0, err
	}
	fi, err := os.Stat(d.path)
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fi.Size(), nil
	}
	return min(st.Blocks*512, capacity), nil
}
