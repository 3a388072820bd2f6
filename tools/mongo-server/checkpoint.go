package main

// WAL checkpointer: keeps each database's SQLite write-ahead log bounded.
//
// SQLite's automatic checkpoints are PASSIVE: they copy WAL frames back into the database
// file, but the WAL is only rewound to its start when a writer finds every frame copied and no
// reader still using the WAL. Under sustained load with overlapping readers from FerretDB's
// pool that moment may never come (checkpoint starvation) and the -wal file grows without bound
// (a soak grew it by ~26 GB/h; patches/0003 removes the cause that made even a lone writer
// starve it). A TRUNCATE checkpoint blocks new writers while it waits for the readers of older
// snapshots to finish, then resets the WAL to zero bytes; new readers meanwhile read the
// database file only, so the wait ends once the in-flight queries do.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"time"

	_ "modernc.org/sqlite" // the driver FerretDB registers as "sqlite"; one copy in the process
)

// FerretDB's SQLite backend keeps one "<database>.sqlite" file per database in its directory.
const dbFileGlob = "*.sqlite"

// After this many consecutive failures on one database the checkpointer logs a warning.
const warnAfterFailures = 3

type walCheckpointer struct {
	dir         string        // FerretDB's SQLite directory
	interval    time.Duration // how often the -wal sizes are looked at
	minSize     int64         // a -wal file larger than this is checkpointed
	busyTimeout time.Duration // how long a checkpoint waits for readers and writers
	logger      *slog.Logger

	failures map[string]int // consecutive failures per database file
}

func newWALCheckpointer(dir string, interval time.Duration, minSize int64, busyTimeout time.Duration,
	logger *slog.Logger,
) *walCheckpointer {
	return &walCheckpointer{
		dir:         dir,
		interval:    interval,
		minSize:     minSize,
		busyTimeout: busyTimeout,
		logger:      logger,
		failures:    map[string]int{},
	}
}

// run checks the databases every interval until ctx is done. The interval counts from the end
// of the previous sweep: after a checkpoint that gave up, the writers it held back get in first.
func (c *walCheckpointer) run(ctx context.Context) {
	timer := time.NewTimer(c.interval)
	defer timer.Stop()

	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
			c.sweep(ctx)
			timer.Reset(c.interval)
		}
	}
}

// sweep checkpoints every database whose WAL exceeds minSize.
func (c *walCheckpointer) sweep(ctx context.Context) {
	files, err := filepath.Glob(filepath.Join(c.dir, dbFileGlob))
	if err != nil { // only for a malformed pattern
		c.logger.Error("wal checkpointer: glob", "error", err)
		return
	}

	for _, dbFile := range files {
		if ctx.Err() != nil {
			return
		}

		info, err := os.Stat(dbFile + "-wal")
		if err != nil || info.Size() <= c.minSize {
			delete(c.failures, dbFile)
			continue
		}

		start := time.Now()
		err = c.checkpoint(ctx, dbFile)
		if ctx.Err() != nil {
			return // shutting down: the interrupted checkpoint is not a failure
		}

		if err != nil {
			c.failures[dbFile]++
			n := c.failures[dbFile]
			c.logger.Debug("wal checkpoint failed", "db", dbFile, "wal_bytes", info.Size(), "failures", n,
				"error", err)
			if n == warnAfterFailures || (n > warnAfterFailures && n%(10*warnAfterFailures) == 0) {
				c.logger.Warn("wal checkpoint keeps failing: the WAL grows", "db", dbFile,
					"wal_bytes", info.Size(), "failures", n, "error", err)
			}
			continue
		}

		if c.failures[dbFile] >= warnAfterFailures {
			c.logger.Warn("wal checkpoint succeeded again", "db", dbFile, "after_failures", c.failures[dbFile])
		}
		delete(c.failures, dbFile)
		c.logger.Debug("wal checkpoint", "db", dbFile, "wal_bytes", info.Size(), "took", time.Since(start))
	}
}

// errCheckpointBusy: readers or a writer did not finish within the busy timeout; the WAL was
// (partly) copied back but not reset.
var errCheckpointBusy = errors.New("checkpoint did not complete: busy")

// checkpoint runs PRAGMA wal_checkpoint(TRUNCATE) on dbFile, on a connection of its own that is
// closed afterwards (so a database FerretDB drops is not kept open).
func (c *walCheckpointer) checkpoint(ctx context.Context, dbFile string) error {
	// mode=rw: never create a database file that was dropped in the meantime.
	dsn := "file:" + (&url.URL{Path: dbFile}).EscapedPath() +
		fmt.Sprintf("?mode=rw&_pragma=busy_timeout(%d)", c.busyTimeout.Milliseconds())

	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)

	// PASSIVE first copies what it can without blocking anyone, so that TRUNCATE, which holds
	// the write lock, has little left to copy. The busy timeout bounds how long writers wait
	// for a TRUNCATE that waits for a long query (or for a command that reads, still open, on
	// one connection while it writes on another, as updates did before patches/0003).
	var busy, logFrames, checkpointed int64
	for _, mode := range []string{"PASSIVE", "TRUNCATE"} {
		row := db.QueryRowContext(ctx, "PRAGMA wal_checkpoint("+mode+")")
		if err := row.Scan(&busy, &logFrames, &checkpointed); err != nil {
			return fmt.Errorf("wal_checkpoint(%s): %w", mode, err)
		}
	}

	if busy != 0 {
		return fmt.Errorf("%w (%d of %d frames copied)", errCheckpointBusy, checkpointed, logFrames)
	}

	return nil
}
