package labapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/vmware/govmomi/vim25/soap"
)

// Client talks to a lab's endpoints over HTTP, for the CLI, the tests and
// the worker's lab disk source. The zero value is not usable: set BaseURL.
type Client struct {
	// BaseURL is any URL of the lab server, typically the SDK URL that
	// `starter lab serve` prints; only its scheme and host are used.
	BaseURL string
	// Thumbprint pins the lab's certificate (SHA-1, as lab.Lab.Thumbprint).
	// Without it the certificate is not verified, which Client allows for
	// loopback hosts only.
	Thumbprint string
	// HTTPClient replaces the default client (whose TLS settings follow
	// Thumbprint).
	HTTPClient *http.Client

	once sync.Once
	hc   *http.Client
	base *url.URL
	err  error
}

// idleConns is how many idle connections to its lab a Client keeps.
const idleConns = 16

func (c *Client) init() error {
	c.once.Do(func() {
		u, err := url.Parse(c.BaseURL)
		if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
			c.err = fmt.Errorf("lab: bad lab URL %q (want the https://HOST:PORT/sdk URL printed by `starter lab serve`)", c.BaseURL)
			return
		}
		c.base = &url.URL{Scheme: u.Scheme, Host: u.Host, Path: Prefix}
		if c.HTTPClient != nil {
			c.hc = c.HTTPClient
			return
		}
		tc := &tls.Config{InsecureSkipVerify: true} // verified below or loopback only
		if c.Thumbprint != "" {
			want := c.Thumbprint
			tc.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
				if len(raw) == 0 {
					return errors.New("lab: no server certificate")
				}
				cert, err := x509.ParseCertificate(raw[0])
				if err != nil {
					return err
				}
				if got := soap.ThumbprintSHA1(cert); got != want {
					return fmt.Errorf("lab: server thumbprint %s, want %s", got, want)
				}
				return nil
			}
		} else if ip := net.ParseIP(u.Hostname()); u.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
			c.err = fmt.Errorf("lab: %s is not a loopback host: give the lab's thumbprint", u.Host)
			return
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = tc
		// One lab: as many idle connections as callers ask at once (a
		// worker's transfers each ask for their image), so that a
		// shared client pays no TLS handshake per ask.
		tr.MaxIdleConnsPerHost = idleConns
		c.hc = &http.Client{Transport: tr}
	})
	return c.err
}

// CloseIdleConnections closes the client's idle connections.
func (c *Client) CloseIdleConnections() {
	if c.hc != nil {
		c.hc.CloseIdleConnections()
	}
}

func (c *Client) endpoint(query url.Values, segments ...string) string {
	u := *c.base
	p := u.Path
	raw := u.Path
	for _, s := range segments {
		p += "/" + s
		switch s {
		case ".", "..": // not path steps: VM names the simulator allows
			raw += "/" + strings.Repeat("%2E", len(s))
		default:
			raw += "/" + url.PathEscape(s)
		}
	}
	u.Path, u.RawPath = p, raw
	u.RawQuery = query.Encode()
	return u.String()
}

// do sends a request and decodes a JSON answer into out (when not nil).
func (c *Client) do(ctx context.Context, method, u string, body io.Reader, size int64, out any) error {
	resp, err := c.send(ctx, method, u, body, size)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("lab: %s %s: decode answer: %w", method, u, err)
	}
	return nil
}

// send returns a response with status 2xx, or the lab's error.
func (c *Client) send(ctx context.Context, method, u string, body io.Reader, size int64) (*http.Response, error) {
	if err := c.init(); err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	if body != nil && size >= 0 {
		req.ContentLength = size
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	var eb ErrorBody
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
		return nil, fmt.Errorf("lab: %s %s: %s: %s", method, u, resp.Status, bytes.TrimSpace(b))
	}
	if s := sentinel(eb.Code); s != nil {
		// The message already names the sentinel; keep it matchable.
		return nil, &remoteError{msg: eb.Error, sentinel: s}
	}
	return nil, errors.New(eb.Error)
}

// remoteError is a lab error that errors.Is matches to its sentinel.
type remoteError struct {
	msg      string
	sentinel error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.sentinel }

// Disks lists the disks of a VM.
func (c *Client) Disks(ctx context.Context, vm string) ([]DiskInfo, error) {
	if err := c.init(); err != nil {
		return nil, err
	}
	var out []DiskInfo
	return out, c.do(ctx, http.MethodGet, c.endpoint(nil, "vms", vm, "disks"), nil, -1, &out)
}

// Disk describes one disk of a VM.
func (c *Client) Disk(ctx context.Context, vm string, key int32) (DiskInfo, error) {
	if err := c.init(); err != nil {
		return DiskInfo{}, err
	}
	var out DiskInfo
	return out, c.do(ctx, http.MethodGet, c.endpoint(nil, "vms", vm, "disks", itoa(key)), nil, -1, &out)
}

