//! `natasks ui`: the built binary serves the dashboard on loopback, and refuses to listen
//! beyond it without authentication.

use std::process::Stdio;
use std::time::Duration;

use natasks_test_support::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{natasks, DEADLINE};

#[tokio::test]
async fn an_exposed_address_without_auth_is_refused_with_the_reason() {
    let server = NatsServer::start().await;
    let run = natasks(&server.url(), &["ui", "--listen", "0.0.0.0:0"]).await;
    run.failed("refusing to serve the dashboard on 0.0.0.0:0 without authentication");
    let run = natasks(&server.url(), &["ui", "--listen", "0.0.0.0:0", "--read-only"]).await;
    run.failed("could read every task's payloads");
    let run = natasks(&server.url(), &["ui", "--listen", "0.0.0.0:0", "--basic-auth", "ops"]).await;
    run.failed("basic auth must be user:password");
    let run = natasks(&server.url(), &["ui", "--auth-token", "t", "--basic-auth", "a:b"]).await;
    assert_eq!(run.code, 2, "clap refuses both: {run:?}");
}

/// GET `path` from `port`; the response's text, or `None` while nothing listens.
async fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    Some(text)
}

#[tokio::test]
async fn the_dashboard_is_served_on_loopback_on_one_connection() {
    // The server's monitoring port lists its connections.
    let monitor = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = NatsServer::builder().arg("-m").arg(monitor.to_string()).start().await;
    let js = server.jetstream().await;
    natasks::Client::new(js)
        .await
        .unwrap()
        .dispatch(natasks::Task::new("t", "p"), "mail")
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_natasks"))
        .args(["ui", "--listen", &format!("127.0.0.1:{port}"), "--read-only"])
        .env("NATS_URL", server.url())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start natasks ui");
    let start = tokio::time::Instant::now();
    let page = loop {
        if let Some(page) = get(port, "/").await {
            break page;
        }
        assert!(start.elapsed() < DEADLINE, "natasks ui did not answer within {DEADLINE:?}");
        assert!(child.try_wait().unwrap().is_none(), "natasks ui exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains(r#"data-queue="mail""#) && page.contains("read-only"), "{page}");
    let connz = get(monitor, "/connz").await.expect("the monitoring port answers");
    let body = connz.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let connz: serde_json::Value = serde_json::from_str(body).expect("connz is JSON");
    let cli = connz["connections"]
        .as_array()
        .expect("connz lists connections")
        .iter()
        .filter(|c| c["name"] == "natasks-cli")
        .count();
    assert_eq!(cli, 1, "the dashboard's reads and dispatches share one connection: {connz}");
    child.kill().await.unwrap();
}
