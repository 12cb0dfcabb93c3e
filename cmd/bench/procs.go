package main

import (
	"bufio"
	"cmp"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cbtflow/cbtflow/testkit/stack"
)

// statusKiB returns the "kB" fields of a /proc/<pid>/status text (VmRSS,
// VmHWM, ...), in KiB.
func statusKiB(text string) map[string]int64 {
	out := map[string]int64{}
	for _, line := range strings.Split(text, "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			continue
		}
		if v, err := strconv.ParseInt(f[0], 10, 64); err == nil {
			out[name] = v
		}
	}
	return out
}

// procStatus reads the "kB" fields of a process's status (statusKiB).
func procStatus(pid int) (map[string]int64, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return nil, err
	}
	return statusKiB(string(b)), nil
}

// resetPeakRSS sets a process's VmHWM back to its current RSS (writing 5
// to /proc/<pid>/clear_refs, Linux 4.0 and later), so that the VmHWM read
// after a round is that round's peak, not the worker's lifetime's.
func resetPeakRSS(pid int) error {
	return os.WriteFile(filepath.Join("/proc", strconv.Itoa(pid), "clear_refs"), []byte("5"), 0)
}

// openFiles counts a process's open file descriptors.
func openFiles(pid int) (int, error) {
	es, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	return len(es), err
}

// limitOf returns the soft limit of one line of a /proc/<pid>/limits text
// ("Max open files  1048576  1048576  files"): the value as written,
// "unlimited" included.
func limitOf(text, name string) string {
	for _, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, name); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				return f[0]
			}
		}
	}
	return "?"
}

// gauges returns the values of one Prometheus metric in an exposition
// text, keyed by the value of one of its labels (e.g. worker_type):
// `name{...,label="v",...} 12` gives v: 12. Samples of the metric without
// that label are keyed "". The metric may carry a prefix
// (cbtflow_name): the worker's metrics scope has one.
func gauges(text, name, label string) map[string]float64 {
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		end := strings.IndexAny(line, "{ ")
		if end < 0 || strings.HasPrefix(line, "#") {
			continue
		}
		if metric := line[:end]; metric != name && !strings.HasSuffix(metric, "_"+name) {
			continue
		}
		rest := line[end:]
		key := ""
		if rest[0] == '{' {
			end := strings.LastIndexByte(rest, '}')
			if end < 0 {
				continue
			}
			key = labelValue(rest[1:end], label)
			rest = rest[end+1:]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		if v, err := strconv.ParseFloat(f[0], 64); err == nil {
			out[key] = v
		}
	}
	return out
}

// vcenterCalls is the worker's count of its calls to vCenter, by method.
func vcenterCalls(metricsURL string) (calls, error) {
	text, err := scrape(httpClient(), metricsURL)
	if err != nil {
		return nil, err
	}
	return gauges(text, "cbtflow_vcenter_calls_total", "method"), nil
}

// calls counts vCenter calls by method.
type calls map[string]float64

// sub is the calls made since before.
func (c calls) sub(before calls) calls {
	out := calls{}
	for m, v := range c {
		if d := v - before[m]; d > 0 {
			out[m] = d
		}
	}
	return out
}

func (c calls) total() float64 {
	var n float64
	for _, v := range c {
		n += v
	}
	return n
}

// perBackup lists the methods, most called first, each with its calls
// per backup: "RetrievePropertiesEx 12.0, ...".
func (c calls) perBackup(backups int) string {
	methods := slices.Collect(maps.Keys(c))
	slices.SortFunc(methods, func(a, b string) int {
		if c[a] != c[b] {
			return cmp.Compare(c[b], c[a])
		}
		return strings.Compare(a, b)
	})
	parts := make([]string, len(methods))
	for i, m := range methods {
		parts[i] = fmt.Sprintf("%s %.1f", m, c[m]/float64(max(backups, 1)))
	}
	return strings.Join(parts, ", ")
}

// labelValue finds label="value" in a Prometheus label list.
func labelValue(labels, label string) string {
	for _, kv := range strings.Split(labels, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if ok && k == label {
			return strings.Trim(v, `"`)
		}
	}
	return ""
}

// scrape reads the worker's metrics endpoint.
func scrape(hc *http.Client, url string) (string, error) {
	resp, err := hc.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", url, resp.Status)
	}
	return string(b), nil
}

