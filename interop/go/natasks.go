package main

// The stand-in library: what the Go natasks library does on the wire, written from its
// published documentation (see main.go for what is documented and what is not). It is kept
// to the surface the interop tests drive: NewClient, Dispatch/DispatchIn/DispatchAt,
// NewWorker, Handle, Run, NoRetry and the documented worker options.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Names on the wire. The dead-letter headers and the -dlq suffix are in the Go library's
// documentation; the stream, subject and task headers are the natasks wire format
// (docs/wire-format.md), which the Go documentation does not spell out.
const (
	DefaultStream         = "NATASKS"
	DefaultSubjectPrefix  = "natasks"
	DefaultConsumerPrefix = "natasks"
	DefaultDLQSuffix      = "-dlq"
	DefaultQueue          = "default"

	HeaderTask          = "Natasks-Task"
	HeaderQueue         = "Natasks-Queue"
	HeaderOriginalQueue = "Natasks-Original-Queue"
	HeaderAttempts      = "Natasks-Attempts"
	HeaderLastError     = "Natasks-Last-Error"

	headerMsgID          = "Nats-Msg-Id"
	headerSchedule       = "Nats-Schedule"
	headerScheduleTarget = "Nats-Schedule-Target"

	// ScheduleToken names the one subject every delayed task of a stream is published to
	// (<prefix>.<ScheduleToken>). The Go documentation does not name it; see main.go.
	ScheduleToken = "_schedule"
)

// ErrNoRetry marks a handler error as non-retriable (documented).
var ErrNoRetry = errors.New("natasks: no retry")

// ErrHandlerNotFound is what a task without a registered handler fails with (documented).
var ErrHandlerNotFound = errors.New("natasks: handler not found")

// NoRetry wraps err so the worker acknowledges the message without retries or DLQ.
func NoRetry(err error) error {
	return fmt.Errorf("%w: %w", ErrNoRetry, err)
}

// Task is a name, a raw payload, headers and an optional message id.
type Task struct {
	name      string
	payload   []byte
	headers   nats.Header
	messageID string
}

// NewTask constructs a task with a raw payload.
func NewTask(name string, payload []byte) (*Task, error) {
	if name == "" {
		return nil, errors.New("natasks: task name is required")
	}
	return &Task{name: name, payload: payload, headers: nats.Header{}}, nil
}

func (t *Task) Name() string                      { return t.name }
func (t *Task) Payload() []byte                   { return t.payload }
func (t *Task) Headers() nats.Header              { return t.headers }
func (t *Task) Header(key string) string          { return t.headers.Get(key) }
func (t *Task) SetHeader(key, value string)       { t.headers.Set(key, value) }
func (t *Task) WithMessageID(id string) *Task     { t.messageID = id; return t }
func (t *Task) MessageID() string                 { return t.messageID }
func (t *Task) AddHeader(key, value string) *Task { t.headers.Add(key, value); return t }

// MessagePropagator injects and extracts context values into message headers (documented).
type MessagePropagator interface {
	Inject(context.Context, TextMapCarrier)
	Extract(context.Context, TextMapCarrier) context.Context
}

// TextMapCarrier is a minimal carrier interface for context propagation (documented).
type TextMapCarrier interface {
	Get(string) string
	Set(string, string)
	Keys() []string
}

type headerCarrier nats.Header

func (h headerCarrier) Get(key string) string { return nats.Header(h).Get(key) }
func (h headerCarrier) Set(key, value string) { nats.Header(h).Set(key, value) }
func (h headerCarrier) Keys() []string {
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	return keys
}

// Settings holds the documented options. Zero values mean "the default".
type Settings struct {
	Stream           string
	SubjectPrefix    string
	ConsumerPrefix   string
	Durable          string
	Concurrency      int
	FetchBatch       int
	FetchTimeout     time.Duration
	IdleWait         time.Duration
	TaskTimeout      time.Duration
	AckWait          time.Duration
	ProgressInterval time.Duration
	MaxAckPending    int
	MaxRetries       int
	Backoff          []time.Duration
	DLQSuffix        string
	Propagator       MessagePropagator
	Logger           *slog.Logger
}

