package aoe

import (
	"bytes"
	"context"
	"errors"
	"reflect"
	"testing"
)

func TestHeaderRoundTrip(t *testing.T) {
	h := Header{Dst: BroadcastMAC, Src: hostMAC, Version: 1, Flags: FlagResponse | FlagError, Error: ErrCodeBadArg,
		Shelf: 0x1234, Slot: 0x56, Command: CmdReserve, Tag: 0x01020304}
	b := make([]byte, HeaderLen)
	if err := h.Marshal(b); err != nil {
		t.Fatal(err)
	}
	want := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 0x10, 0x88, 0xa2, 0x1c, 2, 0x12, 0x34, 0x56, 3, 1, 2, 3, 4}
	if !bytes.Equal(b, want) {
		t.Fatalf("wire bytes\n got %x\nwant %x", b, want)
	}
	var g Header
	if err := g.Unmarshal(b); err != nil || g != h {
		t.Fatalf("round trip: %+v %v", g, err)
	}
	if err := g.Unmarshal(b[:20]); !errors.Is(err, ErrShortFrame) {
		t.Fatalf("short: %v", err)
	}
	b[12] = 0x08
	if err := g.Unmarshal(b); !errors.Is(err, ErrNotAoE) {
		t.Fatalf("ethertype: %v", err)
	}
	if err := h.Marshal(b[:10]); !errors.Is(err, ErrBufferSmall) {
		t.Fatalf("small buffer: %v", err)
	}
}

func TestMessagesRoundTrip(t *testing.T) {
	hdr := Header{Dst: targetMAC, Src: hostMAC, Version: 1, Shelf: 3, Slot: 4, Tag: 99}
	b := make([]byte, 2048)

	a := ATA{Header: hdr, AFlags: ATAFlagExtended | ATAFlagWrite, SectorCount: 2, CmdStatus: ATACmdWriteSectorsExt,
		LBA: 0x0000_1234_5678_9abc, Data: bytes.Repeat([]byte{7}, 1024)}
	a.Command = CmdATA
	n, err := a.Marshal(b)
	if err != nil || n != ATAHeaderLen+1024 {
		t.Fatal(n, err)
	}
	var a2 ATA
	if err := a2.Unmarshal(b[:n]); err != nil || !reflect.DeepEqual(a, a2) {
		t.Fatalf("ATA: %+v %v", a2, err)
	}

	c := Config{Header: hdr, BufferCount: 16, FirmwareVersion: FirmwareVersion, SectorCount: 2, AoEVersion: 1,
		Command: ConfigSet, Config: []byte("cfg")}
	c.Command = ConfigSet
	c.Header.Command = CmdQueryConfig
	n, err = c.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	var c2 Config
	if err := c2.Unmarshal(b[:n]); err != nil || !reflect.DeepEqual(c, c2) {
		t.Fatalf("Config: %+v %v", c2, err)
	}
	// A declared length past the frame is an error, not a slice panic.
	b[31] = 200
	if err := c2.Unmarshal(b[:n]); !errors.Is(err, ErrConfigLength) {
		t.Fatalf("long config: %v", err)
	}
	if _, err := (&Config{Config: make([]byte, MaxConfigLen+1)}).Marshal(make([]byte, 4096)); !errors.Is(err, ErrConfigLength) {
		t.Fatalf("marshal long config: %v", err)
	}

	m := Mask{Header: hdr, Command: MaskEdit, Directives: []Directive{{DirAdd, hostMAC}, {DirDelete, otherMAC}}}
	m.Header.Command = CmdMaskList
	n, err = m.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	var m2 Mask
	if err := m2.Unmarshal(b[:n]); err != nil || !reflect.DeepEqual(m, m2) {
		t.Fatalf("Mask: %+v %v", m2, err)
	}

	r := Reserve{Header: hdr, Command: ReserveSet, MACs: []MAC{hostMAC, otherMAC}}
	r.Header.Command = CmdReserve
	n, err = r.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	var r2 Reserve
	if err := r2.Unmarshal(b[:n]); err != nil || !reflect.DeepEqual(r, r2) {
		t.Fatalf("Reserve: %+v %v", r2, err)
	}
	if err := r2.Unmarshal(b[:n-1]); !errors.Is(err, ErrTooManyMACs) {
		t.Fatalf("truncated reserve: %v", err)
	}
}

