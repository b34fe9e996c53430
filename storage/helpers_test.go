package storage

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// diskDir returns a fresh directory on a disk-backed filesystem that accepts
// O_DIRECT, removed after the test. Tests of O_DIRECT and fdatasync mean
// little on tmpfs (no device behind it; before Linux 6.6 it even refuses
// O_DIRECT), so tmpfs and ramfs are passed over. It skips the test, saying
// why for every candidate, when no such directory exists.
func diskDir(tb testing.TB) string {
	tb.Helper()
	var why []string
	cands := []string{os.Getenv("STORAGE_TEST_DIR"), "/var/tmp", os.TempDir()}
	if home, err := os.UserHomeDir(); err == nil {
		cands = append(cands, home)
	}
	for _, c := range cands {
		if c == "" {
			continue
		}
		var st unix.Statfs_t
		if err := unix.Statfs(c, &st); err != nil {
			why = append(why, fmt.Sprintf("%s: statfs: %v", c, err))
			continue
		}
		if st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC {
			why = append(why, fmt.Sprintf("%s: tmpfs/ramfs (no device)", c))
			continue
		}
		dir, err := os.MkdirTemp(c, "storage-test-")
		if err != nil {
			why = append(why, fmt.Sprintf("%s: %v", c, err))
			continue
		}
		probe := filepath.Join(dir, "probe")
		fd, err := unix.Open(probe, unix.O_CREAT|unix.O_RDWR|unix.O_DIRECT, 0o600)
		if err != nil {
			os.RemoveAll(dir)
			why = append(why, fmt.Sprintf("%s: O_DIRECT open: %v", c, err))
			continue
		}
		unix.Close(fd)
		os.Remove(probe)
		tb.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}
	tb.Skipf("SKIPPING: no disk-backed directory with O_DIRECT support found: %s (set STORAGE_TEST_DIR)", strings.Join(why, "; "))
	return ""
}

// pattern returns n bytes that differ at every position and with seed.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7+i>>8) ^ seed
	}
	return b
}

// writeFile creates a file of the given contents in dir.
func writeFile(tb testing.TB, dir, name string, data []byte) string {
	tb.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		tb.Fatal(err)
	}
	return p
}

func mustOpen(tb testing.TB, path string, opt Options) *File {
	tb.Helper()
	f, err := Open(path, opt)
	if err != nil {
		tb.Fatalf("Open(%s, %+v): %v", path, opt, err)
	}
	tb.Cleanup(func() { f.Close() })
	return f
}

func mustEqual(tb testing.TB, what string, got, want []byte) {
	tb.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		tb.Fatalf("%s: contents differ at byte %d (len got %d, want %d)", what, i, len(got), len(want))
	}
}
