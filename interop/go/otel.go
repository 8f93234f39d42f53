package main

// OpenTelemetry as the Go library documents it: a propagator that carries context in message
// headers through the global text-map propagator, a producer span per dispatch and a consumer
// span per processing attempt. Spans go to an SDK tracer provider that samples everything
// and exports nowhere: the tests read trace and span ids from this program's JSON output.

import (
	"context"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

const tracerName = "natasks-go"

// installOtel sets the global tracer provider and the W3C trace-context propagator.
func installOtel() func() {
	provider := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()))
	otel.SetTracerProvider(provider)
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	return func() { _ = provider.Shutdown(context.Background()) }
}

// otelPropagator is the MessagePropagator the Go library's OpenTelemetry middleware provides.
type otelPropagator struct{}

func (otelPropagator) Inject(ctx context.Context, carrier TextMapCarrier) {
	otel.GetTextMapPropagator().Inject(ctx, carrier)
}

func (otelPropagator) Extract(ctx context.Context, carrier TextMapCarrier) context.Context {
	return otel.GetTextMapPropagator().Extract(ctx, carrier)
}

type dispatchSpan struct{ span trace.Span }

// startDispatchSpan starts the producer span a dispatch runs in (a no-op without --otel).
func startDispatchSpan(ctx context.Context, enabled bool, task, queue string) (context.Context, dispatchSpan) {
	if !enabled {
		return ctx, dispatchSpan{}
	}
	ctx, span := otel.Tracer(tracerName).Start(ctx, "natasks.dispatch", trace.WithSpanKind(trace.SpanKindProducer))
	_ = task
	_ = queue
	return ctx, dispatchSpan{span: span}
}

func (d dispatchSpan) end(event map[string]any, err error) {
	if d.span == nil {
		return
	}
	if err != nil {
		d.span.SetStatus(codes.Error, err.Error())
	}
	sc := d.span.SpanContext()
	event["trace_id"], event["span_id"] = sc.TraceID().String(), sc.SpanID().String()
	d.span.End()
}

// processSpan is the process middleware: a consumer span, child of the context the
// propagator extracted from the headers, current while the handler runs.
func processSpan(ctx context.Context, task *Task, attempt uint64, next Handler) error {
	ctx, span := otel.Tracer(tracerName).Start(ctx, "natasks.process", trace.WithSpanKind(trace.SpanKindConsumer))
	defer span.End()
	err := next(ctx, task)
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	return err
}

// addTrace adds the ids of the span current in ctx, and of its parent, to an output line.
func addTrace(event map[string]any, ctx context.Context) {
	span := trace.SpanFromContext(ctx)
	sc := span.SpanContext()
	if !sc.IsValid() {
		return
	}
	event["trace_id"], event["span_id"] = sc.TraceID().String(), sc.SpanID().String()
	if ro, ok := span.(sdktrace.ReadOnlySpan); ok && ro.Parent().IsValid() {
		event["parent_span_id"] = ro.Parent().SpanID().String()
		event["parent_remote"] = ro.Parent().IsRemote()
	}
}
