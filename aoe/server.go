package aoe

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// ServerConfig sets up the frame path on one interface.
type ServerConfig struct {
	Interface string
	// BufferCount is the per-initiator window the targets advertise; it
	// sizes the socket buffers and the number of commands in flight.
	BufferCount int
	// Workers is the number of commands handled at once (0: derived from
	// BufferCount). Each blocks on its disk; a replicated write waits for a
	// Raft round trip, so there must be enough to cover a full window.
	Workers int
	Logger  *slog.Logger
}

// ServerStats counts frames at the socket.
type ServerStats struct {
	Received, Sent  atomic.Uint64
	Malformed       atomic.Uint64 // too short to carry an AoE header
	NoTarget        atomic.Uint64 // addressed to a shelf.slot not served here
	SendErrors      atomic.Uint64
	BroadcastCopies atomic.Uint64
}

// KernelDrops returns the running total of frames the kernel dropped because
// the socket's receive queue was full. (The kernel resets its own counter on
// every read, so the total is kept here, for every caller.)
func (s *Server) KernelDrops() uint64 {
	s.dropsMu.Lock()
	defer s.dropsMu.Unlock()
	if d, err := s.conn.Drops(); err == nil {
		s.drops += uint64(d)
	}
	return s.drops
}

// Server runs the frame path of one interface: one raw socket, a reader that
// hands each request to a pool of workers, and the targets they serve.
// Reading the socket, doing the I/O and answering overlap, so a slow disk or
// a replicated write does not hold up the next frame.
type Server struct {
	conn    *Conn
	log     *slog.Logger
	bufcnt  int
	workers int

	targets atomic.Pointer[map[TargetAddr]*Target] // copy on write
	mu      sync.Mutex                             // serialises target set changes

	dropsMu sync.Mutex
	drops   uint64

	maxSectors atomic.Int32 // from the MTU, refreshed by Query Config
	free       chan *frame
	work       chan *frame
	sendq      sendQueue

	Stats ServerStats
}

// frameBufSize holds the largest frame we accept (a 9000-byte jumbo frame
// plus the Ethernet header) with room to spare for interfaces set higher.
const frameBufSize = 16384

type frame struct {
	b  []byte // len frameBufSize; b[ATAHeaderLen:] is 4096-aligned for O_DIRECT
	n  int
	at time.Time // when it was read, for latency accounting

	// Set by answer for the sender.
	rlen int
	t    *Target
	kind CommandKind
}

// sendQueue collects answers for batched sending (see Server.send).
type sendQueue struct {
	mu      sync.Mutex
	busy    bool
	pending []*frame
	spare   []*frame
	bufs    [][]byte // sendBatch's argument, reused; only the busy sender touches it
}

// NewServer opens the interface's socket. Targets can be added before or
// after Serve starts.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.BufferCount <= 0 {
		cfg.BufferCount = DefaultBufferCount
	}
	if cfg.Workers <= 0 {
		cfg.Workers = max(2*cfg.BufferCount, 32)
		cfg.Workers = min(cfg.Workers, 1024)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	filter, err := TargetFilter(nil)
	if err != nil {
		return nil, err
	}
	ifi, err := net.InterfaceByName(cfg.Interface)
	if err != nil {
		return nil, fmt.Errorf("aoe: interface %q: %w", cfg.Interface, err)
	}
	// Room for every outstanding frame of a full window in both directions,
	// several initiators' worth; the kernel counts skb overhead too.
	bufBytes := max(cfg.BufferCount*(ifi.MTU+EthernetHeaderLen)*8, 4<<20)
	conn, err := Listen(cfg.Interface, ListenConfig{Filter: filter, ReadBuffer: bufBytes, WriteBuffer: bufBytes})
	if err != nil {
		return nil, err
	}
	s := &Server{
		conn:    conn,
		log:     cfg.Logger.With("netif", cfg.Interface),
		bufcnt:  cfg.BufferCount,
		workers: cfg.Workers,
	}
	empty := map[TargetAddr]*Target{}
	s.targets.Store(&empty)
	s.maxSectors.Store(int32(SectorsPerFrame(ifi.MTU)))
	nbuf := cfg.Workers + 2*cfg.BufferCount + MaxBatch
	s.free = make(chan *frame, nbuf)
	s.work = make(chan *frame, nbuf)
	for _, f := range newFrames(nbuf) {
		s.free <- f
	}
	return s, nil
}