// withDefaults fills in defaults. Concurrency 1, max retries -1, no backoff and the -dlq
// suffix are documented; the rest are the natasks wire-format values or assumptions (main.go).
func (s Settings) withDefaults() Settings {
	if s.Stream == "" {
		s.Stream = DefaultStream
	}
	if s.SubjectPrefix == "" {
		s.SubjectPrefix = DefaultSubjectPrefix
	}
	if s.ConsumerPrefix == "" {
		s.ConsumerPrefix = DefaultConsumerPrefix
	}
	if s.Concurrency <= 0 {
		s.Concurrency = 1
	}
	if s.FetchBatch <= 0 {
		s.FetchBatch = s.Concurrency
	}
	if s.FetchTimeout <= 0 {
		s.FetchTimeout = 5 * time.Second
	}
	if s.IdleWait <= 0 {
		s.IdleWait = 250 * time.Millisecond
	}
	if s.AckWait <= 0 {
		s.AckWait = 30 * time.Second
	}
	if s.ProgressInterval <= 0 {
		s.ProgressInterval = s.AckWait / 3
	}
	if s.MaxAckPending <= 0 {
		s.MaxAckPending = 128
	}
	if s.DLQSuffix == "" {
		s.DLQSuffix = DefaultDLQSuffix
	}
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	return s
}

func (s Settings) subject(queue string) string { return s.SubjectPrefix + "." + queue }

// ScheduleSubject is the one subject delayed tasks are published to.
func (s Settings) ScheduleSubject() string { return s.SubjectPrefix + "." + ScheduleToken }

// StreamConfig is the stream as the Go library creates it: one wildcard subject for every
// queue, work-queue retention, message schedules on.
func (s Settings) StreamConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:              s.Stream,
		Subjects:          []string{s.SubjectPrefix + ".*"},
		Retention:         jetstream.WorkQueuePolicy,
		Storage:           jetstream.FileStorage,
		Discard:           jetstream.DiscardOld,
		AllowMsgSchedules: true,
	}
}

// ConsumerName is the durable name for a queue: WithDurable, else <prefix>-<queue>.
func (s Settings) ConsumerName(queue string) string {
	if s.Durable != "" {
		return s.Durable
	}
	return s.ConsumerPrefix + "-" + queue
}

// ConsumerConfig is the durable pull consumer of a queue.
func (s Settings) ConsumerConfig(queue string) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       s.ConsumerName(queue),
		Description:   "natasks worker",
		FilterSubject: s.subject(queue),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       s.AckWait,
		MaxAckPending: s.MaxAckPending,
		ReplayPolicy:  jetstream.ReplayInstantPolicy,
	}
}

// EnsureStream creates the stream when it is missing and otherwise uses it as it is.
func EnsureStream(ctx context.Context, js jetstream.JetStream, s Settings) (jetstream.Stream, error) {
	for range 2 {
		stream, err := js.Stream(ctx, s.Stream)
		if err == nil {
			return stream, nil
		}
		if !errors.Is(err, jetstream.ErrStreamNotFound) {
			return nil, fmt.Errorf("natasks: get stream %s: %w", s.Stream, err)
		}
		stream, err = js.CreateStream(ctx, s.StreamConfig())
		if err == nil {
			return stream, nil
		}
		if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return nil, fmt.Errorf("natasks: create stream %s: %w", s.Stream, err)
		}
	}
	return nil, fmt.Errorf("natasks: stream %s could neither be created nor read", s.Stream)
}

// Client dispatches tasks into JetStream.
type Client struct {
	js jetstream.JetStream
	s  Settings
}

// NewClient constructs a dispatch client and ensures the stream exists.
func NewClient(ctx context.Context, js jetstream.JetStream, s Settings) (*Client, error) {
	s = s.withDefaults()
	if _, err := EnsureStream(ctx, js, s); err != nil {
		return nil, err
	}
	return &Client{js: js, s: s}, nil
}

// Dispatch publishes a task to the queue.
func (c *Client) Dispatch(ctx context.Context, task *Task, queue string) (*jetstream.PubAck, error) {
	return c.publish(ctx, task, queue, time.Time{})
}

// DispatchIn publishes a task that should become visible after the given delay.
func (c *Client) DispatchIn(ctx context.Context, task *Task, queue string, delay time.Duration) (*jetstream.PubAck, error) {
	if delay <= 0 {
		return c.Dispatch(ctx, task, queue)
	}
	return c.publish(ctx, task, queue, time.Now().Add(delay))
}

// DispatchAt publishes a task that should become visible at the given time.
func (c *Client) DispatchAt(ctx context.Context, task *Task, queue string, at time.Time) (*jetstream.PubAck, error) {
	if !at.After(time.Now()) {
		return c.Dispatch(ctx, task, queue)
	}
	return c.publish(ctx, task, queue, at)
}

