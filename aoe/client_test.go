package aoe

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"
)

// fakeLink is an in-memory frameConn whose other end is a tiny ATA target
// with fault injection: it drops the requests drop() selects and answers
// the others twice when dup is set. It exists to exercise retransmits and
// tag matching deterministically; the behaviour against real targets is in
// client_integration_test.go.
type fakeLink struct {
	mac, peer MAC
	in        chan []byte
	closed    chan struct{}
	once      sync.Once

	mu    sync.Mutex
	disk  []byte
	seen  int
	drop  func(n int) bool
	dup   bool
	delay time.Duration
	ring  [][]byte
}

func newFakeLink(size int) *fakeLink {
	return &fakeLink{
		mac: MAC{2, 0, 0, 0, 0, 1}, peer: MAC{2, 0, 0, 0, 0, 2},
		in: make(chan []byte, 1024), closed: make(chan struct{}), disk: make([]byte, size),
	}
}

func (l *fakeLink) MAC() MAC { return l.mac }
func (l *fakeLink) MTU() int { return 1500 }
func (l *fakeLink) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *fakeLink) ReadFrame(b []byte) (int, error) {
	select {
	case f := <-l.in:
		return copy(b, f), nil
	case <-l.closed:
		return 0, net.ErrClosed
	}
}

// WriteFrame is the target: it answers synchronously (or after delay).
func (l *fakeLink) WriteFrame(b []byte) error {
	var a ATA
	if err := a.Unmarshal(b); err != nil || a.Command != CmdATA {
		return nil
	}
	l.mu.Lock()
	l.seen++
	if l.drop != nil && l.drop(l.seen) {
		l.mu.Unlock()
		return nil
	}
	// Response buffers come from a ring so the fake allocates nothing
	// (TestClientIOAllocs measures the client).
	if l.ring == nil {
		l.ring = make([][]byte, 512)
		for i := range l.ring {
			l.ring[i] = make([]byte, 1600)
		}
	}
	resp := l.ring[l.seen%len(l.ring)][:ATAHeaderLen+int(a.SectorCount)*SectorSize]
	r := a
	r.Dst, r.Src = a.Src, l.peer
	r.Flags = FlagResponse
	r.CmdStatus = ATAStatusReady
	r.Data = nil
	off := int(a.LBA) * SectorSize
	n := int(a.SectorCount) * SectorSize
	switch {
	case off+n > len(l.disk):
		r.CmdStatus = ATAStatusReady | ATAStatusError
		r.ErrFeature = ATAErrIDNotFound
	case a.AFlags&ATAFlagWrite != 0:
		copy(l.disk[off:off+n], a.Data)
	default:
		r.Data = l.disk[off : off+n]
	}
	m, _ := r.Marshal(resp)
	dup, delay := l.dup, l.delay
	l.mu.Unlock()
	resp = resp[:max(m, MinFrameLen)]
	if delay > 0 {
		resp = bytes.Clone(resp)
		time.AfterFunc(delay, func() { l.in <- resp })
		return nil
	}
	l.in <- resp
	if dup {
		l.in <- resp
	}
	return nil
}

func TestClientRetransmitAndMatch(t *testing.T) {
	l := newFakeLink(1 << 20)
	l.drop = func(n int) bool { return n%7 == 3 } // lose some requests
	l.dup = true                                  // and answer the rest twice
	c := newClient(l, ClientOptions{Timeout: 5 * time.Millisecond, Window: 8})
	defer c.Close()
	r := Remote{Shelf: 1, Slot: 1, MAC: l.peer}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	buf := make([]byte, 64*SectorSize)
	for i := range buf {
		buf[i] = byte(i * 13)
	}
	if err := c.WriteAt(ctx, r, buf, 10); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(buf))
	if err := c.ReadAt(ctx, r, got, 10); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, buf) {
		t.Fatal("read back differs")
	}
	st := c.Stats()
	if st.Retransmits == 0 || st.Unmatched == 0 {
		t.Errorf("expected retransmits and duplicate answers, got %+v", st)
	}
	// Out of range: a typed ATA error.
	err := c.ReadAt(ctx, r, got[:SectorSize], 1<<20/SectorSize)
	var ae *ATAError
	if !errors.As(err, &ae) || ae.Err != ATAErrIDNotFound {
		t.Fatalf("read past end: %v", err)
	}
}

func TestClientTimeoutAndCancel(t *testing.T) {
	l := newFakeLink(1 << 20)
	l.drop = func(int) bool { return true }
	c := newClient(l, ClientOptions{Timeout: 2 * time.Millisecond, RequestTimeout: 50 * time.Millisecond})
	defer c.Close()
	r := Remote{Shelf: 1, Slot: 1}
	err := c.ReadAt(context.Background(), r, make([]byte, SectorSize), 0)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("silent target: %v, want ErrTimeout", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(10*time.Millisecond, cancel)
	err = c.ReadAt(ctx, r, make([]byte, SectorSize), 0)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v, want context.Canceled", err)
	}
	if st := c.Stats(); st.Timeouts != 1 {
		t.Errorf("timeouts %d, want 1", st.Timeouts)
	}
}

