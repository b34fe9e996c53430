package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/vblade-ha/vblade-ha/aoe"
)

var bg = context.Background()

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	empty := writeFile(t, dir, "empty", nil)
	small := writeFile(t, dir, "small", make([]byte, 4096))
	tiny := writeFile(t, dir, "tiny", make([]byte, 511))
	missing := filepath.Join(dir, "missing")
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name string
		path string
		opt  Options
		want []string // substrings of the error
	}{
		{"missing", missing, Options{}, []string{"open " + missing, "no such file or directory"}},
		{"missing read-only", missing, Options{ReadOnly: true}, []string{missing, "no such file or directory"}},
		{"zero size", empty, Options{}, []string{empty, "empty (0 bytes)", "nothing to export"}},
		{"less than a sector", tiny, Options{}, []string{tiny, "smaller than one 512-byte sector"}},
		{"offset at end", small, Options{Offset: 4096}, []string{small, "offset 4096 too large for file size 4096"}},
		{"offset past end", small, Options{Offset: 10000}, []string{"offset 10000 too large for file size 4096"}},
		{"length past end", small, Options{Length: 4097}, []string{small, "length 4097 exceeds size of file", "4096 bytes after offset 0"}},
		{"length past end after offset", small, Options{Offset: 1024, Length: 3584}, []string{"length 3584 exceeds size of file (3072 bytes after offset 1024)"}},
		{"export below one sector", small, Options{Offset: 3700}, []string{"export of 396 bytes at offset 3700 is smaller than one 512-byte sector"}},
		{"negative offset", small, Options{Offset: -1}, []string{"negative offset"}},
		{"negative length", small, Options{Length: -1}, []string{"negative length"}},
		{"directory", dir, Options{ReadOnly: true}, []string{dir, "not a regular file or a block device"}},
		{"directory rw", dir, Options{}, []string{dir, "not a regular file or a block device"}},
		{"fifo", fifo, Options{ReadOnly: true}, []string{fifo, "not a regular file or a block device"}},
		{"char device", "/dev/null", Options{}, []string{"/dev/null", "not a regular file or a block device"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Open(tc.path, tc.opt)
			if err == nil {
				f.Close()
				t.Fatalf("Open succeeded, want error containing %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestOffsetLengthMapping(t *testing.T) {
	dir := t.TempDir()
	const fileSize = 64 << 10
	orig := pattern(fileSize, 0x5a)
	path := writeFile(t, dir, "img", orig)

	tests := []struct {
		name     string
		opt      Options
		wantSize int64
	}{
		{"whole file", Options{}, fileSize},
		{"offset", Options{Offset: 1024}, fileSize - 1024},
		{"unaligned offset rounds size down", Options{Offset: 100}, fileSize - 512},
		{"offset and length", Options{Offset: 4096, Length: 8192}, 8192},
		{"length rounds down", Options{Offset: 512, Length: 8192 + 300}, 8192},
		{"length to end", Options{Offset: 1024, Length: fileSize - 1024}, fileSize - 1024},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(path, orig, 0o600); err != nil {
				t.Fatal(err)
			}
			f := mustOpen(t, path, tc.opt)
			if f.Size() != tc.wantSize {
				t.Fatalf("Size() = %d, want %d", f.Size(), tc.wantSize)
			}
			if f.Offset() != tc.opt.Offset || f.Path() != path {
				t.Fatalf("Offset() = %d, Path() = %q", f.Offset(), f.Path())
			}
			// The whole export reads as the file from Offset.
			got := make([]byte, f.Size())
			if err := f.ReadAt(bg, got, 0); err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "export", got, orig[tc.opt.Offset:tc.opt.Offset+f.Size()])

			// A write at export offset 512 lands at file offset Offset+512
			// and nowhere else.
			w := pattern(1024, 0xc3)
			if err := f.WriteAt(bg, w, 512); err != nil {
				t.Fatal(err)
			}
			want := append([]byte(nil), orig...)
			copy(want[tc.opt.Offset+512:], w)
			disk, _ := os.ReadFile(path)
			mustEqual(t, "file after write", disk, want)

			// The last sector is reachable, the byte after it is not.
			last := make([]byte, 512)
			if err := f.ReadAt(bg, last, f.Size()-512); err != nil {
				t.Fatalf("read last sector: %v", err)
			}
			for _, r := range []struct {
				n   int
				off int64
			}{{512, f.Size()}, {1024, f.Size() - 512}, {512, -512}, {1, f.Size()}} {
				b := make([]byte, r.n)
				if err := f.ReadAt(bg, b, r.off); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("read %d at %d: err %v, want ErrOutOfRange", r.n, r.off, err)
				}
				if err := f.WriteAt(bg, b, r.off); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("write %d at %d: err %v, want ErrOutOfRange", r.n, r.off, err)
				}
			}
			disk, _ = os.ReadFile(path)
			mustEqual(t, "file after refused writes", disk, want)
		})
	}
}

