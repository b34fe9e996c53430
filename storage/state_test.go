package storage

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vblade-ha/vblade-ha/aoe"
)

func mac(b byte) aoe.MAC { return aoe.MAC{0x02, 0, 0, 0, 0, b} }

func TestStateDirRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "sub")
	d, err := OpenStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("state dir: %v, mode %v, want 0700", err, fi.Mode())
	}
	if _, ok, err := d.Load(1, 0); ok || err != nil {
		t.Fatalf("Load of nothing: ok %v err %v", ok, err)
	}

	states := []aoe.TargetState{
		{},
		{Config: []byte("hello config")},
		{Config: []byte{0, 0xff, '\n', '"'}, Masks: []aoe.MAC{mac(1), mac(2)}, Reservations: []aoe.MAC{mac(3)}},
		{Config: bytes.Repeat([]byte("x"), aoe.MaxConfigLen), Masks: make([]aoe.MAC, aoe.MaxMasks), Reservations: make([]aoe.MAC, aoe.MaxReservations)},
	}
	for i, s := range states {
		if err := d.Commit(context.Background(), 1, 0, s); err != nil {
			t.Fatalf("state %d: Commit: %v", i, err)
		}
		got, ok, err := d.Load(1, 0)
		if err != nil || !ok {
			t.Fatalf("state %d: Load: ok %v err %v", i, ok, err)
		}
		if !got.Equal(s) {
			t.Fatalf("state %d: loaded %+v, saved %+v", i, got, s)
		}
	}
	// Other targets are separate files; a reopened directory sees them.
	other := aoe.TargetState{Config: []byte("other")}
	if err := d.Commit(context.Background(), 65534, 254, other); err != nil {
		t.Fatal(err)
	}
	d2, err := OpenStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok, err := d2.Load(65534, 254); !ok || err != nil || !got.Equal(other) {
		t.Fatalf("reopened Load: %+v %v %v", got, ok, err)
	}
	if got, ok, err := d2.Load(1, 0); !ok || err != nil || !got.Equal(states[len(states)-1]) {
		t.Fatalf("reopened Load e1.0: ok %v err %v", ok, err)
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
		fi, _ := e.Info()
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", e.Name(), fi.Mode())
		}
	}
	if strings.Join(names, " ") != "e1.0.state e65534.254.state" {
		t.Errorf("state dir holds %v, want exactly e1.0.state and e65534.254.state (no temp files)", names)
	}

	big := aoe.TargetState{Masks: make([]aoe.MAC, aoe.MaxMasks+1)}
	if err := d.Commit(context.Background(), 1, 0, big); err == nil {
		t.Error("Commit of too many masks succeeded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := d.Commit(ctx, 1, 0, other); !errors.Is(err, context.Canceled) {
		t.Errorf("Commit with cancelled context: %v", err)
	}
}

func TestOpenStateDirNotADir(t *testing.T) {
	p := writeFile(t, t.TempDir(), "file", []byte("x"))
	if _, err := OpenStateDir(p); err == nil || !strings.Contains(err.Error(), p) {
		t.Fatalf("OpenStateDir on a file: %v", err)
	}
}

func TestStateCorrupt(t *testing.T) {
	dir := t.TempDir()
	d, err := OpenStateDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	good := aoe.TargetState{Config: []byte("cfg"), Masks: []aoe.MAC{mac(1)}, Reservations: []aoe.MAC{mac(2)}}
	if err := d.Commit(context.Background(), 3, 7, good); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "e3.7.state")
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("state file:\n%s", orig)

	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "file is empty"},
		{"truncated", orig[:len(orig)/2], "not valid JSON"},
		{"garbage", []byte("\x00\x01binary"), "not valid JSON"},
		{"mask altered", bytes.Replace(orig, []byte("02:00:00:00:00:01"), []byte("02:00:00:00:00:09"), 1), "checksum mismatch"},
		{"config altered", bytes.Replace(orig, []byte(`"Y2Zn"`), []byte(`"Y2Zo"`), 1), "checksum mismatch"},
		{"version", bytes.Replace(orig, []byte(`"version": 1`), []byte(`"version": 2`), 1), "format version 2"},
		{"trailing", append(append([]byte(nil), orig...), "{}"...), "trailing data"},
		{"unknown field", bytes.Replace(orig, []byte(`"version": 1`), []byte(`"version": 1, "extra": 1`), 1), "unknown field"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if bytes.Equal(tc.data, orig) {
				t.Fatal("test data equals the original file; the replacement did not apply")
			}
			if err := os.WriteFile(path, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			_, ok, err := d.Load(3, 7)
			if err == nil || ok {
				t.Fatalf("Load of corrupt file: ok %v err %v", ok, err)
			}
			for _, w := range []string{"state file " + path + " is corrupt", tc.want, "remove it"} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}

	// A file copied from another target is refused, not silently used.
	if err := os.WriteFile(filepath.Join(dir, "e3.8.state"), orig, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := d.Load(3, 8); err == nil || !strings.Contains(err.Error(), `state of "e3.7", not e3.8`) {
		t.Errorf("Load of another target's file: %v", err)
	}
}
