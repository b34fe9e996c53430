package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// SectorSize is the AoE/ATA sector size. Exported sizes are whole sectors.
const SectorSize = 512

// ErrOutOfRange is wrapped by the errors of reads and writes that fall outside
// [0, Size()). The engine checks ranges before it calls a Disk (and answers
// IDNF); this is a second line of defence against writing past the export
// into whatever follows it in the file or device.
var ErrOutOfRange = errors.New("outside the exported range")

// Options say how Open exports a file or block device.
type Options struct {
	Offset   int64 // bytes skipped at the start of the file (vblade -o is in 512-byte sectors; the CLI converts)
	Length   int64 // bytes exported; 0 = to the end of the file
	ReadOnly bool  // open O_RDONLY; WriteAt returns an error wrapping aoe.ErrReadOnly
	Direct   bool  // O_DIRECT: bypass the page cache (unaligned requests go through aligned bounce buffers)
	Sync     bool  // writes are durable before WriteAt returns (group commit, see the package comment)
	// URing does reads and writes through an io_uring where the kernel
	// allows one (else pread/pwrite; File.IOPath says which). Opt-in:
	// it wins clearly with Direct but not for page-cache reads; see the
	// measurements in uring.go.
	URing bool
}

// File is a regular file or block device exported as an aoe.Disk.
//
// I/O goes through an io_uring (uring.go) where the kernel allows it, else
// through os.File.ReadAt/WriteAt, which are pread/pwrite loops that retry
// short transfers. Neither uses a raw saved descriptor number: os.File
// reference-counts the descriptor and the ring holds its own reference to
// the open file (a registered file), so a Close that races with in-flight
// commands cannot let the number be reused by another open and a late
// pwrite land in an unrelated file.
type File struct {
	file *os.File
	raw  syscall.RawConn // for fdatasync and ioctls on the live descriptor
	path string
	off  int64 // byte offset of the export inside the file
	size int64 // exported bytes, a multiple of SectorSize
	ro   bool
	sync bool

	dio *directIO // nil unless opened with Options.Direct

	// io does the reads and writes: the io_uring (see uring.go) when the
	// kernel allows one, else file itself (pread/pwrite).
	io   fileIO
	ring *uring // nil on the pread path

	group syncGroup
	// syncFd and syncErr exist so that fdatasync needs no allocation: the
	// closure is built once in Open. Only the group-commit leader calls it
	// and the group runs one fdatasync at a time, so syncErr needs no lock.
	syncFd  func(fd uintptr)
	syncErr error

	closed atomic.Bool // set by Close, to name the error of a late fdatasync

	ranges rangeLocks // overlapping reads and writes exclude each other
}

var _ aoe.Disk = (*File)(nil)

// Open opens path (a regular file or a block device) and exports the part
// described by opt. The exported size is rounded down to whole 512-byte
// sectors (to the O_DIRECT alignment with opt.Direct).
func Open(path string, opt Options) (*File, error) {
	if opt.Offset < 0 {
		return nil, fmt.Errorf("%s: negative offset %d", path, opt.Offset)
	}
	if opt.Length < 0 {
		return nil, fmt.Errorf("%s: negative length %d", path, opt.Length)
	}
	// Look before opening: open itself has side effects on some special
	// files (a FIFO opened read-only blocks, a tape device rewinds). The
	// fstat after open is the authoritative check.
	if fi, err := os.Stat(path); err == nil && !fi.Mode().IsRegular() && !isBlockDevice(fi.Mode()) {
		return nil, notExportable(path, fi.Mode())
	}
	flags := os.O_RDWR
	if opt.ReadOnly {
		flags = os.O_RDONLY
	}
	if opt.Direct {
		flags |= unix.O_DIRECT
	}
	fh, err := os.OpenFile(path, flags, 0)
	if err != nil {
		// Linux refuses O_DIRECT at open time with EINVAL on filesystems
		// without direct I/O (procfs, FUSE without direct_io, tmpfs before
		// 6.6). A bare "invalid argument" would not tell the operator why.
		if opt.Direct && errors.Is(err, unix.EINVAL) {
			return nil, directUnsupported(path, err)
		}
		return nil, fmt.Errorf("open %s: %w", path, unwrapPath(err))
	}
	f := &File{file: fh, path: path, off: opt.Offset, ro: opt.ReadOnly, sync: opt.Sync}
	if err := f.init(opt); err != nil {
		fh.Close()
		return nil, err
	}
	return f, nil
}