func TestReadOnly(t *testing.T) {
	dir := t.TempDir()
	orig := pattern(8192, 1)
	path := writeFile(t, dir, "ro", orig)
	if err := os.Chmod(path, 0o400); err != nil {
		t.Fatal(err)
	}
	f := mustOpen(t, path, Options{ReadOnly: true})
	err := f.WriteAt(bg, make([]byte, 512), 0)
	if !errors.Is(err, aoe.ErrReadOnly) {
		t.Fatalf("WriteAt on read-only: %v, want aoe.ErrReadOnly", err)
	}
	if !strings.Contains(err.Error(), "write 512 bytes at 0 of "+path) {
		t.Errorf("error %q does not say what failed", err)
	}
	if err := f.Flush(bg); err != nil {
		t.Fatalf("Flush on read-only: %v", err)
	}
	got := make([]byte, 8192)
	if err := f.ReadAt(bg, got, 0); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "read-only read", got, orig)
}

func TestIOErrorsSayWhatFailed(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "img", make([]byte, 16384))

	f := mustOpen(t, path, Options{Offset: 4096})
	// Shrink the file under the open export: the read past the new end
	// must fail and say so, not return zeros or a short read.
	if err := os.Truncate(path, 8192); err != nil {
		t.Fatal(err)
	}
	err := f.ReadAt(bg, make([]byte, 1024), 6144)
	if err == nil {
		t.Fatal("read past the truncated end succeeded")
	}
	for _, w := range []string{"read 1024 bytes at 6144 (file offset 10240) of " + path, "truncated"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not contain %q", err, w)
		}
	}

	g, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	err = g.ReadAt(bg, make([]byte, 1024), 4096)
	if !errors.Is(err, os.ErrClosed) || !strings.Contains(err.Error(), "read 1024 bytes at 4096 of "+path) {
		t.Errorf("read after Close: %v", err)
	}
	if err := g.WriteAt(bg, make([]byte, 512), 0); !errors.Is(err, os.ErrClosed) {
		t.Errorf("write after Close: %v", err)
	}
	if err := g.Flush(bg); !errors.Is(err, os.ErrClosed) {
		t.Errorf("flush after Close: %v", err)
	}

	ctx, cancel := context.WithCancel(bg)
	cancel()
	h := mustOpen(t, path, Options{})
	if err := h.ReadAt(ctx, make([]byte, 512), 0); !errors.Is(err, context.Canceled) {
		t.Errorf("read with cancelled context: %v", err)
	}
}

func TestDirectUnsupported(t *testing.T) {
	// procfs has no direct I/O: open(O_DIRECT) fails with EINVAL, exactly
	// what tmpfs did before Linux 6.6.
	const p = "/proc/self/status"
	_, err := Open(p, Options{ReadOnly: true, Direct: true})
	if err == nil {
		t.Skipf("SKIPPING: %s accepted O_DIRECT on this kernel", p)
	}
	if want := "O_DIRECT not supported by the filesystem of " + p; !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not contain %q", err, want)
	}
}

// TestDirect exercises O_DIRECT with aligned buffers (straight to the
// kernel), buffers at odd addresses (bounced), and requests that cover
// blocks only in part (read-modify-write), against a shadow copy.
func TestDirect(t *testing.T) {
	dir := diskDir(t)
	t.Run("native alignment", func(t *testing.T) { testDirect(t, dir, 0) })
	// A 4Kn device (4096-byte logical sectors) makes every 512-byte
	// sector write a read-modify-write. 4096-aligned I/O is valid on any
	// device, so forcing that alignment runs the same paths everywhere.
	t.Run("forced 4096 alignment", func(t *testing.T) { testDirect(t, dir, 4096) })
}

