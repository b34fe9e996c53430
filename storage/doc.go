// Package storage provides the local backing stores of AoE targets: files and
// block devices (File), RAM disks (Mem), a discard-everything disk for
// benchmarks (Zero), and the state directory in which a standalone target
// keeps its config string, mask list and reservations across restarts
// (StateDir).
//
// Every disk here implements aoe.Disk. The engine issues many commands at
// once, so all of them are safe for concurrent use, and the I/O paths do not
// allocate when the caller's buffers are suitably aligned: a per-frame
// allocation would show up directly in the frame rate.
//
// Buffered writes reach the kernel in pieces of at most 32 KiB: the page
// cache keeps each write(2) as one folio, and every later small write into a
// large folio walks all of it (see maxPiece).
//
// Durability model of File:
//
//   - Without Options.Sync a write lands in the page cache (or, with
//     Options.Direct, in the device) and becomes durable at the next Flush,
//     which is how the ATA FLUSH CACHE command is meant to be used.
//   - With Options.Sync every WriteAt returns only after an fdatasync that
//     started after the write completed. Concurrent writers share one
//     fdatasync (group commit) instead of paying for one each as O_SYNC does.
//   - Once an fdatasync has failed, every later sync (and so every later Sync
//     write and Flush) fails too: after a writeback error Linux may have
//     dropped the dirty pages and a later fdatasync can succeed without the
//     lost data ever reaching the disk, so claiming durability again would be
//     a lie. The operator has to check the disk and restart the target.
package storage
