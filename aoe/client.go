package aoe

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Client is an AoE initiator on one interface. One goroutine reads the socket
// and hands every response to the request that waits for it (matched by tag,
// command, shelf.slot and, for unicast requests, the source MAC); the calling
// goroutines send their own frames and retransmit them when the timeout
// expires. All methods are safe for concurrent use.
//
// Request state lives in slots allocated once in NewClient and indexed by the
// low 16 bits of the tag, so the I/O path (ReadAt, WriteAt) does not allocate
// per frame: read data is copied by the reader straight into the caller's
// buffer and write data straight into the slot's transmit buffer.
type Client struct {
	conn frameConn
	opts ClientOptions
	mac  MAC
	mtu  int

	slots []*slot
	free  chan *slot
	calls sync.Pool // *call

	// Jacobson/Karels round-trip estimate in nanoseconds. Only the reader
	// goroutine writes it; senders read it to arm their timers.
	srtt, rttvar atomic.Int64

	routesMu sync.Mutex
	routes   map[TargetAddr]MAC // learned from responses (Follow mode)

	stats clientCounters

	closeOnce  sync.Once
	closed     chan struct{}
	readerDone chan struct{}
}

// frameConn is the part of *Conn the client uses; tests substitute an
// in-memory link for fault injection.
type frameConn interface {
	ReadFrame(b []byte) (int, error)
	WriteFrame(b []byte) error
	MAC() MAC
	MTU() int
	Close() error
}

// ClientOptions tune a Client. The zero value is usable.
type ClientOptions struct {
	// Timeout, when positive, is a fixed retransmit timeout. Zero selects an
	// adaptive one (Jacobson/Karels: srtt + 4*rttvar, doubled on every
	// retransmit of the same request, Karn's rule for samples).
	Timeout time.Duration
	// InitialRTO is the adaptive timeout before the first sample (200ms).
	InitialRTO time.Duration
	// MinRTO and MaxRTO clamp the adaptive timeout (20ms, 2s). The floor is
	// well above a LAN round trip on purpose: a target doing O_SYNC writes
	// with a deep queue answers in milliseconds, and a spurious retransmit
	// costs that target a second write.
	MinRTO, MaxRTO time.Duration
	// RequestTimeout bounds one request, retransmits included (10s). A
	// negative value leaves the bound to the context alone, which is what a
	// failover test wants: keep retransmitting until a new leader answers.
	RequestTimeout time.Duration
	// ProbeTimeout bounds Query Config test and prefix requests, whose
	// negative answer is silence (1s).
	ProbeTimeout time.Duration
	// MaxOutstanding is the number of request slots shared by all callers
	// (256, at most 65536).
	MaxOutstanding int
	// Window is the number of frames one ReadAt/WriteAt keeps in flight when
	// the Remote does not say (16).
	Window int
	// Follow makes the client track targets that move between MACs (cluster
	// failover): any response or announcement for a shelf.slot updates the
	// MAC new requests go to, responses are accepted from any MAC, and a
	// request retransmitted three times is sent to broadcast.
	Follow bool
	// OnAnnounce, if set, is called from the reader goroutine for every Query
	// Config response that answers no outstanding request (a target's
	// announcement). It must not block.
	OnAnnounce func(TargetInfo)
	// ReadBuffer and WriteBuffer size the socket buffers (default: room for
	// MaxOutstanding full frames).
	ReadBuffer, WriteBuffer int
}

func (o *ClientOptions) setDefaults() {
	if o.InitialRTO <= 0 {
		o.InitialRTO = 200 * time.Millisecond
	}
	if o.MinRTO <= 0 {
		o.MinRTO = 20 * time.Millisecond
	}
	if o.MaxRTO <= 0 {
		o.MaxRTO = 2 * time.Second
	}
	if o.MaxRTO < o.MinRTO {
		o.MaxRTO = o.MinRTO
	}
	if o.RequestTimeout == 0 {
		o.RequestTimeout = 10 * time.Second
	}
	if o.ProbeTimeout <= 0 {
		o.ProbeTimeout = time.Second
	}
	if o.MaxOutstanding <= 0 {
		o.MaxOutstanding = 256
	}
	if o.MaxOutstanding > 1<<16 {
		o.MaxOutstanding = 1 << 16
	}
	if o.Window <= 0 {
		o.Window = 16
	}
}

// Remote addresses one AoE target as the initiator sees it. (The name
// Target is the server-side engine.)
type Remote struct {
	Shelf uint16
	Slot  uint8
	// MAC is where requests are sent; the zero MAC means broadcast (and a
	// response from any MAC is accepted).
	MAC MAC
	// MaxSectors is the number of sectors per ATA frame; zero derives it from
	// the interface MTU. Use TargetInfo.Target to honour the target's scnt.
	MaxSectors int
	// Window is the number of frames one ReadAt/WriteAt keeps in flight;
	// zero uses ClientOptions.Window.
	Window int
}

func (t Remote) String() string {
	if t.MAC == (MAC{}) {
		return fmt.Sprintf("e%d.%d", t.Shelf, t.Slot)
	}
	return fmt.Sprintf("e%d.%d@%s", t.Shelf, t.Slot, t.MAC)
}

// TargetInfo is one target as a Query Config response describes it. A target
// reachable through several MACs appears once per MAC.
type TargetInfo struct {
	Shelf           uint16
	Slot            uint8
	MAC             MAC
	BufferCount     uint16
	FirmwareVersion uint16
	SectorCount     uint8
	AoEVersion      uint8
	Config          []byte
}

