package qemu

import (
	"reflect"
	"strings"
	"testing"
)

func TestArgv(t *testing.T) {
	overlay, err := OverlayArgs("/repo/vm/204/b2.qcow2", "/repo/vm/204/b1.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	overlayUp, err := OverlayArgs("/repo/a/b/new.qcow2", "/repo/c/old.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	layerMap, err := LayerMapArgs(`/r/a "b".qcow2`)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		got  []string
		want []string
	}{
		{"create", CreateArgs("/r/x.qcow2", 1<<30),
			[]string{"create", "-q", "-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "/r/x.qcow2", "1073741824"}},
		{"overlay same folder", overlay,
			[]string{"create", "-q", "-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "-b", "b1.qcow2", "-F", "qcow2", "/repo/vm/204/b2.qcow2"}},
		{"overlay other folder", overlayUp,
			[]string{"create", "-q", "-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "-b", "../../c/old.qcow2", "-F", "qcow2", "/repo/a/b/new.qcow2"}},
		{"info", InfoArgs("/r/x.qcow2"),
			[]string{"info", "--output=json", "--backing-chain", "-U", "/r/x.qcow2"}},
		{"map", MapArgs("/r/x.qcow2"),
			[]string{"map", "--output=json", "-f", "qcow2", "/r/x.qcow2"}},
		{"map one layer", layerMap,
			[]string{"map", "--output=json", "-U", `json:{"backing":null,"driver":"qcow2","file":{"driver":"file","filename":"/r/a \"b\".qcow2"}}`}},
		{"check", CheckArgs("/r/x.qcow2"),
			[]string{"check", "--output=json", "-f", "qcow2", "/r/x.qcow2"}},
		{"compare", CompareArgs("a.raw", "raw", "b.qcow2", "qcow2"),
			[]string{"compare", "-U", "-f", "raw", "-F", "qcow2", "a.raw", "b.qcow2"}},
		{"convert", ConvertArgs(ConvertOptions{Source: "nbd+unix:///?socket=/s", SourceFormat: "raw", Target: "t.qcow2", TargetFormat: "qcow2", OutOfOrder: true, Coroutines: 8}),
			[]string{"convert", "-f", "raw", "-O", "qcow2", "-W", "-m", "8", "nbd+unix:///?socket=/s", "t.qcow2"}},
		{"convert into existing", ConvertArgs(ConvertOptions{Source: "a.qcow2", SourceFormat: "qcow2", Target: "b.raw", TargetFormat: "raw", NoCreate: true}),
			[]string{"convert", "-f", "qcow2", "-O", "raw", "-n", "a.qcow2", "b.raw"}},
		{"qemu-nbd qcow2 read-write", QemuNBDOptions{Image: "/r/x.qcow2", Format: "qcow2"}.Args("/d/nbd.sock"),
			[]string{"-t", "-k", "/d/nbd.sock", "-e", "4", "--discard=unmap", "--cache=none", "--image-opts", "driver=qcow2,l2-cache-entry-size=4096,file.driver=file,file.filename=/r/x.qcow2"}},
		{"qemu-nbd qcow2 read-write writeback", QemuNBDOptions{Image: "/r/x.qcow2", Format: "qcow2", Cache: "writeback"}.Args("/d/nbd.sock"),
			[]string{"-t", "-k", "/d/nbd.sock", "-e", "4", "--discard=unmap", "--cache=writeback", "--image-opts", "driver=qcow2,l2-cache-entry-size=4096,file.driver=file,file.filename=/r/x.qcow2"}},
		{"qemu-nbd qcow2 comma in its name", QemuNBDOptions{Image: "/r/a,b.qcow2", Format: "qcow2"}.Args("/d/nbd.sock"),
			[]string{"-t", "-k", "/d/nbd.sock", "-e", "4", "--discard=unmap", "--cache=none", "--image-opts", "driver=qcow2,l2-cache-entry-size=4096,file.driver=file,file.filename=/r/a,,b.qcow2"}},
		{"qemu-nbd raw read-only default cache", QemuNBDOptions{Image: "/r/x.raw", Format: "raw", ReadOnly: true}.Args("/d/nbd.sock"),
			[]string{"-t", "-k", "/d/nbd.sock", "-f", "raw", "-e", "4", "-r", "/r/x.raw"}},
		{"qemu-nbd raw read-only", QemuNBDOptions{Image: "/r/x.raw", Format: "raw", ReadOnly: true, Shared: 8, Cache: "none"}.Args("/d/nbd.sock"),
			[]string{"-t", "-k", "/d/nbd.sock", "-f", "raw", "-e", "8", "-r", "--cache=none", "/r/x.raw"}},
		{"nbdkit file", NbdkitFile("/img.raw", true).Args("/d/nbd.sock"),
			[]string{"--foreground", "--exit-with-parent", "--unix", "/d/nbd.sock", "--readonly", "file", "file=/img.raw"}},
		{"nbdkit filters", NbdkitOptions{Plugin: "file", Filters: []string{"stats", "error"}, Params: []string{"file=/i", "statsfile=/s", "error=EIO"}, Threads: 4, Verbose: true}.Args("/d/nbd.sock"),
			[]string{"--foreground", "--exit-with-parent", "--unix", "/d/nbd.sock", "--threads", "4", "--verbose", "--filter=stats", "--filter=error", "file", "file=/i", "statsfile=/s", "error=EIO"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !reflect.DeepEqual(tt.got, tt.want) {
				t.Errorf("argv\n got %q\nwant %q", tt.got, tt.want)
			}
		})
	}
}

func TestQemuNBDNeverForks(t *testing.T) {
	for _, o := range []QemuNBDOptions{{Image: "x", Format: "raw"}, {Image: "x", Format: "qcow2", ReadOnly: true}} {
		for _, a := range o.Args("/s") {
			if strings.Contains(a, "fork") {
				t.Errorf("qemu-nbd argv contains %q", a)
			}
		}
	}
}

func TestNbdkitRefusesInlinePassword(t *testing.T) {
	tests := []struct {
		params []string
		ok     bool
	}{
		{[]string{"password=secret"}, false},
		{[]string{"PASSWORD=secret"}, false},
		{[]string{"password=+/run/pw"}, true},
		{[]string{"password=-"}, true},
		{[]string{"noequals"}, false},
		{[]string{"file=/x"}, true},
	}
	for _, tt := range tests {
		err := NbdkitOptions{Plugin: "vddk", Params: tt.params}.validate()
		if (err == nil) != tt.ok {
			t.Errorf("%q: err=%v, want ok=%v", tt.params, err, tt.ok)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("error repeats the password: %v", err)
		}
	}
}

func TestQemuNBDValidate(t *testing.T) {
	if err := (QemuNBDOptions{Image: "x", Format: "vmdk"}).validate(); err == nil || !strings.Contains(err.Error(), "vmdk") {
		t.Errorf("format vmdk: err=%v", err)
	}
	if err := (QemuNBDOptions{Format: "raw"}).validate(); err == nil {
		t.Error("no image accepted")
	}
}

func TestChildEnvDropsSecrets(t *testing.T) {
	got := childEnv([]string{"PATH=/bin", "CBTFLOW_VCENTER_PASSWORD=x", "MY_SECRET=y", "GH_TOKEN=z", "HOME=/root"})
	want := []string{"PATH=/bin", "HOME=/root"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("childEnv = %q, want %q", got, want)
	}
}

func TestParseInfo(t *testing.T) {
	out := []byte(`[{"virtual-size": 1048576, "filename": "b.qcow2", "cluster-size": 65536, "format": "qcow2",
	"actual-size": 200704, "full-backing-filename": "/r/a.qcow2", "backing-filename": "a.qcow2",
	"backing-filename-format": "qcow2", "dirty-flag": false},
	{"virtual-size": 1048576, "filename": "/r/a.qcow2", "format": "qcow2", "actual-size": 1000, "dirty-flag": false}]`)
	chain, err := ParseInfo(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[0].BackingFilename != "a.qcow2" || chain[0].FullBackingFilename != "/r/a.qcow2" ||
		chain[1].Filename != "/r/a.qcow2" || chain[0].VirtualSize != 1048576 || chain[0].ClusterSize != 65536 {
		t.Errorf("chain = %+v", chain)
	}
	if _, err := ParseInfo([]byte(`[]`)); err == nil {
		t.Error("empty chain accepted")
	}
	if _, err := ParseInfo([]byte(`{`)); err == nil {
		t.Error("bad JSON accepted")
	}
}

func TestDirectIOProbe(t *testing.T) {
	// A missing image is not a reason to fall back: qemu-nbd reports it.
	if !directIO("/nonexistent/cbtflow/x.qcow2") {
		t.Error("directIO of a missing file = false; want true")
	}
}

func TestParseMap(t *testing.T) {
	ext, err := ParseMap([]byte(`[{ "start": 0, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 65536, "length": 65536, "depth": 1, "present": false, "zero": true, "data": false},
{ "start": 131072, "length": 65536, "depth": 0, "zero": true, "data": false}]`))
	if err != nil {
		t.Fatal(err)
	}
	if len(ext) != 3 || !ext[0].Present || ext[1].Present || !ext[2].Present || ext[0].Depth != 1 || ext[2].Start != 131072 {
		t.Errorf("extents %+v", ext)
	}
	if !ext[0].HasOffset || ext[0].Offset != 327680 || ext[1].HasOffset || ext[0].End() != 65536 {
		t.Errorf("offsets %+v", ext)
	}
	for _, bad := range []string{`{`, `[{"start": -1, "length": 1}]`} {
		if _, err := ParseMap([]byte(bad)); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}
