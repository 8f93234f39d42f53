// Command natasks-go is a stand-in for the Go natasks library (github.com/hexpande/natasks),
// used by the Rust crate's interop tests to run Go and Rust side by side on one server.
//
// It is NOT the Go library. The module is not served by the Go module proxy this project
// builds with (`go list -m -versions github.com/hexpande/natasks` answers "reading
// https://proxy.golang.org/github.com/hexpande/natasks/@v/list: 403 Forbidden, server
// response: This module version is not available."), so this program reproduces, on
// github.com/nats-io/nats.go, what the library's published documentation (its package
// page, v0.1.1) says it does. It was written from that documentation only, not from the
// library's source.
//
// Documented behaviours it reproduces:
//   - NewClient and NewWorker ensure the stream (and, for a worker, the durable pull
//     consumer) exist; Dispatch, DispatchIn, DispatchAt; task.WithMessageID deduplicates
//     through Nats-Msg-Id.
//   - Worker options and defaults: concurrency 1, max retries -1 (unlimited; n = retries
//     after the first failed attempt), no retry backoff (the last delay repeats when there
//     are more retries than delays), dead-letter suffix -dlq; WithFetchBatch,
//     WithFetchTimeout, WithIdleWait, WithTaskTimeout, WithAckWait, WithProgressInterval,
//     WithMaxAckPending, WithConsumerPrefix, WithDurable, WithStreamName, WithSubjectPrefix.
//   - Retries are redeliveries by the broker (a failed task is negatively acknowledged with
//     the backoff delay); a running handler renews its lease with InProgress.
//   - NoRetry(err): the task is acknowledged, not retried, not dead-lettered.
//   - Dead letters keep the original payload and carry Natasks-Original-Queue,
//     Natasks-Attempts and Natasks-Last-Error, on queue <queue>-dlq.
//   - A MessagePropagator carries context in message headers; with OpenTelemetry it is the
//     global text-map propagator (W3C trace context), with a producer span per dispatch and
//     a consumer span per processing attempt.
//
// What the documentation does not say, and where this program takes it from:
//   - From natasks' own docs/wire-format.md: stream NATASKS with the one subject natasks.*,
//     work-queue retention, file storage, message schedules on; queue subject
//     natasks.<queue>; headers Natasks-Task and Natasks-Queue; consumer natasks-<queue>
//     filtered on natasks.<queue>, explicit acks, ack wait 30 s, max ack pending 128,
//     description "natasks worker", instant replay.
//   - Assumed: every delayed task is a JetStream message schedule ("@at <RFC 3339 time>",
//     fractions of a second kept) published to ONE subject, natasks._schedule, targeting
//     natasks.<queue>, with the task's headers and Nats-Msg-Id when it has a message id. The server keeps one schedule
//     per subject, so only the latest pending delayed task survives; the interop tests show
//     what that means for a mixed deployment. Also assumed: an existing stream is used as
//     it is (never updated), the consumer is created or updated to this configuration,
//     a dead letter also keeps the task's own headers (Natasks-Task among them) but not the
//     server's Nats-* headers, it is published before the task is acknowledged, a task
//     without a handler is terminated, fetch batch defaults to the concurrency, fetch
//     timeout to 5 s, idle wait to 250 ms, progress interval to a third of the ack wait.
//
// Commands (each prints JSON lines on stdout; logs are JSON lines on stderr):
//
//	natasks-go ensure   --url URL [--queue Q] [options]       create the stream (and consumer)
//	natasks-go dispatch --url URL --queue Q --task NAME [--payload S | --payload-file F]
//	                    [--header K=V]... [--msg-id ID] [--in D | --at RFC3339] [--count N] [--otel]
//	natasks-go work     --url URL --queue Q --handle NAME=BEHAVIOUR... [worker options] [--otel]
//
// BEHAVIOUR is ok, fail, noretry, sleep:DURATION (then ok) or fail-first:N (fail the first N
// attempts, then ok). In --count mode, {i} in the payload and message id is the index.
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: natasks-go ensure|dispatch|work [flags]"))
	}
	var err error
	switch os.Args[1] {
	case "ensure":
		err = ensure(os.Args[2:])
	case "dispatch":
		err = dispatch(os.Args[2:])
	case "work":
		err = work(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "natasks-go:", err)
	os.Exit(1)
}

