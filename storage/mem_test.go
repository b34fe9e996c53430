package storage

import (
	"errors"
	"sync"
	"testing"
)

func TestMem(t *testing.T) {
	m := NewMem(1<<20 + 100)
	if m.Size() != 1<<20 {
		t.Fatalf("Size() = %d, want rounded down to %d", m.Size(), 1<<20)
	}
	got := make([]byte, 4096)
	if err := m.ReadAt(bg, got, 0); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "fresh mem", got, make([]byte, 4096))

	// Across a lock-chunk boundary.
	w := pattern(3*memChunk, 3)
	if err := m.WriteAt(bg, w, memChunk-512); err != nil {
		t.Fatal(err)
	}
	r := make([]byte, len(w))
	if err := m.ReadAt(bg, r, memChunk-512); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "mem read back", r, w)

	for _, c := range []struct {
		n   int
		off int64
	}{{512, m.Size()}, {1024, m.Size() - 512}, {1, -1}} {
		b := make([]byte, c.n)
		if err := m.ReadAt(bg, b, c.off); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("read %d at %d: %v", c.n, c.off, err)
		}
		if err := m.WriteAt(bg, b, c.off); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("write %d at %d: %v", c.n, c.off, err)
		}
	}
	if err := m.Flush(bg); err != nil {
		t.Fatal(err)
	}
}

// TestMemConcurrent: writers of whole multi-chunk records and readers that
// check each record is never torn (run with -race).
func TestMemConcurrent(t *testing.T) {
	const rec = memChunk + 4096 // straddles chunk boundaries
	const recs = 8
	m := NewMem(rec * recs)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := make([]byte, rec)
			for i := range 200 {
				v := byte(w*50 + i%50)
				for j := range b {
					b[j] = v
				}
				if err := m.WriteAt(bg, b, int64((i%recs)*rec)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := make([]byte, rec)
			for i := range 200 {
				if err := m.ReadAt(bg, b, int64((i%recs)*rec)); err != nil {
					t.Error(err)
					return
				}
				for j := range b {
					if b[j] != b[0] {
						t.Errorf("torn read of record %d: byte %d is %d, byte 0 is %d", i%recs, j, b[j], b[0])
						return
					}
				}
			}
		}()
	}
	wg.Wait()
}

func TestZero(t *testing.T) {
	z := NewZero(10000)
	if z.Size() != 9728 {
		t.Fatalf("Size() = %d, want 9728", z.Size())
	}
	b := pattern(1024, 1)
	if err := z.WriteAt(bg, b, 512); err != nil {
		t.Fatal(err)
	}
	if err := z.ReadAt(bg, b, 512); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "zero read", b, make([]byte, 1024))
	if err := z.ReadAt(bg, b, 9728-512); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("read past end: %v", err)
	}
	if err := z.WriteAt(bg, b, -512); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("write before start: %v", err)
	}
	if err := z.Flush(bg); err != nil {
		t.Fatal(err)
	}
}

func BenchmarkMemReadParallel(b *testing.B) {
	m := NewMem(64 << 20)
	b.SetBytes(8192)
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 8192)
		off := int64(0)
		for pb.Next() {
			if err := m.ReadAt(bg, buf, off); err != nil {
				b.Error(err)
				return
			}
			off = (off + 8192*17) % (m.Size() - 8192)
			off -= off % 512
		}
	})
}
