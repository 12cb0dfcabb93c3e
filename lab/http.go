package lab

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"

	"github.com/cbtflow/cbtflow/lab/labapi"
)

// endpointPrefix is where the lab endpoints live on the lab's HTTPS server,
// next to the vSphere API at /sdk. They need no login and answer only
// loopback clients.
const endpointPrefix = "/cbtflow-lab/"

// endpoints serves the lab endpoints under labapi.Prefix, with labapi's
// types ({vm}: moref value, stored name or name as created, path-escaped):
//
//	POST   /vms                           CreateVMBody -> 201 VMInfo
//	GET    /vms/{vm}                      VMInfo
//	DELETE /vms/{vm}                      RemoveVM -> 204
//	GET    /vms/{vm}/disks                []DiskInfo
//	POST   /vms/{vm}/disks                CapacityBody -> 201 DiskInfo (AddDisk)
//	GET    /vms/{vm}/disks/{key}          DiskInfo
//	DELETE /vms/{vm}/disks/{key}          RemoveDisk -> 204
//	PUT    /vms/{vm}/disks/{key}/capacity CapacityBody -> DiskInfo (GrowDisk)
//	GET    /vms/{vm}/disks/{key}/extents  []Extent
//	GET    /vms/{vm}/disks/{key}/data     ?offset=&length= -> bytes
//	PUT    /vms/{vm}/disks/{key}/data     ?offset= bytes -> WrittenBody
//	POST   /vms/{vm}/disks/{key}/punch    ?offset=&length= -> 204
//	PUT    /vms/{vm}/cbt                  CBTBody -> 204
//	PUT    /vms/{vm}/power                PowerBody -> 204
//	POST   /vms/{vm}/disks/{key}/live-image  ImageInfo (refused unless powered off)
//	GET    /snapshots/{snapshot}/disks/{key}/image  ImageInfo
//	GET    /changeids                     []Stamp
//
// Errors are labapi.ErrorBody with the codes of labapi.Classify.
func (l *Lab) endpoints() http.Handler {
	mux := http.NewServeMux()
	const p = labapi.Prefix
	mux.HandleFunc("POST "+p+"/vms", l.postVM)
	mux.HandleFunc("GET "+p+"/vms/{vm}", l.getVM)
	mux.HandleFunc("DELETE "+p+"/vms/{vm}", l.deleteVM)
	mux.HandleFunc("GET "+p+"/vms/{vm}/disks", l.getDisks)
	mux.HandleFunc("POST "+p+"/vms/{vm}/disks", l.postDisk)
	mux.HandleFunc("DELETE "+p+"/vms/{vm}/disks/{key}", l.deleteDisk)
	mux.HandleFunc("PUT "+p+"/vms/{vm}/disks/{key}/capacity", l.putCapacity)
	mux.HandleFunc("GET "+p+"/vms/{vm}/disks/{key}", l.getDisk)
	mux.HandleFunc("GET "+p+"/vms/{vm}/disks/{key}/extents", l.getExtents)
	mux.HandleFunc("GET "+p+"/vms/{vm}/disks/{key}/data", l.getData)
	mux.HandleFunc("PUT "+p+"/vms/{vm}/disks/{key}/data", l.putData)
	mux.HandleFunc("POST "+p+"/vms/{vm}/disks/{key}/punch", l.postPunch)
	mux.HandleFunc("PUT "+p+"/vms/{vm}/cbt", l.putCBT)
	mux.HandleFunc("PUT "+p+"/vms/{vm}/power", l.putPower)
	mux.HandleFunc("POST "+p+"/vms/{vm}/disks/{key}/live-image", l.postLiveImage)
	mux.HandleFunc("GET "+p+"/snapshots/{snapshot}/disks/{key}/image", l.getImage)
	mux.HandleFunc("GET "+p+"/changeids", l.getChangeIDs)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, err := net.SplitHostPort(r.RemoteAddr)
		if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
			writeError(w, http.StatusForbidden, labapi.CodeBadRequest, "lab endpoints answer loopback clients only")
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(labapi.ErrorBody{Error: msg, Code: code})
}

