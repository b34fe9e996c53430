package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/storage"
)

// Standalone serves exports from local disks with no cluster: the classic
// vblade command line and `vblade serve -c FILE`.
type Standalone struct {
	// StateDir keeps mask lists, config strings and reservations across
	// restarts; empty keeps them in memory only, as the C vblade does.
	StateDir string
	Exports  []Export
	Logger   *slog.Logger
	// Started, if set, is called once per export when its target is ready,
	// before serving begins (the classic CLI prints vblade's "pid N: ..."
	// line from it).
	Started func(e *Export, t *aoe.Target)
	// Disks overrides how a disk is opened (the echo target for benchmarks);
	// nil opens the export's path.
	OpenDisk func(e *Export) (aoe.Disk, io.Closer, error)
	// Metrics, if set, collects the targets' and interfaces' figures.
	Metrics *Collector
}

// Run opens every export and serves them until ctx ends. Exports on the same
// interface share one socket.
func (s *Standalone) Run(ctx context.Context) error {
	log := s.Logger
	if log == nil {
		log = slog.Default()
	}
	if len(s.Exports) == 0 {
		return errors.New("no exports configured")
	}
	var states *storage.StateDir
	if s.StateDir != "" {
		var err error
		if states, err = storage.OpenStateDir(s.StateDir); err != nil {
			return err
		}
	}
	seen := map[aoe.TargetAddr]bool{}
	servers := map[string]*aoe.Server{}
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	for i := range s.Exports {
		e := &s.Exports[i]
		if err := e.Validate(); err != nil {
			return err
		}
		if seen[e.Addr()] {
			return fmt.Errorf("%s is exported twice", e.Addr())
		}
		seen[e.Addr()] = true
		t, closer, err := s.openTarget(e, states, log)
		if err != nil {
			return err
		}
		closers = append(closers, closer)
		srv := servers[e.Netif]
		if srv == nil {
			srv, err = aoe.NewServer(aoe.ServerConfig{Interface: e.Netif, BufferCount: e.BufCount, Logger: log})
			if err != nil {
				return err
			}
			servers[e.Netif] = srv
			closers = append(closers, srv)
			if s.Metrics != nil {
				s.Metrics.AddServer(srv)
			}
		}
		if err := srv.AddTarget(t); err != nil {
			return err
		}
		if s.Metrics != nil {
			s.Metrics.AddTarget(e.Netif, t)
		}
		if s.Started != nil {
			s.Started(e, t)
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, len(servers))
	for _, srv := range servers {
		wg.Add(1)
		go func(srv *aoe.Server) {
			defer wg.Done()
			if err := srv.Serve(ctx); err != nil {
				errc <- err
				cancel()
			}
		}(srv)
	}
	wg.Wait()
	close(errc)
	return <-errc
}

func (s *Standalone) openTarget(e *Export, states *storage.StateDir, log *slog.Logger) (*aoe.Target, io.Closer, error) {
	var disk aoe.Disk
	var closer io.Closer
	if s.OpenDisk != nil {
		d, c, err := s.OpenDisk(e)
		if err != nil {
			return nil, nil, err
		}
		disk, closer = d, c
	} else {
		f, err := e.OpenDisk()
		if err != nil {
			return nil, nil, err
		}
		disk, closer = f, f
	}
	var initial aoe.TargetState
	var store aoe.StateStore
	if states != nil {
		st, ok, err := states.Load(uint16(e.Shelf), uint8(e.Slot))
		if err != nil {
			closer.Close()
			return nil, nil, err
		}
		if ok {
			initial = st
		}
		store = states
	}
	masks, err := e.ParseMasks()
	if err != nil {
		closer.Close()
		return nil, nil, err
	}
	// A mask list on the command line or in the file replaces the saved
	// one, as vblade's -m defines the list at start.
	if len(masks) > 0 {
		initial.Masks = masks
		if states != nil {
			if err := states.Commit(context.Background(), uint16(e.Shelf), uint8(e.Slot), initial); err != nil {
				closer.Close()
				return nil, nil, err
			}
		}
	}
	var mac aoe.MAC
	if e.MAC != "" {
		mac, _ = aoe.ParseMAC(e.MAC)
	}
	var observer func(aoe.CommandKind, time.Duration)
	if s.Metrics != nil {
		observer = s.Metrics.LatencyObserver(e.Netif, e.Addr())
	}
	t, err := aoe.NewTarget(aoe.TargetConfig{
		Shelf:       uint16(e.Shelf),
		Slot:        uint8(e.Slot),
		Disk:        disk,
		ReadOnly:    e.ReadOnly,
		BufferCount: e.BufCount,
		State:       store,
		Initial:     initial,
		MAC:         mac,
		Observe:     observer,
		Logger:      log,
	})
	if err != nil {
		closer.Close()
		return nil, nil, err
	}
	return t, closer, nil
}
