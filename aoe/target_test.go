package aoe

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
)

// memDisk is a minimal in-memory Disk for the engine's unit tests (package
// storage has the real ones; importing it here would be a cycle).
type memDisk struct {
	mu       sync.Mutex
	data     []byte
	flushes  int
	failWith error
}

func (d *memDisk) ReadAt(_ context.Context, p []byte, off int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failWith != nil {
		return d.failWith
	}
	copy(p, d.data[off:])
	return nil
}

func (d *memDisk) WriteAt(_ context.Context, p []byte, off int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failWith != nil {
		return d.failWith
	}
	copy(d.data[off:], p)
	return nil
}

func (d *memDisk) Flush(context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.flushes++
	return d.failWith
}

func (d *memDisk) Size() int64 { return int64(len(d.data)) }

type recordingStore struct {
	commits []TargetState
	err     error
}

func (r *recordingStore) Commit(_ context.Context, _ uint16, _ uint8, s TargetState) error {
	if r.err != nil {
		return r.err
	}
	r.commits = append(r.commits, s.Clone())
	return nil
}

type gateFunc func() bool

func (g gateFunc) Open() bool { return g() }

var (
	hostMAC   = MAC{0x02, 0, 0, 0, 0, 0x10}
	otherMAC  = MAC{0x02, 0, 0, 0, 0, 0x20}
	targetMAC = MAC{0x02, 0, 0, 0, 0, 0x01}
)

func newTestTarget(t *testing.T, sectors int) (*Target, *memDisk, *recordingStore) {
	t.Helper()
	d := &memDisk{data: make([]byte, sectors*SectorSize)}
	st := &recordingStore{}
	tg, err := NewTarget(TargetConfig{Shelf: 1, Slot: 2, Disk: d, State: st, Serial: "1.2:test"})
	if err != nil {
		t.Fatal(err)
	}
	return tg, d, st
}

// req builds a request frame in a full-size buffer and returns it with its length.
func ataReq(cmd, count uint8, lba uint64, ext bool, data []byte) ([]byte, int) {
	b := make([]byte, frameBufSize)
	m := ATA{Header: Header{Dst: targetMAC, Src: hostMAC, Version: 1, Shelf: 1, Slot: 2, Command: CmdATA, Tag: 0xdeadbeef},
		SectorCount: count, CmdStatus: cmd, LBA: lba, Data: data}
	if ext {
		m.AFlags |= ATAFlagExtended
	}
	if data != nil {
		m.AFlags |= ATAFlagWrite
	}
	n, err := m.Marshal(b)
	if err != nil {
		panic(err)
	}
	return b, n
}

func doReq(t *testing.T, tg *Target, b []byte, n int) (ATA, int) {
	t.Helper()
	rl := tg.handle(context.Background(), b, n, targetMAC, 2)
	var r ATA
	if rl == 0 {
		return r, 0
	}
	if err := r.Unmarshal(b[:rl]); err != nil {
		t.Fatal(err)
	}
	return r, rl
}

func TestATAReadWrite(t *testing.T) {
	tg, d, _ := newTestTarget(t, 100)
	data := bytes.Repeat([]byte{0xab, 0xcd}, SectorSize) // 2 sectors
	b, n := ataReq(ATACmdWriteSectorsExt, 2, 10, true, data)
	r, rl := doReq(t, tg, b, n)
	if rl != MinFrameLen || r.CmdStatus != ATAStatusReady || r.ErrFeature != 0 || r.SectorCount != 0 || r.IsError() {
		t.Fatalf("write response: len %d status %#x err %#x count %d", rl, r.CmdStatus, r.ErrFeature, r.SectorCount)
	}
	if r.Tag != 0xdeadbeef || !r.IsResponse() || r.Version != 1 || r.Dst != hostMAC || r.Src != targetMAC || r.Shelf != 1 || r.Slot != 2 {
		t.Fatalf("response header %+v", r.Header)
	}
	if !bytes.Equal(d.data[10*SectorSize:12*SectorSize], data) {
		t.Fatal("data not on disk")
	}
	b, n = ataReq(ATACmdReadSectorsExt, 2, 10, true, nil)
	r, rl = doReq(t, tg, b, n)
	if rl != ATAHeaderLen+2*SectorSize || !bytes.Equal(r.Data, data) || r.CmdStatus != ATAStatusReady {
		t.Fatalf("read back: len %d status %#x", rl, r.CmdStatus)
	}
	// LBA28 commands ignore the top nibble of the 28-bit address.
	b, n = ataReq(ATACmdReadSectors, 1, 0xf0000000|10, false, nil)
	r, _ = doReq(t, tg, b, n)
	if !bytes.Equal(r.Data, data[:SectorSize]) {
		t.Fatal("LBA28 read did not mask the address")
	}
}

