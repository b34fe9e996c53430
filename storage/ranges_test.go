package storage

import (
	"context"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

// TestNoTornReads races writers of whole-pattern blocks against readers of
// the same bytes (straddling a stripe boundary): every read must return one
// pattern whole, never a mix, as a disk sector would.
func TestNoTornReads(t *testing.T) {
	const size = 1 << 20
	path := filepath.Join(t.TempDir(), "torn.img")
	writeFile(t, filepath.Dir(path), filepath.Base(path), make([]byte, size))
	f := mustOpen(t, path, Options{})
	defer f.Close()
	const off = 1<<stripeShift - 4096 // crosses into the next stripe
	const n = 8192
	ctx := context.Background()
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(b byte) {
			defer wg.Done()
			buf := make([]byte, n)
			for i := range buf {
				buf[i] = b
			}
			for i := 0; i < 3000; i++ {
				if err := f.WriteAt(ctx, buf, off); err != nil {
					t.Error(err)
					return
				}
			}
		}(byte(0xa0 + w))
	}
	var torn atomic.Int64
	for r := 0; r < 2; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, n)
			for i := 0; i < 3000; i++ {
				if err := f.ReadAt(ctx, buf, off); err != nil {
					t.Error(err)
					return
				}
				for _, c := range buf {
					if c != buf[0] {
						torn.Add(1)
						break
					}
				}
			}
		}()
	}
	wg.Wait()
	if n := torn.Load(); n != 0 {
		t.Fatalf("%d reads returned a mix of two writes", n)
	}
}

func TestRangeLockSpan(t *testing.T) {
	var r rangeLocks
	cases := []struct {
		off       int64
		n         int
		lo, hi    int
		wrap, all bool
	}{
		{0, 512, 0, 0, false, false},
		{1<<16 - 512, 1024, 0, 1, false, false},
		{255<<16 + 1<<16 - 512, 1024, 255, 0, true, false},
		{0, 256 << 16, 0, 255, false, true},
		{5 << 16, 0, 5, 5, false, false},
	}
	for _, c := range cases {
		lo, hi, wrap, all := r.span(c.off, c.n)
		if lo != c.lo || hi != c.hi || wrap != c.wrap || all != c.all {
			t.Errorf("span(%d, %d) = %d %d %v %v, want %d %d %v %v", c.off, c.n, lo, hi, wrap, all, c.lo, c.hi, c.wrap, c.all)
		}
		// Locking and unlocking must pair up (a leak would deadlock the
		// next write lock of the same stripes).
		r.lock(c.off, c.n, true)
		r.unlock(c.off, c.n, true)
		r.lock(c.off, c.n, false)
		r.unlock(c.off, c.n, false)
	}
}
