package replication

import (
	"context"
	"crypto/sha256"
	"fmt"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// ImageChecksum returns the SHA-256 of a whole image, read in chunks so that
// memory stays bounded for any image size. Comparing checksums of two nodes
// (`vbladectl cluster verify`) is only meaningful at the same applied index:
// take them while no write is in flight, or after a Barrier on the leader and
// FSM.WaitApplied with the leader's index on each follower.
func ImageChecksum(ctx context.Context, d aoe.Disk) ([32]byte, error) {
	var sum [32]byte
	h := sha256.New()
	size := d.Size()
	buf := make([]byte, min(int64(DefaultChunkSize), size))
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return sum, fmt.Errorf("replication: checksum image at %d of %d bytes: %w", off, size, err)
		}
		n := min(int64(len(buf)), size-off)
		if err := d.ReadAt(ctx, buf[:n], off); err != nil {
			return sum, fmt.Errorf("replication: checksum image: read %d bytes at %d: %w", n, off, err)
		}
		h.Write(buf[:n])
		off += n
	}
	h.Sum(sum[:0])
	return sum, nil
}
