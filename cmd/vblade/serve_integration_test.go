package main_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

// TestServeSeveralExports runs `vblade serve -c FILE` with three exports in
// one process: two on one interface (one socket), one read-only, and checks
// each answers for itself.
func TestServeSeveralExports(t *testing.T) {
	netlab.RequireRoot(t)
	bin := ourVblade(t)
	lan := netlab.New(t, netlab.Options{Hosts: 1, RootPorts: 1})
	h := lan.Host(1)
	dir := t.TempDir()
	var cfg strings.Builder
	fmt.Fprintf(&cfg, "state_dir = %q\n", filepath.Join(dir, "state"))
	for i, ro := range []bool{false, false, true} {
		img := filepath.Join(dir, fmt.Sprintf("d%d.img", i))
		if err := os.WriteFile(img, bytes.Repeat([]byte{byte(i + 1)}, (i+1)<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&cfg, "[[export]]\nshelf = 7\nslot = %d\nnetif = %q\npath = %q\nread_only = %v\n", i, h.If, img, ro)
	}
	path := filepath.Join(dir, "serve.toml")
	if err := os.WriteFile(path, []byte(cfg.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "serve", "-c", path, "--check").CombinedOutput(); err != nil || !strings.Contains(string(out), "ok (3 exports)") {
		t.Fatalf("serve --check: %v: %s", err, out)
	}
	cmd := lan.Start(h.NS, bin, "serve", "-c", path)
	_ = cmd

	c, err := aoe.NewClient(lan.Root[0].Name, aoe.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var infos []aoe.TargetInfo
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		if infos, err = c.Discover(ctx, 300*time.Millisecond); err == nil && len(infos) == 3 {
			break
		}
	}
	if len(infos) != 3 {
		t.Fatalf("discover found %d targets (%v), want 3", len(infos), err)
	}
	for _, ti := range infos {
		r := ti.Remote()
		id, err := c.Identify(ctx, r)
		if err != nil {
			t.Fatalf("e7.%d identify: %v", ti.Slot, err)
		}
		if want := uint64(ti.Slot+1) << 20 / 512; id.Sectors != want {
			t.Errorf("e7.%d has %d sectors, want %d", ti.Slot, id.Sectors, want)
		}
		got := make([]byte, 1024)
		if err := c.ReadAt(ctx, r, got, 0); err != nil || got[0] != ti.Slot+1 {
			t.Errorf("e7.%d read: %v, first byte %d (want %d)", ti.Slot, err, got[0], ti.Slot+1)
		}
		data := bytes.Repeat([]byte{0xee}, 1024)
		err = c.WriteAt(ctx, r, data, 8)
		var ae *aoe.ATAError
		switch {
		case ti.Slot == 2 && !errors.As(err, &ae):
			t.Errorf("read-only e7.2 accepted a write: %v", err)
		case ti.Slot != 2 && err != nil:
			t.Errorf("e7.%d write: %v", ti.Slot, err)
		}
	}

	// Bad configuration files are refused with the file, line and key.
	bad := filepath.Join(dir, "bad.toml")
	for _, tc := range []struct{ text, want string }{
		{"[[export]]\nshelf = 1\nslot = 0\nnetif = \"x\"\npath = \"/nonexistent\"\nbogus = 1\n", "unknown key"},
		{"[[export]\n", "bad.toml:"},
		{"[[export]]\nshelf = 70000\nslot = 0\nnetif = \"x\"\npath = \"y\"\n", "shelf 70000"},
	} {
		if err := os.WriteFile(bad, []byte(tc.text), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(bin, "serve", "-c", bad, "--check").CombinedOutput()
		if err == nil || !strings.Contains(string(out), tc.want) {
			t.Errorf("serve --check of %q: %v: %s (want %q)", tc.text, err, out, tc.want)
		}
	}
}
