//! The dashboard tests' fixture: a real nats-server, the dashboard served on a free
//! loopback port, a small HTTP/1.1 client that keeps cookies like a browser, and helpers
//! that store tasks in each state.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use natasks::admin::Admin;
use natasks::Client;
pub use natasks_test_support::NatsServer;
use natasks_ui::Dashboard;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Deadline of every wait.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A server and a dashboard over it.
pub struct Fixture {
    pub server: NatsServer,
    pub js: jetstream::Context,
    pub admin: Admin,
    pub client: Client,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a server and a dashboard configured by `configure`, on 127.0.0.1:0.
pub async fn start(configure: impl FnOnce(Dashboard) -> Dashboard) -> Fixture {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = Client::new(js.clone()).await.unwrap();
    let admin = Admin::new(js.clone());
    let addr = serve(configure(Dashboard::new(admin.clone(), client.clone()))).await;
    Fixture { server, js, admin, client, addr, stop: None }
}

/// Serves `dashboard` on a free loopback port until the test ends.
pub async fn serve(dashboard: Dashboard) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(dashboard.serve(listener, std::future::pending()));
    addr
}

impl Fixture {
    /// A browser-like client of the dashboard.
    pub fn browser(&self) -> Browser {
        Browser::new(self.addr)
    }
}

/// Stores a dead letter of `queue` as a worker would, with these name, payload, error and
/// extra header. Returns its stream sequence.
pub async fn dead_letter(
    js: &jetstream::Context,
    queue: &str,
    name: &str,
    payload: &[u8],
    error: &str,
    header: (&str, &str),
) -> u64 {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Natasks-Task", name);
    headers.insert("Natasks-Queue", format!("{queue}-dlq").as_str());
    headers.insert("Natasks-Original-Queue", queue);
    headers.insert("Natasks-Attempts", "3");
    headers.insert("Natasks-Last-Error", error);
    headers.insert(header.0, header.1);
    let ack = js
        .publish_with_headers(format!("natasks.{queue}-dlq"), headers, payload.to_vec().into())
        .await
        .unwrap();
    ack.await.unwrap().sequence
}

/// Waits for `condition` to hold, polling, up to [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !condition().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Asserts the status, showing the body when it differs.
    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(self.status, status, "unexpected status; body:\n{}", self.body);
        self
    }

    /// Asserts the body contains `text`.
    #[track_caller]
    pub fn contains(self, text: &str) -> Self {
        assert!(self.body.contains(text), "body lacks {text:?}:\n{}", self.body);
        self
    }
}

/// A client that keeps cookies and sends what a browser sends on a same-origin form.
pub struct Browser {
    pub addr: SocketAddr,
    pub cookies: BTreeMap<String, String>,
    /// Extra headers sent with every request (such as `Authorization`).
    pub headers: Vec<(String, String)>,
    /// The `Host` header and the origin of posted forms; the address when `None`.
    pub host: Option<String>,
}

impl Browser {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, cookies: BTreeMap::new(), headers: Vec::new(), host: None }
    }

    /// The CSRF token of this browser's cookie (after a first page).
    pub fn csrf(&self) -> String {
        self.cookies.get("natasks_csrf").cloned().expect("no CSRF cookie yet: get a page first")
    }

    /// The `Host` this browser sends.
    pub fn host(&self) -> String {
        self.host.clone().unwrap_or_else(|| self.addr.to_string())
    }

    pub async fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, &[], None).await
    }

    /// Posts `fields` as a form from this dashboard's own page (Origin and Sec-Fetch-Site
    /// of a same-origin form), with the CSRF token unless `fields` has one.
    pub async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Response {
        let mut fields: Vec<(String, String)> =
            fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if !fields.iter().any(|(k, _)| k == "csrf") {
            fields.push(("csrf".into(), self.csrf()));
        }
        let origin = format!("http://{}", self.host());
        let headers = [("Origin", origin.as_str()), ("Sec-Fetch-Site", "same-origin")];
        self.post_raw(path, &fields, &headers).await
    }

    /// Posts `fields` with exactly these extra headers.
    pub async fn post_raw(
        &mut self,
        path: &str,
        fields: &[(String, String)],
        headers: &[(&str, &str)],
    ) -> Response {
        let body: Vec<String> =
            fields.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect();
        self.request("POST", path, headers, Some(body.join("&"))).await
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        form: Option<String>,
    ) -> Response {
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.host());
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            head.push_str(&format!("Cookie: {}\r\n", jar.join("; ")));
        }
        for (k, v) in
            self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().copied())
        {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = form.unwrap_or_default();
        if method == "POST" {
            head.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        head.push_str(&body);
        let response = tokio::time::timeout(DEADLINE, exchange(self.addr, head))
            .await
            .unwrap_or_else(|_| panic!("{method} {path} got no answer within {DEADLINE:?}"));
        for (name, value) in &response.headers {
            if name == "set-cookie" {
                let pair = value.split(';').next().unwrap_or("");
                if let Some((k, v)) = pair.split_once('=') {
                    if value.contains("Max-Age=0") {
                        self.cookies.remove(k);
                    } else {
                        self.cookies.insert(k.to_owned(), v.to_owned());
                    }
                }
            }
        }
        response
    }
}

/// Sends `request` as written and reads the response.
pub async fn raw_request(addr: SocketAddr, request: String) -> Response {
    tokio::time::timeout(DEADLINE, exchange(addr, request)).await.expect("an answer in time")
}

async fn exchange(addr: SocketAddr, request: String) -> Response {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    // Read to the end of the body: its Content-Length, or the end of the connection.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|length| raw.len() >= end + 4 + length) {
                break;
            }
        }
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Response { status, headers, body }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encodes a form value.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Reads the first `queues` event of the live stream.
pub async fn first_live_event(addr: SocketAddr, cookie: &str) -> String {
    live_events(addr, cookie, 1, |_| {}).await.remove(0)
}

/// Reads `count` `queues` events of one live stream, calling `between` with each event's
/// index once it has arrived.
pub async fn live_events(
    addr: SocketAddr,
    cookie: &str,
    count: usize,
    mut between: impl FnMut(usize),
) -> Vec<String> {
    let request = format!("GET /live HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n");
    let read = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        let mut events = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            while let Some(at) = text.find("event: queues") {
                let Some(end) = text[at..].find("\n\n") else { break };
                events.push(text[at..at + end].to_owned());
                text.drain(..at + end);
                between(events.len() - 1);
                if events.len() == count {
                    return events;
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the live stream ended after {} events", events.len());
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    tokio::time::timeout(DEADLINE, read).await.expect("live events within the deadline")
}

/// A JSON request (`body` `None`: no body), answered with its status and JSON value.
pub async fn json_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = tokio::time::timeout(DEADLINE, exchange(addr, request))
        .await
        .unwrap_or_else(|_| panic!("{method} {path} got no answer within {DEADLINE:?}"));
    let value = serde_json::from_str(&response.body).unwrap_or(serde_json::Value::Null);
    (response.status, value)
}
