// Package node is one vblade-ha process's life: reading its configuration,
// opening the exported disks, wiring them to the AoE engine and, in cluster
// mode, to Raft, and running until told to stop.
package node

import (
	"fmt"
	"strings"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/storage"
)

// Export is one exported shelf.slot as the configuration file and the
// classic command line describe it. Offset and Length are in 512-byte
// sectors, as vblade's -o and -l are.
type Export struct {
	Shelf    int      `toml:"shelf"`
	Slot     int      `toml:"slot"`
	Netif    string   `toml:"netif"`
	Path     string   `toml:"path"`
	BufCount int      `toml:"bufcnt"`
	Offset   int64    `toml:"offset"`
	Length   int64    `toml:"length"`
	Direct   bool     `toml:"direct"`
	Sync     bool     `toml:"sync"`
	ReadOnly bool     `toml:"read_only"`
	Masks    []string `toml:"mask"`
	// MAC, if set, is the address the target answers from (cluster mode's
	// virtual MAC); empty means the interface's own.
	MAC string `toml:"mac"`
}

// Addr is the export's shelf.slot.
func (e *Export) Addr() aoe.TargetAddr {
	return aoe.TargetAddr{Shelf: uint16(e.Shelf), Slot: uint8(e.Slot)}
}

// Validate checks the fields that do not need the disk.
func (e *Export) Validate() error {
	if e.Shelf < 0 || e.Shelf >= int(aoe.BroadcastShelf) {
		return fmt.Errorf("shelf %d out of range 0-65534", e.Shelf)
	}
	if e.Slot < 0 || e.Slot >= int(aoe.BroadcastSlot) {
		return fmt.Errorf("slot %d out of range 0-254", e.Slot)
	}
	if e.Netif == "" {
		return fmt.Errorf("e%d.%d: netif is required", e.Shelf, e.Slot)
	}
	if e.Path == "" {
		return fmt.Errorf("e%d.%d: path is required", e.Shelf, e.Slot)
	}
	if e.BufCount < 0 || e.BufCount > 0xffff {
		return fmt.Errorf("e%d.%d: bufcnt %d out of range 1-65535", e.Shelf, e.Slot, e.BufCount)
	}
	if e.Offset < 0 {
		return fmt.Errorf("e%d.%d: offset %d is negative", e.Shelf, e.Slot, e.Offset)
	}
	if e.Length < 0 {
		return fmt.Errorf("e%d.%d: length %d is negative", e.Shelf, e.Slot, e.Length)
	}
	if _, err := e.ParseMasks(); err != nil {
		return err
	}
	if e.MAC != "" {
		if _, err := aoe.ParseMAC(e.MAC); err != nil {
			return fmt.Errorf("e%d.%d: mac %q: %w", e.Shelf, e.Slot, e.MAC, err)
		}
	}
	return nil
}

// ParseMasks parses the mask list.
func (e *Export) ParseMasks() ([]aoe.MAC, error) {
	var out []aoe.MAC
	for _, s := range e.Masks {
		m, err := aoe.ParseMAC(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("e%d.%d: mask %q is not a MAC address: %w", e.Shelf, e.Slot, s, err)
		}
		out = append(out, m)
	}
	if len(out) > aoe.MaxMasks {
		return nil, fmt.Errorf("e%d.%d: %d masks exceed the limit of %d", e.Shelf, e.Slot, len(out), aoe.MaxMasks)
	}
	return out, nil
}

// OpenDisk opens the export's backing file with its options.
func (e *Export) OpenDisk() (*storage.File, error) {
	return storage.Open(e.Path, storage.Options{
		Offset:   e.Offset * aoe.SectorSize,
		Length:   e.Length * aoe.SectorSize,
		ReadOnly: e.ReadOnly,
		Direct:   e.Direct,
		Sync:     e.Sync,
		// io_uring halves the CPU per O_DIRECT command here (no thread
		// blocks in pread); for page-cache and tmpfs reads pread is
		// cheaper, so only direct exports use it (see storage/uring.go).
		URing: e.Direct,
	})
}