// slotsAvailable and slotsUsed are the SDK's gauges of a worker's task
// slots, by worker_type (WorkflowWorker, ActivityWorker,
// LocalActivityWorker, NexusWorker).
const (
	slotsAvailable = "temporal_worker_task_slots_available"
	slotsUsed      = "temporal_worker_task_slots_used"
	numPollers     = "temporal_num_pollers"
)

// peaks is what a sampler saw of the worker while a round ran.
type peaks struct {
	hwmKiB       int64 // VmHWM at the end, reset at the start
	rssKiB       int64 // the highest VmRSS sampled
	files        int   // the most open file descriptors
	servers      int   // the most qemu-nbd and nbdkit children at once
	serversRSS   int64 // their RSS summed, the most at once, KiB
	activitySlot int   // the most activity slots in use (the SDK's gauge)
	samples      int
}

// sampler watches the worker process (and its NBD servers) while a round
// runs: every interval it reads the worker's RSS and open files, its
// children, and the SDK's slot gauges from its metrics endpoint.
type sampler struct {
	pid  int
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	p    peaks
}

// sampleEvery is how often the sampler looks during a round. Each look
// reads every process's stat in /proc (to find the worker's NBD servers)
// and has the worker render its metrics: every 100 ms, that cost about
// 3% of the machine in an incremental round, CPU the product's own work
// then waited for. The peak RSS is exact whatever the interval (VmHWM).
const sampleEvery = 250 * time.Millisecond

// startSampler resets the worker's VmHWM and starts sampling it.
func startSampler(pid int, metricsURL string, interval time.Duration) (*sampler, error) {
	if err := resetPeakRSS(pid); err != nil {
		return nil, fmt.Errorf("reset the worker's peak RSS: %w", err)
	}
	s := &sampler{pid: pid, stop: make(chan struct{}), done: make(chan struct{})}
	hc := httpClient()
	go func() {
		defer close(s.done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			s.sample(hc, metricsURL)
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s, nil
}

func (s *sampler) sample(hc *http.Client, metricsURL string) {
	var p peaks
	if st, err := procStatus(s.pid); err == nil {
		p.rssKiB = st["VmRSS"]
	}
	p.files, _ = openFiles(s.pid)
	for _, c := range stack.Descendants(s.pid) {
		if name := filepath.Base(strings.Fields(c.Cmd + " ?")[0]); name == "qemu-nbd" || name == "nbdkit" {
			p.servers++
			if st, err := procStatus(c.Pid); err == nil {
				p.serversRSS += st["VmRSS"]
			}
		}
	}
	if text, err := scrape(hc, metricsURL); err == nil {
		p.activitySlot = int(gauges(text, slotsUsed, "worker_type")["ActivityWorker"])
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.p.samples++
	s.p.rssKiB = max(s.p.rssKiB, p.rssKiB)
	s.p.files = max(s.p.files, p.files)
	s.p.servers = max(s.p.servers, p.servers)
	s.p.serversRSS = max(s.p.serversRSS, p.serversRSS)
	s.p.activitySlot = max(s.p.activitySlot, p.activitySlot)
}

// end stops sampling and returns the peaks, with the worker's VmHWM.
func (s *sampler) end() (peaks, error) {
	close(s.stop)
	<-s.done
	st, err := procStatus(s.pid)
	if err != nil {
		return peaks{}, fmt.Errorf("the worker's status: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.p.hwmKiB = st["VmHWM"]
	return s.p, nil
}

// diskUsage adds up the files below dir: their apparent size and the
// bytes the file system allocated for them.
func diskUsage(dir string) (apparent, allocated int64, err error) {
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil // removed meanwhile
		}
		apparent += fi.Size()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			allocated += st.Blocks * 512
		}
		return nil
	})
	return apparent, allocated, err
}

// httpClient is the bench's client of the worker's metrics endpoint. It
// asks for the text uncompressed: compressing it cost the worker more CPU
// than anything but the copies when the bench sampled every 100 ms.
func httpClient() *http.Client {
	return &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableCompression: true}}
}

// clockTicks is the unit of /proc's CPU times (USER_HZ, 100 on Linux).
const clockTicks = 100

// procCPU returns the CPU seconds (user and system) a process used, with
// those of its children it waited for: the worker's exited qemu-nbd,
// nbdkit and qemu-img count in the worker's (a round ends with none
// running).
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	return statCPU(string(b))
}

