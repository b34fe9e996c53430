package storage

import (
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// needURing skips the test where the kernel refuses io_uring (seccomp,
// kernel.io_uring_disabled): File then uses pread, which the other tests
// cover.
func needURing(tb testing.TB, f *File) {
	tb.Helper()
	if f.IOPath() != "io_uring" {
		tb.Skip("SKIPPING: io_uring unavailable here; File uses pread")
	}
}

func TestURingIOPath(t *testing.T) {
	path := writeFile(t, t.TempDir(), "img", make([]byte, 1<<16))
	if f := mustOpen(t, path, Options{}); f.IOPath() != "pread" {
		t.Errorf("default: IOPath %q", f.IOPath())
	}
	f := mustOpen(t, path, Options{URing: true})
	t.Logf("URing IOPath: %s", f.IOPath())
}

// TestURingConcurrent hammers one file from many goroutines with reads and
// writes of varied sizes and alignments (each goroutine owns a region, so
// the expected contents are known), buffered and O_DIRECT.
func TestURingConcurrent(t *testing.T) {
	run := func(t *testing.T, dir string, opt Options) {
		const (
			workers = 24
			region  = 64 << 10
			iters   = 300
		)
		path := writeFile(t, dir, "c.img", make([]byte, workers*region))
		f := mustOpen(t, path, opt)
		needURing(t, f)
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(w), 1))
				shadow := make([]byte, region)
				base := int64(w * region)
				for i := range iters {
					n := 512 * (1 + rng.IntN(16))
					off := int64(512 * rng.IntN((region-n)/512+1))
					if rng.IntN(4) == 0 { // unaligned: bounce path with Direct
						n -= rng.IntN(300)
						off += int64(rng.IntN(100))
					}
					if i%2 == 0 {
						b := pattern(n, byte(i+w))
						if err := f.WriteAt(bg, b, base+off); err != nil {
							t.Error(err)
							return
						}
						copy(shadow[off:], b)
					}
					b := AlignedBuffer(n)
					if err := f.ReadAt(bg, b, base+off); err != nil {
						t.Error(err)
						return
					}
					mustEqual(t, "read back", b, shadow[off:off+int64(n)])
				}
			}()
		}
		wg.Wait()
	}
	t.Run("buffered", func(t *testing.T) { run(t, diskDir(t), Options{URing: true}) })
	t.Run("direct", func(t *testing.T) { run(t, diskDir(t), Options{Direct: true, URing: true}) })
	t.Run("sync", func(t *testing.T) { run(t, diskDir(t), Options{Sync: true, URing: true}) })
}

// TestURingCloseInFlight closes the file while readers and writers are busy:
// every call either succeeds or fails with os.ErrClosed, Close returns after
// the ring is released, and the reaper goroutine is gone.
func TestURingCloseInFlight(t *testing.T) {
	for _, opt := range []Options{{URing: true}, {Direct: true, URing: true}} {
		dir := diskDir(t)
		if opt.Direct {
			dir = diskDir(t)
		}
		path := writeFile(t, dir, "img", make([]byte, 1<<20))
		f, err := Open(path, opt)
		if err != nil {
			t.Fatal(err)
		}
		needURing(t, f)
		var wg sync.WaitGroup
		var ok, closed atomic.Int64
		start := make(chan struct{})
		for w := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := AlignedBuffer(4096)
				<-start
				for i := 0; ; i++ {
					var err error
					if (i+w)%3 == 0 {
						err = f.WriteAt(bg, b, int64(i%256)*4096)
					} else {
						err = f.ReadAt(bg, b, int64(i%256)*4096)
					}
					switch {
					case err == nil:
						ok.Add(1)
					case errors.Is(err, os.ErrClosed):
						closed.Add(1)
						return
					default:
						t.Error(err)
						return
					}
				}
			}()
		}
		close(start)
		for ok.Load() < 500 {
			runtime.Gosched()
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-f.ring.gone:
		default:
			t.Fatal("Close returned before the ring was released")
		}
		wg.Wait()
		if closed.Load() != 16 {
			t.Errorf("%d of 16 workers saw os.ErrClosed", closed.Load())
		}
		if f.ring.fd != -1 {
			t.Errorf("ring descriptor %d still open", f.ring.fd)
		}
		t.Logf("%+v: %d ops before Close", opt, ok.Load())
	}
}