// A late answer to a request that was given up must not write into the
// buffer of the caller that gave up, nor complete a later request.
func TestClientLateAnswer(t *testing.T) {
	l := newFakeLink(1 << 20)
	l.delay = 30 * time.Millisecond
	c := newClient(l, ClientOptions{Timeout: time.Hour, MaxOutstanding: 1})
	defer c.Close()
	r := Remote{Shelf: 1, Slot: 1}
	copy(l.disk, bytes.Repeat([]byte{0xaa}, SectorSize))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
	buf := make([]byte, SectorSize)
	if err := c.ReadAt(ctx, r, buf, 0); err == nil {
		t.Fatal("expected a deadline error")
	}
	cancel()
	l.mu.Lock()
	l.delay = 0
	l.mu.Unlock()
	time.Sleep(50 * time.Millisecond) // the late answer arrives now
	if buf[0] != 0 {
		t.Fatal("late answer wrote into a released buffer")
	}
	got := make([]byte, SectorSize)
	if err := c.ReadAt(context.Background(), r, got, 0); err != nil || got[0] != 0xaa {
		t.Fatalf("next read: %v %x", err, got[0])
	}
}

func TestClientIOAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are not meaningful under -race")
	}
	l := newFakeLink(1 << 20)
	c := newClient(l, ClientOptions{})
	defer c.Close()
	r := Remote{Shelf: 1, Slot: 1}
	buf := make([]byte, 2*SectorSize)
	ctx := context.Background()
	c.ReadAt(ctx, r, buf, 0) // warm the pools
	n := testing.AllocsPerRun(200, func() {
		if err := c.WriteAt(ctx, r, buf, 4); err != nil {
			t.Fatal(err)
		}
		if err := c.ReadAt(ctx, r, buf, 4); err != nil {
			t.Fatal(err)
		}
	})
	if n > 0 {
		t.Errorf("%.1f allocations per write+read", n)
	}
}

func TestParseIdentify(t *testing.T) {
	b := make([]byte, 512)
	put := func(w int, v uint16) { b[2*w], b[2*w+1] = byte(v), byte(v>>8) }
	putStr := func(w int, s string, n int) {
		p := []byte(s + string(bytes.Repeat([]byte(" "), 2*n-len(s))))
		for i := 0; i < n; i++ {
			b[2*(w+i)], b[2*(w+i)+1] = p[2*i+1], p[2*i]
		}
	}
	putStr(10, "1.2:host", 10)
	putStr(23, "V25", 4)
	putStr(27, "Coraid EtherDrive vblade", 20)
	put(60, 0xffff)
	put(61, 0x0fff)
	put(83, 0x5400)
	put(100, 0x0000)
	put(101, 0x0001) // 65536 sectors... plus
	put(102, 0x0002)
	id, err := ParseIdentify(b)
	if err != nil {
		t.Fatal(err)
	}
	if id.Serial != "1.2:host" || id.Firmware != "V25" || id.Model != "Coraid EtherDrive vblade" {
		t.Errorf("strings: %q %q %q", id.Serial, id.Firmware, id.Model)
	}
	if !id.LBA48 || !id.Flush || id.FlushExt {
		t.Errorf("bits: %+v", id)
	}
	if id.Sectors != 0x0002_0001_0000 || id.LBA28Sectors != 0x0fffffff {
		t.Errorf("sectors %#x lba28 %#x", id.Sectors, id.LBA28Sectors)
	}
	if _, err := ParseIdentify(b[:100]); err == nil {
		t.Error("short identify accepted")
	}
}

// FuzzClientHandleFrame feeds arbitrary frames to the response path while
// requests of every kind are outstanding: it must never panic, and must not
// write past a read's buffer.
func FuzzClientHandleFrame(f *testing.F) {
	seed := func(fill func(b []byte) int) {
		b := make([]byte, 1514)
		f.Add(b[:fill(b)])
	}
	seed(func(b []byte) int {
		a := ATA{Header: Header{Flags: FlagResponse, Shelf: 1, Slot: 1, Tag: 1<<16 | 0}, SectorCount: 2, Data: make([]byte, 1024)}
		n, _ := a.Marshal(b)
		return n
	})
	seed(func(b []byte) int {
		m := Config{Header: Header{Flags: FlagResponse, Shelf: 1, Slot: 1, Command: CmdQueryConfig, Tag: 1<<16 | 1}, Config: []byte("x")}
		n, _ := m.Marshal(b)
		return n
	})
	seed(func(b []byte) int {
		m := Mask{Header: Header{Flags: FlagResponse, Shelf: 1, Slot: 1, Command: CmdMaskList, Tag: 1<<16 | 2}, Directives: []Directive{{DirAdd, MAC{1}}}}
		n, _ := m.Marshal(b)
		return n
	})
	seed(func(b []byte) int {
		m := Config{Header: Header{Flags: FlagResponse, Shelf: 3, Slot: 4, Command: CmdQueryConfig}}
		n, _ := m.Marshal(b)
		return n
	})
	f.Fuzz(func(t *testing.T, b []byte) {
		l := newFakeLink(4096)
		c := newClient(l, ClientOptions{MaxOutstanding: 4, Follow: true, OnAnnounce: func(TargetInfo) {}})
		defer c.Close()
		r := Remote{Shelf: 1, Slot: 1}
		guard := make([]byte, 3*SectorSize)
		for i, cmd := range []Command{CmdATA, CmdQueryConfig, CmdMaskList, CmdReserve} {
			s := c.slots[i]
			c.begin(s, r, cmd)
			if cmd == CmdATA {
				s.mu.Lock()
				s.ataIO = true
				s.rdst = guard[:2*SectorSize]
				s.mu.Unlock()
			}
		}
		c.handleFrame(b)
		for _, x := range guard[2*SectorSize:] {
			if x != 0 {
				t.Fatal("wrote past the read buffer")
			}
		}
		var m Mask
		s := c.slots[2]
		if s.done {
			_ = m.Unmarshal(s.rx[:s.rxn])
		}
		ParseIdentify(b)
	})
}
