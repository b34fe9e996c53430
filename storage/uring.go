package storage

import (
	"errors"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal io_uring for positional reads and writes of one file.
//
// Why: on some machines (paravirtualised guests in particular) every system
// call costs microseconds and every thread switch much more. A pread per
// command costs one system call, and a pread that blocks (O_DIRECT, a page
// cache miss) makes the Go runtime hand the P to another thread, two context
// switches per command. With io_uring many commands go to the kernel in one
// io_uring_enter, page-cache hits complete inside that call, and device I/O
// completes asynchronously without parking a thread per command.
//
// Concurrency: callers (the engine's worker goroutines) take a request slot,
// write their SQE under mu and, if nobody is submitting, become the
// submitter: it enters the kernel with everything queued so far (and what is
// queued while it is in the kernel, in the next round), then reaps the
// completion queue and wakes the waiters whose requests finished. Requests
// that are still in flight when the submitter leaves are reaped by one
// reaper goroutine that blocks in io_uring_enter(min_complete=1); it runs
// only while requests are in flight (see reapLoop for why no wake-up is lost).
//
// Measured (PVM guest, 2 vCPUs, /tmp/sysop.sh-style bench, QD16, 1 KiB
// reads, noisy shared machine; CPU µs per op, IOPS):
//
//	O_DIRECT ext4:        io_uring 42-47 µs, 8.5-12.2k   pread 78-85 µs, 6.1-8.1k
//	page cache ext4:      io_uring 48 µs                 pread 30 µs
//	tmpfs (RAM image):    io_uring 26-31 µs              pread 11-17 µs
//
// Hence opt-in (Options.URing), worth it with Direct. For cached reads the
// waiters that park while another goroutine is in io_uring_enter cost
// thread wake-ups that pread does not, and tmpfs has no non-blocking reads
// (every read goes to an io-wq thread; see completesInline).
//
// Fd lifetime: the file is registered with the ring (IORING_REGISTER_FILES)
// and SQEs name it by index (IOSQE_FIXED_FILE). The ring holds its own
// reference to the open file, so closing the os.File cannot let a request
// reach a reused descriptor number; the reference is dropped when the ring
// is torn down, after the last request completed.

// Kernel ABI (include/uapi/linux/io_uring.h).
const (
	uringSetupClamp     = 1 << 4 // IORING_SETUP_CLAMP
	uringSetupSubmitAll = 1 << 7 // IORING_SETUP_SUBMIT_ALL (5.18+)

	uringFeatSingleMmap = 1 << 0 // IORING_FEAT_SINGLE_MMAP
	uringFeatNoDrop     = 1 << 1 // IORING_FEAT_NODROP

	uringOffSQRing = 0          // IORING_OFF_SQ_RING
	uringOffSQEs   = 0x10000000 // IORING_OFF_SQES

	uringEnterGetEvents = 1 << 0 // IORING_ENTER_GETEVENTS

	uringSQCQOverflow = 1 << 1 // IORING_SQ_CQ_OVERFLOW in the SQ ring flags

	uringOpNop   = 0  // IORING_OP_NOP
	uringOpRead  = 22 // IORING_OP_READ (5.6+)
	uringOpWrite = 23 // IORING_OP_WRITE (5.6+)

	uringSQEFixedFile = 1 << 0 // IOSQE_FIXED_FILE

	uringRegisterFiles         = 2 // IORING_REGISTER_FILES
	uringRegisterProbe         = 8 // IORING_REGISTER_PROBE
	uringProbeSupported        = 1 // IO_URING_OP_SUPPORTED
	uringProbeOps              = 64
	uringEntries               = 256
	uringMaxRetries            = 64 // -EAGAIN/-EINTR resubmissions before giving up
	uringNopSlot        uint64 = 1<<64 - 1
)

type uringSQOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type uringCQOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  uringSQOffsets
	cqOff                                                                  uringCQOffsets
}