func TestATAErrors(t *testing.T) {
	tg, _, _ := newTestTarget(t, 100)
	cases := []struct {
		name              string
		cmd, count        uint8
		lba               uint64
		data              []byte
		truncate          int // bytes removed from the frame
		wantAoE           ErrorCode
		wantStatus, wantE uint8
	}{
		{"past end", ATACmdReadSectorsExt, 2, 99, nil, 0, 0, 0x41, ATAErrIDNotFound},
		{"write past end", ATACmdWriteSectorsExt, 1, 100, make([]byte, 512), 0, 0, 0x41, ATAErrIDNotFound},
		{"too many sectors", ATACmdReadSectorsExt, 3, 0, nil, 0, ErrCodeBadArg, 0, 0},
		{"short write frame", ATACmdWriteSectorsExt, 2, 0, make([]byte, 1024), 100, ErrCodeBadArg, 0, 0},
		{"unknown ATA command", 0x99, 0, 0, nil, 0, 0, 0x41, ATAErrAbort},
		{"identify with 2 sectors", ATACmdIdentify, 2, 0, nil, 0, ErrCodeBadArg, 0, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b, n := ataReq(c.cmd, c.count, c.lba, true, c.data)
			r, rl := doReq(t, tg, b, n-c.truncate)
			if rl == 0 {
				t.Fatal("no response")
			}
			if c.wantAoE != 0 {
				if !r.IsError() || r.Error != c.wantAoE {
					t.Fatalf("AoE error %v (flag %v), want %v", r.Error, r.IsError(), c.wantAoE)
				}
				return
			}
			if r.IsError() || r.CmdStatus != c.wantStatus || r.ErrFeature != c.wantE {
				t.Fatalf("status %#x err %#x aoeErr %v, want %#x %#x", r.CmdStatus, r.ErrFeature, r.Error, c.wantStatus, c.wantE)
			}
		})
	}
}

func TestIdentify(t *testing.T) {
	tg, _, _ := newTestTarget(t, 1000)
	b, n := ataReq(ATACmdIdentify, 1, 0, false, nil)
	r, rl := doReq(t, tg, b, n)
	if rl != ATAHeaderLen+512 || r.CmdStatus != ATAStatusReady {
		t.Fatalf("identify len %d status %#x", rl, r.CmdStatus)
	}
	id := r.Data[:512]
	word := func(w int) uint16 { return binary.LittleEndian.Uint16(id[2*w:]) }
	if got := uint32(word(60)) | uint32(word(61))<<16; got != 1000 {
		t.Errorf("LBA28 capacity %d", got)
	}
	if got := uint64(word(100)) | uint64(word(101))<<16 | uint64(word(102))<<32; got != 1000 {
		t.Errorf("LBA48 capacity %d", got)
	}
	if word(83)&(1<<10) == 0 || word(86)&(1<<10) == 0 {
		t.Error("LBA48 bits not set")
	}
	if word(83)&(1<<13) == 0 || word(83)&(1<<12) == 0 {
		t.Error("flush bits not set")
	}
	// ATA strings swap the bytes of each word.
	serial := make([]byte, 20)
	for i := range serial {
		serial[i] = id[20+(i^1)]
	}
	if string(bytes.TrimRight(serial, " ")) != "1.2:test" {
		t.Errorf("serial %q", serial)
	}
	// LBA28 capacity saturates for big disks.
	var big [512]byte
	buildIdentify(&big, 1<<40, "s", "m", "f")
	if got := binary.LittleEndian.Uint32(big[120:]); got != maxLBA28 {
		t.Errorf("LBA28 of a big disk = %#x", got)
	}
}

