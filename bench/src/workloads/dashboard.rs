//! What the dashboard costs the queues it shows.
//!
//! * `dashboard_overview`: `e2e_c64` with the dashboard serving one open live overview
//!   (server-sent events, reading every queue at each refresh) against the same run
//!   without it (`nodash_` fields), and raw. The overview refreshes every 100 ms, ten times
//!   the default, so that a run of well under a second sees several refreshes: a bound on
//!   what one open page costs. Then, on a stream of 50
//!   queues holding 10 tasks each, the latency of the overview page over HTTP
//!   (`overview_ms_p50`, `_p99`, 50 sequential requests) beside the `Admin::queues()` call
//!   it is built on (`queues_call_ms_p50`).

use std::time::{Duration, Instant};

use natasks::admin::Admin;
use natasks::Task;
use natasks_ui::Dashboard;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{drive, Consumer, Dispatcher, Done, Env, Impl, Layout, Res, Sample};

const QUEUES: usize = 50;
const TASKS_PER_QUEUE: usize = 10;
const REQUESTS: usize = 50;
/// The live overview's refresh: ten times the default.
const REFRESH: Duration = Duration::from_millis(100);

pub async fn dashboard_overview(env: &Env, imp: Impl, n: usize) -> Res<Sample> {
    match imp {
        Impl::Natasks => {
            let with = e2e_c64(env, n, true).await?;
            let without = e2e_c64(env, n, false).await?;
            let mut sample = with.clone();
            sample.extra.push(("nodash_per_s".to_owned(), without.per_s));
            sample.extra.push(("dash_vs_nodash".to_owned(), with.per_s / without.per_s.max(1e-9)));
            if let (Some(with), Some(without)) = (with.cpu_us_per_task, without.cpu_us_per_task) {
                sample.extra.push(("added_cpu_us_per_task".to_owned(), with - without));
            }
            let (p50, p99, call_p50) = overview_latency(env).await?;
            sample.extra.push(("overview_ms_p50".to_owned(), p50));
            sample.extra.push(("overview_ms_p99".to_owned(), p99));
            sample.extra.push(("queues_call_ms_p50".to_owned(), call_p50));
            Ok(sample)
        }
        Impl::Raw => super::e2e(env, Impl::Raw, n, 64, None).await,
        Impl::Apalis => Err("apalis runs only in the worker-process workloads".into()),
    }
}

fn admin(env: &Env, layout: &Layout) -> Admin {
    Admin::new(env.publish.clone())
        .stream_name(layout.stream.clone())
        .subject_prefix(layout.prefix.clone())
}

/// Serves the dashboard of `layout` on a free loopback port; it stops with the returned
/// sender.
async fn serve(
    env: &Env,
    layout: &Layout,
    client: natasks::Client,
) -> Res<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let dashboard = Dashboard::new(admin(env, layout), client).refresh(REFRESH);
    tokio::spawn(dashboard.serve(listener, async {
        let _ = stopped.await;
    }));
    Ok((addr, stop))
}

/// `e2e_c64` with natasks, with one live overview open or none.
async fn e2e_c64(env: &Env, n: usize, open: bool) -> Res<Sample> {
    env.with_stream(|layout, client| async move {
        let mut reader = None;
        let mut stop = None;
        if open {
            let (addr, stopper) = serve(env, &layout, client.clone()).await?;
            stop = Some(stopper);
            let mut stream = TcpStream::connect(addr).await?;
            let request = format!("GET /live HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            reader = Some(tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut events = 0usize;
                while let Ok(read) = stream.read(&mut buf).await {
                    if read == 0 {
                        break;
                    }
                    events += buf[..read].windows(13).filter(|w| w == b"event: queues").count();
                }
                events
            }));
        }
        let done = Done::new(n, None);
        let consumer = Consumer::start(Impl::Natasks, env, &layout, 64, None, done.clone()).await?;
        let dispatcher = Dispatcher::new(Impl::Natasks, env, &layout, &client);
        let (sample, waited) = drive(dispatcher, consumer, n, &done).await?;
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        if let Some(reader) = reader {
            reader.abort();
        }
        waited?;
        Ok(sample)
    })
    .await
}

/// Overview latency over HTTP and of the `Admin::queues()` call, p50/p99/p50 in ms.
async fn overview_latency(env: &Env) -> Res<(f64, f64, f64)> {
    env.with_stream(|layout, client| async move {
        for q in 0..QUEUES {
            for i in 0..TASKS_PER_QUEUE {
                client.dispatch(Task::new("bench.noop", format!("{i}")), &format!("q{q}")).await?;
            }
        }
        let (addr, stop) = serve(env, &layout, client.clone()).await?;
        let mut page = Vec::with_capacity(REQUESTS);
        for _ in 0..REQUESTS {
            let start = Instant::now();
            let body = get(addr, "/").await?;
            page.push(start.elapsed());
            if !body.contains(r#"data-queue="q49""#) {
                return Err("the overview lacks a queue".into());
            }
        }
        let admin = admin(env, &layout);
        let mut call = Vec::with_capacity(REQUESTS);
        for _ in 0..REQUESTS {
            let start = Instant::now();
            let queues = admin.queues().await?;
            call.push(start.elapsed());
            if queues.len() != QUEUES {
                return Err(format!("{} queues, not {QUEUES}", queues.len()).into());
            }
        }
        let _ = stop.send(());
        Ok((percentile(&mut page, 0.5), percentile(&mut page, 0.99), percentile(&mut call, 0.5)))
    })
    .await
}

fn percentile(values: &mut [Duration], p: f64) -> f64 {
    values.sort();
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index].as_secs_f64() * 1e3
}

/// A GET over a fresh connection; the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> Res<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", text.lines().next().unwrap_or("")).into());
    }
    Ok(text)
}
