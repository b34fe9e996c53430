package replication

import (
	"bytes"
	"errors"
	"testing"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// FuzzReadMeta feeds arbitrary bytes to the snapshot metadata decoder, the
// first thing a follower parses of a stream the leader sends (and of a
// snapshot file after a crash). It must never panic or allocate beyond its
// limits, every failure must be an ErrCorruptSnapshot, and whatever decodes
// must re-encode to the same bytes (the format is canonical).
func FuzzReadMeta(f *testing.F) {
	metas := []snapshotMeta{
		{Index: 1},
		{Index: 42, Targets: []TargetInfo{{ID: TargetID{Shelf: 1, Slot: 0}, Size: 1 << 20}}},
		{Index: 1 << 40, Targets: []TargetInfo{
			{ID: TargetID{Shelf: 7, Slot: 3}, Size: 4096, State: aoe.TargetState{
				Config:       []byte("cfg"),
				Masks:        []aoe.MAC{{2, 0, 0, 0, 0, 1}},
				Reservations: []aoe.MAC{{2, 0, 0, 0, 0, 2}, {2, 0, 0, 0, 0, 3}},
			}},
			{ID: TargetID{Shelf: 8, Slot: 0}, Size: 512},
		}, Recent: map[TargetID][]recentWrite{
			{Shelf: 7, Slot: 3}: {
				{ID: aoe.RequestID{Src: aoe.MAC{2, 0, 0, 0, 0, 9}, Tag: 0x10002}, Offset: 1024, Length: 512, CRC: 0xdeadbeef},
				{ID: aoe.RequestID{Src: aoe.MAC{2, 0, 0, 0, 0, 9}, Tag: 0x10002}, Offset: 0, Length: 4096, CRC: 1},
			},
			{Shelf: 8, Slot: 0}: {{ID: aoe.RequestID{Src: aoe.MAC{2, 0, 0, 0, 0, 8}}, Length: 512}},
		}},
		// What a node before recent-write tables wrote.
		{Index: 9, version: metaVersionLegacy, Targets: []TargetInfo{{ID: TargetID{Shelf: 1, Slot: 0}, Size: 1 << 20}}},
	}
	for _, m := range metas {
		for _, image := range []bool{false, true} {
			b := m.encode(image)
			f.Add(b)
			f.Add(b[:len(b)/2])
			f.Add(append(bytes.Clone(b), 0xff, 0xff)) // image data after the metadata
		}
	}
	f.Add([]byte{})
	f.Add([]byte(metaMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		m, image, err := readMeta(r)
		if err != nil {
			if !errors.Is(err, ErrCorruptSnapshot) {
				t.Fatalf("error %v does not wrap ErrCorruptSnapshot", err)
			}
			return
		}
		used := len(b) - r.Len()
		again := m.encode(image)
		if !bytes.Equal(again, b[:used]) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", b[:used], again)
		}
	})
}