// Remote returns the address of ti with its scnt and bufcnt as the frame
// size and window (the client still bounds them by its own MTU and slots).
func (ti TargetInfo) Remote() Remote {
	return Remote{Shelf: ti.Shelf, Slot: ti.Slot, MAC: ti.MAC,
		MaxSectors: int(ti.SectorCount), Window: int(ti.BufferCount)}
}

func targetInfoFromConfig(m *Config) TargetInfo {
	return TargetInfo{
		Shelf: m.Shelf, Slot: m.Slot, MAC: m.Src,
		BufferCount: m.BufferCount, FirmwareVersion: m.FirmwareVersion,
		SectorCount: m.SectorCount, AoEVersion: m.AoEVersion,
		Config: bytes.Clone(m.Config),
	}
}

// ErrTimeout is wrapped by every error that means "no answer": a request
// whose retransmits were exhausted, and a Query Config test or prefix that
// did not match (the target answers those with silence).
var ErrTimeout = errors.New("aoe: no response")

// ErrClientClosed is returned by calls on a closed Client.
var ErrClientClosed = errors.New("aoe: client closed")

// ATAError is an ATA response whose status has an error bit (ERR, DF, DRQ or
// BSY: the bits the Linux driver treats as failure).
type ATAError struct {
	Command uint8 // the ATA command that failed
	LBA     uint64
	Status  uint8 // status register
	Err     uint8 // error register (ABRT 0x04, IDNF 0x10, UNC 0x40)
}

func (e *ATAError) Error() string {
	what := ""
	switch {
	case e.Err&ATAErrIDNotFound != 0:
		what = " (IDNF: sector out of range)"
	case e.Err&ATAErrAbort != 0:
		what = " (ABRT: command aborted)"
	case e.Err&ATAErrUncorrectable != 0:
		what = " (UNC: uncorrectable)"
	}
	return fmt.Sprintf("aoe: ATA command %#02x at lba %d failed: status %#02x error %#02x%s",
		e.Command, e.LBA, e.Status, e.Err, what)
}

// MaskListError is a Mac Mask List response with its error field set.
type MaskListError struct {
	Code MaskError
	// Directive is the first directive the target rejected (for MaskErrBadDirective).
	Directive int
}

func (e *MaskListError) Error() string {
	switch e.Code {
	case MaskErrBadDirective:
		return fmt.Sprintf("aoe: mac mask list: bad directive %d", e.Directive)
	case MaskErrListFull:
		return "aoe: mac mask list: list full"
	}
	return fmt.Sprintf("aoe: mac mask list: error %d", uint8(e.Code))
}

// ClientStats counts the client's traffic since it was created.
type ClientStats struct {
	FramesSent  uint64 // every transmission, retransmits included
	Retransmits uint64
	Timeouts    uint64 // requests given up for lack of an answer
	Responses   uint64 // responses matched to a request
	Unmatched   uint64 // responses nobody waited for (late, duplicate, announcements)
	// Late counts answers to a request that was already answered or given
	// up: with Retransmits it tells spurious retransmits (timeout shorter
	// than the target's latency) from lost frames.
	Late           uint64
	ProtocolErrors uint64 // AoE error responses
	ATAErrors      uint64 // ATA responses with an error status
	SRTT, RTTVar   time.Duration
	RTO            time.Duration // the adaptive timeout now
}

type clientCounters struct {
	sent, retrans, timeouts, responses, unmatched, late, protoErrs, ataErrs atomic.Uint64
}

// slot is one outstanding request. The fields under mu are shared with the
// reader goroutine; the rest belong to the goroutine that acquired the slot.
type slot struct {
	idx    uint32
	gen    uint32
	tx     []byte // request frame buffer
	txn    int
	rx     []byte // response frame copy for non-ATA commands
	doneCh chan struct{}

	// Owner-only retransmit bookkeeping.
	next   time.Time // retransmit time
	giveUp time.Time // zero: never (context only)
	first  time.Time

	mu       sync.Mutex
	prevTag  uint32 // tag of the request released last, to recognise late answers
	active   bool
	done     bool
	tag      uint32
	cmd      Command
	shelf    uint16
	slotNo   uint8
	dst      MAC
	anySrc   bool
	sentAt   time.Time
	retries  int
	ataIO    bool   // ReadAt/WriteAt frame: status kept, data to rdst, no frame copy
	rdst     []byte // ATA read destination (aliases the caller's buffer)
	ataCmd   uint8
	collect  func(b []byte) // broadcast collector: called for each response
	src      MAC            // responder
	isErr    bool
	errCode  ErrorCode
	status   uint8
	errReg   uint8
	dataLen  int // ATA data bytes received
	rxn      int
	response bool
}

type call struct {
	timer *time.Timer
	q     []*slot
}

// NewClient opens an AoE socket on ifname (which must be an interface this
// process may flood with broadcasts: never a shared LAN by accident) and
// starts its reader.
func NewClient(ifname string, opts ClientOptions) (*Client, error) {
	opts.setDefaults()
	f, err := ResponseFilter()
	if err != nil {
		return nil, fmt.Errorf("aoe: client on %s: build filter: %w", ifname, err)
	}
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("aoe: client on %s: %w", ifname, err)
	}
	bufs := opts.MaxOutstanding * (frameCap(ifi.MTU) + 256)
	if opts.ReadBuffer == 0 {
		opts.ReadBuffer = bufs
	}
	if opts.WriteBuffer == 0 {
		opts.WriteBuffer = bufs
	}
	conn, err := Listen(ifname, ListenConfig{Filter: f, ReadBuffer: opts.ReadBuffer, WriteBuffer: opts.WriteBuffer})
	if err != nil {
		return nil, fmt.Errorf("aoe: client on %s: %w", ifname, err)
	}
	return newClient(conn, opts), nil
}

