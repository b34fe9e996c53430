package storage

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// pageSize is the alignment AlignedBuffer gives. It satisfies every O_DIRECT
// memory alignment Linux asks for on the devices we care about, and it is what
// the C vblade uses for its buffers.
const pageSize = 4096

// minBounce is the smallest bounce buffer; large unaligned requests are copied
// through it in pieces. 128 KiB holds the largest AoE request (a 9000-byte
// jumbo frame carries 17 sectors) many times over.
const minBounce = 128 << 10

// AlignedBuffer returns n bytes whose first byte is 4096-aligned, for O_DIRECT
// callers that want the zero-copy path of File.
func AlignedBuffer(n int) []byte { return alignedBuffer(n, pageSize) }

// alignedBuffer over-allocates and slices at the first aligned address. The
// Go heap does not move objects, so the alignment holds for the buffer's life.
func alignedBuffer(n, align int) []byte {
	if n < 0 {
		panic("storage: AlignedBuffer: negative size")
	}
	b := make([]byte, n+align)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(unsafe.SliceData(b))) % uintptr(align)); r != 0 {
		skip = align - r
	}
	return b[skip : skip+n : skip+n]
}

// directIO is the O_DIRECT side of a File. Requests whose buffer address,
// file offset and length meet the device's alignment go straight to the
// kernel; the rest are copied through a pooled aligned bounce buffer.
type directIO struct {
	memAlign uintptr // required alignment of the buffer address
	offAlign int64   // required alignment of file offset and length
	bounce   int     // bounce buffer size, a multiple of offAlign
	pool     sync.Pool

	// rmw orders writes that cover only part of an offAlign block (and so
	// must read the block, patch it and write it back) against every other
	// write: a concurrent write to the same block between the read and the
	// write-back would otherwise be undone. Whole-block writes share it;
	// reads never take it. With 512-byte alignment and sector-sized engine
	// requests the exclusive side is never used.
	rmw sync.RWMutex
}

// newDirectIO learns the O_DIRECT alignment of f: statx STATX_DIOALIGN where
// the kernel reports it (6.1+), the logical sector size (BLKSSZGET) for a
// block device otherwise, and 4096 (safe everywhere) as the last resort.
func (f *File) newDirectIO(isBlock bool) (*directIO, error) {
	mem, off := 0, 0
	err := f.control(func(fd int) error {
		var stx unix.Statx_t
		if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx); err == nil &&
			stx.Mask&unix.STATX_DIOALIGN != 0 {
			if stx.Dio_offset_align == 0 {
				return errDIOUnsupported
			}
			mem, off = int(stx.Dio_mem_align), int(stx.Dio_offset_align)
			return nil
		}
		if isBlock {
			ssz, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
			if err != nil {
				return fmt.Errorf("get logical sector size (BLKSSZGET): %w", err)
			}
			mem, off = ssz, ssz
			return nil
		}
		mem, off = pageSize, pageSize
		return nil
	})
	if errors.Is(err, errDIOUnsupported) {
		return nil, directUnsupported(f.path, errDIOUnsupported)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.path, err)
	}
	if mem < 1 || mem&(mem-1) != 0 || off < 1 || off&(off-1) != 0 {
		return nil, fmt.Errorf("%s: unusable O_DIRECT alignment (memory %d, offset %d)", f.path, mem, off)
	}
	d := &directIO{memAlign: uintptr(mem), offAlign: int64(off)}
	d.bounce = max(minBounce, 2*off)
	bufAlign := max(mem, pageSize)
	d.pool.New = func() any {
		b := alignedBuffer(d.bounce, bufAlign)
		return &b
	}
	return d, nil
}

var errDIOUnsupported = errors.New("statx reports no direct I/O support")

// probe reads the first block of the export: some filesystems accept
// O_DIRECT at open and refuse it (EINVAL) on the first transfer.
func (d *directIO) probe(fh *os.File, path string, off int64) error {
	bp := d.pool.Get().(*[]byte)
	defer d.pool.Put(bp)
	if _, err := fh.ReadAt((*bp)[:d.offAlign], off); err != nil {
		if errors.Is(err, unix.EINVAL) {
			return directUnsupported(path, err)
		}
		return fmt.Errorf("%s: O_DIRECT test read at %d: %w", path, off, unwrapPath(err))
	}
	return nil
}

// aligned reports whether p at file offset off can be handed to the kernel
// as is. Pointer arithmetic, no allocation.
func (d *directIO) aligned(p []byte, off int64) bool {
	return uintptr(unsafe.Pointer(unsafe.SliceData(p)))%d.memAlign == 0 &&
		off%d.offAlign == 0 && int64(len(p))%d.offAlign == 0
}

// span returns, for the piece of a request starting at file offset off with
// rest bytes left, the aligned file range [start, end) the bounce buffer
// covers, the piece's position head inside it and its length n.
func (d *directIO) span(off int64, rest int) (start, end int64, head, n int) {
	start = off - off%d.offAlign
	head = int(off - start)
	n = min(rest, d.bounce-head)
	end = off + int64(n)
	if r := end % d.offAlign; r != 0 {
		end += d.offAlign - r
	}
	return start, end, head, n
}

func (d *directIO) readAt(fh fileIO, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if d.aligned(p, off) {
		_, err := fh.ReadAt(p, off)
		return err
	}
	bp := d.pool.Get().(*[]byte)
	defer d.pool.Put(bp)
	for len(p) > 0 {
		start, end, head, n := d.span(off, len(p))
		buf := (*bp)[:end-start]
		if _, err := fh.ReadAt(buf, start); err != nil {
			return err
		}
		copy(p[:n], buf[head:])
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func (d *directIO) writeAt(fh fileIO, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if d.aligned(p, off) {
		d.rmw.RLock()
		_, err := fh.WriteAt(p, off)
		d.rmw.RUnlock()
		return err
	}
	partial := off%d.offAlign != 0 || (off+int64(len(p)))%d.offAlign != 0
	if partial {
		d.rmw.Lock()
		defer d.rmw.Unlock()
	} else {
		d.rmw.RLock()
		defer d.rmw.RUnlock()
	}
	bp := d.pool.Get().(*[]byte)
	defer d.pool.Put(bp)
	blk := int(d.offAlign)
	for len(p) > 0 {
		start, end, head, n := d.span(off, len(p))
		buf := (*bp)[:end-start]
		// Read back the blocks the piece covers only in part. Open made
		// the export offset and size multiples of offAlign, so these
		// blocks lie inside the export.
		if head != 0 {
			if _, err := fh.ReadAt(buf[:blk], start); err != nil {
				return err
			}
		}
		if tail := head + n; tail%blk != 0 && (head == 0 || len(buf) > blk) {
			if _, err := fh.ReadAt(buf[len(buf)-blk:], end-int64(blk)); err != nil {
				return err
			}
		}
		copy(buf[head:], p[:n])
		if _, err := fh.WriteAt(buf, start); err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}
