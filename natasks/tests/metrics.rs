//! Prometheus metrics: the Go metric set plus retries, dead letters and queue gauges, read
//! by scraping a real HTTP exposition endpoint and parsing the text.
#![cfg(feature = "metrics")]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use natasks::metrics::{Metrics, MetricsOptions, QueueMetrics, DEFAULT_BUCKETS};
use natasks::{Client, HandlerError, Task, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Custom names for `custom_namespace_subsystem_and_buckets`.
fn custom_options() -> MetricsOptions {
    MetricsOptions::new().namespace("acme").subsystem("jobs").buckets([0.5, 30.0])
}

/// The process-wide recorder (tests run in parallel; each uses its own queues), with the
/// buckets `Metrics::histogram_buckets` asks for, served on 127.0.0.1 on its own thread so
/// it outlives each test's runtime.
fn endpoint() -> &'static str {
    static ADDR: OnceLock<String> = OnceLock::new();
    ADDR.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        for metrics in [Metrics::new(), Metrics::with_options(custom_options())] {
            for (name, buckets) in metrics.histogram_buckets() {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
                    .unwrap();
            }
        }
        let handle = builder.install_recorder().expect("the only recorder");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(serve(handle, tx));
        });
        rx.recv().expect("endpoint address")
    })
}

/// A minimal HTTP/1.1 exposition endpoint: every request gets the rendered metrics.
async fn serve(handle: PrometheusHandle, tx: std::sync::mpsc::Sender<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    tx.send(listener.local_addr().unwrap().to_string()).unwrap();
    loop {
        let (mut socket, _) = listener.accept().await.unwrap();
        let body = {
            handle.run_upkeep();
            handle.render()
        };
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

/// One parsed sample line.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
    help: BTreeMap<String, String>,
}

impl Scrape {
    /// The value of the one sample named `name` whose labels include `labels`; 0 if none.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(matching.len() <= 1, "{name} {labels:?} matches several samples: {matching:?}");
        matching.first().map_or(0.0, |s| s.value)
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|s| {
            s.name == name
                && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

/// GET /metrics over a raw TCP connection and parse the text exposition format.
async fn scrape() -> Scrape {
    let mut socket = TcpStream::connect(endpoint()).await.expect("endpoint reachable");
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, socket.read_to_string(&mut response))
        .await
        .expect("scrape in time")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    parse(body)
}

fn parse(text: &str) -> Scrape {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    let mut help = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help.insert(name.to_owned(), text.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("closing brace");
                (name.to_owned(), parse_labels(rest))
            }
        };
        samples.push(Sample { name, labels, value });
    }
    Scrape { samples, types, help }
}

/// `a="x",b="y \"q\""` -> map.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('"'), "quoted label value in {text:?}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

