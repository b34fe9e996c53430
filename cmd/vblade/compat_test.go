package main

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// The sample files in ops/examples/vblade.conf.d are what vblade-persistence
// users have; each must parse to the vblade command line Debian's
// vblade@.service would have run.
func TestCompatSampleFiles(t *testing.T) {
	want := map[string]struct {
		args   []string
		ionice string
		check  string
	}{
		"disk1.conf": {
			args:   []string{"14", "2", "ens3", "/dev/mapper/export", "-r", "-m", "11:22:33:44:55:66,22:33:44:55:66:77", "-o", "8"},
			ionice: "--class best-effort --classdata 7",
			check:  "e14.2 on ens3: /dev/mapper/export",
		},
		"scratch.conf": {
			args:   []string{"1", "0", "eth1", "/srv/aoe/scratch.img", "-d", "-b", "64"},
			ionice: debianIonice,
			check:  "e1.0 on eth1",
		},
		"minimal.conf": {
			args:   []string{"0", "1", "eth1", "/var/lib/vblade/images/minimal.img"},
			ionice: debianIonice,
			check:  "e0.1 on eth1",
		},
	}
	files, _ := filepath.Glob("../../ops/examples/vblade.conf.d/*.conf")
	if len(files) != len(want) {
		t.Fatalf("sample files %v, want %d", files, len(want))
	}
	for _, f := range files {
		w, ok := want[filepath.Base(f)]
		if !ok {
			t.Errorf("%s: no expectation in this test", f)
			continue
		}
		var out, errb bytes.Buffer
		if rc := run([]string{"compat", "--check", f}, &out, &errb); rc != 0 {
			// The dispatch in main.go may not be wired yet: call directly.
			out.Reset()
			errb.Reset()
			if rc := compatMain([]string{"--check", f}, &out, &errb); rc != 0 {
				t.Errorf("%s: check failed (%d): %s", f, rc, errb.String())
				continue
			}
		}
		if !strings.Contains(out.String(), w.check) {
			t.Errorf("%s: check said %q, want %q", f, out.String(), w.check)
		}
		data := mustRead(t, f)
		cc, err := parseCompat(f, data)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(cc.args(), w.args) {
			t.Errorf("%s: args %q, want %q", f, cc.args(), w.args)
		}
		if cc.Ionice != w.ionice {
			t.Errorf("%s: ionice %q, want %q", f, cc.Ionice, w.ionice)
		}
	}
}

func TestCompatParsedOptions(t *testing.T) {
	cc, err := parseCompat("x", []byte("shelf=14\nslot=2\nnetif=ens3\nfilename=/dev/x\noptions='-r -m 11:22:33:44:55:66,22:33:44:55:66:77 -o 8 -l 100'\n"))
	if err != nil {
		t.Fatal(err)
	}
	var errb bytes.Buffer
	o, err := parseClassic(cc.args(), &errb)
	if err != nil {
		t.Fatal(err, errb.String())
	}
	e := o.export
	if !e.ReadOnly || e.Offset != 8 || e.Length != 100 || len(e.Masks) != 2 || e.Shelf != 14 || e.Slot != 2 || e.Netif != "ens3" {
		t.Errorf("export %+v", e)
	}
}

func TestCompatBadFiles(t *testing.T) {
	for _, c := range []struct{ name, text, want string }{
		{"missing", "shelf=1\nslot=2\n", "netif, filename not set"},
		{"garbage", "shelf=1\nthis is not sh\n", "x:2:"},
		{"quote", "shelf=1\nslot=2\nnetif=e\nfilename='/x\n", "unterminated"},
		{"expansion", "shelf=1\nslot=2\nnetif=e\nfilename=$HOME/x\n", "expansion"},
	} {
		_, err := parseCompat("x", []byte(c.text))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want %q", c.name, err, c.want)
		}
	}
	var out, errb bytes.Buffer
	f := filepath.Join(t.TempDir(), "bad.conf")
	writeFile(t, f, "shelf=1\nslot=2\nnetif=eth1\nfilename=/x\noptions='-z'\n")
	if rc := compatMain([]string{"--check", f}, &out, &errb); rc == 0 || !strings.Contains(errb.String(), "invalid option") {
		t.Errorf("bad option: rc %d, %s", rc, errb.String())
	}
}

func TestParseIonice(t *testing.T) {
	for in, want := range map[string]int{
		"--class best-effort --classdata 7": 2<<13 | 7,
		"-c2 -n7":                           2<<13 | 7,
		"-c 3":                              3 << 13,
		"--class=realtime --classdata=0":    1 << 13,
		"":                                  2<<13 | 4,
	} {
		got, _, err := parseIonice(in)
		if err != nil || got != want {
			t.Errorf("parseIonice(%q) = %#x, %v; want %#x", in, got, err, want)
		}
	}
	if _, _, err := parseIonice("-p 1"); err == nil {
		t.Error("ionice -p accepted")
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}