var (
	outMu sync.Mutex
	out   = json.NewEncoder(os.Stdout)
)

// emit prints one JSON line on stdout.
func emit(v map[string]any) {
	outMu.Lock()
	defer outMu.Unlock()
	_ = out.Encode(v)
}

// common holds the connection and layout flags every command takes.
type common struct {
	url           string
	stream        string
	subjectPrefix string
	otel          bool
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.url, "url", nats.DefaultURL, "NATS server URL")
	fs.StringVar(&c.stream, "stream", "", "stream name (WithStreamName)")
	fs.StringVar(&c.subjectPrefix, "subject-prefix", "", "subject prefix (WithSubjectPrefix)")
	fs.BoolVar(&c.otel, "otel", false, "OpenTelemetry: W3C trace context in headers, spans per dispatch and attempt")
}

func (c *common) connect() (*nats.Conn, jetstream.JetStream, error) {
	nc, err := nats.Connect(c.url, nats.Name("natasks-go"))
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

func (c *common) settings() Settings {
	s := Settings{Stream: c.stream, SubjectPrefix: c.subjectPrefix}
	s.Logger = slog.New(slog.NewJSONHandler(os.Stderr, nil))
	if c.otel {
		s.Propagator = otelPropagator{}
	}
	return s
}

// workerFlags are the documented worker options.
type workerFlags struct {
	consumerPrefix   string
	durable          string
	concurrency      int
	fetchBatch       int
	fetchTimeout     time.Duration
	idleWait         time.Duration
	taskTimeout      time.Duration
	ackWait          time.Duration
	progressInterval time.Duration
	maxAckPending    int
	maxRetries       int
	backoff          string
	dlqSuffix        string
}

func (w *workerFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&w.consumerPrefix, "consumer-prefix", "", "WithConsumerPrefix")
	fs.StringVar(&w.durable, "durable", "", "WithDurable")
	fs.IntVar(&w.concurrency, "concurrency", 1, "WithConcurrency")
	fs.IntVar(&w.fetchBatch, "fetch-batch", 0, "WithFetchBatch (default: the concurrency)")
	fs.DurationVar(&w.fetchTimeout, "fetch-timeout", 0, "WithFetchTimeout")
	fs.DurationVar(&w.idleWait, "idle-wait", 0, "WithIdleWait")
	fs.DurationVar(&w.taskTimeout, "task-timeout", 0, "WithTaskTimeout")
	fs.DurationVar(&w.ackWait, "ack-wait", 0, "WithAckWait")
	fs.DurationVar(&w.progressInterval, "progress-interval", 0, "WithProgressInterval")
	fs.IntVar(&w.maxAckPending, "max-ack-pending", 0, "WithMaxAckPending")
	fs.IntVar(&w.maxRetries, "max-retries", -1, "WithMaxRetries (-1: unlimited)")
	fs.StringVar(&w.backoff, "backoff", "", "WithRetryBackoff: comma-separated durations")
	fs.StringVar(&w.dlqSuffix, "dlq-suffix", "", "WithDLQSuffix")
}

func (w *workerFlags) apply(s *Settings) error {
	s.ConsumerPrefix, s.Durable = w.consumerPrefix, w.durable
	s.Concurrency, s.FetchBatch = w.concurrency, w.fetchBatch
	s.FetchTimeout, s.IdleWait, s.TaskTimeout = w.fetchTimeout, w.idleWait, w.taskTimeout
	s.AckWait, s.ProgressInterval, s.MaxAckPending = w.ackWait, w.progressInterval, w.maxAckPending
	s.MaxRetries, s.DLQSuffix = w.maxRetries, w.dlqSuffix
	if w.backoff != "" {
		for _, part := range strings.Split(w.backoff, ",") {
			d, err := time.ParseDuration(strings.TrimSpace(part))
			if err != nil {
				return fmt.Errorf("--backoff: %w", err)
			}
			s.Backoff = append(s.Backoff, d)
		}
	}
	return nil
}

