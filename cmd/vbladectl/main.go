// Command vbladectl is the operator's and the test suite's initiator-side
// tool: it discovers AoE targets on an interface, measures them, and (in
// cluster mode) inspects the cluster.
package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// Exit codes shared by every command.
const (
	exitOK    = 0
	exitFail  = 1 // the command ran and found errors (I/O errors, mismatches)
	exitUsage = 2 // bad command line
)

func main() {
	os.Exit(run(os.Args))
}

func run(args []string) int {
	app := newApp()
	err := app.Run(args)
	if err == nil {
		return exitOK
	}
	fmt.Fprintln(os.Stderr, "vbladectl:", err)
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		return ec.ExitCode()
	}
	return exitFail
}

func newApp() *cli.App {
	return &cli.App{
		Name:  "vbladectl",
		Usage: "inspect and measure ATA over Ethernet targets",
		Commands: []*cli.Command{
			discoverCommand(),
			benchCommand(),
			clusterCommand(),
		},
		// Run returns errors to run, which owns the exit code.
		ExitErrHandler: func(*cli.Context, error) {},
		OnUsageError:   usageError,
		Action: func(c *cli.Context) error {
			if c.Args().Len() > 0 {
				return cli.Exit(fmt.Sprintf("unknown command %q (see vbladectl --help)", c.Args().First()), exitUsage)
			}
			return cli.ShowAppHelp(c)
		},
	}
}

// usageError maps flag parsing errors to exit code 2.
func usageError(c *cli.Context, err error, _ bool) error {
	return cli.Exit(fmt.Sprintf("%v (see --help)", err), exitUsage)
}

func usagef(format string, a ...any) error {
	return cli.Exit(fmt.Sprintf(format, a...), exitUsage)
}

// parseTarget accepts "shelf.slot" and aoe-stat's "eshelf.slot".
func parseTarget(s string) (aoe.TargetAddr, error) {
	t := strings.TrimPrefix(s, "e")
	sh, sl, ok := strings.Cut(t, ".")
	if !ok {
		return aoe.TargetAddr{}, fmt.Errorf("target %q: want shelf.slot, e.g. 1.0", s)
	}
	shelf, err := strconv.ParseUint(sh, 10, 16)
	if err != nil || shelf >= uint64(aoe.BroadcastShelf) {
		return aoe.TargetAddr{}, fmt.Errorf("target %q: shelf must be 0-65534", s)
	}
	slot, err := strconv.ParseUint(sl, 10, 8)
	if err != nil || slot >= uint64(aoe.BroadcastSlot) {
		return aoe.TargetAddr{}, fmt.Errorf("target %q: slot must be 0-254", s)
	}
	return aoe.TargetAddr{Shelf: uint16(shelf), Slot: uint8(slot)}, nil
}