// uringSQE is struct io_uring_sqe (64 bytes) with the fields READ/WRITE use.
type uringSQE struct {
	opcode      uint8
	flags       uint8
	ioprio      uint16
	fd          int32
	off         uint64
	addr        uint64
	len         uint32
	rwFlags     uint32
	userData    uint64
	bufIndex    uint16
	personality uint16
	spliceFdIn  int32
	pad         [2]uint64
}

// uringCQE is struct io_uring_cqe (16 bytes; no CQE32).
type uringCQE struct {
	userData uint64
	res      int32
	flags    uint32
}

type uringProbe struct {
	lastOp, opsLen uint8
	resv           uint16
	resv2          [3]uint32
	ops            [uringProbeOps]struct {
		op, resv uint8
		flags    uint16
		resv2    uint32
	}
}

// uringReq is one request slot. Its fields are owned by the caller between
// taking the slot and queueing it, by whoever holds uring.mu while it is in
// flight, and by the caller again after done fires.
type uringReq struct {
	done    chan struct{} // buffered (1): completion never blocks the reaper
	write   bool
	buf     []byte // the rest still to transfer; keeps the memory alive and on the heap
	off     int64
	n       int // bytes transferred so far
	retries int
	err     error
}

type uring struct {
	fd int // the ring's descriptor

	ringMem []byte // SQ and CQ rings (single mmap)
	sqeMem  []byte

	// Pointers into ringMem. The kernel reads sqTail and writes sqHead,
	// cqTail and sqFlags concurrently, so every access to them is atomic;
	// see push and reapLocked for the ordering each one needs.
	sqHead, sqTail, sqMask, sqFlags *uint32
	cqHead, cqTail, cqMask          *uint32
	sqes                            []uringSQE
	cqes                            []uringCQE

	slots []uringReq
	free  chan uint32   // indices of idle slots; bounds requests in flight
	kick  chan struct{} // (1) wakes the reaper goroutine
	gone  chan struct{} // closed after teardown

	mu         sync.Mutex
	sqLocal    uint32 // our copy of the SQ tail (only we write it)
	inflight   int    // queued or submitted requests not yet reaped (NOP included)
	submitting bool   // a caller is in the submit loop
	reaping    bool   // the reaper goroutine is active (maybe inside the kernel)
	closed     bool
}

// newURing sets up a ring for fd (registered as fixed file 0). It returns an
// error when io_uring is unavailable (ENOSYS, EPERM from
// kernel.io_uring_disabled or seccomp, ENOMEM from RLIMIT_MEMLOCK on old
// kernels, or a kernel without IORING_OP_READ/WRITE); the caller then uses
// pread/pwrite.
//
// With probe set, it also checks that a cached read of probe at probeOff
// completes inline (see completesInline) and fails if not.
func newURing(file int, probe []byte, probeOff int64) (*uring, error) {
	var p uringParams
	p.flags = uringSetupClamp | uringSetupSubmitAll
	fd, err := uringSetup(uringEntries, &p)
	if err == unix.EINVAL { // SUBMIT_ALL unknown before 5.18
		p = uringParams{flags: uringSetupClamp}
		fd, err = uringSetup(uringEntries, &p)
	}
	if err != nil {
		return nil, os.NewSyscallError("io_uring_setup", err)
	}
	r := &uring{fd: fd}
	if err := r.init(&p, file); err != nil {
		r.unmap()
		unix.Close(fd)
		return nil, err
	}
	if probe != nil && !r.completesInline(probe, probeOff) {
		r.unmap()
		unix.Close(fd)
		return nil, errNotInline
	}
	go r.reapLoop()
	return r, nil
}

var errNotInline = errors.New("io_uring: cached reads of this file do not complete inline")