func (f *File) init(opt Options) error {
	raw, err := f.file.SyscallConn()
	if err != nil {
		return fmt.Errorf("open %s: %w", f.path, err)
	}
	f.raw = raw
	f.syncFd = func(fd uintptr) {
		for {
			f.syncErr = unix.Fdatasync(int(fd))
			if f.syncErr != unix.EINTR {
				return
			}
		}
	}
	f.group.sync = f.fdatasync

	fi, err := f.file.Stat()
	if err != nil {
		return fmt.Errorf("stat %s: %w", f.path, unwrapPath(err))
	}
	var total int64
	mode := fi.Mode()
	isBlock := isBlockDevice(mode)
	switch {
	case mode.IsRegular():
		total = fi.Size()
	case isBlock:
		var n uint64
		err := f.control(func(fd int) (err error) {
			n, err = unix.IoctlGetUint64(fd, unix.BLKGETSIZE64)
			return err
		})
		if err != nil {
			return fmt.Errorf("%s: get block device size (BLKGETSIZE64): %w", f.path, err)
		}
		total = int64(n)
	default:
		return notExportable(f.path, mode)
	}

	unit := int64(SectorSize)
	if opt.Direct {
		d, err := f.newDirectIO(isBlock)
		if err != nil {
			return err
		}
		f.dio = d
		unit = max(unit, d.offAlign)
		if opt.Offset%d.offAlign != 0 {
			return fmt.Errorf("%s: offset %d is not a multiple of %d bytes, the O_DIRECT alignment of the file's device; use an aligned offset or do not use direct I/O",
				f.path, opt.Offset, d.offAlign)
		}
	}

	// Messages follow vblade 25 ("Offset N too large for file size",
	// "Length N too big - exceeds size of file!") but in bytes and with the
	// numbers the operator needs to pick a valid value.
	if total == 0 {
		return fmt.Errorf("%s is empty (0 bytes): nothing to export", f.path)
	}
	if opt.Offset >= total {
		return fmt.Errorf("%s: offset %d too large for file size %d", f.path, opt.Offset, total)
	}
	size := total - opt.Offset
	if opt.Length > 0 {
		if opt.Length > size {
			return fmt.Errorf("%s: length %d exceeds size of file (%d bytes after offset %d)",
				f.path, opt.Length, size, opt.Offset)
		}
		size = opt.Length
	}
	f.size = size - size%unit
	if f.size == 0 {
		return fmt.Errorf("%s: export of %d bytes at offset %d is smaller than one %d-byte sector: nothing to export",
			f.path, size, opt.Offset, unit)
	}

	if f.dio != nil {
		if err := f.dio.probe(f.file, f.path, f.off); err != nil {
			return err
		}
	}

	f.io = f.file
	if opt.URing {
		// Any failure (ENOSYS, EPERM from kernel.io_uring_disabled or a
		// seccomp filter, an old kernel) means the pread path; IOPath
		// tells the daemon which one it got.
		//
		// Buffered files are probed: where the filesystem cannot read
		// the page cache without blocking, io_uring hands every read to
		// a kernel worker thread, which costs more than pread. The
		// probe block is read with pread first so that it is cached.
		// O_DIRECT reads go to the device anyway and gain either way.
		var probe []byte
		if f.dio == nil {
			probe = make([]byte, SectorSize)
			if _, err := f.file.ReadAt(probe, f.off); err != nil {
				probe = nil // let the first real read report it
			}
		}
		var ring *uring
		if (f.dio != nil || probe != nil) &&
			f.control(func(fd int) (err error) { ring, err = newURing(fd, probe, f.off); return err }) == nil {
			f.ring, f.io = ring, ring
		}
	}
	return nil
}

// fileIO is what File needs for data transfer: *os.File or *uring, both with
// os.File's ReadAt/WriteAt contract (full length or an error).
type fileIO interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
}

// IOPath says how reads and writes reach the kernel: "io_uring" or "pread"
// (pread/pwrite: Options.URing unset, io_uring unavailable, or a filesystem
// whose cached reads io_uring cannot do inline)
func (f *File) IOPath() string {
	if f.ring != nil {
		return "io_uring"
	}
	return "pread"
}

func isBlockDevice(m fs.FileMode) bool {
	return m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0
}

func notExportable(path string, m fs.FileMode) error {
	return fmt.Errorf("%s is not a regular file or a block device (mode %v)", path, m)
}

// control runs fn on the live descriptor (holding os.File's reference so it
// cannot be closed and reused underneath).
func (f *File) control(fn func(fd int) error) error {
	var ferr error
	if err := f.raw.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// fdatasync is the group's sync function. It allocates nothing on success.
func (f *File) fdatasync() error {
	f.syncErr = nil
	if err := f.raw.Control(f.syncFd); err != nil {
		// Control fails only when the descriptor is gone; its error is
		// internal/poll's, which errors.Is does not match to os.ErrClosed.
		if f.closed.Load() {
			err = os.ErrClosed
		}
		return fmt.Errorf("fdatasync %s: %w", f.path, err)
	}
	if err := f.syncErr; err != nil {
		return fmt.Errorf("fdatasync %s: %w (writes since the last successful sync may be lost; check the device, then restart the target)", f.path, err)
	}
	return nil
}

// Size returns the exported size in bytes (a multiple of 512).
func (f *File) Size() int64 { return f.size }

// Path returns the path the file was opened with.
func (f *File) Path() string { return f.path }

// Offset returns the byte offset of the export inside the file.
func (f *File) Offset() int64 { return f.off }

// Fd returns the file descriptor, for streaming the image (replication
// snapshots). It is valid until Close.
func (f *File) Fd() uintptr { return f.file.Fd() }

// ReadAt reads len(p) bytes at byte offset off of the export.
func (f *File) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := f.check(ctx, "read", p, off); err != nil {
		return err
	}
	var err error
	f.ranges.lock(off, len(p), false)
	if f.dio != nil {
		err = f.dio.readAt(f.io, p, f.off+off)
	} else {
		_, err = f.io.ReadAt(p, f.off+off)
	}
	f.ranges.unlock(off, len(p), false)
	if err != nil {
		return f.ioError("read", len(p), off, err)
	}
	return nil
}