// newFrames allocates n frame buffers from one slab, each placed so that its
// ATA data starts on a 4096-byte boundary: O_DIRECT reads and writes then go
// straight between the disk and the frame, with no bounce copy.
func newFrames(n int) []*frame {
	const align = 4096
	stride := frameBufSize + align // keeps every buffer's data aligned alike
	slab := make([]byte, n*stride+2*align)
	base := uintptr(unsafe.Pointer(&slab[0]))
	first := int((align - (base+ATAHeaderLen)%align) % align)
	frames := make([]*frame, n)
	for i := range frames {
		off := first + i*stride
		frames[i] = &frame{b: slab[off : off+frameBufSize : off+frameBufSize]}
	}
	return frames
}

// MAC is the interface's hardware address.
func (s *Server) MAC() MAC { return s.conn.MAC() }

// Interface is the name of the interface served.
func (s *Server) Interface() string { return s.conn.Interface().Name }

// Conn is the server's socket (for virtual MAC membership).
func (s *Server) Conn() *Conn { return s.conn }

// AddTarget starts serving t on this interface.
func (s *Server) AddTarget(t *Target) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := *s.targets.Load()
	if _, dup := old[t.addr]; dup {
		return fmt.Errorf("aoe: %s is already served on %s", t.addr, s.Interface())
	}
	next := make(map[TargetAddr]*Target, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[t.addr] = t
	if err := s.setFilter(next); err != nil {
		return err
	}
	s.targets.Store(&next)
	return nil
}

// RemoveTarget stops serving a shelf.slot.
func (s *Server) RemoveTarget(a TargetAddr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := *s.targets.Load()
	next := make(map[TargetAddr]*Target, len(old))
	for k, v := range old {
		if k != a {
			next[k] = v
		}
	}
	s.targets.Store(&next)
	if err := s.setFilter(next); err != nil {
		s.log.Warn("kernel filter not narrowed after target removal", "err", err)
	}
}

// Targets lists the targets served.
func (s *Server) Targets() []*Target {
	m := *s.targets.Load()
	out := make([]*Target, 0, len(m))
	for _, t := range m {
		out = append(out, t)
	}
	return out
}

func (s *Server) setFilter(m map[TargetAddr]*Target) error {
	addrs := make([]TargetAddr, 0, len(m))
	for a := range m {
		addrs = append(addrs, a)
	}
	f, err := TargetFilter(addrs)
	if err != nil {
		return err
	}
	if err := s.conn.SetFilter(f); err != nil {
		return fmt.Errorf("aoe: set kernel filter on %s: %w", s.Interface(), err)
	}
	return nil
}

// Announce broadcasts an unsolicited Query Config response for t, as vblade
// does at start and as a new cluster leader does: initiators add the source
// MAC as a path to the target. With a mask list the announcement goes to each
// masked MAC instead of the broadcast address.
func (s *Server) Announce(t *Target) error {
	if !t.open() {
		return nil
	}
	var b [ConfigHeaderLen + MaxConfigLen]byte
	st := t.state.Load()
	src := s.MAC()
	if t.mac != (MAC{}) {
		src = t.mac
	}
	h := Header{Dst: BroadcastMAC, Src: src, Version: Version, Flags: FlagResponse,
		Shelf: t.addr.Shelf, Slot: t.addr.Slot, Command: CmdQueryConfig}
	if err := h.Marshal(b[:]); err != nil {
		return err
	}
	s.refreshMTU()
	n := t.fillConfig(b[:], st, ConfigRead, int(s.maxSectors.Load()))
	dsts := st.Masks
	if len(dsts) == 0 {
		dsts = []MAC{BroadcastMAC}
	}
	var errs error
	for _, d := range dsts {
		copy(b[0:6], d[:])
		if err := s.conn.WriteFrame(b[:max(n, MinFrameLen)]); err != nil {
			errs = errors.Join(errs, fmt.Errorf("aoe: announce %s to %s: %w", t.addr, d, err))
		}
	}
	return errs
}

func (s *Server) refreshMTU() {
	s.maxSectors.Store(int32(SectorsPerFrame(s.conn.MTU())))
}