func (l *Lab) fail(w http.ResponseWriter, r *http.Request, err error) {
	code, status := labapi.Classify(err)
	if code == labapi.CodeInternal {
		l.log.Warn("lab endpoint failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeError(w, status, code, err.Error())
}

func badRequest(w http.ResponseWriter, format string, args ...any) {
	writeError(w, http.StatusBadRequest, labapi.CodeBadRequest, fmt.Sprintf(format, args...))
}

func pathKey(w http.ResponseWriter, r *http.Request) (int32, bool) {
	k, err := strconv.ParseInt(r.PathValue("key"), 10, 32)
	if err != nil {
		badRequest(w, "disk key %q is not a number", r.PathValue("key"))
		return 0, false
	}
	return int32(k), true
}

// queryInt reads an integer query parameter, def when absent.
func queryInt(w http.ResponseWriter, r *http.Request, name string, def int64) (int64, bool) {
	s := r.URL.Query().Get(name)
	if s == "" {
		return def, true
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		badRequest(w, "%s %q is not a number", name, s)
		return 0, false
	}
	return v, true
}

func (l *Lab) getDisks(w http.ResponseWriter, r *http.Request) {
	disks, err := l.Disks(r.PathValue("vm"))
	if err != nil {
		l.fail(w, r, err)
		return
	}
	if disks == nil {
		disks = []DiskInfo{}
	}
	writeJSON(w, disks)
}

func (l *Lab) getDisk(w http.ResponseWriter, r *http.Request) {
	key, ok := pathKey(w, r)
	if !ok {
		return
	}
	d, err := l.Disk(r.PathValue("vm"), key)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	writeJSON(w, d)
}

func (l *Lab) getExtents(w http.ResponseWriter, r *http.Request) {
	key, ok := pathKey(w, r)
	if !ok {
		return
	}
	exts, err := l.DiskExtents(r.PathValue("vm"), key)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	if exts == nil {
		exts = []Extent{}
	}
	writeJSON(w, exts)
}

// getData streams [offset, offset+length) of the disk (default: all of it).
func (l *Lab) getData(w http.ResponseWriter, r *http.Request) {
	key, ok := pathKey(w, r)
	if !ok {
		return
	}
	vm := r.PathValue("vm")
	d, err := l.liveDisk(vm, key)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	capacity := d.capacitySafe()
	off, ok := queryInt(w, r, "offset", 0)
	if !ok {
		return
	}
	length, ok := queryInt(w, r, "length", capacity-off)
	if !ok {
		return
	}
	if off < 0 || length < 0 || off+length > capacity {
		l.fail(w, r, rangeErr(off, length, capacity))
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(length, 10))
	if _, err := d.readRange(off, length, w); err != nil {
		l.log.Warn("disk read aborted", "vm", vm, "disk", key, "err", err)
	}
}

func (l *Lab) putData(w http.ResponseWriter, r *http.Request) {
	key, ok := pathKey(w, r)
	if !ok {
		return
	}
	vm := r.PathValue("vm")
	off, ok := queryInt(w, r, "offset", 0)
	if !ok {
		return
	}
	if r.ContentLength >= 0 {
		capacity, err := l.DiskCapacity(vm, key)
		if err != nil {
			l.fail(w, r, err)
			return
		}
		if off < 0 || off+r.ContentLength > capacity {
			l.fail(w, r, rangeErr(off, r.ContentLength, capacity))
			return
		}
	}
	n, err := l.WriteDisk(vm, key, off, r.Body)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	l.log.Debug("disk written", "vm", vm, "disk", key, "offset", off, "bytes", n)
	writeJSON(w, labapi.WrittenBody{Written: n})
}

func (l *Lab) postPunch(w http.ResponseWriter, r *http.Request) {
	key, ok := pathKey(w, r)
	if !ok {
		return
	}
	off, ok := queryInt(w, r, "offset", -1)
	if !ok {
		return
	}
	length, ok := queryInt(w, r, "length", -1)
	if !ok {
		return
	}
	if err := l.PunchHole(r.PathValue("vm"), key, off, length); err != nil {
		l.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (l *Lab) putCBT(w http.ResponseWriter, r *http.Request) {
	var body labapi.CBTBody
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		badRequest(w, "body: %v", err)
		return
	}
	if err := l.SetCBT(r.PathValue("vm"), body.Enabled); err != nil {
		l.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (l *Lab) putPower(w http.ResponseWriter, r *http.Request) {
	var body labapi.PowerBody
	if !decodeBody(w, r, &body) {
		return
	}
	if err := l.SetPower(r.PathValue("vm"), body.On); err != nil {
		l.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// postLiveImage is a POST: it ends the disk's change-ID series (see
// LiveImage), which a GET must not do.
func (l *Lab) postLiveImage(w http.ResponseWriter, r *http.Request) {
	key, ok := pathKey(w, r)
	if !ok {
		return
	}
	img, err := l.LiveImage(r.PathValue("vm"), key)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	writeJSON(w, img)
}

func (l *Lab) getImage(w http.ResponseWriter, r *http.Request) {
	key, ok := pathKey(w, r)
	if !ok {
		return
	}
	img, err := l.SnapshotImage(r.PathValue("snapshot"), key)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	writeJSON(w, img)
}

func (l *Lab) getChangeIDs(w http.ResponseWriter, r *http.Request) {
	stamps := l.ChangeIDLog()
	if stamps == nil {
		stamps = []Stamp{}
	}
	writeJSON(w, stamps)
}

// decodeBody reads a small JSON request body into v.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(v); err != nil {
		badRequest(w, "body: %v", err)
		return false
	}
	return true
}

func writeCreated(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	_ = json.NewEncoder(w).Encode(v)
}

func (l *Lab) postVM(w http.ResponseWriter, r *http.Request) {
	var body labapi.CreateVMBody
	if !decodeBody(w, r, &body) {
		return
	}
	ref, err := l.CreateVM(body.Name, body.Disks...)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	info, err := l.VM(ref)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	writeCreated(w, info)
}

func (l *Lab) getVM(w http.ResponseWriter, r *http.Request) {
	info, err := l.VM(r.PathValue("vm"))
	if err != nil {
		l.fail(w, r, err)
		return
	}
	writeJSON(w, info)
}

func (l *Lab) deleteVM(w http.ResponseWriter, r *http.Request) {
	if err := l.RemoveVM(r.PathValue("vm")); err != nil {
		l.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (l *Lab) postDisk(w http.ResponseWriter, r *http.Request) {
	var body labapi.CapacityBody
	if !decodeBody(w, r, &body) {
		return
	}
	vm := r.PathValue("vm")
	key, err := l.AddDisk(vm, body.Capacity)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	d, err := l.Disk(vm, key)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	writeCreated(w, d)
}

func (l *Lab) putCapacity(w http.ResponseWriter, r *http.Request) {
	key, ok := pathKey(w, r)
	if !ok {
		return
	}
	var body labapi.CapacityBody
	if !decodeBody(w, r, &body) {
		return
	}
	vm := r.PathValue("vm")
	if err := l.GrowDisk(vm, key, body.Capacity); err != nil {
		l.fail(w, r, err)
		return
	}
	d, err := l.Disk(vm, key)
	if err != nil {
		l.fail(w, r, err)
		return
	}
	writeJSON(w, d)
}

func (l *Lab) deleteDisk(w http.ResponseWriter, r *http.Request) {
	key, ok := pathKey(w, r)
	if !ok {
		return
	}
	if err := l.RemoveDisk(r.PathValue("vm"), key); err != nil {
		l.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