func TestFlushAndPowerMode(t *testing.T) {
	tg, d, _ := newTestTarget(t, 10)
	for _, cmd := range []uint8{ATACmdFlushCache, ATACmdFlushCacheExt} {
		b, n := ataReq(cmd, 0, 0, false, nil)
		r, _ := doReq(t, tg, b, n)
		if r.CmdStatus != ATAStatusReady {
			t.Fatalf("flush %#x status %#x", cmd, r.CmdStatus)
		}
	}
	if d.flushes != 2 {
		t.Fatalf("disk flushed %d times, want 2", d.flushes)
	}
	b, n := ataReq(ATACmdCheckPowerMode, 0, 0, false, nil)
	r, _ := doReq(t, tg, b, n)
	if r.SectorCount != 0xff || r.CmdStatus != ATAStatusReady {
		t.Fatalf("check power mode: count %#x status %#x", r.SectorCount, r.CmdStatus)
	}
}

func TestDiskErrors(t *testing.T) {
	tg, d, _ := newTestTarget(t, 10)
	d.failWith = errors.New("EIO")
	b, n := ataReq(ATACmdReadSectorsExt, 1, 0, true, nil)
	r, _ := doReq(t, tg, b, n)
	if r.CmdStatus&ATAStatusError == 0 || r.ErrFeature != ATAErrAbort {
		t.Fatalf("I/O error: status %#x err %#x", r.CmdStatus, r.ErrFeature)
	}
	// A store that cannot finish the command stays silent.
	d.failWith = ErrNoReply
	b, n = ataReq(ATACmdWriteSectorsExt, 1, 0, true, make([]byte, 512))
	if _, rl := doReq(t, tg, b, n); rl != 0 {
		t.Fatal("ErrNoReply was answered")
	}
}

