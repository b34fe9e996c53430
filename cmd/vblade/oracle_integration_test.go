package main_test

// The oracle test: Debian's vblade 25 is the reference. The same request
// sequence goes to both targets, each in its own LAN, and the responses are
// compared byte for byte after masking what legitimately differs.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

type oracleReq struct {
	name  string
	frame []byte
}

// oracleSequence builds the request sequence. Tags restart at the same
// value for each target, so they compare equal.
func oracleSequence(c *client, dst aoe.MAC, sects int64) []oracleReq {
	c.tag = 0x0a000000
	end := uint64(sects)
	w := func(cmd, fl uint8, n int, lba uint64) []byte {
		return c.ataFrame(dst, 1, 0, fl|aoe.ATAFlagWrite, cmd, uint8(n), lba, pattern(3, lba, n))
	}
	r := func(cmd, fl uint8, n int, lba uint64) []byte {
		return c.ataFrame(dst, 1, 0, fl, cmd, uint8(n), lba, nil)
	}
	unknownCmd := make([]byte, aoe.MinFrameLen)
	h := c.hdr(dst, 1, 0, aoe.Command(0x7f))
	_ = h.Marshal(unknownCmd)
	return []oracleReq{
		{"config read (broadcast)", c.cfgFrame(aoe.BroadcastMAC, 0xffff, 0xff, aoe.ConfigRead, "")},
		{"identify", r(aoe.ATACmdIdentify, 0, 1, 0)},
		{"write28 lba 5 x2", w(aoe.ATACmdWriteSectors, 0, 2, 5)},
		{"read28 lba 5 x2", r(aoe.ATACmdReadSectors, 0, 2, 5)},
		{"write48 lba 1000 x2", w(aoe.ATACmdWriteSectorsExt, aoe.ATAFlagExtended, 2, 1000)},
		{"read48 lba 1000 x2", r(aoe.ATACmdReadSectorsExt, aoe.ATAFlagExtended, 2, 1000)},
		{"read48 x1", r(aoe.ATACmdReadSectorsExt, aoe.ATAFlagExtended, 1, 1001)},
		{"read48 last sector", r(aoe.ATACmdReadSectorsExt, aoe.ATAFlagExtended, 1, end-1)},
		{"read48 past end", r(aoe.ATACmdReadSectorsExt, aoe.ATAFlagExtended, 2, end-1)},
		{"write48 past end", w(aoe.ATACmdWriteSectorsExt, aoe.ATAFlagExtended, 2, end)},
		{"read more than scnt", r(aoe.ATACmdReadSectorsExt, aoe.ATAFlagExtended, 3, 0)},
		{"flush cache", r(aoe.ATACmdFlushCache, 0, 0, 0)},
		{"flush cache ext", r(aoe.ATACmdFlushCacheExt, aoe.ATAFlagExtended, 0, 0)},
		{"check power mode", r(aoe.ATACmdCheckPowerMode, 0, 0, 0)},
		{"unknown ATA command", r(0x99, 0, 0, 0)},
		{"short write frame", c.ataFrame(dst, 1, 0, aoe.ATAFlagWrite, aoe.ATACmdWriteSectors, 2, 0, pattern(1, 0, 1))},
		{"unknown AoE command", unknownCmd},
		{"config set", c.cfgFrame(dst, 1, 0, aoe.ConfigSet, "oracle")},
		{"config test mismatch", c.cfgFrame(dst, 1, 0, aoe.ConfigTest, "orac")},
		{"config prefix", c.cfgFrame(dst, 1, 0, aoe.ConfigPrefix, "orac")},
		{"config set other", c.cfgFrame(dst, 1, 0, aoe.ConfigSet, "other")},
		{"config force set", c.cfgFrame(dst, 1, 0, aoe.ConfigForceSet, "other")},
		{"mask read", c.maskFrame(dst, 1, 0, aoe.MaskRead)},
		{"mask add self", c.maskFrame(dst, 1, 0, aoe.MaskEdit, aoe.Directive{Command: aoe.DirAdd, MAC: c.mac})},
		{"reserve read", c.resFrame(dst, 1, 0, aoe.ReserveRead)},
		{"reserve set self", c.resFrame(dst, 1, 0, aoe.ReserveSet, c.mac)},
		{"read as holder", r(aoe.ATACmdReadSectors, 0, 1, 5)},
	}
}

// acceptedDiffs lists the requests whose responses may differ, and why.
// Everything else must be equal byte for byte after masking.
var acceptedDiffs = map[string]string{
	// vblade 25 answers FLUSH CACHE (0xe7) with status 0 (no DRDY); a real
	// drive, and ours, reports DRDY. The Linux driver only tests 0xa9.
	"flush cache": "vblade 25 answers status 0x00 and a stale error register (0x10 seen); ours status DRDY (0x40), error 0",
	// vblade 25 does not know FLUSH CACHE EXT (0xea) and aborts it; ours
	// implements it (the brief requires both flush commands).
	"flush cache ext": "vblade 25 aborts 0xea; ours executes it",
}

