//! `natasks dispatch` with input the library cannot send: refused with a one-line error,
//! without a panic, and with nothing stored.

use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use natasks_test_support::NatsServer;

const DEADLINE: Duration = Duration::from_secs(20);

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stderr: String,
}

/// Runs `natasks <args>` against `url` (passed as NATS_URL), with a deadline.
async fn natasks(url: &str, args: &[&str]) -> Run {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_natasks"))
        .args(args)
        .env("NATS_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start natasks");
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("natasks {args:?} did not finish within {DEADLINE:?}"))
        .expect("wait for natasks");
    Run {
        code: output.status.code().expect("natasks exited by signal"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// Messages in the natasks stream.
async fn stream_messages(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream("NATASKS").await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

/// Runs `natasks dispatch emails emails.send <extra>` and checks it failed cleanly: exit
/// code 1, one line on stderr that mentions `mention`, no panic, nothing stored.
async fn refused(server: &NatsServer, extra: &[&str], mention: &str) {
    let js = server.jetstream().await;
    let args = [&["dispatch", "emails", "emails.send"][..], extra].concat();
    let run = natasks(&server.url(), &args).await;
    assert!(!run.stderr.contains("panicked"), "{args:?} panicked: {run:?}");
    assert_eq!(run.code, 1, "{args:?}: {run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {run:?}");
    assert!(run.stderr.starts_with("error: "), "{args:?}: {run:?}");
    assert!(run.stderr.contains(mention), "{args:?} should mention {mention:?}: {run:?}");
    assert_eq!(stream_messages(&js).await, 0, "{args:?} stored a message");
}

#[tokio::test]
async fn header_names_the_library_cannot_send_are_refused() {
    let server = NatsServer::start().await;
    // The stream exists, so that "nothing stored" is checked on a real stream.
    natasks::Client::new(server.jetstream().await).await.unwrap();
    refused(&server, &["-H", "Größe=1"], "Größe").await;
    refused(&server, &["-H", "X-Ok=1", "--header", "Ä=1"], "\"Ä\"").await;
    refused(&server, &["-H", "X:Colon=1"], "X:Colon").await;
    refused(&server, &["-H", "X-Del\u{7f}=1"], "header name").await;
}

#[tokio::test]
async fn due_times_a_schedule_cannot_name_are_refused() {
    let server = NatsServer::start().await;
    natasks::Client::new(server.jetstream().await).await.unwrap();
    refused(&server, &["--in", "4000000000d"], "4000000000d").await;
    refused(&server, &["--in", "3000000d"], "3000000d").await;
    // Parses as a time, but is in the year 10000 in UTC.
    refused(&server, &["--at", "9999-12-31T23:30:00-01:00"], "9999-12-31T23:30:00-01:00").await;
}