func TestSectorsPerFrame(t *testing.T) {
	for mtu, want := range map[int]int{1500: 2, 9000: 17, 576: 1, 65536: 127, 200000: 255} {
		if got := SectorsPerFrame(mtu); got != want {
			t.Errorf("MTU %d: %d sectors, want %d", mtu, got, want)
		}
	}
}

func TestParseMAC(t *testing.T) {
	for _, s := range []string{"02:00:00:00:00:10", "020000000010", "02-00-00-00-00-10", "02:00:00:00:00:10"} {
		m, err := ParseMAC(s)
		if err != nil || m != hostMAC {
			t.Errorf("%q: %v %v", s, m, err)
		}
	}
	for _, s := range []string{"", "zz:zz", "0200000000", "02:00:00:00:00:00:00:10", "02000000001g"} {
		if _, err := ParseMAC(s); err == nil {
			t.Errorf("%q parsed", s)
		}
	}
}

// seedFrames are valid requests of every kind, the fuzzers' starting points.
func seedFrames() [][]byte {
	var seeds [][]byte
	add := func(b []byte, n int) { seeds = append(seeds, append([]byte(nil), b[:n]...)) }
	add(ataReq(ATACmdReadSectorsExt, 2, 10, true, nil))
	add(ataReq(ATACmdWriteSectorsExt, 1, 3, true, make([]byte, 512)))
	add(ataReq(ATACmdIdentify, 1, 0, false, nil))
	add(ataReq(ATACmdFlushCacheExt, 0, 0, false, nil))
	add(cfgReq(ConfigSet, "hello"))
	add(cfgReq(ConfigPrefix, "he"))
	add(maskReq(MaskEdit, []Directive{{DirAdd, hostMAC}}))
	rb := make([]byte, 256)
	r := Reserve{Header: Header{Src: hostMAC, Shelf: 1, Slot: 2, Command: CmdReserve}, Command: ReserveSet, MACs: []MAC{hostMAC}}
	n, _ := r.Marshal(rb)
	add(rb, n)
	return seeds
}

// FuzzDecode feeds arbitrary frames to every decoder: none may panic, and
// whatever decodes must encode back to the same bytes.
func FuzzDecode(f *testing.F) {
	for _, s := range seedFrames() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		out := make([]byte, len(b)+MinFrameLen+2048)
		var h Header
		if h.Unmarshal(b) == nil {
			if err := h.Marshal(out); err != nil || !bytes.Equal(out[:HeaderLen], b[:HeaderLen]) {
				t.Fatalf("header round trip: %v", err)
			}
		}
		var a ATA
		if a.Unmarshal(b) == nil {
			n, err := a.Marshal(out)
			if err != nil || n != len(b) {
				t.Fatalf("ATA re-encode: %d %v", n, err)
			}
		}
		var c Config
		if c.Unmarshal(b) == nil {
			if _, err := c.Marshal(out); err != nil {
				t.Fatalf("config re-encode: %v", err)
			}
		}
		var m Mask
		if m.Unmarshal(b) == nil {
			if _, err := m.Marshal(out); err != nil {
				t.Fatalf("mask re-encode: %v", err)
			}
		}
		var r Reserve
		if r.Unmarshal(b) == nil {
			if _, err := r.Marshal(out); err != nil {
				t.Fatalf("reserve re-encode: %v", err)
			}
		}
	})
}

// FuzzTargetHandle throws arbitrary frames at a target: it must never panic,
// never answer with more than its buffer, and never write outside the disk.
func FuzzTargetHandle(f *testing.F) {
	for _, s := range seedFrames() {
		f.Add(s, uint8(2))
	}
	f.Fuzz(func(t *testing.T, req []byte, maxSectors uint8) {
		if len(req) < HeaderLen || len(req) > frameBufSize {
			return
		}
		d := &memDisk{data: make([]byte, 64*SectorSize)}
		tg, err := NewTarget(TargetConfig{Shelf: 1, Slot: 2, Disk: d})
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, frameBufSize)
		copy(b, req)
		ms := int(maxSectors%17) + 1
		rl := tg.handle(context.Background(), b, len(req), targetMAC, ms)
		if rl < 0 || rl > len(b) {
			t.Fatalf("response length %d", rl)
		}
		if rl > 0 && rl < MinFrameLen {
			t.Fatalf("runt response of %d bytes", rl)
		}
	})
}
