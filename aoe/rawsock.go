package aoe

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/mdlayher/packet"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Conn is an AF_PACKET socket bound to one interface and the AoE ethertype.
// mdlayher/packet opens, binds and filters it; the frame I/O itself goes
// through the raw file descriptor with preallocated closures so that reading
// and writing a frame does not allocate (packet.Conn's ReadFrom/WriteTo build
// a sockaddr per call). Writes need no address: a bound packet socket sends
// on its interface, and every AoE frame carries its own Ethernet header.
type Conn struct {
	pc  *packet.Conn
	rc  syscall.RawConn
	fd  int
	ifi *net.Interface
	mac MAC

	// The single reader's state, reused on every ReadFrame.
	rbuf  []byte
	rn    int
	rerr  error
	rfunc func(fd uintptr) bool

	writers sync.Pool // *frameWriter, for the rare EAGAIN path

	rbatch   mmsgBatch // the single reader's recvmmsg block
	wbatches sync.Pool // *mmsgBatch for sendmmsg
}

// ListenConfig sets up a Conn.
type ListenConfig struct {
	// Filter is the classic BPF program the kernel runs on every frame before
	// it reaches the socket. Nil accepts all AoE frames.
	Filter []bpf.RawInstruction
	// ReadBuffer and WriteBuffer size the socket buffers in bytes (0: leave
	// the kernel default). As root the limits in net.core.*mem_max are
	// bypassed, so a full window of frames never overflows the queue.
	ReadBuffer, WriteBuffer int
}

// Listen opens an AoE socket on the named interface.
func Listen(ifname string, cfg ListenConfig) (*Conn, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("aoe: interface %q: %w", ifname, err)
	}
	if len(ifi.HardwareAddr) != 6 {
		return nil, fmt.Errorf("aoe: interface %q has no Ethernet address", ifname)
	}
	filter := cfg.Filter
	if filter == nil {
		filter, err = etherTypeFilter()
		if err != nil {
			return nil, err
		}
	}
	pc, err := packet.Listen(ifi, packet.Raw, EtherType, &packet.Config{Filter: filter})
	if err != nil {
		return nil, fmt.Errorf("aoe: open raw socket on %s (needs root or CAP_NET_RAW): %w", ifname, err)
	}
	rc, err := pc.SyscallConn()
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("aoe: raw socket on %s: %w", ifname, err)
	}
	c := &Conn{pc: pc, rc: rc, ifi: ifi}
	copy(c.mac[:], ifi.HardwareAddr)
	var serr error
	err = rc.Control(func(fd uintptr) {
		c.fd = int(fd)
		// Our own transmissions must not come back to us through the tap
		// that AF_PACKET keeps on outgoing frames (Linux >= 4.20).
		_ = unix.SetsockoptInt(int(fd), unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1)
		if cfg.ReadBuffer > 0 {
			if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, cfg.ReadBuffer); e != nil {
				serr = errors.Join(serr, unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, cfg.ReadBuffer))
			}
		}
		if cfg.WriteBuffer > 0 {
			if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, cfg.WriteBuffer); e != nil {
				serr = errors.Join(serr, unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, cfg.WriteBuffer))
			}
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("aoe: configure socket on %s: %w", ifname, err)
	}
	c.rfunc = func(fd uintptr) bool {
		c.rn, c.rerr = unix.Read(int(fd), c.rbuf)
		return c.rerr != unix.EAGAIN
	}
	c.initBatch()
	c.writers.New = func() any {
		w := &frameWriter{}
		w.fn = func(fd uintptr) bool {
			w.err = unix.Send(int(fd), w.b, 0)
			return w.err != unix.EAGAIN
		}
		return w
	}
	return c, nil
}

type frameWriter struct {
	b   []byte
	err error
	fn  func(fd uintptr) bool
}

// Interface is the interface the socket is bound to.
func (c *Conn) Interface() *net.Interface { return c.ifi }

// MAC is the interface's hardware address.
func (c *Conn) MAC() MAC { return c.mac }

// MTU is the interface's current MTU (read again on each call, as vblade
// does, so a changed MTU is honoured).
func (c *Conn) MTU() int {
	if ifi, err := net.InterfaceByIndex(c.ifi.Index); err == nil {
		return ifi.MTU
	}
	return c.ifi.MTU
}

// ReadFrame reads one frame into b and returns its length. Only one goroutine
// may call ReadFrame at a time.
func (c *Conn) ReadFrame(b []byte) (int, error) {
	c.rbuf = b
	err := c.rc.Read(c.rfunc)
	c.rbuf = nil
	if err != nil {
		return 0, err
	}
	if c.rerr != nil {
		return 0, os.NewSyscallError("read", c.rerr)
	}
	return c.rn, nil
}

// WriteFrame sends one complete Ethernet frame. It is safe for concurrent use.
func (c *Conn) WriteFrame(b []byte) error {
	// Fast path: the socket buffer almost always has room.
	err := unix.Send(c.fd, b, 0)
	if err != unix.EAGAIN {
		if err != nil {
			return os.NewSyscallError("send", err)
		}
		return nil
	}
	w := c.writers.Get().(*frameWriter)
	w.b = b
	err = c.rc.Write(w.fn)
	if err == nil && w.err != nil {
		err = os.NewSyscallError("send", w.err)
	}
	w.b, w.err = nil, nil
	c.writers.Put(w)
	return err
}

// SetReadDeadline bounds the next ReadFrame; it is how a reader stops.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.pc.SetReadDeadline(t) }

// SetFilter replaces the socket's BPF program.
func (c *Conn) SetFilter(f []bpf.RawInstruction) error { return c.pc.SetBPF(f) }

// SetPromiscuous puts the interface in promiscuous mode for this socket.
func (c *Conn) SetPromiscuous(on bool) error { return c.pc.SetPromiscuous(on) }