func testDirect(t *testing.T, dir string, force int) {
	const fileSize = 1 << 20
	const off = 64 << 10
	shadow := pattern(fileSize, 9)
	path := writeFile(t, dir, "direct.img", shadow)
	f := mustOpen(t, path, Options{Direct: true, Offset: off})
	if force != 0 {
		f.dio.memAlign, f.dio.offAlign = uintptr(force), int64(force)
	}
	t.Logf("%s: O_DIRECT memory alignment %d, offset alignment %d", dir, f.dio.memAlign, f.dio.offAlign)
	exp := shadow[off:]

	check := func(what string) {
		t.Helper()
		got := AlignedBuffer(int(f.Size()))
		if err := f.ReadAt(bg, got, 0); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		mustEqual(t, what, got, exp[:f.Size()])
	}
	check("initial")

	blk := int(f.dio.offAlign)
	cases := []struct {
		name   string
		off    int64
		n      int
		misbuf int // buffer address misalignment
	}{
		{"aligned", 8192, 3 * blk, 0},
		{"unaligned buffer", 4 * int64(blk), 2 * blk, 1},
		{"unaligned offset", 1000, 2000, 0},
		{"unaligned both", 5*int64(blk) + 17, 100, 3},
		{"inside one block", 7*int64(blk) + 10, 20, 0},
		{"ends on boundary", 9*int64(blk) - 300, 300, 5},
		{"larger than bounce", 100, minBounce*2 + 1234, 7},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			buf := AlignedBuffer(tc.n + tc.misbuf)[tc.misbuf:]
			copy(buf, pattern(tc.n, byte(0x40+i)))
			if err := f.WriteAt(bg, buf, tc.off); err != nil {
				t.Fatal(err)
			}
			copy(exp[tc.off:], buf)
			rb := AlignedBuffer(tc.n + tc.misbuf)[tc.misbuf:]
			if err := f.ReadAt(bg, rb, tc.off); err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "read back", rb, buf)
			check("whole export")
		})
	}
	if err := f.Flush(bg); err != nil {
		t.Fatal(err)
	}
	disk, _ := os.ReadFile(path)
	mustEqual(t, "file through the page cache", disk[off:], exp)

	// Concurrent partial writes to the same block must not undo each
	// other (the read-modify-write lock).
	t.Run("concurrent partial writes", func(t *testing.T) {
		var wg sync.WaitGroup
		const pieces = 16
		base := int64(20 * blk)
		piece := blk / pieces
		for p := range pieces {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := pattern(piece, byte(0x90+p))
				for range 20 {
					if err := f.WriteAt(bg, b, base+int64(p*piece)); err != nil {
						t.Error(err)
						return
					}
				}
			}()
			copy(exp[base+int64(p*piece):], pattern(piece, byte(0x90+p)))
		}
		wg.Wait()
		check("after concurrent partial writes")
	})
}

// TestSyncGroupCommit writes from many goroutines to a Sync file and checks
// every byte, and that concurrent writers shared fdatasyncs.
func TestSyncGroupCommit(t *testing.T) {
	dir := diskDir(t)
	const (
		writers = 32
		each    = 40
		bs      = 4096
	)
	path := writeFile(t, dir, "sync.img", make([]byte, writers*each*bs))
	f := mustOpen(t, path, Options{Sync: true})
	var mu sync.Mutex
	syncs := 0
	inner := f.group.sync
	f.group.sync = func() error {
		mu.Lock()
		syncs++
		mu.Unlock()
		return inner()
	}

	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				blk := int64(i*writers + w)
				if err := f.WriteAt(bg, pattern(bs, byte(blk)), blk*bs); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := f.Flush(bg); err != nil {
		t.Fatal(err)
	}
	disk, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for blk := range int64(writers * each) {
		mustEqual(t, fmt.Sprintf("block %d", blk), disk[blk*bs:(blk+1)*bs], pattern(bs, byte(blk)))
	}
	t.Logf("%d Sync writes from %d goroutines used %d fdatasyncs", writers*each, writers, syncs)
	if syncs >= writers*each {
		t.Errorf("no grouping: %d fdatasyncs for %d concurrent writes", syncs, writers*each)
	}
}