// completesInline reads p at off (which the caller has just read, so it is
// in the page cache) and reports whether the read completed inside
// io_uring_enter. Files whose filesystem does not support non-blocking
// reads (FMODE_NOWAIT; tmpfs on the kernels we tried) have every read
// punted to an io-wq kernel thread: two thread switches per read, far worse
// than pread. It runs before the reaper starts, alone on the ring.
//
// A punted read could in principle complete on another CPU before we look
// at the CQ, so the probe is repeated and every round must be inline.
func (r *uring) completesInline(p []byte, off int64) bool {
	q := &r.slots[0]
	defer func() { q.buf = nil }()
	for range 4 {
		q.buf, q.off = p, off
		r.push(0, q)
		_, e := r.enter(1, 0)
		for e == unix.EINTR {
			_, e = r.enter(1, 0)
		}
		if e != 0 {
			return false
		}
		inline := atomic.LoadUint32(r.cqTail) != *r.cqHead
		for atomic.LoadUint32(r.cqTail) == *r.cqHead {
			r.enter(0, 1) // wait for the punted read before the teardown
		}
		c := r.cqes[*r.cqHead&*r.cqMask]
		atomic.StoreUint32(r.cqHead, *r.cqHead+1)
		if !inline || c.res != int32(len(p)) {
			return false
		}
	}
	return true
}

func uringSetup(entries uint32, p *uringParams) (int, error) {
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(p)), 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

func (r *uring) init(p *uringParams, file int) error {
	// SINGLE_MMAP (5.4) maps both rings at once; NODROP (5.5) means the
	// kernel never drops a completion. Both predate IORING_OP_READ (5.6).
	if p.features&uringFeatSingleMmap == 0 || p.features&uringFeatNoDrop == 0 {
		return errors.New("io_uring: kernel too old")
	}
	size := max(p.sqOff.array+p.sqEntries*4, p.cqOff.cqes+p.cqEntries*uint32(unsafe.Sizeof(uringCQE{})))
	var err error
	r.ringMem, err = unix.Mmap(r.fd, uringOffSQRing, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return os.NewSyscallError("mmap io_uring", err)
	}
	sqeSize := int(p.sqEntries) * int(unsafe.Sizeof(uringSQE{}))
	r.sqeMem, err = unix.Mmap(r.fd, uringOffSQEs, sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return os.NewSyscallError("mmap io_uring SQEs", err)
	}
	u32 := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&r.ringMem[off])) }
	r.sqHead, r.sqTail, r.sqMask, r.sqFlags = u32(p.sqOff.head), u32(p.sqOff.tail), u32(p.sqOff.ringMask), u32(p.sqOff.flags)
	r.cqHead, r.cqTail, r.cqMask = u32(p.cqOff.head), u32(p.cqOff.tail), u32(p.cqOff.ringMask)
	r.sqes = unsafe.Slice((*uringSQE)(unsafe.Pointer(&r.sqeMem[0])), p.sqEntries)
	r.cqes = unsafe.Slice((*uringCQE)(unsafe.Pointer(&r.ringMem[p.cqOff.cqes])), p.cqEntries)
	// The SQ index array maps ring positions to SQEs; we always use the
	// SQE at the same position, so it is the identity, written once.
	array := unsafe.Slice((*uint32)(unsafe.Pointer(&r.ringMem[p.sqOff.array])), p.sqEntries)
	for i := range array {
		array[i] = uint32(i)
	}
	r.sqLocal = atomic.LoadUint32(r.sqTail)

	var probe uringProbe
	if err := r.register(uringRegisterProbe, unsafe.Pointer(&probe), uringProbeOps); err != nil {
		return os.NewSyscallError("io_uring_register probe", err)
	}
	for _, op := range []uint8{uringOpRead, uringOpWrite} {
		if op > probe.lastOp || probe.ops[op].flags&uringProbeSupported == 0 {
			return errors.New("io_uring: kernel lacks IORING_OP_READ/WRITE")
		}
	}
	fds := [1]int32{int32(file)}
	if err := r.register(uringRegisterFiles, unsafe.Pointer(&fds[0]), 1); err != nil {
		return os.NewSyscallError("io_uring_register files", err)
	}

	// In flight requests are bounded by the SQ size and the CQ is at least
	// as large (twice, by default), so the CQ cannot overflow; with NODROP
	// an overflow would not lose completions anyway (see submitLocked).
	// One slot fewer than the SQ leaves room for Close's wake-up NOP.
	n := int(p.sqEntries) - 1
	r.slots = make([]uringReq, n)
	r.free = make(chan uint32, n)
	for i := range r.slots {
		r.slots[i].done = make(chan struct{}, 1)
		r.free <- uint32(i)
	}
	r.kick = make(chan struct{}, 1)
	r.gone = make(chan struct{})
	return nil
}

