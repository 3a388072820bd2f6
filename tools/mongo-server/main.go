// Command mongo-server runs FerretDB (embedded, SQLite backend) as a
// MongoDB-wire server on loopback for twinhub's development stack and tests.
//
// It prints one line "READY mongodb://HOST:PORT/" on stdout once the listener
// is bound, and runs until SIGTERM or SIGINT.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	_ "net/http/pprof" // served only with --pprof
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "TCP address to listen on (port 0 picks a free port)")
	dataDir := flag.String("data-dir", "", "directory for the SQLite databases (created if missing)")
	logLevel := flag.String("log-level", "warn", "debug, info, warn or error")
	syncMode := flag.String("sqlite-synchronous", "normal",
		"SQLite synchronous pragma: normal (WAL: no fsync per commit; a power loss may roll back "+
			"the last commits, never corrupt) or full (fsync every commit)")
	pprofAddr := flag.String("pprof", "", "serve Go's net/http/pprof on this loopback address (profiling)")
	walInterval := flag.Duration("wal-checkpoint-interval", 5*time.Second,
		"how often to look for a database whose SQLite WAL exceeds --wal-checkpoint-size and "+
			"checkpoint it with TRUNCATE (0 disables; see checkpoint.go)")
	walSize := flag.Int64("wal-checkpoint-size", 64<<20,
		"WAL size in bytes above which a database is checkpointed; also its journal_size_limit")
	walTimeout := flag.Duration("wal-checkpoint-timeout", 250*time.Millisecond,
		"how long a checkpoint waits for readers and writers before it gives up until the next "+
			"interval (new writes wait meanwhile: keep it short, far under FerretDB's 10s busy timeout)")
	gcPercent := flag.Int("gc-percent", 400,
		"Go's GOGC for the server (ignored when $GOGC is set): a collection each time the heap "+
			"grows by this percentage of the live heap. Go's default, 100, spent ~10 % of the CPU "+
			"of a replace loop in the collector; 400 keeps a few tens of MB more heap")
	flag.Parse()

	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(*gcPercent)
	}

	if *dataDir == "" {
		fmt.Fprintln(os.Stderr, "mongo-server: --data-dir is required")
		os.Exit(2)
	}
	abs, err := filepath.Abs(*dataDir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mongo-server: %v\n", err)
		os.Exit(2)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		fmt.Fprintf(os.Stderr, "mongo-server: %v\n", err)
		os.Exit(2)
	}

	if *syncMode != "normal" && *syncMode != "full" {
		fmt.Fprintf(os.Stderr, "mongo-server: bad --sqlite-synchronous %q: normal or full\n", *syncMode)
		os.Exit(2)
	}

	if *walInterval < 0 || *walSize < 0 || *walTimeout <= 0 {
		fmt.Fprintln(os.Stderr, "mongo-server: --wal-checkpoint-interval and --wal-checkpoint-size "+
			"must not be negative, --wal-checkpoint-timeout must be positive")
		os.Exit(2)
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "mongo-server: bad --log-level: %v\n", err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	// journal_size_limit: whenever SQLite rewinds a WAL, it truncates a larger file to that size.
	sqliteURL := fmt.Sprintf("file:%s/?_pragma=synchronous(%s)&_pragma=journal_size_limit(%d)",
		abs, *syncMode, *walSize)
	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Logger:    logger,
		Handler:   "sqlite",
		SQLiteURL: sqliteURL,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "mongo-server: %v\n", err)
		os.Exit(1)
	}

	if *pprofAddr != "" {
		go func() {
			logger.Warn("pprof", "error", http.ListenAndServe(*pprofAddr, nil)) //nolint:gosec // loopback, dev only
		}()
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	done := make(chan struct{})
	go func() {
		defer close(done)
		defer stop() // however FerretDB ends, the checkpointer ends with it
		_ = f.Run(ctx)
	}()

	checkpointerDone := make(chan struct{})
	go func() {
		defer close(checkpointerDone)
		if *walInterval > 0 {
			newWALCheckpointer(abs, *walInterval, *walSize, *walTimeout, logger).run(ctx)
		}
	}()

	fmt.Printf("READY %s\n", f.MongoDBURI())
	_ = os.Stdout.Sync()
	<-done
	<-checkpointerDone
}