// frameCap is the frame size the client's buffers hold for an MTU: one
// full ATA frame (capped at jumbo size, which is all AoE targets use) or the
// largest control message, whichever is bigger.
func frameCap(mtu int) int {
	if mtu > 9216 {
		mtu = 9216
	}
	n := ATAHeaderLen + SectorsPerFrame(mtu)*SectorSize
	if c := ConfigHeaderLen + MaxConfigLen; c > n {
		n = c
	}
	if m := MaskHeaderLen + 255*directiveLen; m > n {
		n = m
	}
	return n
}

func newClient(conn frameConn, opts ClientOptions) *Client {
	opts.setDefaults()
	c := &Client{
		conn:       conn,
		opts:       opts,
		mac:        conn.MAC(),
		mtu:        conn.MTU(),
		free:       make(chan *slot, opts.MaxOutstanding),
		routes:     map[TargetAddr]MAC{},
		closed:     make(chan struct{}),
		readerDone: make(chan struct{}),
	}
	n := frameCap(c.mtu)
	c.slots = make([]*slot, opts.MaxOutstanding)
	for i := range c.slots {
		s := &slot{idx: uint32(i), tx: make([]byte, n), rx: make([]byte, n), doneCh: make(chan struct{}, 1)}
		c.slots[i] = s
		c.free <- s
	}
	c.calls.New = func() any {
		t := time.NewTimer(time.Hour)
		t.Stop()
		return &call{timer: t, q: make([]*slot, 0, 64)}
	}
	go c.reader()
	return c
}

// MAC is the client's own address.
func (c *Client) MAC() MAC { return c.mac }

// MaxSectors is the number of sectors per frame the client's MTU carries.
func (c *Client) MaxSectors() int { return SectorsPerFrame(min(c.mtu, 9216)) }

// Close stops the reader and closes the socket. Calls in progress fail with
// ErrClientClosed.
func (c *Client) Close() error {
	var err error
	c.closeOnce.Do(func() {
		close(c.closed)
		err = c.conn.Close()
		<-c.readerDone
	})
	return err
}

// Stats returns the traffic counters.
func (c *Client) Stats() ClientStats {
	return ClientStats{
		FramesSent:     c.stats.sent.Load(),
		Retransmits:    c.stats.retrans.Load(),
		Timeouts:       c.stats.timeouts.Load(),
		Responses:      c.stats.responses.Load(),
		Unmatched:      c.stats.unmatched.Load(),
		Late:           c.stats.late.Load(),
		ProtocolErrors: c.stats.protoErrs.Load(),
		ATAErrors:      c.stats.ataErrs.Load(),
		SRTT:           time.Duration(c.srtt.Load()),
		RTTVar:         time.Duration(c.rttvar.Load()),
		RTO:            c.rto(),
	}
}

// rto is the timeout for a first transmission.
func (c *Client) rto() time.Duration {
	if c.opts.Timeout > 0 {
		return c.opts.Timeout
	}
	srtt := c.srtt.Load()
	if srtt == 0 {
		return c.opts.InitialRTO
	}
	d := time.Duration(srtt + 4*c.rttvar.Load())
	return max(c.opts.MinRTO, min(d, c.opts.MaxRTO))
}

// sample feeds one round-trip measurement to the estimator (reader only).
func (c *Client) sample(m time.Duration) {
	ns := int64(m)
	srtt := c.srtt.Load()
	if srtt == 0 {
		c.srtt.Store(max(ns, 1))
		c.rttvar.Store(ns / 2)
		return
	}
	rttvar := c.rttvar.Load()
	e := ns - srtt
	srtt += e / 8
	if e < 0 {
		e = -e
	}
	rttvar += (e - rttvar) / 4
	c.srtt.Store(max(srtt, 1))
	c.rttvar.Store(rttvar)
}

// ---- slots ----

func (c *Client) acquire(ctx context.Context) (*slot, error) {
	select {
	case s := <-c.free:
		return s, nil
	default:
	}
	select {
	case s := <-c.free:
		return s, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.closed:
		return nil, ErrClientClosed
	}
}

func (c *Client) tryAcquire() *slot {
	select {
	case s := <-c.free:
		return s
	default:
		return nil
	}
}

// release retires s: after it returns the reader no longer touches the
// caller's buffers through s.
func (c *Client) release(s *slot) {
	s.mu.Lock()
	s.active = false
	s.prevTag = s.tag
	s.ataIO = false
	s.rdst = nil
	s.collect = nil
	s.mu.Unlock()
	select {
	case <-s.doneCh:
	default:
	}
	c.free <- s
}

func (c *Client) dstFor(t Remote) MAC {
	if c.opts.Follow {
		c.routesMu.Lock()
		m, ok := c.routes[TargetAddr{t.Shelf, t.Slot}]
		c.routesMu.Unlock()
		if ok {
			return m
		}
	}
	if t.MAC == (MAC{}) {
		return BroadcastMAC
	}
	return t.MAC
}