// Serve reads and answers frames until ctx ends or the socket fails. It
// announces every target first.
func (s *Server) Serve(ctx context.Context) error {
	for _, t := range s.Targets() {
		if err := s.Announce(t); err != nil {
			s.log.Warn("announcement failed", "err", err)
		}
	}
	var wg sync.WaitGroup
	for i := 0; i < s.workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.worker(ctx)
		}()
	}
	stop := context.AfterFunc(ctx, func() { s.conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	err := s.readLoop(ctx)
	close(s.work)
	wg.Wait()
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func (s *Server) readLoop(ctx context.Context) error {
	// The reader keeps a stash of free frames so that a batched read has
	// somewhere to put everything the kernel has queued, and tops it up
	// with only what the last read consumed.
	var (
		stash [MaxBatch]*frame
		bufs  [MaxBatch][]byte
		lens  [MaxBatch]int
		have  int
	)
	defer func() {
		for _, f := range stash[:have] {
			s.putFree(f)
		}
	}()
	for {
		if have == 0 {
			select {
			case stash[0] = <-s.free:
				have = 1
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	topUp:
		for have < MaxBatch {
			select {
			case stash[have] = <-s.free:
				have++
			default:
				break topUp
			}
		}
		for i := range have {
			bufs[i] = stash[i].b
		}
		n, err := s.conn.ReadFrames(bufs[:have], lens[:have])
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("aoe: read from %s: %w", s.Interface(), err)
		}
		now := time.Now()
		s.Stats.Received.Add(uint64(n))
		for i := range n {
			f := stash[i]
			if lens[i] < HeaderLen {
				s.Stats.Malformed.Add(1)
				s.putFree(f)
				continue
			}
			f.n, f.at = lens[i], now
			s.work <- f
		}
		// Keep the frames not filled, in front.
		have = copy(stash[:], stash[n:have])
	}
}

// putFree returns a frame to the pool. Frames allocated past the pool when
// it ran dry (broadcast copies) are dropped for the collector.
func (s *Server) putFree(f *frame) {
	select {
	case s.free <- f:
	default:
	}
}

func (s *Server) worker(ctx context.Context) {
	for f := range s.work {
		s.serveFrame(ctx, f)
	}
}

// serveFrame answers one request. It owns f and passes it on to answer or
// back to the pool.
func (s *Server) serveFrame(ctx context.Context, f *frame) {
	b := f.b
	shelf := binary.BigEndian.Uint16(b[16:18])
	slot := b[18]
	if Command(b[19]) == CmdQueryConfig {
		s.refreshMTU()
	}
	if shelf != BroadcastShelf && slot != BroadcastSlot {
		t := (*s.targets.Load())[TargetAddr{shelf, slot}]
		if t == nil {
			s.Stats.NoTarget.Add(1)
			s.putFree(f)
			return
		}
		s.answer(ctx, t, f)
		return
	}
	// A broadcast request is answered by every matching target, each in a
	// copy of the request since the answer is built in place.
	for a, t := range *s.targets.Load() {
		if (shelf != BroadcastShelf && shelf != a.Shelf) || (slot != BroadcastSlot && slot != a.Slot) {
			continue
		}
		var c *frame
		select {
		case c = <-s.free:
		default:
			c = newFrames(1)[0]
		}
		copy(c.b, b[:f.n])
		c.n, c.at = f.n, f.at
		s.Stats.BroadcastCopies.Add(1)
		s.answer(ctx, t, c)
	}
	s.putFree(f)
}

// answer runs the command in f for t and queues the answer for sending. It
// owns f.
func (s *Server) answer(ctx context.Context, t *Target, f *frame) {
	f.kind = kindOf(f.b[:f.n])
	f.rlen = t.handle(ctx, f.b, f.n, s.MAC(), int(s.maxSectors.Load()))
	if f.rlen == 0 {
		s.putFree(f)
		return
	}
	f.t = t
	s.send(f)
}

// send queues an answer. Answers that are ready at the same time leave in
// one sendmmsg: the first worker to find the queue idle sends for everyone
// who queues meanwhile (flat combining), so under load the socket sees few
// calls and no worker waits for a dedicated sender goroutine.
func (s *Server) send(f *frame) {
	q := &s.sendq
	q.mu.Lock()
	q.pending = append(q.pending, f)
	if q.busy {
		q.mu.Unlock()
		return
	}
	q.busy = true
	for len(q.pending) > 0 {
		batch := q.pending
		q.pending, q.spare = q.spare[:0], batch
		q.mu.Unlock()
		s.sendBatch(batch)
		q.mu.Lock()
	}
	q.busy = false
	q.mu.Unlock()
}

func (s *Server) sendBatch(batch []*frame) {
	bufs := s.sendq.bufs[:0]
	for _, f := range batch {
		bufs = append(bufs, f.b[:f.rlen])
	}
	s.sendq.bufs = bufs
	err := s.conn.WriteFrames(bufs)
	clear(bufs)
	if err != nil {
		s.Stats.SendErrors.Add(uint64(len(batch)))
		s.log.Warn("send failed", "frames", len(batch), "err", err)
	} else {
		s.Stats.Sent.Add(uint64(len(batch)))
	}
	for i, f := range batch {
		if err == nil && f.t.observe != nil {
			f.t.observe(f.kind, time.Since(f.at))
		}
		f.t = nil
		batch[i] = nil
		s.putFree(f)
	}
}

// Close closes the socket. Call it after Serve has returned.
func (s *Server) Close() error { return s.conn.Close() }