// TestAllocs: the hot path allocates nothing when buffers are aligned.
func TestAllocs(t *testing.T) {
	dir := diskDir(t)
	path := writeFile(t, dir, "alloc.img", make([]byte, 1<<20))
	buf := AlignedBuffer(8192)
	disks := []struct {
		name string
		d    aoe.Disk
	}{
		{"File", mustOpen(t, path, Options{})},
		{"File Sync", mustOpen(t, path, Options{Sync: true})},
		{"File Direct", mustOpen(t, path, Options{Direct: true})},
		{"File Direct Sync", mustOpen(t, path, Options{Direct: true, Sync: true})},
		{"Mem", NewMem(1 << 20)},
		{"Zero", NewZero(1 << 20)},
	}
	for _, tc := range disks {
		t.Run(tc.name, func(t *testing.T) {
			if n := testing.AllocsPerRun(50, func() {
				if err := tc.d.ReadAt(bg, buf, 65536); err != nil {
					t.Fatal(err)
				}
			}); n != 0 {
				t.Errorf("ReadAt: %v allocations per call", n)
			}
			if n := testing.AllocsPerRun(50, func() {
				if err := tc.d.WriteAt(bg, buf, 65536); err != nil {
					t.Fatal(err)
				}
			}); n != 0 {
				t.Errorf("WriteAt: %v allocations per call", n)
			}
			if n := testing.AllocsPerRun(20, func() {
				if err := tc.d.Flush(bg); err != nil {
					t.Fatal(err)
				}
			}); n != 0 {
				t.Errorf("Flush: %v allocations per call", n)
			}
		})
	}
}

func TestAlignedBuffer(t *testing.T) {
	for _, n := range []int{0, 1, 512, 4096, 100000} {
		b := AlignedBuffer(n)
		if len(b) != n || cap(b) != n {
			t.Errorf("AlignedBuffer(%d): len %d cap %d", n, len(b), cap(b))
		}
		if n > 0 && !(&directIO{memAlign: 4096, offAlign: 1}).aligned(b, 0) {
			t.Errorf("AlignedBuffer(%d) is not 4096-aligned", n)
		}
	}
}

// recordingIO is a fileIO over a byte slice that records every write's
// offset and length.
type recordingIO struct {
	data   []byte
	writes [][2]int64
	failAt int64 // a write starting here fails; -1: none
}

func (r *recordingIO) ReadAt(p []byte, off int64) (int, error) { return copy(p, r.data[off:]), nil }

func (r *recordingIO) WriteAt(p []byte, off int64) (int, error) {
	if off == r.failAt {
		return 0, errors.New("injected")
	}
	r.writes = append(r.writes, [2]int64{off, int64(len(p))})
	return copy(r.data[off:], p), nil
}

// A buffered write larger than maxPiece reaches the kernel as consecutive
// writes of at most maxPiece (the page cache makes each one folio; see
// maxPiece), with the data in place; a failing piece stops it with the error.
func TestWritePieces(t *testing.T) {
	const off = 512
	for _, n := range []int{1024, maxPiece, maxPiece + 512, 3*maxPiece + 4096} {
		r := &recordingIO{data: make([]byte, off+n), failAt: -1}
		p := bytes.Repeat([]byte{0xa5, 0x5a, 0x01}, n/3+1)[:n]
		if err := writePieces(r, p, off); err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if !bytes.Equal(r.data[off:], p) {
			t.Fatalf("%d bytes: data differs after the write", n)
		}
		want := (n + maxPiece - 1) / maxPiece
		if len(r.writes) != want {
			t.Fatalf("%d bytes: %d writes %v, want %d", n, len(r.writes), r.writes, want)
		}
		next := int64(off)
		for _, w := range r.writes {
			if w[0] != next || w[1] > maxPiece || w[1] <= 0 {
				t.Fatalf("%d bytes: writes %v are not consecutive pieces of at most %d", n, r.writes, maxPiece)
			}
			next += w[1]
		}
	}
	r := &recordingIO{data: make([]byte, off+3*maxPiece), failAt: off + maxPiece}
	if err := writePieces(r, make([]byte, 3*maxPiece), off); err == nil {
		t.Fatal("a failing piece: no error")
	}
	if len(r.writes) != 1 {
		t.Fatalf("writes after the failing piece: %v", r.writes)
	}
}