// TestURingIdleClose: Close with nothing in flight, and with the reaper
// possibly asleep in the kernel after the last completion.
func TestURingIdleClose(t *testing.T) {
	path := writeFile(t, diskDir(t), "img", make([]byte, 1<<16))
	for range 20 {
		f, err := Open(path, Options{Direct: true, URing: true})
		if err != nil {
			t.Fatal(err)
		}
		needURing(t, f)
		b := AlignedBuffer(4096)
		if err := f.ReadAt(bg, b, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		if err := f.ReadAt(bg, b, 0); !errors.Is(err, os.ErrClosed) {
			t.Fatalf("read after Close: %v", err)
		}
	}
}

// BenchmarkReadAt1K: 1 KiB reads at random sector offsets from 16 goroutines,
// io_uring against pread, from tmpfs (page cache hits) and O_DIRECT from a
// file on disk (whole O_DIRECT blocks there). ns/op is per read.
//
//	go test -run=- -bench=ReadAt1K -benchtime=2s ./storage/
func BenchmarkReadAt1K(b *testing.B) {
	const span = 64 << 20
	shm := "/dev/shm"
	var st unix.Statfs_t
	if unix.Statfs(shm, &st) != nil || st.Type != unix.TMPFS_MAGIC {
		shm = ""
	}
	for _, c := range []struct {
		name   string
		dir    func(b *testing.B) string
		direct bool
	}{
		{"tmpfs", func(b *testing.B) string {
			if shm == "" {
				b.Skip("no tmpfs at /dev/shm")
			}
			d, err := os.MkdirTemp(shm, "storage-bench-")
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { os.RemoveAll(d) })
			return d
		}, false},
		{"direct", func(b *testing.B) string { return diskDir(b) }, true},
	} {
		for _, noURing := range []bool{false, true} {
			name := c.name + "/io_uring"
			if noURing {
				name = c.name + "/pread"
			}
			b.Run(name, func(b *testing.B) {
				path := filepath.Join(c.dir(b), "r.img")
				if err := os.WriteFile(path, pattern(span, 1), 0o600); err != nil {
					b.Fatal(err)
				}
				f := mustOpen(b, path, Options{Direct: c.direct, URing: !noURing})
				if !noURing {
					needURing(b, f)
				}
				bs := 1024
				if c.direct {
					bs = int(f.dio.offAlign) // O_DIRECT reads whole blocks
				}
				b.SetBytes(int64(bs))
				var next atomic.Int64
				var wg sync.WaitGroup
				b.ResetTimer()
				for w := range 16 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						buf := AlignedBuffer(bs)
						rng := rand.New(rand.NewPCG(uint64(w), 2))
						for next.Add(1) <= int64(b.N) {
							off := int64(rng.IntN(span/bs)) * int64(bs)
							if err := f.ReadAt(bg, buf, off); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
			})
		}
	}
}

// TestURingAllocs: the io_uring path allocates nothing per call either.
func TestURingAllocs(t *testing.T) {
	path := writeFile(t, diskDir(t), "alloc.img", make([]byte, 1<<20))
	buf := AlignedBuffer(8192)
	for _, opt := range []Options{{URing: true}, {URing: true, Sync: true}, {URing: true, Direct: true}} {
		f := mustOpen(t, path, opt)
		needURing(t, f)
		if n := testing.AllocsPerRun(50, func() {
			if err := f.ReadAt(bg, buf, 65536); err != nil {
				t.Fatal(err)
			}
		}); n != 0 {
			t.Errorf("%+v ReadAt: %v allocations per call", opt, n)
		}
		if n := testing.AllocsPerRun(50, func() {
			if err := f.WriteAt(bg, buf, 65536); err != nil {
				t.Fatal(err)
			}
		}); n != 0 {
			t.Errorf("%+v WriteAt: %v allocations per call", opt, n)
		}
	}
}