// begin writes the common header for a request to t into s.tx and arms s.
// The caller then writes the command body and calls start.
func (c *Client) begin(s *slot, t Remote, cmd Command) {
	s.gen = (s.gen + 1) & 0x7fff
	if s.gen == 0 {
		s.gen = 1 // tag 0 is what announcements carry
	}
	dst := c.dstFor(t)
	s.mu.Lock()
	s.active = true
	s.done = false
	s.response = false
	s.tag = s.gen<<16 | s.idx
	s.cmd = cmd
	s.shelf, s.slotNo = t.Shelf, t.Slot
	s.dst = dst
	s.anySrc = dst == BroadcastMAC || c.opts.Follow
	s.retries = 0
	s.isErr, s.errCode, s.status, s.errReg, s.dataLen, s.rxn = false, 0, 0, 0, 0, 0
	s.mu.Unlock()
	h := Header{Dst: dst, Src: c.mac, Version: Version, Shelf: t.Shelf, Slot: t.Slot, Command: cmd, Tag: s.tag}
	_ = h.Marshal(s.tx) // tx is always at least HeaderLen long
}

// start sends s for the first time; timeout bounds the whole request (zero:
// the client's RequestTimeout).
func (c *Client) start(s *slot, n int, timeout time.Duration) error {
	if n < MinFrameLen {
		clear(s.tx[n:MinFrameLen])
		n = MinFrameLen
	}
	s.txn = n
	now := time.Now()
	s.first = now
	s.next = now.Add(c.rto())
	if timeout == 0 {
		timeout = c.opts.RequestTimeout
	}
	s.giveUp = time.Time{}
	if timeout > 0 {
		s.giveUp = now.Add(timeout)
	}
	s.mu.Lock()
	s.sentAt = now
	s.mu.Unlock()
	c.stats.sent.Add(1)
	if err := c.conn.WriteFrame(s.tx[:n]); err != nil {
		return fmt.Errorf("aoe: send %s to e%d.%d: %w", s.cmd, s.shelf, s.slotNo, err)
	}
	return nil
}

// retransmit sends s again with a doubled timeout.
func (c *Client) retransmit(s *slot, now time.Time) error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		return nil
	}
	s.retries++
	s.sentAt = now
	retries := s.retries
	if c.opts.Follow && s.dst != BroadcastMAC {
		// The target may have moved (failover): go where it was last
		// heard from, and to everyone once that has not helped either.
		dst := s.dst
		c.routesMu.Lock()
		if m, ok := c.routes[TargetAddr{s.shelf, s.slotNo}]; ok {
			dst = m
		}
		c.routesMu.Unlock()
		if retries >= 3 {
			dst = BroadcastMAC
		}
		if dst != s.dst {
			s.dst = dst
			copy(s.tx[0:6], dst[:])
		}
	}
	s.mu.Unlock()
	rto := c.rto()
	for i := 0; i < retries && rto < c.opts.MaxRTO; i++ {
		rto *= 2
	}
	if c.opts.Timeout <= 0 {
		rto = min(rto, c.opts.MaxRTO)
	}
	s.next = now.Add(rto)
	c.stats.sent.Add(1)
	c.stats.retrans.Add(1)
	if err := c.conn.WriteFrame(s.tx[:s.txn]); err != nil {
		return fmt.Errorf("aoe: retransmit %s to e%d.%d: %w", s.cmd, s.shelf, s.slotNo, err)
	}
	return nil
}

func (c *Client) getCall() *call { return c.calls.Get().(*call) }

// putCall releases every slot still outstanding in cl (the call failed or
// was cancelled) and returns cl to the pool.
func (c *Client) putCall(cl *call) {
	for _, s := range cl.q {
		c.release(s)
	}
	clear(cl.q)
	cl.q = cl.q[:0]
	cl.timer.Stop()
	c.calls.Put(cl)
}

// waitOldest waits until the oldest request of cl is answered, retransmitting
// every request of cl whose timeout expires meanwhile, and pops it. Later
// requests that complete first keep their signal until their turn.
func (c *Client) waitOldest(ctx context.Context, cl *call) (*slot, error) {
	s := cl.q[0]
	for {
		next := s.next
		for _, o := range cl.q[1:] {
			if o.next.Before(next) {
				next = o.next
			}
		}
		cl.timer.Reset(time.Until(next))
		select {
		case <-s.doneCh:
			cl.timer.Stop()
			copy(cl.q, cl.q[1:])
			cl.q[len(cl.q)-1] = nil
			cl.q = cl.q[:len(cl.q)-1]
			return s, nil
		case now := <-cl.timer.C:
			now = time.Now() // the channel's time may be stale under load
			for _, o := range cl.q {
				if now.Before(o.next) {
					continue
				}
				if c.isDone(o) {
					// Answered, waiting for its turn: no more timer for it.
					o.next = now.Add(time.Hour)
					continue
				}
				if !o.giveUp.IsZero() && !now.Before(o.giveUp) {
					c.stats.timeouts.Add(1)
					return nil, c.timeoutError(o, now, nil)
				}
				if err := c.retransmit(o, now); err != nil {
					return nil, err
				}
			}
		case <-ctx.Done():
			cl.timer.Stop()
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				// The caller's deadline, not the client giving up: not
				// counted in Timeouts, but still "no response" to errors.Is.
				return nil, c.timeoutError(s, time.Now(), ctx.Err())
			}
			return nil, fmt.Errorf("aoe: %s to e%d.%d: %w", s.cmd, s.shelf, s.slotNo, ctx.Err())
		case <-c.closed:
			cl.timer.Stop()
			return nil, ErrClientClosed
		}
	}
}

