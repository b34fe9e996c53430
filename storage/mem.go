package storage

import (
	"context"
	"sync"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// memChunk is the span of a Mem covered by one lock. Commands touching
// different chunks never share a lock word, so reads (and writes to different
// places) scale with the number of cores; a command takes the locks of the
// chunks it covers in ascending order, so it cannot deadlock with another.
const memChunk = 64 << 10

// Mem is a RAM-backed aoe.Disk for tests and benchmarks. A command is atomic
// with respect to other commands on the same bytes.
type Mem struct {
	data  []byte
	locks []sync.RWMutex // locks[i] guards data[i*memChunk : (i+1)*memChunk]
}

var _ aoe.Disk = (*Mem)(nil)

// NewMem returns a zero-filled memory disk of size bytes, rounded down to
// whole 512-byte sectors. It panics if size is negative.
func NewMem(size int64) *Mem {
	if size < 0 {
		panic("storage: NewMem: negative size")
	}
	size -= size % SectorSize
	return &Mem{
		data:  make([]byte, size),
		locks: make([]sync.RWMutex, (size+memChunk-1)/memChunk),
	}
}

// Size returns the size in bytes.
func (m *Mem) Size() int64 { return int64(len(m.data)) }

// ReadAt copies len(p) bytes at off into p.
func (m *Mem) ReadAt(_ context.Context, p []byte, off int64) error {
	if !inRange(p, off, m.Size()) {
		return rangeError("read", len(p), off, m.Size(), "memory disk")
	}
	if len(p) == 0 {
		return nil
	}
	first, last := off/memChunk, (off+int64(len(p))-1)/memChunk
	for i := first; i <= last; i++ {
		m.locks[i].RLock()
	}
	copy(p, m.data[off:])
	for i := first; i <= last; i++ {
		m.locks[i].RUnlock()
	}
	return nil
}

// WriteAt copies p to off.
func (m *Mem) WriteAt(_ context.Context, p []byte, off int64) error {
	if !inRange(p, off, m.Size()) {
		return rangeError("write", len(p), off, m.Size(), "memory disk")
	}
	if len(p) == 0 {
		return nil
	}
	first, last := off/memChunk, (off+int64(len(p))-1)/memChunk
	for i := first; i <= last; i++ {
		m.locks[i].Lock()
	}
	copy(m.data[off:], p)
	for i := first; i <= last; i++ {
		m.locks[i].Unlock()
	}
	return nil
}

// Flush does nothing: memory is as durable as it gets.
func (m *Mem) Flush(context.Context) error { return nil }

// Zero is the "echo" disk: reads return zeros, writes are discarded, nothing
// is stored. Benchmarks use it to measure the frame path alone, the upper
// bound any real store can reach.
type Zero struct {
	size int64
}

var _ aoe.Disk = (*Zero)(nil)

// NewZero returns a Zero disk of size bytes, rounded down to whole 512-byte
// sectors. It panics if size is negative.
func NewZero(size int64) *Zero {
	if size < 0 {
		panic("storage: NewZero: negative size")
	}
	return &Zero{size: size - size%SectorSize}
}

// Size returns the size in bytes.
func (z *Zero) Size() int64 { return z.size }

// ReadAt fills p with zeros.
func (z *Zero) ReadAt(_ context.Context, p []byte, off int64) error {
	if !inRange(p, off, z.size) {
		return rangeError("read", len(p), off, z.size, "zero disk")
	}
	clear(p)
	return nil
}

// WriteAt discards p.
func (z *Zero) WriteAt(_ context.Context, p []byte, off int64) error {
	if !inRange(p, off, z.size) {
		return rangeError("write", len(p), off, z.size, "zero disk")
	}
	return nil
}

// Flush does nothing.
func (z *Zero) Flush(context.Context) error { return nil }

func inRange(p []byte, off, size int64) bool {
	return off >= 0 && off <= size && int64(len(p)) <= size-off
}
