package aoe

import (
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Batched frame I/O with recvmmsg(2) and sendmmsg(2). A system call costs
// more than the work a RAM-backed read does, so under load the frame path
// moves several frames per call: the reader takes whatever the kernel has
// queued (up to MaxBatch frames) in one call, and answers that are ready
// together leave in one call.

// MaxBatch is the most frames one batched call moves.
const MaxBatch = 32

// mmsghdr is struct mmsghdr of <sys/socket.h> on 64-bit Linux.
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
	_   [4]byte
}

// mmsgBatch is the preallocated argument block of one batched call.
type mmsgBatch struct {
	msgs [MaxBatch]mmsghdr
	iovs [MaxBatch]unix.Iovec
	bufs [][]byte // the frames of the current call
	n    int      // frames moved by the last call
	err  error
	fn   func(fd uintptr) bool
}

func (m *mmsgBatch) prepare(bufs [][]byte) {
	m.bufs = bufs
	for i, b := range bufs {
		m.iovs[i] = unix.Iovec{Base: &b[0], Len: uint64(len(b))}
		m.msgs[i] = mmsghdr{hdr: unix.Msghdr{Iov: &m.iovs[i], Iovlen: 1}}
	}
}

func (m *mmsgBatch) release() {
	for i := range m.bufs {
		m.iovs[i].Base = nil
		m.msgs[i].hdr.Iov = nil
	}
	m.bufs = nil
}

func mmsg(trap uintptr, fd uintptr, m *mmsgBatch, count int) (int, error) {
	r, _, e := unix.Syscall6(trap, fd, uintptr(unsafe.Pointer(&m.msgs[0])), uintptr(count), unix.MSG_DONTWAIT, 0, 0)
	runtime.KeepAlive(m)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

func (c *Conn) initBatch() {
	c.rbatch.fn = func(fd uintptr) bool {
		c.rbatch.n, c.rbatch.err = mmsg(unix.SYS_RECVMMSG, fd, &c.rbatch, len(c.rbatch.bufs))
		return c.rbatch.err != unix.EAGAIN
	}
	c.wbatches.New = func() any {
		m := &mmsgBatch{}
		m.fn = func(fd uintptr) bool {
			m.n, m.err = mmsg(unix.SYS_SENDMMSG, fd, m, len(m.bufs))
			return m.err != unix.EAGAIN
		}
		return m
	}
}

// ReadFrames reads up to len(bufs) frames (at most MaxBatch), blocking until
// at least one arrives, and stores each frame's length in lens. It returns
// the number of frames read. Only one goroutine may read at a time.
func (c *Conn) ReadFrames(bufs [][]byte, lens []int) (int, error) {
	if len(bufs) > MaxBatch {
		bufs = bufs[:MaxBatch]
	}
	m := &c.rbatch
	m.prepare(bufs)
	err := c.rc.Read(m.fn)
	n, serr := m.n, m.err
	for i := 0; i < n; i++ {
		lens[i] = int(m.msgs[i].len)
	}
	m.release()
	if err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, os.NewSyscallError("recvmmsg", serr)
	}
	return n, nil
}

// WriteFrames sends complete Ethernet frames, as many per call as the
// kernel takes. It is safe for concurrent use.
func (c *Conn) WriteFrames(bufs [][]byte) error {
	m := c.wbatches.Get().(*mmsgBatch)
	defer c.wbatches.Put(m)
	for len(bufs) > 0 {
		chunk := bufs[:min(len(bufs), MaxBatch)]
		m.prepare(chunk)
		// Fast path straight on the descriptor; the poller only when the
		// socket buffer is full.
		m.n, m.err = mmsg(unix.SYS_SENDMMSG, uintptr(c.fd), m, len(chunk))
		if m.err == unix.EAGAIN {
			if err := c.rc.Write(m.fn); err != nil {
				m.release()
				return err
			}
		}
		n, err := m.n, m.err
		m.release()
		if err != nil {
			return os.NewSyscallError("sendmmsg", err)
		}
		bufs = bufs[n:]
	}
	return nil
}
