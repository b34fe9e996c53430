package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/vblade-ha/vblade-ha/aoe"
)

func discoverCommand() *cli.Command {
	return &cli.Command{
		Name:      "discover",
		Usage:     "list the AoE targets answering on an interface (like aoe-stat)",
		ArgsUsage: " ",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "i", Aliases: []string{"interface"}, Usage: "network interface to query", Required: true},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
			&cli.DurationFlag{Name: "wait", Value: time.Second, Usage: "how long to collect answers"},
		},
		OnUsageError: usageError,
		Action:       discoverAction,
	}
}

// discovered is one shelf.slot with every MAC it answered from.
type discovered struct {
	Target          string   `json:"target"`
	Shelf           uint16   `json:"shelf"`
	Slot            uint8    `json:"slot"`
	MACs            []string `json:"macs"`
	SizeBytes       int64    `json:"size_bytes"`
	Sectors         uint64   `json:"sectors"`
	BufferCount     uint16   `json:"bufcnt"`
	SectorCount     uint8    `json:"scnt"`
	FirmwareVersion string   `json:"firmware"`
	AoEVersion      uint8    `json:"aoe_version"`
	Config          string   `json:"config"`
	Model           string   `json:"model,omitempty"`
	Serial          string   `json:"serial,omitempty"`
	Error           string   `json:"error,omitempty"`
}

func discoverAction(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return usagef("discover takes no arguments, got %q", c.Args().Slice())
	}
	ifname := c.String("i")
	wait := c.Duration("wait")
	if wait <= 0 || wait > time.Minute {
		return usagef("--wait %v: want between 0 and 1m", wait)
	}
	client, err := aoe.NewClient(ifname, aoe.ClientOptions{RequestTimeout: 2 * time.Second})
	if err != nil {
		return cli.Exit(err, exitFail)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(c.Context, wait+time.Minute)
	defer cancel()
	infos, err := client.Discover(ctx, wait)
	if err != nil {
		return cli.Exit(fmt.Errorf("discover on %s: %w", ifname, err), exitFail)
	}
	var out []discovered
	index := map[aoe.TargetAddr]int{}
	for _, ti := range infos {
		a := aoe.TargetAddr{Shelf: ti.Shelf, Slot: ti.Slot}
		if i, ok := index[a]; ok {
			out[i].MACs = append(out[i].MACs, ti.MAC.String())
			continue
		}
		index[a] = len(out)
		d := discovered{
			Target: a.String(), Shelf: ti.Shelf, Slot: ti.Slot, MACs: []string{ti.MAC.String()},
			BufferCount: ti.BufferCount, SectorCount: ti.SectorCount,
			FirmwareVersion: fmt.Sprintf("%#04x", ti.FirmwareVersion), AoEVersion: ti.AoEVersion,
			Config: string(ti.Config),
		}
		// The size is not in Query Config: ask the target itself.
		id, err := client.Identify(ctx, ti.Remote())
		if err != nil {
			d.Error = err.Error()
		} else {
			d.SizeBytes, d.Sectors, d.Model, d.Serial = id.Size(), id.Sectors, id.Model, id.Serial
		}
		out = append(out, d)
	}
	if c.Bool("json") {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if out == nil {
			out = []discovered{}
		}
		return enc.Encode(out)
	}
	printDiscovered(os.Stdout, out, term.IsTerminal(int(os.Stdout.Fd())))
	for _, d := range out {
		if d.Error != "" {
			fmt.Fprintf(os.Stderr, "vbladectl: %s: %s\n", d.Target, d.Error)
		}
	}
	return nil
}

// printDiscovered prints one line per target: an aligned table on a
// terminal, single-space separated fields (easy to cut/awk) otherwise.
func printDiscovered(w io.Writer, ds []discovered, tty bool) {
	var tw *tabwriter.Writer
	sep := " "
	if tty {
		tw = tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
		w = tw
		sep = "\t"
		fmt.Fprintln(w, strings.Join([]string{"TARGET", "SIZE", "MAC", "BUFCNT", "SCNT", "FW", "CONFIG"}, sep))
	}
	for _, d := range ds {
		size := "?"
		if d.Error == "" {
			size = humanSize(d.SizeBytes)
		}
		fmt.Fprintln(w, strings.Join([]string{d.Target, size, strings.Join(d.MACs, ","),
			strconv.Itoa(int(d.BufferCount)), strconv.Itoa(int(d.SectorCount)), d.FirmwareVersion,
			strconv.Quote(d.Config)}, sep))
	}
	if tw != nil {
		tw.Flush()
	}
}

// humanSize prints decimal units as aoe-stat does (1.073GB for 1 GiB).
func humanSize(b int64) string {
	switch {
	case b >= 1e12:
		return fmt.Sprintf("%.3fTB", float64(b)/1e12)
	case b >= 1e9:
		return fmt.Sprintf("%.3fGB", float64(b)/1e9)
	case b >= 1e6:
		return fmt.Sprintf("%.3fMB", float64(b)/1e6)
	}
	return fmt.Sprintf("%dB", b)
}
