package aoe

import (
	"bytes"
	"context"
	"net"
)

// MaxConfigLen is the longest config string AoE r11 carries.
const MaxConfigLen = 1024

// MaxMasks is the number of MACs a target's mask list holds (as vblade).
const MaxMasks = 32

// MaxReservations is the number of MACs a reservation holds (as vblade).
const MaxReservations = 256

// MAC is an Ethernet address as a value (comparable, no allocation).
type MAC [6]byte

// String formats m as colon-separated hex.
func (m MAC) String() string { return net.HardwareAddr(m[:]).String() }

// ParseMAC parses a MAC in any form net.ParseMAC accepts, or vblade's bare
// 12-hex-digit form.
func ParseMAC(s string) (MAC, error) {
	var m MAC
	if len(s) == 12 {
		if _, err := hexDecode(m[:], s); err == nil {
			return m, nil
		}
	}
	hw, err := net.ParseMAC(s)
	if err != nil {
		return m, err
	}
	if len(hw) != 6 {
		return m, &net.AddrError{Err: "not a 48-bit MAC", Addr: s}
	}
	copy(m[:], hw)
	return m, nil
}

func hexDecode(dst []byte, s string) (int, error) {
	for i := 0; i < len(dst); i++ {
		hi, ok1 := fromHex(s[2*i])
		lo, ok2 := fromHex(s[2*i+1])
		if !ok1 || !ok2 {
			return i, &net.AddrError{Err: "bad hex digit", Addr: s}
		}
		dst[i] = hi<<4 | lo
	}
	return len(dst), nil
}

func fromHex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// TargetState is the protocol state of a target that must survive restarts
// and, in a cluster, failover: the config string, the MAC mask list and the
// reservation list. Values are immutable once published; changes build a new
// TargetState.
type TargetState struct {
	Config       []byte
	Masks        []MAC
	Reservations []MAC
}

// Clone returns a deep copy of s.
func (s TargetState) Clone() TargetState {
	return TargetState{
		Config:       bytes.Clone(s.Config),
		Masks:        append([]MAC(nil), s.Masks...),
		Reservations: append([]MAC(nil), s.Reservations...),
	}
}

// Equal reports whether s and o hold the same state.
func (s TargetState) Equal(o TargetState) bool {
	return bytes.Equal(s.Config, o.Config) && macsEqual(s.Masks, o.Masks) &&
		macsEqual(s.Reservations, o.Reservations)
}

func macsEqual(a, b []MAC) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func containsMAC(list []MAC, m MAC) bool {
	for _, x := range list {
		if x == m {
			return true
		}
	}
	return false
}

// StateStore makes a target's state durable. Standalone mode writes a file in
// the state directory; cluster mode proposes a Raft entry and returns once it
// is committed and applied. The target calls Commit with the new state before
// it publishes it or answers the request that changed it. An error wrapping
// ErrNoReply drops the request unanswered; any other error is logged and the
// request is dropped too (the state did not change).
type StateStore interface {
	Commit(ctx context.Context, shelf uint16, slot uint8, s TargetState) error
}