func ensure(args []string) error {
	fs := flag.NewFlagSet("ensure", flag.ExitOnError)
	var c common
	var wf workerFlags
	c.register(fs)
	wf.register(fs)
	queue := fs.String("queue", "", "also create the consumer of this queue")
	_ = fs.Parse(args)
	nc, js, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	s := c.settings()
	if err := wf.apply(&s); err != nil {
		return err
	}
	s = s.withDefaults()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := EnsureStream(ctx, js, s)
	if err != nil {
		return err
	}
	event := map[string]any{"event": "ensured", "stream": stream.CachedInfo().Config}
	if *queue != "" {
		consumer, err := EnsureConsumer(ctx, js, s, *queue)
		if err != nil {
			return err
		}
		event["consumer"] = consumer.CachedInfo().Config
	}
	emit(event)
	return nil
}

type headerFlags []string

func (h *headerFlags) String() string     { return strings.Join(*h, ",") }
func (h *headerFlags) Set(v string) error { *h = append(*h, v); return nil }

func dispatch(args []string) error {
	fs := flag.NewFlagSet("dispatch", flag.ExitOnError)
	var c common
	c.register(fs)
	queue := fs.String("queue", "", "queue")
	name := fs.String("task", "", "task name")
	payload := fs.String("payload", "", "payload")
	payloadFile := fs.String("payload-file", "", "read the payload from this file")
	msgID := fs.String("msg-id", "", "message id (task.WithMessageID)")
	in := fs.Duration("in", 0, "DispatchIn: delay")
	at := fs.String("at", "", "DispatchAt: RFC 3339 time")
	count := fs.Int("count", 1, "dispatch this many tasks ({i} in payload and message id is the index)")
	var headers headerFlags
	fs.Var(&headers, "header", "task header K=V (repeatable)")
	_ = fs.Parse(args)

	body := []byte(*payload)
	if *payloadFile != "" {
		var err error
		if body, err = os.ReadFile(*payloadFile); err != nil {
			return err
		}
	}
	var due time.Time
	if *at != "" {
		var err error
		if due, err = time.Parse(time.RFC3339Nano, *at); err != nil {
			return fmt.Errorf("--at: %w", err)
		}
	}
	nc, js, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	var shutdown func()
	if c.otel {
		shutdown = installOtel()
		defer shutdown()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client, err := NewClient(ctx, js, c.settings())
	if err != nil {
		return err
	}
	for i := range *count {
		index := strconv.Itoa(i)
		data := body
		if *count > 1 {
			data = []byte(strings.ReplaceAll(string(body), "{i}", index))
		}
		task, err := NewTask(*name, data)
		if err != nil {
			return err
		}
		for _, h := range headers {
			k, v, ok := strings.Cut(h, "=")
			if !ok {
				return fmt.Errorf("--header %q: want K=V", h)
			}
			task.AddHeader(k, v)
		}
		if *msgID != "" {
			task.WithMessageID(strings.ReplaceAll(*msgID, "{i}", index))
		}
		event := map[string]any{"event": "dispatched", "task": *name, "queue": *queue, "index": i}
		dctx, span := startDispatchSpan(ctx, c.otel, *name, *queue)
		var ack *jetstream.PubAck
		switch {
		case *in > 0:
			ack, err = client.DispatchIn(dctx, task, *queue, *in)
		case !due.IsZero():
			ack, err = client.DispatchAt(dctx, task, *queue, due)
		default:
			ack, err = client.Dispatch(dctx, task, *queue)
		}
		span.end(event, err)
		if err != nil {
			return fmt.Errorf("dispatch %d: %w", i, err)
		}
		event["seq"], event["duplicate"] = ack.Sequence, ack.Duplicate
		if *count <= 100 || i == *count-1 {
			emit(event)
		}
	}
	return nil
}

type handleFlags map[string]string

func (h handleFlags) String() string { return fmt.Sprint(map[string]string(h)) }
func (h handleFlags) Set(v string) error {
	name, behaviour, ok := strings.Cut(v, "=")
	if !ok || name == "" {
		return fmt.Errorf("--handle %q: want NAME=BEHAVIOUR", v)
	}
	h[name] = behaviour
	return nil
}

// handler builds the test handler for a behaviour.
func handler(behaviour string) (Handler, error) {
	kind, arg, _ := strings.Cut(behaviour, ":")
	switch kind {
	case "ok":
		return func(context.Context, *Task) error { return nil }, nil
	case "fail":
		return func(_ context.Context, t *Task) error { return fmt.Errorf("go handler failed %s", t.Name()) }, nil
	case "noretry":
		return func(_ context.Context, t *Task) error {
			return NoRetry(fmt.Errorf("go handler rejected %s", t.Name()))
		}, nil
	case "sleep":
		d, err := time.ParseDuration(arg)
		if err != nil {
			return nil, fmt.Errorf("sleep:%s: %w", arg, err)
		}
		return func(ctx context.Context, _ *Task) error {
			select {
			case <-time.After(d):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}, nil
	case "fail-first":
		n, err := strconv.Atoi(arg)
		if err != nil {
			return nil, fmt.Errorf("fail-first:%s: %w", arg, err)
		}
		var seen sync.Map
		return func(_ context.Context, t *Task) error {
			key := string(t.Payload()) + "\x00" + t.MessageID()
			v, _ := seen.LoadOrStore(key, new(atomic.Int64))
			if v.(*atomic.Int64).Add(1) <= int64(n) {
				return fmt.Errorf("go handler failed %s (attempt %d of the first %d)", t.Name(), v.(*atomic.Int64).Load(), n)
			}
			return nil
		}, nil
	}
	return nil, fmt.Errorf("unknown behaviour %q (ok, fail, noretry, sleep:D, fail-first:N)", behaviour)
}

func work(args []string) error {
	fs := flag.NewFlagSet("work", flag.ExitOnError)
	var c common
	var wf workerFlags
	c.register(fs)
	wf.register(fs)
	queue := fs.String("queue", "", "queue")
	exitAfter := fs.Int("exit-after", 0, "exit after this many settled attempts (0: run until stdin closes or SIGTERM)")
	handles := handleFlags{}
	fs.Var(handles, "handle", "NAME=BEHAVIOUR (repeatable)")
	_ = fs.Parse(args)

	nc, js, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	if c.otel {
		shutdown := installOtel()
		defer shutdown()
	}
	s := c.settings()
	if err := wf.apply(&s); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	// The test harness closes stdin to stop the worker (and the worker stops if the harness dies).
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		stop()
	}()
	setup, cancel := context.WithTimeout(ctx, 10*time.Second)
	worker, err := NewWorker(setup, js, *queue, s)
	cancel()
	if err != nil {
		return err
	}
	for name, behaviour := range handles {
		h, err := handler(behaviour)
		if err != nil {
			return err
		}
		worker.Handle(name, h)
	}
	if c.otel {
		worker.Process = processSpan
	}
	var settled atomic.Int64
	worker.Settled = func(a Attempt) {
		event := map[string]any{
			"event":       "processed",
			"task":        a.Task.Name(),
			"queue":       a.Queue,
			"payload_b64": base64.StdEncoding.EncodeToString(a.Task.Payload()),
			"headers":     a.Task.Headers(),
			"attempt":     a.Number,
			"seq":         a.Sequence,
			"outcome":     a.Outcome,
			"received_ms": a.Received.UnixMilli(),
		}
		if a.Err != nil {
			event["error"] = a.Err.Error()
		}
		addTrace(event, a.Ctx)
		emit(event)
		if n := settled.Add(1); *exitAfter > 0 && n >= int64(*exitAfter) {
			stop()
		}
	}
	emit(map[string]any{"event": "ready", "queue": *queue, "consumer": s.withDefaults().ConsumerName(*queue)})
	err = worker.Run(ctx)
	// Acknowledgements are asynchronous publishes: send them before the connection closes.
	_ = nc.FlushTimeout(5 * time.Second)
	return err
}