/// Scrapes until `condition` holds, or panics with the last scrape.
async fn scrape_until(what: &str, condition: impl Fn(&Scrape) -> bool) -> Scrape {
    let start = std::time::Instant::now();
    loop {
        let scrape = scrape().await;
        if condition(&scrape) {
            return scrape;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}; last scrape: {scrape:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn dispatch_and_process_metrics_with_go_names_and_labels() {
    endpoint();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let metrics = Metrics::new();
    let client = Client::builder(js.clone()).observer(metrics.clone()).build().await.unwrap();
    let worker = Worker::builder(js.clone(), "mq")
        .observer(metrics.clone())
        .max_retries(1)
        .retry_backoff([Duration::from_millis(100)])
        .handle("ok", |_t: Task| async { Ok::<_, HandlerError>(()) })
        .handle("bad", |_t: Task| async { Err::<(), _>(HandlerError::msg("boom")) })
        .handle("reject", |_t: Task| async {
            Err::<(), _>(HandlerError::dead_letter(std::io::Error::other("poison")))
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);

    for _ in 0..3 {
        client.dispatch(Task::new("ok", "x"), "mq").await.unwrap();
    }
    client.dispatch(Task::new("bad", "x"), "mq").await.unwrap();
    client.dispatch(Task::new("reject", "x"), "mq").await.unwrap();
    assert!(client.dispatch(Task::new("bad name", "x"), "mq").await.is_err());

    let q = ("queue", "mq");
    let s = scrape_until("every attempt counted", |s| {
        s.value("natasks_process_total", &[q, ("task", "ok"), ("status", "success")]) == 3.0
            && s.value("natasks_process_total", &[q, ("task", "bad"), ("status", "error")]) == 2.0
            && s.value("natasks_process_total", &[q, ("task", "reject"), ("status", "error")])
                == 1.0
    })
    .await;
    running.stop().await.unwrap();

    // The Go set: names, types, labels, status values.
    for (name, kind) in [
        ("natasks_dispatch_total", "counter"),
        ("natasks_dispatch_duration_seconds", "histogram"),
        ("natasks_process_total", "counter"),
        ("natasks_process_duration_seconds", "histogram"),
        ("natasks_process_inflight", "gauge"),
        ("natasks_retries_total", "counter"),
        ("natasks_dead_letters_total", "counter"),
    ] {
        assert_eq!(s.types.get(name).map(String::as_str), Some(kind), "TYPE of {name}");
    }
    assert!(s.help.contains_key("natasks_process_total"), "HELP text");
    let ok = [q, ("task", "ok")];
    assert_eq!(s.value("natasks_dispatch_total", &[q, ("task", "ok"), ("status", "success")]), 3.0);
    assert_eq!(
        s.value("natasks_dispatch_total", &[q, ("task", "bad"), ("status", "success")]),
        1.0
    );
    assert_eq!(
        s.value("natasks_dispatch_total", &[q, ("task", "bad name"), ("status", "error")]),
        1.0
    );
    assert_eq!(s.value("natasks_dispatch_total", &[q, ("task", "ok"), ("status", "error")]), 0.0);
    let dispatch_ok = [q, ("task", "ok"), ("status", "success")];
    assert_eq!(s.value("natasks_dispatch_duration_seconds_count", &dispatch_ok), 3.0);
    assert!(s.value("natasks_dispatch_duration_seconds_sum", &dispatch_ok) > 0.0);
    // Histograms with the Go default buckets.
    for le in DEFAULT_BUCKETS.iter().map(|b| b.to_string()).chain(["+Inf".to_owned()]) {
        let labels = [q, ("task", "ok"), ("status", "success"), ("le", le.as_str())];
        assert!(s.has("natasks_process_duration_seconds_bucket", &labels), "bucket le={le}");
    }
    let inf = [q, ("task", "ok"), ("status", "success"), ("le", "+Inf")];
    assert_eq!(s.value("natasks_process_duration_seconds_bucket", &inf), 3.0);
    assert_eq!(s.value("natasks_process_total", &[q, ("task", "ok"), ("status", "error")]), 0.0);
    assert_eq!(s.value("natasks_process_inflight", &ok), 0.0);
    assert!(s.has("natasks_process_inflight", &ok));
    // Beyond Go: retries and dead letters.
    assert_eq!(s.value("natasks_retries_total", &[q, ("task", "bad")]), 1.0);
    assert_eq!(s.value("natasks_retries_total", &ok), 0.0);
    assert_eq!(
        s.value(
            "natasks_dead_letters_total",
            &[q, ("task", "bad"), ("reason", "retries-exhausted")]
        ),
        1.0
    );
    assert_eq!(
        s.value("natasks_dead_letters_total", &[q, ("task", "reject"), ("reason", "rejected")]),
        1.0
    );
}

#[tokio::test]
async fn process_inflight_counts_running_handlers() {
    endpoint();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let metrics = Metrics::new();
    let client = Client::new(js.clone()).await.unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    let worker = Worker::builder(js, "inflight")
        .observer(metrics)
        .concurrency(4)
        .handle("hold", move |_t: Task| {
            let held = held.clone();
            async move {
                held.acquire().await.unwrap().forget();
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    for _ in 0..3 {
        client.dispatch(Task::new("hold", ""), "inflight").await.unwrap();
    }
    let labels = [("queue", "inflight"), ("task", "hold")];
    scrape_until("3 in flight", |s| s.value("natasks_process_inflight", &labels) == 3.0).await;
    gate.add_permits(3);
    let s = scrape_until("none in flight", |s| {
        s.value("natasks_process_total", &[labels[0], labels[1], ("status", "success")]) == 3.0
    })
    .await;
    assert_eq!(s.value("natasks_process_inflight", &labels), 0.0);
    running.stop().await.unwrap();
}

/// Two workers in one process, each with its own `Metrics` (as two Go workers registering
/// the same collectors): both work and feed the same series.
#[tokio::test]
async fn two_workers_in_one_process_share_the_series() {
    endpoint();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::builder(js.clone()).observer(Metrics::new()).build().await.unwrap();
    let mut seen = Seen::new();
    let mut workers = Vec::new();
    for id in 0..2 {
        let tx = seen.tx.clone();
        let worker = Worker::builder(js.clone(), "shared")
            .observer(Metrics::new())
            .concurrency(1)
            .handle("t", move |_t: Task| {
                let _ = tx.send(id);
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, HandlerError>(())
                }
            })
            .build()
            .await
            .unwrap();
        workers.push(spawn(worker));
    }
    for _ in 0..20 {
        client.dispatch(Task::new("t", ""), "shared").await.unwrap();
    }
    let ids = seen.take(20, DEADLINE).await;
    assert!(ids.contains(&0) && ids.contains(&1), "both workers processed tasks: {ids:?}");
    let labels = [("queue", "shared"), ("task", "t"), ("status", "success")];
    let s =
        scrape_until("20 processed", |s| s.value("natasks_process_total", &labels) == 20.0).await;
    assert_eq!(s.value("natasks_dispatch_total", &labels), 20.0);
    assert_eq!(s.value("natasks_process_duration_seconds_count", &labels), 20.0);
    for worker in workers {
        worker.stop().await.unwrap();
    }
}

#[tokio::test]
async fn custom_namespace_subsystem_and_buckets() {
    endpoint();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let metrics = Metrics::with_options(custom_options());
    let client = Client::builder(js.clone()).observer(metrics.clone()).build().await.unwrap();
    let worker = Worker::builder(js, "custom")
        .observer(metrics)
        .handle("t", |_t: Task| async { Ok::<_, HandlerError>(()) })
        .build()
        .await
        .unwrap();
    let running = spawn(worker);
    client.dispatch(Task::new("t", ""), "custom").await.unwrap();
    let labels = [("queue", "custom"), ("task", "t"), ("status", "success")];
    let s = scrape_until("custom-named metrics", |s| {
        s.value("acme_jobs_process_total", &labels) == 1.0
    })
    .await;
    running.stop().await.unwrap();
    assert_eq!(s.value("acme_jobs_dispatch_total", &labels), 1.0);
    assert!(!s.has("natasks_process_total", &[("queue", "custom")]));
    let buckets: Vec<&str> = s
        .samples
        .iter()
        .filter(|x| x.name == "acme_jobs_process_duration_seconds_bucket")
        .filter(|x| x.labels.get("queue").map(String::as_str) == Some("custom"))
        .filter(|x| x.labels.get("status").map(String::as_str) == Some("success"))
        .map(|x| x.labels["le"].as_str())
        .collect();
    assert_eq!(buckets, ["0.5", "30", "+Inf"]);
}

#[tokio::test]
async fn queue_gauges_come_from_jetstream() {
    endpoint();
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    // At most 2 tasks delivered at once, so the rest of the backlog stays pending.
    let worker = Worker::builder(js.clone(), "gauged")
        .concurrency(2)
        .fetch_batch(1)
        .max_ack_pending(2)
        .handle("hold", move |_t: Task| {
            let held = held.clone();
            async move {
                held.acquire().await.unwrap().forget();
                Ok::<_, HandlerError>(())
            }
        })
        .handle("reject", |_t: Task| async {
            Err::<(), _>(HandlerError::dead_letter(std::io::Error::other("poison")))
        })
        .build()
        .await
        .unwrap();
    let poller = QueueMetrics::new(js.clone(), ["gauged", "idle"])
        .interval(Duration::from_millis(100))
        .spawn();
    let running = spawn(worker);

    client.dispatch(Task::new("reject", ""), "gauged").await.unwrap();
    for _ in 0..7 {
        client.dispatch(Task::new("hold", ""), "gauged").await.unwrap();
    }
    // A queue without any worker (no consumer): its backlog is counted from the stream.
    for _ in 0..3 {
        client.dispatch(Task::new("t", ""), "idle").await.unwrap();
    }
    let q = [("queue", "gauged")];
    let idle = [("queue", "idle")];
    let s = scrape_until("backlog, in flight and dead letter", |s| {
        s.value("natasks_queue_pending", &q) == 5.0
            && s.value("natasks_queue_in_flight", &q) == 2.0
            && s.value("natasks_queue_dlq_depth", &q) == 1.0
            && s.value("natasks_queue_pending", &idle) == 3.0
    })
    .await;
    for name in [
        "natasks_queue_pending",
        "natasks_queue_in_flight",
        "natasks_queue_dlq_depth",
        "natasks_queue_oldest_pending_age_seconds",
    ] {
        assert_eq!(s.types.get(name).map(String::as_str), Some("gauge"), "TYPE of {name}");
        assert!(s.help.contains_key(name), "HELP of {name}");
    }
    let age = s.value("natasks_queue_oldest_pending_age_seconds", &q);
    assert!(age > 0.0 && age < DEADLINE.as_secs_f64(), "oldest task age {age}");
    assert!(s.value("natasks_queue_oldest_pending_age_seconds", &idle) > 0.0);
    assert_eq!(s.value("natasks_queue_in_flight", &idle), 0.0);
    assert_eq!(s.value("natasks_queue_dlq_depth", &idle), 0.0);
    // Ages grow while tasks wait.
    scrape_until("the oldest task ages", |s| {
        s.value("natasks_queue_oldest_pending_age_seconds", &q) > age
    })
    .await;

    gate.add_permits(7);
    let s = scrape_until("queue drained", |s| {
        s.value("natasks_queue_pending", &q) == 0.0 && s.value("natasks_queue_in_flight", &q) == 0.0
    })
    .await;
    assert_eq!(s.value("natasks_queue_oldest_pending_age_seconds", &q), 0.0);
    assert_eq!(s.value("natasks_queue_dlq_depth", &q), 1.0, "the dead letter stays");
    running.stop().await.unwrap();

    // A stopped poller no longer updates the gauges.
    poller.stop().await;
    client.dispatch(Task::new("hold", ""), "gauged").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(scrape().await.value("natasks_queue_pending", &q), 0.0);
}

#[tokio::test]
async fn queue_state_reads_one_queue() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let gauges = QueueMetrics::new(js.clone(), ["empty"]);
    let state = gauges.read("empty").await.unwrap();
    assert_eq!((state.pending, state.in_flight, state.dlq_depth), (0, 0, 0));
    assert_eq!(state.oldest_age, Duration::ZERO);
    client.dispatch(Task::new("t", ""), "empty-dlq").await.unwrap();
    let state = gauges.read("empty").await.unwrap();
    assert_eq!(state.dlq_depth, 1);
    assert_eq!(state.pending, 0);
    // A stream that does not exist is an error, not zeros.
    let missing = QueueMetrics::new(js, ["empty"]).stream_name("NOPE");
    assert!(missing.refresh().await.is_err());
}