func (r *uring) register(op uintptr, arg unsafe.Pointer, n uintptr) error {
	for {
		_, _, e := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), op, uintptr(arg), n, 0, 0)
		if e != unix.EINTR {
			if e != 0 {
				return e
			}
			return nil
		}
	}
}

func (r *uring) enter(toSubmit, minComplete uint32) (int, syscall.Errno) {
	n, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(minComplete), uringEnterGetEvents, 0, 0)
	return int(n), e
}

func (r *uring) unmap() {
	if r.sqeMem != nil {
		unix.Munmap(r.sqeMem)
		r.sqeMem = nil
	}
	if r.ringMem != nil {
		unix.Munmap(r.ringMem)
		r.ringMem = nil
	}
}

// ReadAt and WriteAt have os.File's contract (the full length or an error;
// io.EOF for a read past the end of the file), so directIO can use a ring in
// place of an *os.File.
func (r *uring) ReadAt(p []byte, off int64) (int, error)  { return r.do(false, p, off) }
func (r *uring) WriteAt(p []byte, off int64) (int, error) { return r.do(true, p, off) }

func (r *uring) do(write bool, p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	i := <-r.free // waits while the ring is full
	q := &r.slots[i]
	q.write, q.buf, q.off, q.n, q.retries, q.err = write, p, off, 0, 0, nil
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		q.buf = nil
		r.free <- i
		return 0, os.ErrClosed
	}
	r.inflight++
	r.push(uint64(i), q)
	if !r.submitting {
		// Flat combining: before entering the kernel, let the goroutines
		// that are already runnable (the engine readies a worker per frame
		// of a receive batch) queue their requests too, so one
		// io_uring_enter carries them all. They see submitting set and
		// wait. Gosched costs far less than a system call.
		r.submitting = true
		r.mu.Unlock()
		runtime.Gosched()
		r.mu.Lock()
		r.submitLocked()
	}
	r.mu.Unlock()
	<-q.done
	n, err := q.n, q.err
	q.buf = nil
	r.free <- i
	return n, err
}

// push writes an SQE for the rest of request q. Caller holds mu. There is
// always room: slots+1 <= SQ entries, and the kernel consumes every SQE it
// is handed during io_uring_enter (no SQPOLL), so the SQ never holds more
// than the requests queued since the last enter.
func (r *uring) push(slot uint64, q *uringReq) {
	e := &r.sqes[r.sqLocal&*r.sqMask]
	*e = uringSQE{userData: slot}
	if q != nil {
		e.opcode = uringOpRead
		if q.write {
			e.opcode = uringOpWrite
		}
		e.flags = uringSQEFixedFile
		e.fd = 0 // index into the registered files
		e.addr = uint64(uintptr(unsafe.Pointer(unsafe.SliceData(q.buf))))
		e.len = uint32(len(q.buf))
		e.off = uint64(q.off)
	}
	r.sqLocal++
	// Release: the kernel loads the tail with acquire semantics and only
	// then reads the SQE, so the SQE's contents must be visible before the
	// new tail. Go atomics are sequentially consistent, which is stronger.
	atomic.StoreUint32(r.sqTail, r.sqLocal)
}