func (c *Client) isDone(s *slot) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.done
}

func (c *Client) timeoutError(s *slot, now time.Time, ctxErr error) error {
	s.mu.Lock()
	dst, tries := s.dst, s.retries+1
	s.mu.Unlock()
	what := fmt.Sprintf("aoe: %s to e%d.%d at %s: no answer after %d transmission(s) in %v",
		s.cmd, s.shelf, s.slotNo, dst, tries, now.Sub(s.first).Round(time.Millisecond))
	if ctxErr != nil {
		return fmt.Errorf("%s: %w (%w)", what, ErrTimeout, ctxErr)
	}
	return fmt.Errorf("%s: %w", what, ErrTimeout)
}

// ---- reader ----

func (c *Client) reader() {
	defer close(c.readerDone)
	buf := make([]byte, 1<<16)
	for {
		n, err := c.conn.ReadFrame(buf)
		if err != nil {
			select {
			case <-c.closed:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
				return
			}
			// A transient error (ENOBUFS, EINTR): back off a little rather
			// than spin.
			time.Sleep(time.Millisecond)
			continue
		}
		c.handleFrame(buf[:n])
	}
}

// handleFrame matches one received frame to its request. It is the client's
// only decoding of untrusted input and must accept any bytes.
func (c *Client) handleFrame(b []byte) {
	var h Header
	if h.Unmarshal(b) != nil || !h.IsResponse() {
		return
	}
	idx := h.Tag & 0xffff
	if idx >= uint32(len(c.slots)) || h.Tag>>31 != 0 {
		c.unmatched(&h, b)
		return
	}
	s := c.slots[idx]
	s.mu.Lock()
	if h.Tag == s.prevTag && (!s.active || s.tag != h.Tag) {
		s.mu.Unlock()
		c.stats.late.Add(1)
		c.stats.unmatched.Add(1)
		return
	}
	if !s.active || s.tag != h.Tag || s.cmd != h.Command ||
		(s.shelf != BroadcastShelf && s.shelf != h.Shelf) ||
		(s.slotNo != BroadcastSlot && s.slotNo != h.Slot) ||
		(!s.anySrc && s.dst != h.Src) {
		s.mu.Unlock()
		c.unmatched(&h, b)
		return
	}
	if s.collect != nil {
		// Broadcast query: every answer counts, the request stays open.
		s.collect(b)
		s.mu.Unlock()
		c.stats.responses.Add(1)
		return
	}
	if s.done {
		s.mu.Unlock()
		c.stats.late.Add(1) // duplicate answer to a retransmit
		c.stats.unmatched.Add(1)
		return
	}
	s.src = h.Src
	s.isErr = h.IsError()
	s.errCode = h.Error
	if s.ataIO {
		var a ATA
		if a.Unmarshal(b) == nil {
			s.status, s.errReg = a.CmdStatus, a.ErrFeature
			s.dataLen = copy(s.rdst, a.Data)
		}
	} else {
		s.rxn = copy(s.rx, b)
	}
	if s.retries == 0 {
		c.sample(time.Since(s.sentAt))
	}
	s.done = true
	s.response = true
	select {
	case s.doneCh <- struct{}{}:
	default:
	}
	s.mu.Unlock()
	c.stats.responses.Add(1)
	if c.opts.Follow {
		c.learn(h.Shelf, h.Slot, h.Src)
	}
}

func (c *Client) learn(shelf uint16, slot uint8, src MAC) {
	a := TargetAddr{shelf, slot}
	c.routesMu.Lock()
	if c.routes[a] != src {
		c.routes[a] = src
	}
	c.routesMu.Unlock()
}

func (c *Client) unmatched(h *Header, b []byte) {
	c.stats.unmatched.Add(1)
	if h.Command != CmdQueryConfig || h.IsError() {
		return
	}
	if !c.opts.Follow && c.opts.OnAnnounce == nil {
		return
	}
	var m Config
	if m.Unmarshal(b) != nil || m.Shelf == BroadcastShelf || m.Slot == BroadcastSlot {
		return
	}
	if c.opts.Follow {
		c.learn(m.Shelf, m.Slot, m.Src)
	}
	if c.opts.OnAnnounce != nil {
		c.opts.OnAnnounce(targetInfoFromConfig(&m))
	}
}

// ---- ATA I/O ----

func (c *Client) sectorsPerFrame(t Remote) int {
	n := c.MaxSectors()
	if t.MaxSectors > 0 && t.MaxSectors < n {
		n = t.MaxSectors
	}
	return n
}

// ReadAt reads len(p) bytes (a multiple of 512) starting at sector lba.
func (c *Client) ReadAt(ctx context.Context, t Remote, p []byte, lba uint64) error {
	return c.rw(ctx, t, p, lba, false)
}

// WriteAt writes p (a multiple of 512 bytes) starting at sector lba. It
// returns once the target acknowledged every frame.
func (c *Client) WriteAt(ctx context.Context, t Remote, p []byte, lba uint64) error {
	return c.rw(ctx, t, p, lba, true)
}

