//! `natasks dispatch` with input the library cannot send: refused with a one-line error,
//! without a panic, and with nothing stored.

use async_nats::jetstream;
use natasks_test_support::NatsServer;

mod common;
use common::natasks;

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