// DiskExtents lists the allocated ranges of a VM's disk.
func (c *Client) DiskExtents(ctx context.Context, vm string, key int32) ([]Extent, error) {
	if err := c.init(); err != nil {
		return nil, err
	}
	var out []Extent
	return out, c.do(ctx, http.MethodGet, c.endpoint(nil, "vms", vm, "disks", itoa(key), "extents"), nil, -1, &out)
}

// WriteDisk streams r into a VM's disk at offset off. size is r's length
// when known (the lab then refuses a write past the capacity before it
// starts), -1 otherwise.
func (c *Client) WriteDisk(ctx context.Context, vm string, key int32, off int64, r io.Reader, size int64) (int64, error) {
	if err := c.init(); err != nil {
		return 0, err
	}
	q := url.Values{"offset": {strconv.FormatInt(off, 10)}}
	var out WrittenBody
	err := c.do(ctx, http.MethodPut, c.endpoint(q, "vms", vm, "disks", itoa(key), "data"), io.NopCloser(r), size, &out)
	return out.Written, err
}

// PunchHole deallocates a range of a VM's disk (a guest discard).
func (c *Client) PunchHole(ctx context.Context, vm string, key int32, off, length int64) error {
	if err := c.init(); err != nil {
		return err
	}
	q := url.Values{"offset": {strconv.FormatInt(off, 10)}, "length": {strconv.FormatInt(length, 10)}}
	return c.do(ctx, http.MethodPost, c.endpoint(q, "vms", vm, "disks", itoa(key), "punch"), nil, -1, nil)
}

// ReadRange streams length bytes of a VM's disk from off into w.
func (c *Client) ReadRange(ctx context.Context, vm string, key int32, off, length int64, w io.Writer) (int64, error) {
	if err := c.init(); err != nil {
		return 0, err
	}
	q := url.Values{"offset": {strconv.FormatInt(off, 10)}, "length": {strconv.FormatInt(length, 10)}}
	resp, err := c.send(ctx, http.MethodGet, c.endpoint(q, "vms", vm, "disks", itoa(key), "data"), nil, -1)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	n, err := io.Copy(w, resp.Body)
	if err == nil && n != length {
		err = fmt.Errorf("lab: short read of %s disk %d at %d: %d of %d bytes", vm, key, off, n, length)
	}
	return n, err
}

// ReadDisk copies the current content of a VM's disk into f as a sparse
// raw file of exactly the disk's capacity: only allocated ranges travel,
// and all-zero blocks in them stay holes.
func (c *Client) ReadDisk(ctx context.Context, vm string, key int32, f *os.File) (DiskInfo, error) {
	info, err := c.Disk(ctx, vm, key)
	if err != nil {
		return info, err
	}
	exts, err := c.DiskExtents(ctx, vm, key)
	if err != nil {
		return info, err
	}
	if err := f.Truncate(0); err != nil {
		return info, err
	}
	if err := f.Truncate(info.Capacity); err != nil {
		return info, err
	}
	for _, e := range exts {
		w := &sparseWriter{f: f, off: e.Offset}
		if _, err := c.ReadRange(ctx, vm, key, e.Offset, e.Length, w); err != nil {
			return info, err
		}
		if err := w.flush(); err != nil {
			return info, err
		}
	}
	return info, nil
}

// holeBlock is the unit in which ReadDisk looks for zeros to leave as
// holes: the lab's change-tracking block (lab.BlockSize), so a copy is as
// sparse as the lab's own image.
const holeBlock = 64 << 10

// sparseWriter writes a stream into f from off on, leaving all-zero
// blocks as holes.
type sparseWriter struct {
	f   *os.File
	off int64
	buf []byte
}