func (c *Client) rw(ctx context.Context, t Remote, p []byte, lba uint64, write bool) error {
	op := "read"
	if write {
		op = "write"
	}
	if len(p)%SectorSize != 0 {
		return fmt.Errorf("aoe: %s %s: length %d is not a multiple of %d", op, t, len(p), SectorSize)
	}
	if lba+uint64(len(p)/SectorSize) > 1<<48 {
		return fmt.Errorf("aoe: %s %s: lba %d+%d beyond 48 bits", op, t, lba, len(p)/SectorSize)
	}
	spf := c.sectorsPerFrame(t) * SectorSize
	win := t.Window
	if win <= 0 {
		win = c.opts.Window
	}
	win = max(1, min(win, len(c.slots)))
	cl := c.getCall()
	defer c.putCall(cl)
	off := 0
	for off < len(p) || len(cl.q) > 0 {
		for off < len(p) && len(cl.q) < win {
			var s *slot
			if len(cl.q) == 0 {
				var err error
				if s, err = c.acquire(ctx); err != nil {
					return fmt.Errorf("aoe: %s %s at lba %d: %w", op, t, lba+uint64(off/SectorSize), err)
				}
			} else if s = c.tryAcquire(); s == nil {
				break // serve what is in flight before waiting for a slot
			}
			n := min(spf, len(p)-off)
			a := ATA{AFlags: ATAFlagExtended, SectorCount: uint8(n / SectorSize), LBA: lba + uint64(off/SectorSize)}
			c.begin(s, t, CmdATA)
			if write {
				a.AFlags |= ATAFlagWrite
				a.CmdStatus = ATACmdWriteSectorsExt
				a.marshalATAHeader(s.tx)
				copy(s.tx[ATAHeaderLen:], p[off:off+n])
			} else {
				a.CmdStatus = ATACmdReadSectorsExt
				a.marshalATAHeader(s.tx)
			}
			s.mu.Lock()
			s.ataCmd = a.CmdStatus
			s.ataIO = true
			s.rdst = nil
			if !write {
				s.rdst = p[off : off+n]
			}
			s.mu.Unlock()
			cl.q = append(cl.q, s)
			fl := ATAHeaderLen
			if write {
				fl += n
			}
			if err := c.start(s, fl, 0); err != nil {
				return err
			}
			off += n
		}
		s, err := c.waitOldest(ctx, cl)
		if err != nil {
			return fmt.Errorf("aoe: %s %s: %w", op, t, err)
		}
		err = c.ataResult(s, write)
		c.release(s)
		if err != nil {
			return err
		}
	}
	return nil
}

// ataResult turns a completed ATA slot into an error (nil when it succeeded).
func (c *Client) ataResult(s *slot, write bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.isErr {
		c.stats.protoErrs.Add(1)
		return &ProtocolError{Command: CmdATA, Code: s.errCode}
	}
	lba := getLBA(s.tx[28:34])
	if s.status&ATAStatusErrorMaskLinx != 0 {
		c.stats.ataErrs.Add(1)
		return &ATAError{Command: s.ataCmd, LBA: lba, Status: s.status, Err: s.errReg}
	}
	if !write && s.dataLen < len(s.rdst) {
		return fmt.Errorf("aoe: read e%d.%d lba %d: response carried %d of %d bytes",
			s.shelf, s.slotNo, lba, s.dataLen, len(s.rdst))
	}
	return nil
}

// ATA sends one raw ATA command and returns the response (its Data copied
// out of the frame: up to SectorCount sectors for a command without the
// write flag). A response whose status has an error bit is returned along
// with an *ATAError.
func (c *Client) ATA(ctx context.Context, t Remote, req ATA) (ATA, error) {
	s, err := c.acquire(ctx)
	if err != nil {
		return ATA{}, fmt.Errorf("aoe: ATA %#02x to %s: %w", req.CmdStatus, t, err)
	}
	cl := c.getCall()
	defer c.putCall(cl)
	cl.q = append(cl.q, s)
	c.begin(s, t, CmdATA)
	if len(req.Data) > len(s.tx)-ATAHeaderLen {
		return ATA{}, fmt.Errorf("aoe: ATA %#02x to %s: %d data bytes exceed the frame", req.CmdStatus, t, len(req.Data))
	}
	req.marshalATAHeader(s.tx)
	copy(s.tx[ATAHeaderLen:], req.Data)
	if err := c.start(s, ATAHeaderLen+len(req.Data), 0); err != nil {
		return ATA{}, err
	}
	if _, err := c.waitOldest(ctx, cl); err != nil {
		cl.q = append(cl.q[:0], s)
		return ATA{}, fmt.Errorf("aoe: ATA %#02x to %s: %w", req.CmdStatus, t, err)
	}
	cl.q = append(cl.q[:0], s) // putCall releases it
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.isErr {
		c.stats.protoErrs.Add(1)
		return ATA{}, &ProtocolError{Command: CmdATA, Code: s.errCode}
	}
	var resp ATA
	if err := resp.Unmarshal(s.rx[:s.rxn]); err != nil {
		return ATA{}, fmt.Errorf("aoe: ATA %#02x to %s: decode response: %w", req.CmdStatus, t, err)
	}
	want := 0
	if req.AFlags&ATAFlagWrite == 0 {
		want = int(req.SectorCount) * SectorSize
	}
	resp.Data = bytes.Clone(resp.Data[:min(want, len(resp.Data))])
	if resp.CmdStatus&ATAStatusErrorMaskLinx != 0 {
		c.stats.ataErrs.Add(1)
		return resp, &ATAError{Command: req.CmdStatus, LBA: req.LBA, Status: resp.CmdStatus, Err: resp.ErrFeature}
	}
	return resp, nil
}