func (c *Client) publish(ctx context.Context, task *Task, queue string, at time.Time) (*jetstream.PubAck, error) {
	if queue == "" {
		queue = DefaultQueue
	}
	if c.s.Propagator != nil {
		c.s.Propagator.Inject(ctx, headerCarrier(task.headers))
	}
	header := nats.Header{}
	for k, vs := range task.headers {
		header[k] = append([]string(nil), vs...)
	}
	header.Set(HeaderTask, task.name)
	header.Set(HeaderQueue, queue)
	if task.messageID != "" {
		header.Set(headerMsgID, task.messageID)
	}
	subject := c.s.subject(queue)
	if !at.IsZero() {
		header.Set(headerSchedule, "@at "+at.UTC().Format(time.RFC3339Nano))
		header.Set(headerScheduleTarget, subject)
		subject = c.s.ScheduleSubject()
	}
	return c.js.PublishMsg(ctx, &nats.Msg{Subject: subject, Header: header, Data: task.payload})
}

// Handler processes an incoming task.
type Handler func(context.Context, *Task) error

// Attempt is what the worker reports after settling one delivery.
type Attempt struct {
	Ctx      context.Context
	Task     *Task
	Queue    string
	Sequence uint64
	Number   uint64
	Outcome  string
	Err      error
	Received time.Time
}

// Worker consumes tasks from a queue and dispatches them to registered handlers.
type Worker struct {
	js       jetstream.JetStream
	s        Settings
	queue    string
	consumer jetstream.Consumer
	handlers map[string]Handler
	// Process wraps every handler call, like a process middleware (OpenTelemetry here).
	Process func(ctx context.Context, task *Task, attempt uint64, next Handler) error
	// Settled is told about every settled delivery.
	Settled func(Attempt)
}

// NewWorker constructs a worker for a single queue and ensures the required stream and
// consumer exist.
func NewWorker(ctx context.Context, js jetstream.JetStream, queue string, s Settings) (*Worker, error) {
	s = s.withDefaults()
	if queue == "" {
		queue = DefaultQueue
	}
	w := &Worker{js: js, s: s, queue: queue, handlers: map[string]Handler{}}
	if err := w.ensure(ctx); err != nil {
		return nil, err
	}
	return w, nil
}

// EnsureConsumer creates the durable consumer, or updates it to this configuration.
func EnsureConsumer(ctx context.Context, js jetstream.JetStream, s Settings, queue string) (jetstream.Consumer, error) {
	s = s.withDefaults()
	if _, err := EnsureStream(ctx, js, s); err != nil {
		return nil, err
	}
	consumer, err := js.CreateOrUpdateConsumer(ctx, s.Stream, s.ConsumerConfig(queue))
	if err != nil {
		return nil, fmt.Errorf("natasks: create consumer %s: %w", s.ConsumerName(queue), err)
	}
	return consumer, nil
}

func (w *Worker) ensure(ctx context.Context) error {
	consumer, err := EnsureConsumer(ctx, w.js, w.s, w.queue)
	if err != nil {
		return err
	}
	w.consumer = consumer
	return nil
}

// Handle registers a handler for a task name.
func (w *Worker) Handle(name string, handler Handler) { w.handlers[name] = handler }

// Run fetches and processes tasks until ctx is cancelled, then waits for running handlers.
func (w *Worker) Run(ctx context.Context) error {
	slots := make(chan struct{}, w.s.Concurrency)
	var running sync.WaitGroup
	defer running.Wait()
	for {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return nil
		}
		free := 1
	fill:
		for free < w.s.FetchBatch && free < w.s.Concurrency {
			select {
			case slots <- struct{}{}:
				free++
			default:
				break fill
			}
		}
		batch, err := w.consumer.Fetch(free, jetstream.FetchMaxWait(w.s.FetchTimeout))
		if err != nil {
			for range free {
				<-slots
			}
			if ctx.Err() != nil {
				return nil
			}
			w.s.Logger.Error("fetch failed; recovering", "queue", w.queue, "error", err)
			time.Sleep(w.s.IdleWait)
			if err := w.ensure(ctx); err != nil {
				w.s.Logger.Error("cannot ensure stream and consumer", "queue", w.queue, "error", err)
			}
			continue
		}
		got, stopped := 0, false
		msgs := batch.Messages()
	receive:
		for {
			select {
			case msg, ok := <-msgs:
				if !ok {
					break receive
				}
				got++
				running.Add(1)
				go func() {
					defer running.Done()
					defer func() { <-slots }()
					w.process(msg)
				}()
			case <-ctx.Done():
				// Shutdown: stop waiting for the rest of the batch; hand back what arrived.
				for {
					select {
					case msg, ok := <-msgs:
						if ok {
							_ = msg.Nak()
							continue
						}
					default:
					}
					break
				}
				stopped = true
				break receive
			}
		}
		for range free - got {
			<-slots
		}
		if stopped {
			return nil
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && ctx.Err() == nil {
			w.s.Logger.Error("fetch ended with an error", "queue", w.queue, "error", err)
		}
		if got == 0 && ctx.Err() == nil {
			time.Sleep(w.s.IdleWait)
		}
	}
}