// WriteAt writes p at byte offset off of the export. With Options.Sync it
// returns after the data is durable.
func (f *File) WriteAt(ctx context.Context, p []byte, off int64) error {
	if f.ro {
		return fmt.Errorf("write %d bytes at %d of %s: %w", len(p), off, f.path, aoe.ErrReadOnly)
	}
	if err := f.check(ctx, "write", p, off); err != nil {
		return err
	}
	var err error
	f.ranges.lock(off, len(p), true)
	if f.dio != nil {
		err = f.dio.writeAt(f.io, p, f.off+off)
	} else {
		err = writePieces(f.io, p, f.off+off)
	}
	f.ranges.unlock(off, len(p), true)
	if err != nil {
		return f.ioError("write", len(p), off, err)
	}
	if f.sync {
		// The context is not consulted here: the data is already written,
		// and the wait is for an fdatasync that cannot be interrupted.
		if err := f.group.wait(); err != nil {
			return fmt.Errorf("write %d bytes at %d of %s: written but not durable: %w", len(p), off, f.path, err)
		}
	}
	return nil
}

// maxPiece is the largest write(2) a buffered write is made of.
//
// The page cache keeps what one write brings in as one folio of up to that
// size (ext4 and block devices, Linux 6.16 on), and every later write into a
// folio walks all of its buffer heads. A 1 KiB write, the size of every AoE
// write at MTU 1500, cost 28 µs in a 2 MiB folio, 6 µs in 128 KiB, 4 µs in
// 32 KiB and 3.5 µs in 16 KiB (pwrite at random offsets of a cached 512 MiB
// file written by dd with that block size, kernel 6.18). Image installs
// write 1 MiB chunks; a cluster node then pays the walk on every replicated
// write, on every node.
const maxPiece = 32 << 10

// writePieces writes p at off through w in pieces of at most maxPiece.
func writePieces(w fileIO, p []byte, off int64) error {
	for len(p) > 0 {
		n := min(len(p), maxPiece)
		if _, err := w.WriteAt(p[:n], off); err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// Flush makes every write that completed before the call durable
// (fdatasync, shared with concurrent Flush and Sync writes). On a read-only
// file it does nothing.
func (f *File) Flush(ctx context.Context) error {
	if f.ro {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("flush %s: %w", f.path, err)
	}
	return f.group.wait()
}

// Close closes the file. There is no background goroutine to stop: group
// commit runs on the callers' goroutines. Commands still in flight finish or
// fail with os.ErrClosed; the descriptor is released after the last one.
func (f *File) Close() error {
	f.closed.Store(true)
	if f.ring != nil {
		// Refuses new requests and waits for those in flight. The ring
		// holds its own reference to the file, so the order of the two
		// closes does not matter for safety; closing the ring first means
		// the descriptor is really released when Close returns.
		f.ring.Close()
	}
	if err := f.file.Close(); err != nil {
		return fmt.Errorf("close %s: %w", f.path, unwrapPath(err))
	}
	return nil
}

// check refuses I/O outside the export and commands whose deadline passed.
func (f *File) check(ctx context.Context, op string, p []byte, off int64) error {
	if !inRange(p, off, f.size) {
		return rangeError(op, len(p), off, f.size, f.path)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s %d bytes at %d of %s: %w", op, len(p), off, f.path, err)
	}
	return nil
}

func rangeError(op string, n int, off, size int64, name string) error {
	return fmt.Errorf("%s %d bytes at %d of %s: %w [0, %d)", op, n, off, name, ErrOutOfRange, size)
}

// ioError says what failed, where, and why. os errors already name the path;
// the PathError wrapper is dropped so the path is not said twice.
func (f *File) ioError(op string, n int, off int64, err error) error {
	if errors.Is(err, io.EOF) {
		err = fmt.Errorf("%w: the file ends before the exported range (was it truncated?)", io.ErrUnexpectedEOF)
	}
	err = unwrapPath(err)
	if f.off != 0 {
		return fmt.Errorf("%s %d bytes at %d (file offset %d) of %s: %w", op, n, off, f.off+off, f.path, err)
	}
	return fmt.Errorf("%s %d bytes at %d of %s: %w", op, n, off, f.path, err)
}

func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func directUnsupported(path string, err error) error {
	return fmt.Errorf("O_DIRECT not supported by the filesystem of %s (%v); move the image to a filesystem with direct I/O (ext4, xfs, a block device) or do not use direct I/O",
		path, unwrapPath(err))
}