// Flush asks the target to make every acknowledged write durable. It sends
// FLUSH CACHE (0xE7), as the Linux driver does: Debian's vblade 25 aborts
// FLUSH CACHE EXT.
func (c *Client) Flush(ctx context.Context, t Remote) error {
	_, err := c.ATA(ctx, t, ATA{CmdStatus: ATACmdFlushCache})
	if err != nil {
		return fmt.Errorf("aoe: flush %s: %w", t, err)
	}
	return nil
}

// IdentifyInfo is what ATA IDENTIFY DEVICE reports.
type IdentifyInfo struct {
	Sectors      uint64 // LBA48 capacity when supported, else LBA28
	LBA28Sectors uint32
	LBA48Sectors uint64
	Model        string
	Serial       string
	Firmware     string
	LBA48        bool // word 83 bit 10
	Flush        bool // FLUSH CACHE supported (word 83 bit 12)
	FlushExt     bool // FLUSH CACHE EXT supported (word 83 bit 13)
	Raw          [512]byte
}

// Size is the capacity in bytes.
func (i IdentifyInfo) Size() int64 { return int64(i.Sectors) * SectorSize }

// ParseIdentify decodes an IDENTIFY DEVICE data block.
func ParseIdentify(b []byte) (IdentifyInfo, error) {
	var info IdentifyInfo
	if len(b) < 512 {
		return info, fmt.Errorf("aoe: identify data is %d bytes, want 512", len(b))
	}
	copy(info.Raw[:], b)
	word := func(i int) uint16 { return uint16(b[2*i]) | uint16(b[2*i+1])<<8 }
	info.Serial = ataString(b[20:40])
	info.Firmware = ataString(b[46:54])
	info.Model = ataString(b[54:94])
	info.LBA28Sectors = uint32(word(60)) | uint32(word(61))<<16
	w83 := word(83)
	// Bit 14 set and bit 15 clear mark word 83 as valid.
	if w83&0xc000 == 0x4000 {
		info.LBA48 = w83&(1<<10) != 0
		info.Flush = w83&(1<<12) != 0
		info.FlushExt = w83&(1<<13) != 0
	}
	for i := 0; i < 4; i++ {
		info.LBA48Sectors |= uint64(word(100+i)) << (16 * i)
	}
	info.Sectors = uint64(info.LBA28Sectors)
	if info.LBA48 {
		info.Sectors = info.LBA48Sectors
	}
	return info, nil
}

// ataString decodes an ATA string: byte pairs swapped, space padded.
func ataString(b []byte) string {
	out := make([]byte, len(b))
	for i := 0; i+1 < len(b); i += 2 {
		out[i], out[i+1] = b[i+1], b[i]
	}
	return string(bytes.TrimRight(bytes.TrimLeft(out, " \x00"), " \x00"))
}

// Identify runs ATA IDENTIFY DEVICE on t.
func (c *Client) Identify(ctx context.Context, t Remote) (IdentifyInfo, error) {
	resp, err := c.ATA(ctx, t, ATA{SectorCount: 1, CmdStatus: ATACmdIdentify})
	if err != nil {
		return IdentifyInfo{}, fmt.Errorf("aoe: identify %s: %w", t, err)
	}
	info, err := ParseIdentify(resp.Data)
	if err != nil {
		return IdentifyInfo{}, fmt.Errorf("aoe: identify %s: %w", t, err)
	}
	return info, nil
}

// ---- control commands ----

// control sends one non-ATA request built by body (which writes after the
// common header and returns the frame length) and waits for its answer; the
// response frame is returned in a copy.
func (c *Client) control(ctx context.Context, t Remote, cmd Command, timeout time.Duration, body func(b []byte) (int, error)) ([]byte, error) {
	s, err := c.acquire(ctx)
	if err != nil {
		return nil, err
	}
	cl := c.getCall()
	defer c.putCall(cl)
	cl.q = append(cl.q, s)
	c.begin(s, t, cmd)
	n, err := body(s.tx)
	if err != nil {
		return nil, err
	}
	if err := c.start(s, n, timeout); err != nil {
		return nil, err
	}
	if _, err := c.waitOldest(ctx, cl); err != nil {
		cl.q = append(cl.q[:0], s)
		return nil, err
	}
	cl.q = append(cl.q[:0], s)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.isErr {
		c.stats.protoErrs.Add(1)
		return nil, &ProtocolError{Command: cmd, Code: s.errCode}
	}
	return bytes.Clone(s.rx[:s.rxn]), nil
}

// QueryConfig sends a Query Config request. For ConfigTest and ConfigPrefix
// a target whose string does not match stays silent: that comes back as an
// error wrapping ErrTimeout after ProbeTimeout. ConfigSet on a target whose
// string differs returns a *ProtocolError with ErrCodeConfigSet.
func (c *Client) QueryConfig(ctx context.Context, t Remote, cmd ConfigCommand, s []byte) (Config, error) {
	if len(s) > MaxConfigLen {
		return Config{}, fmt.Errorf("aoe: query config %s: string of %d bytes exceeds %d", t, len(s), MaxConfigLen)
	}
	var timeout time.Duration
	if cmd == ConfigTest || cmd == ConfigPrefix {
		timeout = c.opts.ProbeTimeout
	}
	b, err := c.control(ctx, t, CmdQueryConfig, timeout, func(b []byte) (int, error) {
		m := Config{Command: cmd, Config: s}
		_ = m.Header.Unmarshal(b) // keep the header begin wrote
		return m.Marshal(b)
	})
	if err != nil {
		return Config{}, fmt.Errorf("aoe: query config (command %d) %s: %w", cmd, t, err)
	}
	var m Config
	if err := m.Unmarshal(b); err != nil {
		return Config{}, fmt.Errorf("aoe: query config %s: decode response: %w", t, err)
	}
	return m, nil
}