func TestReadOnly(t *testing.T) {
	d := &memDisk{data: make([]byte, 10*SectorSize)}
	tg, err := NewTarget(TargetConfig{Shelf: 1, Slot: 2, Disk: d, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	b, n := ataReq(ATACmdWriteSectorsExt, 1, 0, true, bytes.Repeat([]byte{1}, 512))
	r, _ := doReq(t, tg, b, n)
	if r.CmdStatus != ATAStatusReady|ATAStatusError || r.ErrFeature != ATAErrAbort {
		t.Fatalf("read-only write: status %#x err %#x", r.CmdStatus, r.ErrFeature)
	}
	if d.data[0] != 0 {
		t.Fatal("read-only target wrote")
	}
}

func TestGateClosedIsSilent(t *testing.T) {
	d := &memDisk{data: make([]byte, 10*SectorSize)}
	open := false
	tg, _ := NewTarget(TargetConfig{Shelf: 1, Slot: 2, Disk: d, Gate: gateFunc(func() bool { return open })})
	for _, cmd := range []Command{CmdATA, CmdQueryConfig, CmdMaskList, CmdReserve, 9} {
		b, n := ataReq(ATACmdIdentify, 1, 0, false, nil)
		b[19] = byte(cmd)
		if rl := tg.handle(context.Background(), b, n, targetMAC, 2); rl != 0 {
			t.Fatalf("closed gate answered %v", cmd)
		}
	}
	open = true
	b, n := ataReq(ATACmdIdentify, 1, 0, false, nil)
	if _, rl := doReq(t, tg, b, n); rl == 0 {
		t.Fatal("open gate silent")
	}
}

func cfgReq(cmd ConfigCommand, s string) ([]byte, int) {
	b := make([]byte, frameBufSize)
	m := Config{Header: Header{Dst: BroadcastMAC, Src: hostMAC, Version: 1, Shelf: 1, Slot: 2, Command: CmdQueryConfig, Tag: 7},
		Command: cmd, Config: []byte(s)}
	n, _ := m.Marshal(b)
	return b, n
}

func doCfg(t *testing.T, tg *Target, cmd ConfigCommand, s string) (Config, bool) {
	t.Helper()
	b, n := cfgReq(cmd, s)
	rl := tg.handle(context.Background(), b, n, targetMAC, 17)
	var r Config
	if rl == 0 {
		return r, false
	}
	if err := r.Unmarshal(b[:rl]); err != nil {
		t.Fatal(err)
	}
	return r, true
}

func TestQueryConfig(t *testing.T) {
	tg, _, store := newTestTarget(t, 10)
	r, ok := doCfg(t, tg, ConfigRead, "")
	if !ok || r.BufferCount != 16 || r.SectorCount != 17 || r.AoEVersion != 1 || r.FirmwareVersion != FirmwareVersion || len(r.Config) != 0 {
		t.Fatalf("read: %+v", r)
	}
	if _, ok := doCfg(t, tg, ConfigTest, "x"); ok {
		t.Fatal("test of empty config against x answered")
	}
	if r, ok = doCfg(t, tg, ConfigSet, "hello"); !ok || string(r.Config) != "hello" || r.IsError() {
		t.Fatalf("set: %+v", r)
	}
	if r, ok = doCfg(t, tg, ConfigSet, "other"); !ok || !r.IsError() || r.Error != ErrCodeConfigSet || string(r.Config) != "hello" {
		t.Fatalf("set over a different string: %+v", r)
	}
	if r, ok = doCfg(t, tg, ConfigSet, "hello"); !ok || r.IsError() {
		t.Fatalf("set of the same string: %+v", r)
	}
	if _, ok = doCfg(t, tg, ConfigTest, "hello"); !ok {
		t.Fatal("exact test did not answer")
	}
	if _, ok = doCfg(t, tg, ConfigTest, "hell"); ok {
		t.Fatal("exact test answered a prefix")
	}
	if _, ok = doCfg(t, tg, ConfigPrefix, "hel"); !ok {
		t.Fatal("prefix test did not answer")
	}
	if _, ok = doCfg(t, tg, ConfigPrefix, "help"); ok {
		t.Fatal("prefix test answered a non-prefix")
	}
	if r, ok = doCfg(t, tg, ConfigForceSet, "forced"); !ok || string(r.Config) != "forced" {
		t.Fatalf("force set: %+v", r)
	}
	if r, ok = doCfg(t, tg, 9, ""); !ok || r.Error != ErrCodeBadArg {
		t.Fatalf("bad sub-command: %+v", r)
	}
	if len(store.commits) != 3 || string(store.commits[2].Config) != "forced" {
		t.Fatalf("commits: %d", len(store.commits))
	}
	// A state store that cannot commit leaves the request unanswered and
	// the state unchanged.
	store.err = ErrNoReply
	if _, ok = doCfg(t, tg, ConfigForceSet, "lost"); ok {
		t.Fatal("uncommitted set answered")
	}
	if string(tg.State().Config) != "forced" {
		t.Fatal("uncommitted state published")
	}
}

func maskReq(cmd MaskCommand, dirs []Directive) ([]byte, int) {
	b := make([]byte, frameBufSize)
	m := Mask{Header: Header{Src: hostMAC, Version: 1, Shelf: 1, Slot: 2, Command: CmdMaskList}, Command: cmd, Directives: dirs}
	n, _ := m.Marshal(b)
	return b, n
}

func TestMaskList(t *testing.T) {
	tg, _, _ := newTestTarget(t, 10)
	do := func(cmd MaskCommand, dirs ...Directive) (Mask, bool) {
		b, n := maskReq(cmd, dirs)
		rl := tg.handle(context.Background(), b, n, targetMAC, 2)
		var r Mask
		if rl == 0 {
			return r, false
		}
		if err := r.Unmarshal(b[:rl]); err != nil {
			// An edit that stopped early reports in the count how many
			// directives it applied, with no list after the header.
			if !errors.Is(err, ErrTooManyMACs) {
				t.Fatal(err)
			}
			r.Header.Unmarshal(b[:rl])
			r.MaskError = MaskError(b[26])
			r.Directives = make([]Directive, b[27])
		}
		return r, true
	}
	r, _ := do(MaskEdit, Directive{DirAdd, hostMAC}, Directive{DirAdd, otherMAC}, Directive{DirAdd, hostMAC})
	if r.MaskError != 0 || len(r.Directives) != 2 {
		t.Fatalf("add: %+v", r)
	}
	r, _ = do(MaskEdit, Directive{DirDelete, otherMAC})
	if len(r.Directives) != 1 || r.Directives[0].MAC != hostMAC {
		t.Fatalf("delete: %+v", r)
	}
	r, _ = do(MaskEdit, Directive{DirNone, otherMAC}, Directive{7, otherMAC})
	if r.MaskError != MaskErrBadDirective || len(r.Directives) != 1 { // count = directives applied before the bad one
		t.Fatalf("bad directive: %+v", r)
	}
	// hostMAC is on the list; a frame from another MAC gets silence.
	b, n := ataReq(ATACmdIdentify, 1, 0, false, nil)
	copy(b[6:12], otherMAC[:])
	if rl := tg.handle(context.Background(), b, n, targetMAC, 2); rl != 0 {
		t.Fatal("masked-out MAC answered")
	}
	// The list fills at MaxMasks.
	var dirs []Directive
	for i := 0; i < MaxMasks+1; i++ {
		dirs = append(dirs, Directive{DirAdd, MAC{0x02, 1, 0, 0, 0, byte(i)}})
	}
	r, _ = do(MaskEdit, dirs...)
	if r.MaskError != MaskErrListFull || int(r.Header.Error) != 0 || len(r.Directives) != MaxMasks-1 {
		t.Fatalf("full list: %+v", r)
	}
	if len(tg.State().Masks) != MaxMasks {
		t.Fatalf("mask list has %d entries", len(tg.State().Masks))
	}
	r, _ = do(5)
	if !r.IsError() || r.Error != ErrCodeBadArg {
		t.Fatalf("bad mask command: %+v", r)
	}
}

func TestReserve(t *testing.T) {
	tg, _, _ := newTestTarget(t, 10)
	do := func(src MAC, cmd ReserveCommand, macs ...MAC) Reserve {
		b := make([]byte, frameBufSize)
		m := Reserve{Header: Header{Src: src, Version: 1, Shelf: 1, Slot: 2, Command: CmdReserve}, Command: cmd, MACs: macs}
		n, _ := m.Marshal(b)
		rl := tg.handle(context.Background(), b, n, targetMAC, 2)
		var r Reserve
		if err := r.Unmarshal(b[:rl]); err != nil {
			t.Fatal(err)
		}
		return r
	}
	if r := do(hostMAC, ReserveSet, hostMAC); r.IsError() || len(r.MACs) != 1 {
		t.Fatalf("set: %+v", r)
	}
	if r := do(otherMAC, ReserveSet, otherMAC); !r.IsError() || r.Error != ErrCodeTargetReserved || len(r.MACs) != 1 || r.MACs[0] != hostMAC {
		t.Fatalf("set by non-holder: %+v", r)
	}
	// A non-holder gets "reserved" on reads but IDENTIFY still works.
	b, n := ataReq(ATACmdReadSectorsExt, 1, 0, true, nil)
	copy(b[6:12], otherMAC[:])
	r, _ := doReq(t, tg, b, n)
	if !r.IsError() || r.Error != ErrCodeTargetReserved {
		t.Fatalf("read by non-holder: %+v", r.Header)
	}
	b, n = ataReq(ATACmdIdentify, 1, 0, false, nil)
	copy(b[6:12], otherMAC[:])
	if r, _ = doReq(t, tg, b, n); r.IsError() {
		t.Fatal("identify by non-holder refused")
	}
	if r := do(otherMAC, ReserveForceSet); r.IsError() || len(r.MACs) != 0 {
		t.Fatalf("force release: %+v", r)
	}
	if r := do(otherMAC, ReserveRead); len(r.MACs) != 0 {
		t.Fatalf("read: %+v", r)
	}
}

func TestUnknownCommandEchoed(t *testing.T) {
	tg, _, _ := newTestTarget(t, 10)
	b, n := ataReq(ATACmdIdentify, 1, 0, false, nil)
	b[19] = 9
	rl := tg.handle(context.Background(), b, n, targetMAC, 2)
	var h Header
	if err := h.Unmarshal(b[:rl]); err != nil {
		t.Fatal(err)
	}
	if !h.IsError() || h.Error != ErrCodeBadCommand || rl != max(n, MinFrameLen) {
		t.Fatalf("unknown command: %+v len %d", h, rl)
	}
}

func TestHandleAllocs(t *testing.T) {
	tg, _, _ := newTestTarget(t, 100)
	b, n := ataReq(ATACmdReadSectorsExt, 2, 10, true, nil)
	req := append([]byte(nil), b[:n]...)
	ctx := context.Background()
	allocs := testing.AllocsPerRun(1000, func() {
		copy(b, req)
		tg.handle(ctx, b, n, targetMAC, 2)
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per read command", allocs)
	}
}

func TestUnsupportedVersion(t *testing.T) {
	tg, _, _ := newTestTarget(t, 10)
	b, n := ataReq(ATACmdIdentify, 1, 0, false, nil)
	b[14] = 2<<4 | b[14]&0x0f
	rl := tg.handle(context.Background(), b, n, targetMAC, 2)
	var h Header
	if err := h.Unmarshal(b[:rl]); err != nil {
		t.Fatal(err)
	}
	if !h.IsError() || h.Error != ErrCodeBadVersion || h.Version != Version {
		t.Fatalf("version 2 request: %+v", h)
	}
}

// onceDisk is a memDisk that also implements DedupWriter and records the
// identities it was given.
type onceDisk struct {
	memDisk
	ids    []RequestID
	plains int
}

func (d *onceDisk) WriteAt(ctx context.Context, p []byte, off int64) error {
	d.plains++
	return d.memDisk.WriteAt(ctx, p, off)
}

func (d *onceDisk) WriteAtOnce(ctx context.Context, p []byte, off int64, id RequestID) error {
	d.ids = append(d.ids, id)
	return d.memDisk.WriteAt(ctx, p, off)
}

func TestWriteUsesDedupWriter(t *testing.T) {
	d := &onceDisk{memDisk: memDisk{data: make([]byte, 100*SectorSize)}}
	tg, err := NewTarget(TargetConfig{Shelf: 1, Slot: 2, Disk: d, Serial: "1.2:test"})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0x5a}, 2*SectorSize)
	for _, ext := range []bool{true, false} {
		cmd := uint8(ATACmdWriteSectorsExt)
		if !ext {
			cmd = ATACmdWriteSectors
		}
		b, n := ataReq(cmd, 2, 10, ext, data)
		binary.BigEndian.PutUint32(b[20:24], 0x8001beef)
		copy(b[6:12], otherMAC[:])
		r, rl := doReq(t, tg, b, n)
		if rl == 0 || r.IsError() || r.CmdStatus != ATAStatusReady {
			t.Fatalf("write answered %d bytes, status %#x", rl, r.CmdStatus)
		}
	}
	want := RequestID{Src: otherMAC, Tag: 0x8001beef}
	if len(d.ids) != 2 || d.ids[0] != want || d.ids[1] != want || d.plains != 0 {
		t.Fatalf("WriteAtOnce ids %v, WriteAt calls %d; want two calls with %v and no WriteAt", d.ids, d.plains, want)
	}
	if !bytes.Equal(d.data[10*SectorSize:12*SectorSize], data) {
		t.Fatal("data not on disk")
	}
	// Reads, flushes and a read-only target do not go through it.
	b, n := ataReq(ATACmdReadSectorsExt, 2, 10, true, nil)
	if r, _ := doReq(t, tg, b, n); !bytes.Equal(r.Data, data) {
		t.Fatal("read back")
	}
	ro, _ := NewTarget(TargetConfig{Shelf: 1, Slot: 2, Disk: d, ReadOnly: true})
	b, n = ataReq(ATACmdWriteSectorsExt, 1, 0, true, data[:SectorSize])
	if r, _ := doReq(t, ro, b, n); r.CmdStatus&ATAStatusError == 0 || len(d.ids) != 2 {
		t.Fatal("read-only target wrote")
	}
}

// Writes stay allocation-free on both paths (plain Disk and DedupWriter).
func TestHandleWriteAllocs(t *testing.T) {
	plain, _, _ := newTestTarget(t, 100)
	od := &onceDisk{memDisk: memDisk{data: make([]byte, 100*SectorSize)}}
	od.ids = make([]RequestID, 0, 4096)
	once, err := NewTarget(TargetConfig{Shelf: 1, Slot: 2, Disk: od})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for name, tg := range map[string]*Target{"plain": plain, "dedup": once} {
		b, n := ataReq(ATACmdWriteSectorsExt, 2, 10, true, make([]byte, 2*SectorSize))
		req := append([]byte(nil), b[:n]...)
		allocs := testing.AllocsPerRun(1000, func() {
			copy(b, req)
			tg.handle(ctx, b, n, targetMAC, 2)
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations per write command", name, allocs)
		}
	}
}