// queuedLocked is the number of SQEs written but not yet consumed by the
// kernel. It is derived from the ring rather than counted, so it cannot drift
// from what the kernel sees. The kernel advances the SQ head only inside a
// submitting io_uring_enter (no SQPOLL), and only the submitter makes those.
func (r *uring) queuedLocked() uint32 {
	return r.sqLocal - atomic.LoadUint32(r.sqHead)
}

// submitLocked hands every queued SQE to the kernel, and keeps doing so while
// others queue more, reaping after each round. Caller holds mu, which is
// released while in the kernel; submitting keeps others out of the loop.
func (r *uring) submitLocked() {
	r.submitting = true
	for r.queuedLocked() > 0 {
		n := r.queuedLocked()
		r.mu.Unlock()
		// GETEVENTS with min_complete 0 does not wait; it lets the kernel
		// run pending completion work so finished requests are visible.
		got, e := r.enter(n, 0)
		r.mu.Lock()
		switch e {
		case 0:
			// With SUBMIT_ALL the kernel takes everything; without it, it
			// may stop early and the rest stays in the SQ for next round.
			// Taking nothing is treated like EAGAIN below, not retried
			// at once.
			if got <= 0 {
				e = unix.EAGAIN
			}
		case unix.EINTR, unix.EAGAIN, unix.EBUSY:
			// Nothing taken. EAGAIN/EBUSY: the kernel is short of memory
			// or its overflowed completions must be reaped first (below).
		default:
			r.failQueuedLocked(e)
		}
		r.reapLocked()
		if e != 0 && e != unix.EINTR && r.queuedLocked() > 0 {
			// Do not spin on a kernel that is short of resources: wait for
			// a request in flight to finish if there is one (which frees
			// some), otherwise a moment.
			submitted := r.inflight - int(r.queuedLocked())
			r.mu.Unlock()
			if submitted > 0 {
				r.enter(0, 1)
			} else {
				time.Sleep(time.Millisecond)
			}
			r.mu.Lock()
			r.reapLocked()
		}
	}
	r.submitting = false
	if (r.inflight > 0 || r.closed) && !r.reaping {
		r.reaping = true
		r.kick <- struct{}{} // cannot block: only sent when reaping turns true
	}
}

// failQueuedLocked fails the SQEs the kernel did not consume (after an
// unexpected io_uring_enter error): we own the SQ tail, so we take them
// back.
func (r *uring) failQueuedLocked(err error) {
	head := atomic.LoadUint32(r.sqHead)
	for r.sqLocal != head {
		r.sqLocal--
		slot := r.sqes[r.sqLocal&*r.sqMask].userData
		r.finishLocked(slot, err)
	}
	atomic.StoreUint32(r.sqTail, r.sqLocal)
}

