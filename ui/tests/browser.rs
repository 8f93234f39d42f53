//! The dashboard in a real headless Chromium, driven over WebDriver (chromedriver): open
//! the overview, watch a queue's dead letters counted live, open them, requeue one and then
//! the rest (each confirmed), and see a running worker process them. Screenshots of the
//! main pages, at laptop and phone widths, go to `<target>/ui-screenshots/`.
//!
//! Needs `chromium` and `chromedriver` (`scripts/install-chromium` installs them).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use natasks::{HandlerError, Task, Worker};
use serde_json::{json, Value};

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session on it; both end on drop.
struct Driver {
    addr: SocketAddr,
    session: String,
    _process: tokio::process::Child,
    _profile: tempfile::TempDir,
}

fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

impl Driver {
    async fn start() -> Driver {
        let missing = "chromedriver and chromium are needed: run scripts/install-chromium";
        let chromedriver = find_binary(&["chromedriver"]).expect(missing);
        let chromium =
            find_binary(&["chromium", "chromium-browser", "google-chrome"]).expect(missing);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let process = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("chromedriver to be ready", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
                && json_request(addr, "GET", "/status", None).await.1["value"]["ready"] == true
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let (status, value) = json_request(addr, "POST", "/session", Some(&capabilities)).await;
        assert_eq!(status, 200, "no browser session: {value}");
        let session = value["value"]["sessionId"].as_str().unwrap().to_owned();
        Driver { addr, session, _process: process, _profile: profile }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, value) = json_request(self.addr, method, &path, body.as_ref()).await;
        assert_eq!(status, 200, "{method} {path}: {value}");
        value["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    async fn size(&self, width: u32, height: u32) {
        self.call("POST", "/window/rect", Some(json!({"width": width, "height": height}))).await;
    }

    /// The element matching `css`, waiting for it to appear.
    async fn find(&self, css: &str) -> String {
        let body = json!({"using": "css selector", "value": css});
        let path = format!("/session/{}/element", self.session);
        let start = tokio::time::Instant::now();
        loop {
            let (status, value) = json_request(self.addr, "POST", &path, Some(&body)).await;
            if status == 200 {
                let id = value["value"][ELEMENT].as_str();
                return id.unwrap_or_else(|| panic!("no element id: {value}")).to_owned();
            }
            assert!(start.elapsed() < DEADLINE, "no element {css:?} within {DEADLINE:?}: {value}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call("POST", &format!("/element/{element}/click"), Some(json!({}))).await;
    }

    /// The text of the element matching `css`, or "" while there is none.
    async fn text(&self, css: &str) -> String {
        let script =
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';";
        let value = self
            .call("POST", "/execute/sync", Some(json!({"script": script, "args": [css]})))
            .await;
        value.as_str().unwrap_or("").trim().to_owned()
    }

    /// The value `script` returns in the page.
    async fn script(&self, script: &str) -> serde_json::Value {
        self.call("POST", "/execute/sync", Some(json!({"script": script, "args": []}))).await
    }

    async fn url(&self) -> String {
        self.call("GET", "/url", None).await.as_str().unwrap_or("").to_owned()
    }

    /// Waits until the element matching `css` reads `expected`, without reloading.
    async fn wait_text(&self, css: &str, expected: &str) {
        let start = tokio::time::Instant::now();
        loop {
            let text = self.text(css).await;
            if text == expected {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{css:?} reads {text:?}, not {expected:?}, after {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn screenshot(&self, dir: &Path, name: &str) {
        let png = self.call("GET", "/screenshot", None).await;
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        println!("screenshot: {}", path.display());
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Ends the browser; chromedriver itself is killed with its handle.
        let (addr, path) = (self.addr, format!("/session/{}", self.session));
        let _ = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    json_request(addr, "DELETE", &path, None),
                )
                .await
            })
        })
        .join();
    }
}

/// `<target>/ui-screenshots`.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_dead_letter_is_seen_requeued_and_processed_in_a_browser() {
    let f = start(|d| d).await;
    let dir = screenshot_dir();
    println!("screenshots go to {}", dir.display());
    // A worker runs the queue's tasks throughout, counting them.
    let processed = Arc::new(AtomicU64::new(0));
    let counter = processed.clone();
    let worker = Worker::builder(f.js.clone(), "emails")
        .handle("emails.send", move |_: Task| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .await
        .unwrap();
    let shutdown = worker.shutdown_handle();
    let running = tokio::spawn(async move { worker.run().await });
    let payload = br#"{"to":"ada@example.com","template":"welcome","attempt_log":["smtp timeout","smtp timeout","smtp timeout"]}"#;
    dead_letter(
        &f.js,
        "emails",
        "emails.send",
        payload,
        "SMTP timeout after 30s",
        ("X-Tenant", "acme"),
    )
    .await;
    f.client
        .dispatch(Task::new("reports.build", r#"{"month":"2026-11"}"#), "reports")
        .await
        .unwrap();
    f.client
        .dispatch_in(
            Task::new("reports.build", r#"{"month":"2026-12"}"#),
            "reports",
            Duration::from_secs(86_400),
        )
        .await
        .unwrap();

    let browser = Driver::start().await;
    browser.size(1280, 800).await;
    let base = format!("http://{}", f.addr);
    browser.goto(&format!("{base}/")).await;
    let dead_cell = r#"tr[data-queue="emails"] td[data-field="dead_letters"]"#;
    browser.wait_text(dead_cell, "1").await;

    // A second dead letter shows up on the open page by itself.
    dead_letter(
        &f.js,
        "emails",
        "emails.send",
        br#"{"to":"bob@example.com"}"#,
        "SMTP timeout after 30s",
        ("X-Tenant", "acme"),
    )
    .await;
    browser.wait_text(dead_cell, "2").await;
    assert!(!browser.text("table[data-live]").await.is_empty());
    browser.screenshot(&dir, "overview").await;

    browser.size(390, 844).await;
    browser.screenshot(&dir, "overview-phone").await;
    browser.size(1280, 800).await;

    // The dead letters, then the first one in full.
    browser.click(&format!("{dead_cell} a")).await;
    browser.wait_text("nav.tabs a.current", "Dead (2)").await;
    browser.screenshot(&dir, "queue").await;

    // On a phone, each row's buttons are 44 px touch targets, apart from each other, and
    // on screen without scrolling the table sideways.
    browser.size(390, 844).await;
    browser.wait_text("nav.tabs a.current", "Dead (2)").await;
    let layout = browser
        .script(
            "const rows = [...document.querySelectorAll('table.tasks tbody tr')];
             return rows.map(row => {
               const b = [...row.querySelectorAll('button')].map(e => e.getBoundingClientRect());
               return { sizes: b.map(r => [Math.round(r.width), Math.round(r.height)]),
                        gap: b.length > 1 ? Math.round(b[1].left - b[0].right) : null,
                        right: Math.round(Math.max(...b.map(r => r.right))),
                        width: window.innerWidth };
             });",
        )
        .await;
    let rows = layout.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{layout}");
    for row in rows {
        for size in row["sizes"].as_array().unwrap() {
            assert!(size[0].as_i64() >= Some(44) && size[1].as_i64() >= Some(44), "{layout}");
        }
        assert!(row["gap"].as_i64() >= Some(16), "requeue and delete apart: {layout}");
        assert!(row["right"].as_i64() <= row["width"].as_i64(), "buttons on screen: {layout}");
    }
    browser.screenshot(&dir, "queue-phone").await;
    browser.size(1280, 800).await;
    browser.click("table.tasks tbody tr:first-child td:first-child a").await;
    browser.wait_text("h2", &format!("Payload (JSON, {} bytes)", payload.len())).await;
    browser.screenshot(&dir, "task").await;

    // Requeue it: a confirmation, then the report; the worker runs it.
    browser.click(r#"form[action="/actions/requeue"] button"#).await;
    browser.wait_text("h1", "Confirm").await;
    browser.click("#confirm").await;
    browser.wait_text("p.flash", r#"Requeued 1 task of "emails"."#).await;
    eventually("the worker to run the requeued task", || async {
        processed.load(Ordering::SeqCst) == 1
    })
    .await;

    // Search for the other, then requeue every dead letter left from the queue page.
    browser.goto(&format!("{base}/search?queue=emails&state=dead&error=smtp")).await;
    browser.wait_text("p.hint", "1 found, 1 message read").await;
    browser.screenshot(&dir, "search").await;
    browser.goto(&format!("{base}/queues/emails?state=dead")).await;
    browser.click(r#"input[name="all"] ~ button"#).await;
    browser.wait_text("h1", "Confirm").await;
    browser.click("#confirm").await;
    browser.wait_text("p.flash", r#"Requeued 1 task of "emails"."#).await;
    eventually("the worker to run both requeued tasks", || async {
        processed.load(Ordering::SeqCst) == 2
    })
    .await;
    assert!(browser.url().await.ends_with("/queues/emails?state=dead"));

    // The overview, live again, shows them gone.
    browser.goto(&format!("{base}/")).await;
    browser.wait_text(dead_cell, "0").await;
    browser.wait_text(r#"tr[data-queue="emails"] td[data-field="pending"]"#, "0").await;
    browser.wait_text(r#"tr[data-queue="emails"] td[data-field="in_flight"]"#, "0").await;
    browser.goto(&format!("{base}/schedules")).await;
    browser.wait_text("table.schedules tbody tr td", "delayed").await;
    browser.screenshot(&dir, "schedules").await;
    assert_eq!(processed.load(Ordering::SeqCst), 2, "each requeued task ran once");
    shutdown.shutdown();
    tokio::time::timeout(DEADLINE, running).await.unwrap().unwrap().unwrap();
}