// MaskList reads (MaskRead) or edits (MaskEdit) t's MAC mask list and
// returns the list the target reports afterwards. A rejected edit returns a
// *MaskListError.
func (c *Client) MaskList(ctx context.Context, t Remote, cmd MaskCommand, dirs []Directive) ([]MAC, error) {
	if len(dirs) > 255 {
		return nil, fmt.Errorf("aoe: mac mask list %s: %d directives exceed 255", t, len(dirs))
	}
	b, err := c.control(ctx, t, CmdMaskList, 0, func(b []byte) (int, error) {
		m := Mask{Command: cmd, Directives: dirs}
		_ = m.Header.Unmarshal(b)
		return m.Marshal(b)
	})
	if err != nil {
		return nil, fmt.Errorf("aoe: mac mask list %s: %w", t, err)
	}
	var m Mask
	if err := m.Unmarshal(b); err != nil {
		return nil, fmt.Errorf("aoe: mac mask list %s: decode response: %w", t, err)
	}
	if m.MaskError != 0 {
		return nil, &MaskListError{Code: m.MaskError, Directive: len(m.Directives)}
	}
	macs := make([]MAC, len(m.Directives))
	for i, d := range m.Directives {
		macs[i] = d.MAC
	}
	return macs, nil
}

// Reserve reads (ReserveRead), sets (ReserveSet; an empty list releases) or
// force-sets t's reservation and returns the list the target reports. A
// target reserved by others answers *ProtocolError with
// ErrCodeTargetReserved.
func (c *Client) Reserve(ctx context.Context, t Remote, cmd ReserveCommand, macs []MAC) ([]MAC, error) {
	if len(macs) > 255 {
		return nil, fmt.Errorf("aoe: reserve %s: %d MACs exceed 255", t, len(macs))
	}
	b, err := c.control(ctx, t, CmdReserve, 0, func(b []byte) (int, error) {
		m := Reserve{Command: cmd, MACs: macs}
		_ = m.Header.Unmarshal(b)
		return m.Marshal(b)
	})
	if err != nil {
		return nil, fmt.Errorf("aoe: reserve %s: %w", t, err)
	}
	var m Reserve
	if err := m.Unmarshal(b); err != nil {
		return nil, fmt.Errorf("aoe: reserve %s: decode response: %w", t, err)
	}
	return m.MACs, nil
}

// Discover broadcasts a Query Config read and collects the answers for wait
// (the query is sent twice, at the start and halfway, in case one is lost).
// Targets are sorted by shelf, slot and MAC; a target reachable through
// several MACs appears once per MAC.
func (c *Client) Discover(ctx context.Context, wait time.Duration) ([]TargetInfo, error) {
	s, err := c.acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("aoe: discover: %w", err)
	}
	defer c.release(s)
	type key struct {
		a   TargetAddr
		mac MAC
	}
	seen := map[key]int{}
	var found []TargetInfo
	c.begin(s, Remote{Shelf: BroadcastShelf, Slot: BroadcastSlot}, CmdQueryConfig)
	m := Config{Command: ConfigRead}
	_ = m.Header.Unmarshal(s.tx)
	n, err := m.Marshal(s.tx)
	if err != nil {
		return nil, fmt.Errorf("aoe: discover: %w", err)
	}
	s.mu.Lock()
	s.collect = func(b []byte) {
		var r Config
		if r.Unmarshal(b) != nil || r.IsError() {
			return
		}
		k := key{TargetAddr{r.Shelf, r.Slot}, r.Src}
		if i, ok := seen[k]; ok {
			found[i] = targetInfoFromConfig(&r)
			return
		}
		seen[k] = len(found)
		found = append(found, targetInfoFromConfig(&r))
	}
	s.mu.Unlock()
	if err := c.start(s, n, 0); err != nil {
		return nil, fmt.Errorf("aoe: discover: %w", err)
	}
	half := time.NewTimer(wait / 2)
	end := time.NewTimer(wait)
	defer half.Stop()
	defer end.Stop()
	for done := false; !done; {
		select {
		case <-half.C:
			// A second query, not a retransmit: the first may have been
			// answered by some targets and lost on the way to others.
			c.stats.sent.Add(1)
			if err := c.conn.WriteFrame(s.tx[:s.txn]); err != nil {
				return nil, fmt.Errorf("aoe: discover: resend query: %w", err)
			}
		case <-end.C:
			done = true
		case <-ctx.Done():
			done = true
		case <-c.closed:
			return nil, ErrClientClosed
		}
	}
	s.mu.Lock()
	s.collect = nil
	out := found
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Shelf != b.Shelf {
			return a.Shelf < b.Shelf
		}
		if a.Slot != b.Slot {
			return a.Slot < b.Slot
		}
		return bytes.Compare(a.MAC[:], b.MAC[:]) < 0
	})
	if len(out) == 0 && ctx.Err() != nil {
		return nil, fmt.Errorf("aoe: discover: %w", ctx.Err())
	}
	return out, nil
}