// maskResponse zeroes the fields that legitimately differ between two
// targets and returns the meaningful prefix of the frame (trailing
// padding, which vblade fills with leftovers of the request, is cut).
func maskResponse(fr []byte, client aoe.MAC) []byte {
	if fr == nil {
		return nil
	}
	b := bytes.Clone(fr)
	copy(b[0:12], make([]byte, 12)) // Ethernet addresses: different LANs
	// The initiator's MAC differs per LAN too; it appears in mask and
	// reservation lists.
	b = append(b[:12:12], bytes.ReplaceAll(b[12:], client[:], make([]byte, 6))...)
	var h aoe.Header
	if h.Unmarshal(b) != nil {
		return b
	}
	n := len(b)
	switch {
	case h.IsError():
		// An error response carries the request's bytes; compare the
		// header only.
		n = aoe.HeaderLen
	case h.Command == aoe.CmdATA && len(b) >= aoe.ATAHeaderLen:
		n = aoe.ATAHeaderLen
		var m aoe.ATA
		_ = m.Unmarshal(b)
		if m.AFlags&aoe.ATAFlagWrite == 0 && m.CmdStatus&aoe.ATAStatusError == 0 {
			// data-in: IDENTIFY or READ; the request's sector count is
			// what was asked, scnt in the response is what remains (0).
			if len(b) >= aoe.ATAHeaderLen+512 {
				n = len(b) - (len(b)-aoe.ATAHeaderLen)%512
			}
		}
		// LBA in the response (bytes 28-33) is not specified by AoE r11
		// for the Linux driver, which ignores it; vblade advances it by the
		// sectors done. Compared as is: ours matches.
	case h.Command == aoe.CmdQueryConfig && len(b) >= aoe.ConfigHeaderLen:
		b[26], b[27] = 0, 0 // firmware version: an implementation detail, free to differ
		n = min(len(b), aoe.ConfigHeaderLen+int(binary.BigEndian.Uint16(b[30:32])))
	case h.Command == aoe.CmdMaskList && len(b) >= aoe.MaskHeaderLen:
		n = min(len(b), aoe.MaskHeaderLen+8*int(b[27]))
	case h.Command == aoe.CmdReserve && len(b) >= aoe.ReserveHeaderLen:
		n = min(len(b), aoe.ReserveHeaderLen+6*int(b[25]))
	}
	return b[:n]
}

// maskIdentify zeroes serial (words 10-19), firmware (23-26) and model
// (27-46): they name the implementation and the host.
func maskIdentify(b []byte) {
	if len(b) < aoe.ATAHeaderLen+512 {
		return
	}
	d := b[aoe.ATAHeaderLen:]
	for _, r := range [][2]int{{10, 20}, {23, 47}} {
		for w := r[0]; w < r[1]; w++ {
			d[2*w], d[2*w+1] = 0, 0
		}
	}
	// Words 83 and 86 bit 13: FLUSH CACHE EXT supported / enabled. Ours
	// implements 0xea and says so; vblade 25 does not.
	d[2*83+1] &^= 0x20
	d[2*86+1] &^= 0x20
}

func runOracle(t *testing.T, im impl) (names []string, resp [][]byte, announce []byte, mac aoe.MAC) {
	f := newFixture(t, im, targetOpts{Size: 4 << 20})
	mac = f.cl.mac
	announce, _ = f.cl.waitAnnounce(1, 0, 0)
	for _, rq := range oracleSequence(f.cl, f.tmac, f.sects) {
		ok, r := f.cl.silent(rq.frame, 500*time.Millisecond)
		if ok {
			r = nil
		}
		names = append(names, rq.name)
		resp = append(resp, r)
	}
	return names, resp, announce, mac
}

func TestOracle(t *testing.T) {
	netlab.RequireRoot(t)
	im := impls()
	var names []string
	var ref, ours [][]byte
	var refAnn, ourAnn []byte
	var refMAC, ourMAC aoe.MAC
	t.Run("debian", func(t *testing.T) { names, ref, refAnn, refMAC = runOracle(t, im[0]) })
	t.Run("ours", func(t *testing.T) { _, ours, ourAnn, ourMAC = runOracle(t, im[1]) })
	if ref == nil || ours == nil {
		t.Skip("SKIP: oracle needs both implementations")
	}
	for i, name := range names {
		a, b := maskResponse(ref[i], refMAC), maskResponse(ours[i], ourMAC)
		if name == "identify" {
			maskIdentify(a)
			maskIdentify(b)
		}
		if bytes.Equal(a, b) {
			continue
		}
		msg := fmt.Sprintf("%s:\n  vblade 25: % x\n  ours:      % x", name, trunc(a), trunc(b))
		if why, ok := acceptedDiffs[name]; ok {
			t.Logf("accepted difference (%s) %s", why, msg)
			continue
		}
		t.Errorf("response differs from vblade 25: %s%s", msg, firstDiff(a, b))
	}
	// The startup announcement: vblade 25 sends AoE version 0 in the
	// header (verfl 0x08), which the Linux driver does not check; ours
	// sends version 1 as AoE r11 says. The rest must match.
	a, b := maskResponse(refAnn, refMAC), maskResponse(ourAnn, ourMAC)
	if len(a) > 14 && len(b) > 14 {
		a[14], b[14] = 0, 0
	}
	if !bytes.Equal(a, b) {
		t.Errorf("startup announcement differs (version nibble masked):\n  vblade 25: % x\n  ours:      % x", trunc(a), trunc(b))
	}
}

func trunc(b []byte) []byte { return b[:min(len(b), 64)] }

func firstDiff(a, b []byte) string {
	for i := 0; i < min(len(a), len(b)); i++ {
		if a[i] != b[i] {
			return fmt.Sprintf("\n  first difference at byte %d: %#02x vs %#02x (lengths %d, %d)", i, a[i], b[i], len(a), len(b))
		}
	}
	return fmt.Sprintf("\n  lengths %d vs %d", len(a), len(b))
}