func (s *sparseWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if s.buf == nil {
			s.buf = make([]byte, 0, holeBlock)
		}
		k := min(len(p), holeBlock-len(s.buf))
		s.buf = append(s.buf, p[:k]...)
		p = p[k:]
		if len(s.buf) == holeBlock {
			if err := s.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (s *sparseWriter) flush() error {
	if len(s.buf) == 0 {
		return nil
	}
	if !allZero(s.buf) {
		if _, err := s.f.WriteAt(s.buf, s.off); err != nil {
			return err
		}
	}
	s.off += int64(len(s.buf))
	s.buf = s.buf[:0]
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// SnapshotImage locates the frozen image of a snapshot's disk.
func (c *Client) SnapshotImage(ctx context.Context, snapshot string, key int32) (ImageInfo, error) {
	if err := c.init(); err != nil {
		return ImageInfo{}, err
	}
	var out ImageInfo
	return out, c.do(ctx, http.MethodGet, c.endpoint(nil, "snapshots", snapshot, "disks", itoa(key), "image"), nil, -1, &out)
}

// LiveImage locates the live image of a VM's disk for writing into it
// (a restore): refused with ErrPoweredOn unless the VM is powered off.
// It ends the disk's change-ID series (see lab.Lab.LiveImage).
func (c *Client) LiveImage(ctx context.Context, vm string, key int32) (ImageInfo, error) {
	if err := c.init(); err != nil {
		return ImageInfo{}, err
	}
	var out ImageInfo
	return out, c.do(ctx, http.MethodPost, c.endpoint(nil, "vms", vm, "disks", itoa(key), "live-image"), nil, -1, &out)
}

// SetPower powers a VM on or off.
func (c *Client) SetPower(ctx context.Context, vm string, on bool) error {
	if err := c.init(); err != nil {
		return err
	}
	body, size := jsonBody(PowerBody{On: on})
	return c.do(ctx, http.MethodPut, c.endpoint(nil, "vms", vm, "power"), body, size, nil)
}

// ChangeIDLog returns every change ID the lab stamped.
func (c *Client) ChangeIDLog(ctx context.Context) ([]Stamp, error) {
	if err := c.init(); err != nil {
		return nil, err
	}
	var out []Stamp
	return out, c.do(ctx, http.MethodGet, c.endpoint(nil, "changeids"), nil, -1, &out)
}

// SetCBT switches change tracking of a VM.
func (c *Client) SetCBT(ctx context.Context, vm string, enabled bool) error {
	if err := c.init(); err != nil {
		return err
	}
	body, n := jsonBody(CBTBody{Enabled: enabled})
	return c.do(ctx, http.MethodPut, c.endpoint(nil, "vms", vm, "cbt"), body, n, nil)
}

func jsonBody(v any) (io.Reader, int64) {
	b, _ := json.Marshal(v)
	return bytes.NewReader(b), int64(len(b))
}

// VM describes a VM (by name, as given or as stored, or moref value).
func (c *Client) VM(ctx context.Context, vm string) (VMInfo, error) {
	if err := c.init(); err != nil {
		return VMInfo{}, err
	}
	var out VMInfo
	return out, c.do(ctx, http.MethodGet, c.endpoint(nil, "vms", vm), nil, -1, &out)
}

// CreateVM creates a VM with one disk per capacity and returns its moref
// value (see lab.Lab.CreateVM).
func (c *Client) CreateVM(ctx context.Context, name string, diskCapacities ...int64) (string, error) {
	if err := c.init(); err != nil {
		return "", err
	}
	if diskCapacities == nil {
		diskCapacities = []int64{}
	}
	body, n := jsonBody(CreateVMBody{Name: name, Disks: diskCapacities})
	var out VMInfo
	err := c.do(ctx, http.MethodPost, c.endpoint(nil, "vms"), body, n, &out)
	return out.Ref, err
}

// RemoveVM destroys a VM (see lab.Lab.RemoveVM).
func (c *Client) RemoveVM(ctx context.Context, vm string) error {
	if err := c.init(); err != nil {
		return err
	}
	return c.do(ctx, http.MethodDelete, c.endpoint(nil, "vms", vm), nil, -1, nil)
}

// AddDisk adds a thin disk to a VM and returns its device key (see
// lab.Lab.AddDisk).
func (c *Client) AddDisk(ctx context.Context, vm string, capacity int64) (int32, error) {
	if err := c.init(); err != nil {
		return 0, err
	}
	body, n := jsonBody(CapacityBody{Capacity: capacity})
	var out DiskInfo
	err := c.do(ctx, http.MethodPost, c.endpoint(nil, "vms", vm, "disks"), body, n, &out)
	return out.Key, err
}

// GrowDisk extends a VM's disk (see lab.Lab.GrowDisk).
func (c *Client) GrowDisk(ctx context.Context, vm string, key int32, capacity int64) error {
	if err := c.init(); err != nil {
		return err
	}
	body, n := jsonBody(CapacityBody{Capacity: capacity})
	return c.do(ctx, http.MethodPut, c.endpoint(nil, "vms", vm, "disks", itoa(key), "capacity"), body, n, nil)
}

// RemoveDisk removes a disk from a VM (see lab.Lab.RemoveDisk).
func (c *Client) RemoveDisk(ctx context.Context, vm string, key int32) error {
	if err := c.init(); err != nil {
		return err
	}
	return c.do(ctx, http.MethodDelete, c.endpoint(nil, "vms", vm, "disks", itoa(key)), nil, -1, nil)
}

func itoa(k int32) string { return strconv.FormatInt(int64(k), 10) }