func (w *Worker) process(msg jetstream.Msg) {
	received := time.Now()
	attempt := uint64(1)
	var sequence uint64
	if md, err := msg.Metadata(); err == nil {
		attempt, sequence = md.NumDelivered, md.Sequence.Stream
	}
	headers := msg.Headers()
	if headers == nil {
		headers = nats.Header{}
	}
	task := &Task{name: headers.Get(HeaderTask), payload: msg.Data(), headers: headers, messageID: headers.Get(headerMsgID)}
	ctx := context.Background()
	if w.s.Propagator != nil {
		ctx = w.s.Propagator.Extract(ctx, headerCarrier(headers))
	}
	report := func(ctx context.Context, outcome string, err error) {
		if w.Settled != nil {
			w.Settled(Attempt{Ctx: ctx, Task: task, Queue: w.queue, Sequence: sequence, Number: attempt, Outcome: outcome, Err: err, Received: received})
		}
	}
	handler, ok := w.handlers[task.name]
	if !ok {
		w.s.Logger.Warn("no handler for task; discarded", "queue", w.queue, "task", task.name)
		_ = msg.Term()
		report(ctx, "discarded", ErrHandlerNotFound)
		return
	}
	call := func(ctx context.Context, task *Task) error {
		outcome, err := w.run(ctx, msg, task, handler, attempt)
		report(ctx, outcome, err)
		return err
	}
	if w.Process != nil {
		_ = w.Process(ctx, task, attempt, call)
	} else {
		_ = call(ctx, task)
	}
}

// run calls the handler, renewing the lease while it runs, and settles the delivery.
func (w *Worker) run(ctx context.Context, msg jetstream.Msg, task *Task, handler Handler, attempt uint64) (string, error) {
	if w.s.TaskTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, w.s.TaskTimeout)
		defer cancel()
	}
	done := make(chan error, 1)
	go func() { done <- handler(ctx, task) }()
	ticker := time.NewTicker(w.s.ProgressInterval)
	defer ticker.Stop()
	var err error
wait:
	for {
		select {
		case err = <-done:
			break wait
		case <-ticker.C:
			_ = msg.InProgress()
		}
	}
	switch {
	case err == nil:
		return "succeeded", msg.Ack()
	case errors.Is(err, ErrNoRetry):
		w.s.Logger.Info("task failed; not retried", "queue", w.queue, "task", task.name, "error", err)
		_ = msg.Ack()
		return "no-retry", err
	case w.s.MaxRetries >= 0 && attempt > uint64(w.s.MaxRetries):
		if dlqErr := w.deadLetter(msg, task, attempt, err); dlqErr != nil {
			w.s.Logger.Error("could not publish the dead letter", "queue", w.queue, "error", dlqErr)
			_ = msg.NakWithDelay(time.Second)
			return "retried", err
		}
		w.s.Logger.Warn("task dead-lettered", "queue", w.queue, "task", task.name, "error", err)
		_ = msg.Ack()
		return "dead-lettered", err
	default:
		w.s.Logger.Warn("task failed; will retry", "queue", w.queue, "task", task.name, "error", err)
		if delay := w.backoff(attempt); delay > 0 {
			_ = msg.NakWithDelay(delay)
		} else {
			_ = msg.Nak()
		}
		return "retried", err
	}
}

// backoff is the delay before the retry after failed delivery `attempt`; the last configured
// delay repeats (documented).
func (w *Worker) backoff(attempt uint64) time.Duration {
	if len(w.s.Backoff) == 0 {
		return 0
	}
	i := int(attempt) - 1
	if i >= len(w.s.Backoff) {
		i = len(w.s.Backoff) - 1
	}
	return w.s.Backoff[i]
}

// deadLetter publishes the task to <queue><suffix>: original payload, the task's headers
// (not the server's Nats-* headers) and the three documented headers.
func (w *Worker) deadLetter(msg jetstream.Msg, task *Task, attempt uint64, cause error) error {
	header := nats.Header{}
	for k, vs := range task.headers {
		if strings.HasPrefix(k, "Nats-") {
			continue
		}
		header[k] = append([]string(nil), vs...)
	}
	header.Set(HeaderOriginalQueue, w.queue)
	header.Set(HeaderAttempts, strconv.FormatUint(attempt, 10))
	header.Set(HeaderLastError, strings.Join(strings.Fields(cause.Error()), " "))
	subject := w.s.subject(w.queue + w.s.DLQSuffix)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := w.js.PublishMsg(ctx, &nats.Msg{Subject: subject, Header: header, Data: msg.Data()})
	return err
}