// reapLocked consumes the completion queue. Caller holds mu: one consumer at
// a time.
func (r *uring) reapLocked() {
	head := *r.cqHead // only we write it
	// Acquire: the kernel writes a CQE and then stores the tail with
	// release semantics; loading the tail first makes the CQEs up to it
	// visible.
	tail := atomic.LoadUint32(r.cqTail)
	mask := *r.cqMask
	for ; head != tail; head++ {
		c := &r.cqes[head&mask]
		slot, res := c.userData, c.res
		if slot == uringNopSlot {
			r.finishLocked(slot, nil)
			continue
		}
		q := &r.slots[slot]
		switch {
		case res == -int32(unix.EAGAIN) || res == -int32(unix.EINTR):
			if q.retries++; q.retries > uringMaxRetries {
				r.finishLocked(slot, syscall.Errno(-res))
				continue
			}
			r.push(slot, q)
		case res < 0:
			r.finishLocked(slot, syscall.Errno(-res))
		case res == 0:
			// A read at or past the end of the file, as pread reports it;
			// a write that makes no progress would loop forever.
			if q.write {
				r.finishLocked(slot, io.ErrShortWrite)
			} else {
				r.finishLocked(slot, io.EOF)
			}
		case int(res) < len(q.buf):
			// Short transfer: queue the rest, as os.File's loops do.
			q.n += int(res)
			q.buf = q.buf[res:]
			q.off += int64(res)
			r.push(slot, q)
		default:
			q.n += int(res)
			r.finishLocked(slot, nil)
		}
	}
	// Release: we are done reading the CQEs before the kernel may reuse
	// their entries.
	atomic.StoreUint32(r.cqHead, head)
	// Completions the CQ had no room for wait in the kernel's overflow list
	// (NODROP); an enter with GETEVENTS moves them over. Bounded in-flight
	// requests make this unreachable; it is here so that it cannot hang.
	if atomic.LoadUint32(r.sqFlags)&uringSQCQOverflow != 0 && r.queuedLocked() == 0 && r.inflight > 0 {
		r.mu.Unlock()
		r.enter(0, 0)
		r.mu.Lock()
		r.reapLocked()
	}
}

func (r *uring) finishLocked(slot uint64, err error) {
	r.inflight--
	if slot == uringNopSlot {
		return
	}
	q := &r.slots[slot]
	q.err = err
	q.done <- struct{}{}
}

// reapLoop is the reaper goroutine. It sleeps on kick until a submitter
// leaves requests in flight, then waits in the kernel for completions until
// none are left.
//
// No lost wake-up: a submitter that leaves requests in flight either finds
// reaping set (the reaper has not yet seen inflight drop to zero under mu, so
// it will enter the kernel again and see those requests' completions: the
// kernel wakes min_complete waiters on every CQ tail advance past the target
// it computed on entry, whoever consumes the entries) or sets it and kicks.
// The reaper may enter the kernel after a submitter reaped everything; it
// then sleeps until the next completion, which costs a parked thread but no
// CPU. Close unblocks it with a NOP.
func (r *uring) reapLoop() {
	for range r.kick {
		for {
			r.mu.Lock()
			if r.inflight == 0 {
				if r.closed && !r.submitting {
					r.teardownLocked()
					r.mu.Unlock()
					return
				}
				r.reaping = false
				r.mu.Unlock()
				break
			}
			r.mu.Unlock()
			if _, e := r.enter(0, 1); e != 0 && e != unix.EINTR && e != unix.EAGAIN && e != unix.EBUSY {
				// Cannot happen with a valid ring; make sure this never
				// turns into a busy loop.
				panic("storage: io_uring_enter wait: " + e.Error())
			}
			r.mu.Lock()
			r.reapLocked()
			if r.queuedLocked() > 0 && !r.submitting { // resubmissions
				r.submitLocked()
				// submitLocked does not kick: reaping is still set.
			}
			r.mu.Unlock()
		}
	}
}

// teardownLocked releases the ring. Only the reaper calls it, once closed and
// with nothing in flight or being submitted, so no one touches the rings.
func (r *uring) teardownLocked() {
	r.unmap()
	unix.Close(r.fd) // drops the registered file's reference too
	r.fd = -1
	close(r.gone)
}

// Close refuses new requests, waits for those in flight and releases the
// ring. Requests that complete meanwhile are delivered normally.
func (r *uring) Close() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		<-r.gone
		return
	}
	r.closed = true
	if r.reaping {
		// The reaper may be asleep in the kernel with nothing in flight;
		// a NOP completes at once and wakes it.
		r.inflight++
		r.push(uringNopSlot, nil)
		if !r.submitting {
			r.submitLocked()
		}
	} else if !r.submitting {
		r.reaping = true
		r.kick <- struct{}{}
	}
	// else: the submitter kicks the reaper on its way out (closed is set).
	r.mu.Unlock()
	<-r.gone
}
