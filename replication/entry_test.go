package replication

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"strings"
	"testing"

	"github.com/vblade-ha/vblade-ha/aoe"
)

func sampleEntries() map[string]Entry {
	mac := aoe.MAC{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	return map[string]Entry{
		"write one sector": {Op: OpWrite, Target: TargetID{1, 0}, Offset: 0, Data: pattern(1, 512)},
		"write jumbo":      {Op: OpWrite, Target: TargetID{65535, 255}, Offset: 1 << 40, Data: pattern(2, 17*512)},
		"write with identity": {Op: OpWrite, Target: TargetID{1, 0}, Offset: 4096, Data: pattern(3, 1024),
			Request: aoe.RequestID{Src: mac, Tag: 0x80017fff}},
		"set empty state": {Op: OpSetState, Target: TargetID{2, 3}},
		"set full state": {Op: OpSetState, Target: TargetID{2, 3}, State: aoe.TargetState{
			Config:       bytes.Repeat([]byte("c"), aoe.MaxConfigLen),
			Masks:        []aoe.MAC{mac, {1, 2, 3, 4, 5, 6}},
			Reservations: []aoe.MAC{mac},
		}},
		"add target":    {Op: OpAddTarget, Target: TargetID{1, 0}, Size: 1 << 30},
		"remove target": {Op: OpRemoveTarget, Target: TargetID{1, 0}, Size: 512},
		"noop":          {Op: OpNoop},
		"batch": {Op: OpBatch, Batch: []Entry{
			{Op: OpWrite, Target: TargetID{1, 0}, Offset: 512, Data: pattern(4, 1024), Request: aoe.RequestID{Src: mac, Tag: 7}},
			{Op: OpWrite, Target: TargetID{1, 1}, Offset: 0, Data: pattern(5, 512)},
			{Op: OpSetState, Target: TargetID{1, 0}, State: aoe.TargetState{Config: []byte("c")}},
		}},
		"batch of one": {Op: OpBatch, Batch: []Entry{{Op: OpNoop}}},
	}
}

// sameEntry reports whether a and b are the same entry (Batch included).
func sameEntry(a, b Entry) bool {
	if a.Op != b.Op || a.Target != b.Target || a.Offset != b.Offset || a.Size != b.Size || a.Request != b.Request ||
		!bytes.Equal(a.Data, b.Data) || !a.State.Equal(b.State) || len(a.Batch) != len(b.Batch) {
		return false
	}
	for i := range a.Batch {
		if !sameEntry(a.Batch[i], b.Batch[i]) {
			return false
		}
	}
	return true
}

func TestEntryRoundTrip(t *testing.T) {
	for name, e := range sampleEntries() {
		t.Run(name, func(t *testing.T) {
			b, err := e.MarshalBinary()
			if err != nil {
				t.Fatalf("marshal: %v", err)
			}
			if len(b) != e.encodedLen() {
				t.Errorf("encoded %d bytes, encodedLen says %d", len(b), e.encodedLen())
			}
			got, err := DecodeEntry(b)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !sameEntry(got, e) {
				t.Fatalf("round trip changed the entry:\n got %+v\nwant %+v", got, e)
			}
			want := byte(entryVersionSingle)
			if e.Op == OpBatch {
				want = EntryVersion
			}
			if b[0] != want {
				t.Errorf("written at version %d, want %d (the lowest that holds it)", b[0], want)
			}
		})
	}
}

func TestEntryMarshalRejectsInvalid(t *testing.T) {
	for name, e := range map[string]Entry{
		"zero op":          {},
		"unknown op":       {Op: 99},
		"empty write":      {Op: OpWrite},
		"partial sector":   {Op: OpWrite, Data: make([]byte, 100)},
		"unaligned offset": {Op: OpWrite, Offset: 3, Data: make([]byte, 512)},
		"negative offset":  {Op: OpWrite, Offset: -512, Data: make([]byte, 512)},
		"huge write":       {Op: OpWrite, Data: make([]byte, MaxWriteLen+512)},
		"long config":      {Op: OpSetState, State: aoe.TargetState{Config: make([]byte, aoe.MaxConfigLen+1)}},
		"too many masks":   {Op: OpSetState, State: aoe.TargetState{Masks: make([]aoe.MAC, aoe.MaxMasks+1)}},
		"too many reservations": {Op: OpSetState, State: aoe.TargetState{
			Reservations: make([]aoe.MAC, aoe.MaxReservations+1)}},
		"zero size":        {Op: OpAddTarget},
		"unaligned size":   {Op: OpRemoveTarget, Size: 1000},
		"empty batch":      {Op: OpBatch},
		"nested batch":     {Op: OpBatch, Batch: []Entry{{Op: OpBatch, Batch: []Entry{{Op: OpNoop}}}}},
		"batch target":     {Op: OpBatch, Target: TargetID{1, 0}, Batch: []Entry{{Op: OpNoop}}},
		"invalid in batch": {Op: OpBatch, Batch: []Entry{{Op: OpNoop}, {Op: OpWrite}}},
		"batch on write":   {Op: OpWrite, Data: make([]byte, 512), Batch: []Entry{{Op: OpNoop}}},
		"huge batch":       {Op: OpBatch, Batch: make([]Entry, MaxBatch+1)},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := e.MarshalBinary(); !errors.Is(err, ErrInvalidEntry) {
				t.Fatalf("marshal: got %v, want ErrInvalidEntry", err)
			}
		})
	}
}

