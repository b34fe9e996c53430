//go:build !race

package aoe

const raceEnabled = false