// statCPU reads utime, stime, cutime and cstime (fields 14 to 17) from a
// /proc/<pid>/stat text, whose command (field 2) may hold spaces.
func statCPU(text string) (float64, error) {
	f := stack.StatFields(text) // from field 3 on
	if len(f) < 15 {
		return 0, fmt.Errorf("/proc stat %q", text)
	}
	var ticks int64
	for _, v := range f[11:15] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc stat %q", text)
		}
		ticks += n
	}
	return float64(ticks) / clockTicks, nil
}

// commandCPU adds up procCPU of every process whose command (comm) is
// name: PostgreSQL's server and backends, say.
func commandCPU(name string) float64 {
	es, _ := os.ReadDir("/proc")
	var sum float64
	for _, e := range es {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != name {
			continue
		}
		if c, err := procCPU(pid); err == nil {
			sum += c
		}
	}
	return sum
}

// machineCPU returns the machine's busy CPU seconds (every CPU time of
// /proc/stat's first line but idle, iowait and steal), the seconds the
// host took from its CPUs (steal), and its CPU count.
func machineCPU() (busySeconds, stealSeconds float64, cpus int, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, 0, err
	}
	var busy, steal int64
	for i, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], "cpu") {
			continue
		}
		if i > 0 {
			cpus++
			continue
		}
		for j, v := range f[1:] {
			if j == 3 || j == 4 || j > 7 { // idle, iowait; guest times are in user's
				continue
			}
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return 0, 0, 0, fmt.Errorf("/proc/stat: %q", line)
			}
			if j == 7 { // steal: the hypervisor ran another guest on our CPUs
				steal += n
				continue
			}
			busy += n
		}
	}
	return float64(busy) / clockTicks, float64(steal) / clockTicks, cpus, nil
}

// cpuUse is where the machine's CPU went: the seconds of each part of a
// stack, read before and after a round (cpuSnapshot), and their
// difference (sub).
type cpuUse struct {
	machine, worker, temporal, postgres, bench float64
	steal                                      float64 // the host's: not ours, not in machine
	cpus                                       int
}

// cpuSnapshot reads the CPU seconds so far of the machine, the worker
// (with the NBD servers and qemu-img runs it waited for), the Temporal
// dev server, every PostgreSQL process, and this process (the lab's
// vCenter and disks, and the starters it ran).
func cpuSnapshot(workerPID, temporalPID int) (cpuUse, error) {
	var u cpuUse
	var err error
	if u.machine, u.steal, u.cpus, err = machineCPU(); err != nil {
		return u, err
	}
	if u.worker, err = procCPU(workerPID); err != nil {
		return u, fmt.Errorf("the worker's CPU: %w", err)
	}
	if temporalPID != 0 { // else a Temporal server of another's: "the rest"
		if u.temporal, err = procCPU(temporalPID); err != nil {
			return u, fmt.Errorf("the Temporal server's CPU: %w", err)
		}
	}
	if u.bench, err = procCPU(os.Getpid()); err != nil {
		return u, err
	}
	u.postgres = commandCPU("postgres")
	return u, nil
}

func (u cpuUse) sub(before cpuUse) cpuUse {
	return cpuUse{machine: u.machine - before.machine, worker: u.worker - before.worker, temporal: u.temporal - before.temporal,
		postgres: u.postgres - before.postgres, bench: u.bench - before.bench, steal: u.steal - before.steal, cpus: u.cpus}
}

// quietBusy is the share of the machine's CPUs in use below which
// waitQuiet calls the machine quiet, and quietWindow the time over which
// it is measured.
const (
	quietBusy   = 0.15
	quietWindow = 250 * time.Millisecond
	quietMax    = 15 * time.Second
)

// waitQuiet waits until the machine's CPUs were busy less than quietBusy
// of a quietWindow (whatever a round or a copy left running: the dev
// server's tasks of the closed workflows, the NBD servers' exits), at most
// quietMax, and returns how long it waited and the share of the last
// window. So far the machine was quiet within the first window every
// time: the reference's 2× spread before the sixth of December's fifth
// session came from the copier's own buffers, not from the stack.
func waitQuiet() (time.Duration, float64, error) {
	start := time.Now()
	for {
		before, _, cpus, err := machineCPU()
		if err != nil {
			return 0, 0, err
		}
		time.Sleep(quietWindow)
		after, _, _, err := machineCPU()
		if err != nil {
			return 0, 0, err
		}
		share := (after - before) / (float64(cpus) * quietWindow.Seconds())
		if share < quietBusy || time.Since(start) >= quietMax {
			return time.Since(start), share, nil
		}
	}
}