// reseal recomputes the checksum of a hand-edited entry so that the decoder
// gets past it to the field being tested.
func reseal(b []byte) []byte {
	body := b[:len(b)-4]
	return binary.BigEndian.AppendUint32(append([]byte(nil), body...), crc32.Checksum(body, castagnoli))
}

func TestDecodeEntryRejectsCorrupt(t *testing.T) {
	good, _ := (&Entry{Op: OpWrite, Target: TargetID{1, 0}, Data: pattern(3, 1024)}).MarshalBinary()
	state, _ := (&Entry{Op: OpSetState, State: aoe.TargetState{Config: []byte("x")}}).MarshalBinary()
	add, _ := (&Entry{Op: OpAddTarget, Size: 4096}).MarshalBinary()
	batch, _ := (&Entry{Op: OpBatch, Batch: []Entry{{Op: OpNoop}, {Op: OpAddTarget, Size: 4096}}}).MarshalBinary()
	// batch: 3 1 0 0 0 | n=2 | len=4 5 0 0 0 | len=12 3 0 0 0 size(8) | crc
	mod := func(b []byte, f func([]byte) []byte) []byte { return f(append([]byte(nil), b...)) }
	for _, tc := range []struct {
		name   string
		in     []byte
		want   error
		reason string
	}{
		{"empty", nil, ErrCorruptEntry, "shorter"},
		{"truncated", good[:len(good)-1], ErrCorruptEntry, "checksum"},
		{"bit flip", mod(good, func(b []byte) []byte { b[20] ^= 1; return b }), ErrCorruptEntry, "checksum"},
		{"bad checksum", mod(good, func(b []byte) []byte { b[len(b)-1] ^= 0xff; return b }), ErrCorruptEntry, "checksum"},
		{"future version", reseal(mod(good, func(b []byte) []byte { b[0] = EntryVersion + 1; return b })), ErrUnsupportedVersion, "upgrade"},
		{"batch at version 2", reseal(mod(batch, func(b []byte) []byte { b[0] = 2; return b })), ErrCorruptEntry, "batch"},
		{"batch with target", reseal(mod(batch, func(b []byte) []byte { b[4] = 1; return b })), ErrCorruptEntry, "names target"},
		{"batch count zero", reseal(mod(batch, func(b []byte) []byte { b[6] = 0; return b })), ErrCorruptEntry, "entries"},
		{"batch count too high", reseal(mod(batch, func(b []byte) []byte { b[6] = 3; return b })), ErrCorruptEntry, "truncated"},
		{"batch count too low", reseal(mod(batch, func(b []byte) []byte { b[6] = 1; return b })), ErrCorruptEntry, "trailing"},
		{"batch length overflow", reseal(mod(batch, func(b []byte) []byte { b[7] = 0xff; return b })), ErrCorruptEntry, "claims"},
		{"batch in batch", reseal(mod(batch, func(b []byte) []byte { b[11] = byte(OpBatch); return b })), ErrCorruptEntry, "inside a batch"},
		{"batch short entry", reseal(mod(batch, func(b []byte) []byte { b[10] = 2; return b })), ErrCorruptEntry, "header"},
		{"version zero", reseal(mod(good, func(b []byte) []byte { b[0] = 0; return b })), ErrUnsupportedVersion, "upgrade"},
		{"unknown op", reseal(mod(good, func(b []byte) []byte { b[1] = 42; return b })), ErrCorruptEntry, "unknown op"},
		{"partial sector", reseal(append(append([]byte(nil), good[:len(good)-5]...), 0, 0, 0, 0)), ErrCorruptEntry, "whole sectors"},
		{"v1 write without offset", reseal([]byte{1, byte(OpWrite), 0, 1, 0, 1, 2, 3, 0, 0, 0, 0}), ErrCorruptEntry, "truncated"},
		{"write without identity", reseal([]byte{2, byte(OpWrite), 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0}), ErrCorruptEntry, "truncated"},
		{"write without offset", reseal(append(append([]byte(nil), good[:5+10+7]...), 0, 0, 0, 0)), ErrCorruptEntry, "truncated"},
		{"unaligned offset", reseal(mod(good, func(b []byte) []byte { b[22] = 7; return b })), ErrCorruptEntry, "offset"},
		{"state trailing bytes", reseal(append(append([]byte(nil), state[:len(state)-4]...), 9, 0, 0, 0, 0)), ErrCorruptEntry, "trailing"},
		{"state mask overflow", reseal(mod(state, func(b []byte) []byte { b[5+2+1] = 200; return b })), ErrCorruptEntry, "mask count"},
		{"size zero", reseal(mod(add, func(b []byte) []byte { copy(b[5:13], make([]byte, 8)); return b })), ErrCorruptEntry, "size"},
		{"noop with body", reseal([]byte{1, byte(OpNoop), 0, 0, 0, 1, 0, 0, 0, 0}), ErrCorruptEntry, "noop"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeEntry(tc.in)
			var ee *EntryError
			if !errors.As(err, &ee) || !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want an *EntryError wrapping %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("error %q does not mention %q", err, tc.reason)
			}
		})
	}
}