// AddUnicast makes the interface accept frames to mac as if it were its own
// address (PACKET_MR_UNICAST), without promiscuous mode. The membership ends
// when the socket closes.
func (c *Conn) AddUnicast(mac MAC, add bool) error {
	op := unix.PACKET_ADD_MEMBERSHIP
	if !add {
		op = unix.PACKET_DROP_MEMBERSHIP
	}
	mreq := unix.PacketMreq{Ifindex: int32(c.ifi.Index), Type: unix.PACKET_MR_UNICAST, Alen: 6}
	copy(mreq.Address[:], mac[:])
	var serr error
	err := c.rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptPacketMreq(int(fd), unix.SOL_PACKET, op, &mreq)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("aoe: unicast membership for %s on %s: %w", mac, c.ifi.Name, err)
	}
	return nil
}

// Drops returns the number of frames the kernel dropped for lack of socket
// buffer since the last call.
func (c *Conn) Drops() (uint32, error) {
	st, err := c.pc.Stats()
	if err != nil {
		return 0, err
	}
	return st.Drops, nil
}

// Close closes the socket; a blocked ReadFrame returns an error.
func (c *Conn) Close() error { return c.pc.Close() }

// etherTypeFilter accepts every AoE frame.
func etherTypeFilter() ([]bpf.RawInstruction, error) {
	return bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 12, Size: 2},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: EtherType, SkipFalse: 1},
		bpf.RetConstant{Val: 0x40000},
		bpf.RetConstant{Val: 0},
	})
}

// TargetAddr names a shelf.slot.
type TargetAddr struct {
	Shelf uint16
	Slot  uint8
}

func (a TargetAddr) String() string { return fmt.Sprintf("e%d.%d", a.Shelf, a.Slot) }

// TargetFilter builds the kernel filter a target socket uses: AoE ethertype,
// requests only (response flag clear), and a shelf among those served (or the
// broadcast shelf) with a slot among those served (or the broadcast slot).
// The pairing of shelf and slot is checked again in user space; the kernel's
// job is to keep every other frame on the wire away from the process.
func TargetFilter(targets []TargetAddr) ([]bpf.RawInstruction, error) {
	shelves := []uint32{uint32(BroadcastShelf)}
	slots := []uint32{uint32(BroadcastSlot)}
	seenShelf := map[uint16]bool{}
	seenSlot := map[uint8]bool{}
	for _, t := range targets {
		if !seenShelf[t.Shelf] {
			seenShelf[t.Shelf] = true
			shelves = append(shelves, uint32(t.Shelf))
		}
		if !seenSlot[t.Slot] {
			seenSlot[t.Slot] = true
			slots = append(slots, uint32(t.Slot))
		}
	}
	if len(shelves) > 100 || len(slots) > 100 {
		// Jump offsets are 8 bits; past this size fall back to a looser
		// filter and let user space do the matching.
		shelves, slots = nil, nil
	}
	var p []bpf.Instruction
	// Positions: drop and accept are the last two instructions.
	p = append(p,
		bpf.LoadAbsolute{Off: 12, Size: 2},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: EtherType, SkipTrue: 0xff}, // patched
		bpf.LoadAbsolute{Off: 14, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: FlagResponse, SkipTrue: 0xff}, // patched
	)
	dropJumps := []int{1, 3}
	if shelves != nil {
		p = append(p, bpf.LoadAbsolute{Off: 16, Size: 2})
		shelfStart := len(p)
		for _, s := range shelves {
			p = append(p, bpf.JumpIf{Cond: bpf.JumpEqual, Val: s})
		}
		p = append(p, bpf.Jump{Skip: 0xff}) // to drop, patched
		jumpToDrop := len(p) - 1
		slotLoad := len(p)
		for i := range shelves {
			idx := shelfStart + i
			j := p[idx].(bpf.JumpIf)
			j.SkipTrue = uint8(slotLoad - idx - 1)
			p[idx] = j
		}
		p = append(p, bpf.LoadAbsolute{Off: 18, Size: 1})
		slotStart := len(p)
		for _, s := range slots {
			p = append(p, bpf.JumpIf{Cond: bpf.JumpEqual, Val: s})
		}
		p = append(p, bpf.Jump{Skip: 1}) // over accept, to drop
		accept := len(p)
		for i := range slots {
			idx := slotStart + i
			j := p[idx].(bpf.JumpIf)
			j.SkipTrue = uint8(accept - idx - 1)
			p[idx] = j
		}
		p = append(p, bpf.RetConstant{Val: 0x40000}, bpf.RetConstant{Val: 0})
		drop := len(p) - 1
		jd := p[jumpToDrop].(bpf.Jump)
		jd.Skip = uint32(drop - jumpToDrop - 1)
		p[jumpToDrop] = jd
		patchDrops(p, dropJumps, drop)
	} else {
		p = append(p, bpf.RetConstant{Val: 0x40000}, bpf.RetConstant{Val: 0})
		patchDrops(p, dropJumps, len(p)-1)
	}
	return bpf.Assemble(p)
}

func patchDrops(p []bpf.Instruction, at []int, drop int) {
	for _, idx := range at {
		j := p[idx].(bpf.JumpIf)
		j.SkipTrue = uint8(drop - idx - 1)
		p[idx] = j
	}
}

// ResponseFilter is the initiator's filter: AoE responses only.
func ResponseFilter() ([]bpf.RawInstruction, error) {
	return bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 12, Size: 2},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: EtherType, SkipFalse: 3},
		bpf.LoadAbsolute{Off: 14, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: FlagResponse, SkipFalse: 1},
		bpf.RetConstant{Val: 0x40000},
		bpf.RetConstant{Val: 0},
	})
}
