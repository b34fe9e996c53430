package storage

import (
	"os"
	"sync"
	"sync/atomic"
	"testing"
)

// BenchmarkSyncWrite16 compares durable 4 KiB writes from 16 concurrent
// writers (as the engine issues them with bufcnt >= 16): group commit
// (Options.Sync) against a file opened O_SYNC written by the same 16 writers,
// and against O_SYNC with one writer, which is what the single-threaded C
// vblade -s does. ns/op is per write. Run it on a real disk:
//
//	go test -run=- -bench=SyncWrite ./storage/
func BenchmarkSyncWrite16(b *testing.B) {
	const (
		writers = 16
		bs      = 4096
		span    = 16 << 20 // preallocated, so no write allocates blocks
	)
	dir := diskDir(b)
	path := writeFile(b, dir, "bench.img", make([]byte, span))

	run := func(b *testing.B, writers int, write func(p []byte, off int64) error) {
		b.SetBytes(bs)
		var next atomic.Int64
		var wg sync.WaitGroup
		b.ResetTimer()
		for range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := AlignedBuffer(bs)
				for {
					i := next.Add(1) - 1
					if i >= int64(b.N) {
						return
					}
					if err := write(buf, i*bs%span); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
	}

	b.Run("group-commit", func(b *testing.B) {
		f, err := Open(path, Options{Sync: true})
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		var syncs atomic.Int64
		inner := f.group.sync
		f.group.sync = func() error { syncs.Add(1); return inner() }
		run(b, writers, func(p []byte, off int64) error { return f.WriteAt(bg, p, off) })
		b.ReportMetric(float64(b.N)/float64(max(syncs.Load(), 1)), "writes/fdatasync")
	})
	osync := func(writers int) func(b *testing.B) {
		return func(b *testing.B) {
			f, err := os.OpenFile(path, os.O_RDWR|os.O_SYNC, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			run(b, writers, func(p []byte, off int64) error { _, err := f.WriteAt(p, off); return err })
		}
	}
	b.Run("O_SYNC", osync(writers))
	b.Run("O_SYNC-1-writer", osync(1))
}