// TestDecodeLegacyEntries: a log written before request identities (entry
// version 1) still replays; its writes have no identity.
func TestDecodeLegacyEntries(t *testing.T) {
	for name, e := range sampleEntries() {
		if e.Request != (aoe.RequestID{}) || e.Op == OpBatch {
			if _, err := e.appendVersion(nil, entryVersionLegacy); !errors.Is(err, ErrInvalidEntry) {
				t.Errorf("%s: encoding an identity or a batch at version 1: %v, want ErrInvalidEntry", name, err)
			}
			continue
		}
		b, err := e.appendVersion(nil, entryVersionLegacy)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if b[0] != 1 {
			t.Fatalf("%s: version byte %d", name, b[0])
		}
		got, err := DecodeEntry(b)
		if err != nil {
			t.Fatalf("%s: decode legacy: %v", name, err)
		}
		if got.Op != e.Op || got.Target != e.Target || got.Offset != e.Offset || got.Size != e.Size ||
			got.Request != (aoe.RequestID{}) || !bytes.Equal(got.Data, e.Data) || !got.State.Equal(e.State) {
			t.Fatalf("%s: legacy decode changed the entry:\n got %+v\nwant %+v", name, got, e)
		}
		if cur, _ := e.MarshalBinary(); cur[0] != entryVersionSingle {
			t.Fatalf("%s: new entries must be written at version %d", name, entryVersionSingle)
		}
	}
	// The exact bytes an older node wrote for a one-sector write at 512.
	old := reseal(append([]byte{1, byte(OpWrite), 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0}, append(pattern(7, 512), 0, 0, 0, 0)...))
	e, err := DecodeEntry(old)
	if err != nil || e.Op != OpWrite || e.Target != (TargetID{1, 0}) || e.Offset != 512 || !bytes.Equal(e.Data, pattern(7, 512)) {
		t.Fatalf("legacy write: %+v, %v", e, err)
	}
}

func FuzzDecodeEntry(f *testing.F) {
	for _, e := range sampleEntries() {
		b, err := e.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		f.Add(b[:len(b)/2])
		if old, err := e.appendVersion(nil, entryVersionLegacy); err == nil {
			f.Add(old)
		}
	}
	f.Add([]byte{})
	f.Add([]byte{1, 1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := DecodeEntry(b)
		if err != nil {
			var ee *EntryError
			if !errors.As(err, &ee) {
				t.Fatalf("error %v is not an *EntryError", err)
			}
			return
		}
		// Whatever decodes must re-encode (at the version it was written
		// with) to the same bytes: the format is canonical, so a replica
		// never reads an entry two ways.
		again, err := e.appendVersion(nil, b[0])
		if err != nil {
			t.Fatalf("decoded entry %+v does not re-encode: %v", e, err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", b, again)
		}
	})
}
