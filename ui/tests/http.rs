//! The dashboard over HTTP against a real nats-server: every page, every action (confirmed,
//! and refused without auth, CSRF token or same origin, and in read-only mode), escaping of
//! everything that comes from tasks, and the refusal to listen exposed.

mod common;

use std::time::Duration;

use common::*;
use natasks::admin::TaskState;
use natasks::{Task, Worker};
use natasks_ui::{Auth, Dashboard, DashboardErrorKind};

const XSS: &str = "<script>alert(1)</script>";
const XSS_ESCAPED: &str = "&lt;script&gt;alert(1)&lt;/script&gt;";
/// A task name cannot hold `>` (a subject wildcard) nor spaces, but it can open a tag.
const IMG: &str = "<img/src=x/onerror=alert(1)";

/// A worker consumer for `queue`, so it can be paused; it runs no task while the test
/// keeps the queue paused or leaves tasks alone (no handler for their names).
async fn consumer(f: &Fixture, queue: &str) {
    Worker::builder(f.js.clone(), queue)
        .handle("never-dispatched", |_: Task| async { Ok::<(), natasks::HandlerError>(()) })
        .build()
        .await
        .unwrap();
}

#[tokio::test]
async fn every_page_renders() {
    let f = start(|d| d).await;
    let mut b = f.browser();
    b.get("/").await.expect(200).contains("No queues yet");
    f.client.dispatch(Task::new("emails.send", r#"{"to":"a@b.c"}"#), "emails").await.unwrap();
    f.client
        .dispatch_in(Task::new("emails.later", "x"), "emails", Duration::from_secs(3600))
        .await
        .unwrap();
    let dead = dead_letter(
        &f.js,
        "emails",
        "emails.send",
        b"\x00\x01\xff",
        "SMTP timeout",
        ("X-Tenant", "acme"),
    )
    .await;

    let overview = b.get("/").await.expect(200).contains(r#"<tr data-queue="emails">"#);
    assert!(
        overview
            .body
            .contains(r#"data-field="dead_letters"><a href="/queues/emails?state=dead">1</a>"#),
        "{}",
        overview.body
    );
    assert!(b.cookies.contains_key("natasks_csrf"), "the first page sets the CSRF cookie");
    b.get("/queues/emails").await.expect(200).contains("emails.send").contains("Pending (1)");
    b.get("/queues/emails?state=scheduled")
        .await
        .expect(200)
        .contains("emails.later")
        .contains("Scheduled (1)");
    b.get("/queues/emails?state=in_flight").await.expect(200).contains("No in flight tasks");
    b.get("/queues/emails?state=dead")
        .await
        .expect(200)
        .contains("SMTP timeout")
        .contains("Requeue all dead letters");
    b.get("/queues/emails?state=nonsense").await.expect(400).contains("unknown task state");
    b.get(&format!("/tasks/{dead}"))
        .await
        .expect(200)
        .contains("binary, hex")
        .contains("00 01 ff")
        .contains("X-Tenant")
        .contains("acme");
    let pending =
        f.admin.tasks("emails", TaskState::Pending, None, 10).await.unwrap().items[0].sequence;
    b.get(&format!("/tasks/{pending}"))
        .await
        .expect(200)
        .contains("JSON")
        .contains("&quot;to&quot;: &quot;a@b.c&quot;");
    b.get("/tasks/999999").await.expect(404).contains("no task 999999");
    b.get("/schedules").await.expect(200).contains("delayed").contains("emails.later");
    b.get("/search").await.expect(200).contains("Last error contains");
    b.get("/search?queue=emails&state=dead&error=smtp")
        .await
        .expect(200)
        .contains("1 found")
        .contains("Requeue all matching");
    b.get("/search?header=nonsense").await.expect(400).contains("must be Name=value");
    b.get("/dispatch?queue=emails").await.expect(200).contains(r#"value="emails""#);
    let css = b.get("/assets/style.css").await.expect(200);
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    b.get("/assets/live.js").await.expect(200).contains("EventSource");
    b.get("/assets/nope").await.expect(404);

    let event = first_live_event(f.addr, "").await;
    assert!(
        event.contains(r#""name":"emails""#) && event.contains(r#""dead_letters":1"#),
        "{event}"
    );

    // Paging: 120 dead letters in pages of 50.
    for i in 0..119 {
        dead_letter(&f.js, "emails", &format!("bulk-{i}"), b"{}", "e", ("X-I", "1")).await;
    }
    let first = b.get("/queues/emails?state=dead").await.expect(200).contains("Next page");
    let next = first.body.split("after=").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let second = b
        .get(&format!("/queues/emails?state=dead&after={next}"))
        .await
        .expect(200)
        .contains("First page")
        .contains("bulk-49");
    assert!(!second.body.contains(">bulk-48<"), "the second page starts after the first");
}

#[tokio::test]
async fn actions_are_confirmed_then_run_and_reported() {
    let f = start(|d| d).await;
    let mut b = f.browser();
    consumer(&f, "emails").await;
    let dead: Vec<u64> = dead_letters(&f, "emails", 4).await;
    b.get("/").await.expect(200);

    // Pause: the first post only asks for confirmation.
    b.post("/actions/pause", &[("queue", "emails")])
        .await
        .expect(200)
        .contains("Confirm")
        .contains(r#"name="confirm" value="yes""#);
    assert_eq!(
        f.admin.queue("emails").await.unwrap().paused_until,
        None,
        "nothing happens before confirmation"
    );
    let done =
        b.post("/actions/pause", &[("queue", "emails"), ("confirm", "yes")]).await.expect(303);
    assert_eq!(done.header("location"), Some("/"));
    assert!(f.admin.queue("emails").await.unwrap().paused_until.is_some());
    b.get("/").await.expect(200).contains("Queue &quot;emails&quot; paused.").contains(">paused<");
    assert!(!b.get("/").await.body.contains("paused.</p>"), "the report shows once");
    b.post("/actions/resume", &[("queue", "emails"), ("confirm", "yes")]).await.expect(303);
    assert_eq!(f.admin.queue("emails").await.unwrap().paused_until, None);

    // Requeue one dead letter, then all of them.
    let seq = dead[0].to_string();
    b.post("/actions/requeue", &[("queue", "emails"), ("state", "dead"), ("seq", &seq)])
        .await
        .expect(200)
        .contains("Requeue dead task");
    b.post(
        "/actions/requeue",
        &[("queue", "emails"), ("state", "dead"), ("seq", &seq), ("confirm", "yes")],
    )
    .await
    .expect(303);
    b.get("/queues/emails?state=dead").await.contains("Requeued 1 task of &quot;emails&quot;.");
    let info = f.admin.queue("emails").await.unwrap();
    assert_eq!((info.dead_letters, info.stored), (3, 1));
    b.post(
        "/actions/requeue",
        &[("queue", "emails"), ("state", "dead"), ("seq", &seq), ("confirm", "yes")],
    )
    .await
    .expect(404)
    .contains("nothing done");

    // Delete all dead letters matching a search (error contains "#1"), then one pending task.
    let matching =
        [("queue", "emails"), ("state", "dead"), ("all", "1"), ("error", "#1"), ("confirm", "yes")];
    b.post("/actions/delete", &matching[..4])
        .await
        .expect(200)
        .contains("Delete every dead task of queue &quot;emails&quot; matching all of:")
        .contains("<li>last error contains &quot;#1&quot;</li>");
    b.post("/actions/delete", &matching).await.expect(303);
    b.get("/").await.contains("Deleted 1 task of &quot;emails&quot;.");
    assert_eq!(f.admin.queue("emails").await.unwrap().dead_letters, 2);
    b.post(
        "/actions/requeue",
        &[("queue", "emails"), ("state", "dead"), ("all", "1"), ("confirm", "yes")],
    )
    .await
    .expect(303);
    let info = f.admin.queue("emails").await.unwrap();
    assert_eq!((info.dead_letters, info.stored), (0, 3));
    let pending = f.admin.tasks("emails", TaskState::Pending, None, 10).await.unwrap().items[0]
        .sequence
        .to_string();
    b.post(
        "/actions/delete",
        &[("queue", "emails"), ("state", "pending"), ("seq", &pending), ("confirm", "yes")],
    )
    .await
    .expect(303);
    assert_eq!(f.admin.queue("emails").await.unwrap().stored, 2);

    // Dispatch now and later; cancel the later one.
    let form = [("queue", "reports"), ("name", "build"), ("payload", r#"{"n":1}"#), ("delay", "")];
    b.post("/actions/dispatch", &form)
        .await
        .expect(200)
        .contains("Dispatch task &quot;build&quot; to queue &quot;reports&quot;")
        .contains("{&quot;n&quot;:1}");
    let mut confirmed = form.to_vec();
    confirmed.push(("confirm", "yes"));
    b.post("/actions/dispatch", &confirmed).await.expect(303);
    b.get("/queues/reports").await.contains("Task &quot;build&quot; dispatched");
    assert_eq!(f.admin.queue("reports").await.unwrap().pending, 1);
    let later = [
        ("queue", "reports"),
        ("name", "later"),
        ("payload", "x"),
        ("delay", "600"),
        ("confirm", "yes"),
    ];
    b.post("/actions/dispatch", &later).await.expect(303);
    let schedules = f.admin.schedules(Some("reports")).await.unwrap();
    assert_eq!(schedules.len(), 1);
    let id = schedules[0].id.clone();
    b.get("/schedules").await.contains(&id);
    b.post("/actions/cancel", &[("id", &id), ("queue", "reports"), ("confirm", "yes")])
        .await
        .expect(303);
    b.get("/schedules").await.contains("cancelled.").contains("No delayed tasks");
    assert!(f.admin.schedules(Some("reports")).await.unwrap().is_empty());
}

/// Stores `n` dead letters of `queue` with errors `timeout #<i>`.
async fn dead_letters(f: &Fixture, queue: &str, n: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        seqs.push(
            dead_letter(&f.js, queue, "send", b"{}", &format!("timeout #{i}"), ("X-I", "1")).await,
        );
    }
    seqs
}

#[tokio::test]
async fn bad_input_is_refused_with_its_reason_and_nothing_is_published() {
    let f = start(|d| d).await;
    let mut b = f.browser();
    b.get("/").await;
    let refuse = |fields: Vec<(&'static str, &'static str)>| fields;
    for (fields, status, why) in [
        (refuse(vec![("queue", "q"), ("name", " ")]), 400, "the task needs a name"),
        (refuse(vec![("queue", "bad queue"), ("name", "t")]), 400, "cannot dispatch"),
        (refuse(vec![("queue", "q"), ("name", "t"), ("delay", "soon")]), 400, "not a whole number"),
    ] {
        let mut fields = fields.clone();
        fields.push(("confirm", "yes"));
        b.post("/actions/dispatch", &fields).await.expect(status).contains(why);
    }
    let nothing = match f.admin.queues().await {
        Ok(queues) => queues.is_empty(),
        Err(err) => err.kind() == natasks::admin::AdminErrorKind::UnknownStream,
    };
    assert!(nothing, "nothing was published");
    b.post(
        "/actions/requeue",
        &[("queue", "q"), ("state", "dead"), ("seq", "x"), ("confirm", "yes")],
    )
    .await
    .expect(400)
    .contains("not a number");
    b.post(
        "/actions/delete",
        &[("queue", "q"), ("state", "gone"), ("seq", "1"), ("confirm", "yes")],
    )
    .await
    .expect(400)
    .contains("unknown task state");
    b.post("/actions/cancel", &[("id", "a.b"), ("confirm", "yes")])
        .await
        .expect(400)
        .contains("invalid schedule id");
    b.post("/actions/explode", &[("confirm", "yes")]).await.expect(404);
}

/// Every action, as a confirmed form; and whether it changed anything.
fn all_actions(dead: u64) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let s = |v: &str| v.to_owned();
    vec![
        ("pause", vec![("queue", s("emails"))]),
        ("resume", vec![("queue", s("emails"))]),
        ("dispatch", vec![("queue", s("emails")), ("name", s("t")), ("payload", s("p"))]),
        ("requeue", vec![("queue", s("emails")), ("state", s("dead")), ("seq", dead.to_string())]),
        ("delete", vec![("queue", s("emails")), ("state", s("dead")), ("all", s("1"))]),
        ("cancel", vec![("id", s("whatever"))]),
    ]
}

async fn unchanged(f: &Fixture) {
    let info = f.admin.queue("emails").await.unwrap();
    assert_eq!(
        (info.dead_letters, info.stored, info.paused_until),
        (1, 0, None),
        "nothing changed"
    );
}

fn confirmed(fields: &[(&'static str, String)], csrf: Option<String>) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> =
        fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    all.push(("confirm".into(), "yes".into()));
    if let Some(csrf) = csrf {
        all.push(("csrf".into(), csrf));
    }
    all
}

#[tokio::test]
async fn actions_are_refused_without_csrf_token_or_from_another_origin() {
    let f = start(|d| d).await;
    consumer(&f, "emails").await;
    let dead = dead_letter(&f.js, "emails", "send", b"{}", "e", ("X", "1")).await;
    let mut b = f.browser();
    b.get("/").await;
    let origin = format!("http://{}", f.addr);
    for (action, fields) in all_actions(dead) {
        let path = format!("/actions/{action}");
        let good = Some(b.csrf());
        // No token, a wrong token, no cookie.
        b.post_raw(&path, &confirmed(&fields, None), &[("Origin", &origin)])
            .await
            .expect(403)
            .contains("security token");
        b.post_raw(&path, &confirmed(&fields, Some("0".repeat(64))), &[("Origin", &origin)])
            .await
            .expect(403);
        let mut cookieless = Browser::new(f.addr);
        cookieless.post_raw(&path, &confirmed(&fields, good.clone()), &[]).await.expect(403);
        // The right token, from another origin or site.
        b.post_raw(&path, &confirmed(&fields, good.clone()), &[("Origin", "http://evil.example")])
            .await
            .expect(403)
            .contains("another origin");
        b.post_raw(&path, &confirmed(&fields, good.clone()), &[("Sec-Fetch-Site", "cross-site")])
            .await
            .expect(403)
            .contains("another site");
        // Actions are POST only.
        b.get(&format!("{path}?confirm=yes&queue=emails")).await.expect(405);
        unchanged(&f).await;
    }
}

#[tokio::test]
async fn read_only_mode_hides_and_refuses_every_action() {
    let f = start(|d| d.read_only(true)).await;
    consumer(&f, "emails").await;
    let dead = dead_letter(&f.js, "emails", "send", b"{}", "e", ("X", "1")).await;
    let mut b = f.browser();
    let overview = b.get("/").await.expect(200).contains("read-only");
    let queue = b.get("/queues/emails?state=dead").await.expect(200);
    let task = b.get(&format!("/tasks/{dead}")).await.expect(200);
    for page in [&overview.body, &queue.body, &task.body] {
        assert!(!page.contains("/actions/"), "no action forms in read-only mode:\n{page}");
    }
    b.get("/dispatch").await.expect(403);
    for (action, fields) in all_actions(dead) {
        let mut with_token: Vec<(&str, &str)> =
            fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        with_token.push(("confirm", "yes"));
        b.post(&format!("/actions/{action}"), &with_token).await.expect(403).contains("read-only");
    }
    unchanged(&f).await;
}

#[tokio::test]
async fn a_token_guards_every_page_and_action() {
    let f = start(|d| d.auth(Auth::token("s3cret-token-1"))).await;
    consumer(&f, "emails").await;
    let dead = dead_letter(&f.js, "emails", "send", b"{}", "e", ("X", "1")).await;
    let mut b = f.browser();
    b.get("/").await.expect(401).contains("log in");
    b.get("/queues/emails").await.expect(401);
    b.get("/live").await.expect(401);
    b.get("/assets/style.css").await.expect(200);
    b.get("/login").await.expect(200).contains(r#"name="token""#);
    for (action, fields) in all_actions(dead) {
        let mut with_token: Vec<(&str, &str)> =
            fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        with_token.push(("confirm", "yes"));
        b.post(&format!("/actions/{action}"), &with_token).await.expect(401);
    }
    unchanged(&f).await;
    b.post("/login", &[("token", "wrong")]).await.expect(401).contains("wrong token");
    b.post("/login", &[("token", "s3cret-token-1")]).await.expect(303);
    assert!(b.cookies.contains_key("natasks_auth"));
    b.get("/").await.expect(200).contains("Log out");
    b.post("/actions/pause", &[("queue", "emails"), ("confirm", "yes")]).await.expect(303);
    assert!(f.admin.queue("emails").await.unwrap().paused_until.is_some());
    b.post("/logout", &[]).await.expect(303);
    b.get("/").await.expect(401);

    let mut api = Browser::new(f.addr);
    api.headers.push(("Authorization".into(), "Bearer s3cret-token-1".into()));
    api.get("/").await.expect(200);
    api.headers[0].1 = "Bearer s3cret-token-".into();
    api.get("/").await.expect(401);
}

#[tokio::test]
async fn basic_auth_guards_every_page_and_action() {
    let f = start(|d| d.auth(Auth::basic("ops", "pa:ss-long-enough"))).await;
    consumer(&f, "emails").await;
    let dead = dead_letter(&f.js, "emails", "send", b"{}", "e", ("X", "1")).await;
    let mut b = f.browser();
    let refused = b.get("/").await.expect(401);
    assert!(
        refused.header("www-authenticate").is_some_and(|v| v.starts_with("Basic")),
        "{refused:?}"
    );
    b.headers.push(("Authorization".into(), "Basic b3BzOnBhOnNzLWxvbmctZW5vdWdo".into())); // ops:pa:ss-long-enough
    b.get("/").await.expect(200);
    let mut wrong = Browser::new(f.addr);
    wrong.headers.push(("Authorization".into(), "Basic b3BzOnBhc3M=".into())); // ops:pass
    wrong.get("/").await.expect(401);
    wrong.cookies = b.cookies.clone();
    for (action, fields) in all_actions(dead) {
        let mut with_token: Vec<(&str, &str)> =
            fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        with_token.push(("confirm", "yes"));
        wrong.post(&format!("/actions/{action}"), &with_token).await.expect(401);
    }
    unchanged(&f).await;
    b.post("/actions/pause", &[("queue", "emails"), ("confirm", "yes")]).await.expect(303);
    assert!(f.admin.queue("emails").await.unwrap().paused_until.is_some());
}

#[tokio::test]
async fn everything_from_tasks_is_escaped() {
    let f = start(|d| d).await;
    let seq = dead_letter(&f.js, "xss", XSS, XSS.as_bytes(), XSS, ("X-Evil", XSS)).await;
    // A task name cannot hold `>` when dispatched; the dead letter above carries one anyway.
    let mut tracked = Task::new(IMG, XSS);
    tracked.set_header("X-Evil", XSS);
    f.client.dispatch(tracked, "xss").await.unwrap();
    let mut b = f.browser();
    let pages = [
        "/".to_owned(),
        "/queues/xss?state=dead".to_owned(),
        "/queues/xss?state=pending".to_owned(),
        format!("/tasks/{seq}"),
        format!("/tasks/{}", seq + 1),
        format!("/search?queue=xss&payload={}", encode(XSS)),
        format!("/search?name={}", encode(XSS)),
    ];
    for path in &pages {
        let page = b.get(path).await.expect(200);
        assert!(!page.body.contains(XSS), "{path} renders the raw tag:\n{}", page.body);
        assert!(!page.body.contains(IMG), "{path} renders the raw name:\n{}", page.body);
        if path != "/" {
            let escaped = page.body.contains(XSS_ESCAPED) || page.body.contains("&lt;img/src=x");
            assert!(escaped, "{path} lacks the escaped text:\n{}", page.body);
        }
    }
    // Confirmations, refusals and reports escape what the form carried.
    let confirm = b
        .post("/actions/dispatch", &[("queue", "xss"), ("name", "<b"), ("payload", XSS)])
        .await
        .expect(200);
    assert!(!confirm.body.contains(XSS) && confirm.body.contains(XSS_ESCAPED), "{}", confirm.body);
    let refused = b
        .post("/actions/dispatch", &[("queue", "xss"), ("name", XSS), ("confirm", "yes")])
        .await
        .expect(400);
    assert!(!refused.body.contains(XSS) && refused.body.contains(XSS_ESCAPED), "{}", refused.body);
    let done = [("queue", "xss"), ("name", "<b"), ("payload", XSS), ("confirm", "yes")];
    b.post("/actions/dispatch", &done).await.expect(303);
    let report = b.get("/queues/xss").await.expect(200);
    assert!(report.body.contains("Task &quot;&lt;b&quot; dispatched"), "{}", report.body);
}

#[tokio::test]
async fn an_exposed_address_without_auth_is_refused() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let dashboard = || async {
        Dashboard::new(
            natasks::admin::Admin::new(js.clone()),
            natasks::Client::new(js.clone()).await.unwrap(),
        )
    };
    let exposed = "0.0.0.0:8080".parse().unwrap();
    let err = dashboard().await.check_exposure(exposed).unwrap_err();
    assert_eq!(err.kind(), DashboardErrorKind::Unprotected);
    assert!(err.to_string().contains("without authentication"), "{err}");
    dashboard().await.auth(Auth::token("a-long-token")).check_exposure(exposed).unwrap();
    // Read-only still shows every payload, which may carry secrets.
    let err = dashboard().await.read_only(true).check_exposure(exposed).unwrap_err();
    assert_eq!(err.kind(), DashboardErrorKind::Unprotected);
    assert!(err.to_string().contains("payloads"), "{err}");
    dashboard().await.check_exposure("127.0.0.1:8080".parse().unwrap()).unwrap();
    dashboard().await.check_exposure("[::1]:8080".parse().unwrap()).unwrap();

    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let served =
        tokio::time::timeout(DEADLINE, dashboard().await.serve(listener, std::future::pending()))
            .await
            .expect("serve refuses at once");
    assert_eq!(served.unwrap_err().kind(), DashboardErrorKind::Unprotected);
    assert_eq!(Auth::parse_basic("user").unwrap_err().kind(), DashboardErrorKind::InvalidConfig);
}

#[tokio::test]
async fn a_server_killed_and_restarted_loses_nothing_the_dashboard_shows() {
    let mut f = start(|d| d).await;
    let mut b = f.browser();
    for i in 0..3 {
        dead_letter(&f.js, "emails", "send", b"{}", &format!("e{i}"), ("X", "1")).await;
    }
    b.get("/").await.expect(200);
    f.server.kill().await;
    let down = b.get("/").await;
    assert_eq!(down.status, 502, "a dead server is reported, not hung on: {}", down.body);
    b.post(
        "/actions/requeue",
        &[("queue", "emails"), ("state", "dead"), ("all", "1"), ("confirm", "yes")],
    )
    .await
    .expect(502);
    f.server.restart().await;
    eventually("the dashboard to see the server again", || async {
        Browser::new(f.addr).get("/queues/emails?state=dead").await.status == 200
    })
    .await;
    assert_eq!(f.admin.queue("emails").await.unwrap().dead_letters, 3, "nothing was lost");
    b.post(
        "/actions/requeue",
        &[("queue", "emails"), ("state", "dead"), ("all", "1"), ("confirm", "yes")],
    )
    .await
    .expect(303);
    let info = f.admin.queue("emails").await.unwrap();
    assert_eq!((info.dead_letters, info.stored), (0, 3), "each dead letter requeued once");
}

#[tokio::test]
async fn nested_in_an_app_its_links_and_actions_follow_the_path() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = natasks::Client::new(js.clone()).await.unwrap();
    let admin = natasks::admin::Admin::new(js.clone());
    client.dispatch(Task::new("send", "x"), "emails").await.unwrap();
    Worker::builder(js.clone(), "emails")
        .handle("other", |_: Task| async { Ok::<(), natasks::HandlerError>(()) })
        .build()
        .await
        .unwrap();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "mine" })).nest(
        "/ops",
        Dashboard::new(admin.clone(), client).auth(Auth::token("a-long-token")).router(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut b = Browser::new(addr);
    b.get("/").await.expect(200).contains("mine");
    b.get("/ops").await.expect(401).contains(r#"href="/ops/login""#);
    b.get("/ops/login").await.expect(200).contains(r#"action="/ops/login""#);
    let login = b.post("/ops/login", &[("token", "a-long-token")]).await.expect(303);
    assert_eq!(login.header("location"), Some("/ops"));
    assert!(login.header("set-cookie").is_some_and(|c| c.contains("Path=/ops;")), "{login:?}");
    let overview = b.get("/ops").await.expect(200);
    for link in [
        r#"href="/ops/queues/emails""#,
        r#"href="/ops/assets/style.css""#,
        r#"data-live="/ops/live""#,
        r#"action="/ops/actions/pause""#,
    ] {
        assert!(overview.body.contains(link), "lacks {link}:\n{}", overview.body);
    }
    b.get("/ops/queues/emails").await.expect(200).contains(r#"href="/ops/tasks/"#);
    let paused =
        b.post("/ops/actions/pause", &[("queue", "emails"), ("confirm", "yes")]).await.expect(303);
    assert_eq!(paused.header("location"), Some("/ops"));
    assert!(admin.queue("emails").await.unwrap().paused_until.is_some());
    b.get("/ops").await.expect(200).contains("paused.");
}

#[tokio::test]
async fn open_overviews_share_one_reading_and_follow_changes() {
    let f = start(|d| d.refresh(Duration::from_millis(100))).await;
    dead_letter(&f.js, "emails", "send", b"{}", "e", ("X", "1")).await;
    // Two pages at once each see the queue. Once both have gone the poller stops; the next
    // page starts another (a stale subscription would end its stream at once).
    let (a, b) = tokio::join!(first_live_event(f.addr, ""), first_live_event(f.addr, ""));
    for event in [a, b] {
        assert!(event.contains(r#""dead_letters":1"#), "{event}");
    }
    // No page for three refreshes: the poller notices at its next refresh and stops. (The
    // scenario is time passing with no page open, so this waits on the clock.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A change shows on the open page, with the rate known from the second event on.
    let js = f.js.clone();
    let mut added = None;
    let events = live_events(f.addr, "", 20, |i| {
        if i == 0 {
            let js = js.clone();
            added = Some(tokio::spawn(async move {
                dead_letter(&js, "emails", "send", b"{}", "e2", ("X", "1")).await
            }));
        }
    })
    .await;
    added.unwrap().await.unwrap();
    assert!(events[0].contains(r#""dead_letters":1"#), "{events:?}");
    assert!(events.iter().any(|e| e.contains(r#""dead_letters":2"#)), "{events:?}");
    assert!(
        events[0].contains(r#""rate":null"#) && events[1].contains(r#""rate":"+"#),
        "{events:?}"
    );
}

#[tokio::test]
async fn only_loopback_ip_and_allowed_host_names_are_served() {
    let f = start(|d| d).await;
    dead_letters(&f, "emails", 2).await;
    // A page of another site whose name was rebound to 127.0.0.1 sends its own name.
    let mut rebound = f.browser();
    rebound.host = Some(format!("evil.example:{}", f.addr.port()));
    rebound.get("/").await.expect(403).contains("evil.example");
    rebound.cookies.insert("natasks_csrf".into(), "a".repeat(64));
    let fields = [("queue", "emails"), ("state", "dead"), ("all", "1"), ("confirm", "yes")];
    rebound.post("/actions/delete", &fields).await.expect(403);
    assert_eq!(f.admin.queue("emails").await.unwrap().dead_letters, 2, "nothing deleted");
    // Loopback names and IP addresses are served.
    for host in [format!("localhost:{}", f.addr.port()), format!("[::1]:{}", f.addr.port())] {
        let mut b = f.browser();
        b.host = Some(host);
        b.get("/").await.expect(200);
    }
}

#[tokio::test]
async fn allowed_hosts_serve_a_public_name_and_accept_its_origin() {
    let f = start(|d| d.allowed_hosts(["ops.example.com"])).await;
    consumer(&f, "emails").await;
    let mut b = f.browser();
    b.host = Some("OPS.example.com".into());
    b.get("/").await.expect(200);
    // Behind a reverse proxy the Host is the proxy's upstream, the Origin the public name.
    let mut proxied = f.browser();
    proxied.get("/").await.expect(200);
    let fields = confirmed(&[("queue", "emails".into())], Some(proxied.csrf()));
    proxied
        .post_raw("/actions/pause", &fields, &[("Origin", "https://ops.example.com")])
        .await
        .expect(303);
    assert!(f.admin.queue("emails").await.unwrap().paused_until.is_some());
    proxied
        .post_raw("/actions/resume", &fields, &[("Origin", "https://evil.example")])
        .await
        .expect(403);
    let mut other = f.browser();
    other.host = Some("evil.example".into());
    other.get("/").await.expect(403);
}

#[tokio::test]
async fn empty_or_short_secrets_are_refused() {
    let server = NatsServer::start().await;
    let js = server.jetstream().await;
    let client = natasks::Client::new(js.clone()).await.unwrap();
    let dashboard = || Dashboard::new(natasks::admin::Admin::new(js.clone()), client.clone());
    let loopback = "127.0.0.1:8080".parse().unwrap();
    for auth in [
        Auth::token(""),
        Auth::token("short"),
        Auth::basic("", ""),
        Auth::basic("ops", ""),
        Auth::basic("", "a long enough password"),
    ] {
        let err = dashboard().auth(auth.clone()).check_exposure(loopback).unwrap_err();
        assert_eq!(err.kind(), DashboardErrorKind::InvalidConfig, "{auth:?}: {err}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = tokio::time::timeout(
            DEADLINE,
            dashboard().auth(auth.clone()).serve(listener, std::future::pending()),
        )
        .await
        .expect("serve refuses at once");
        assert_eq!(served.unwrap_err().kind(), DashboardErrorKind::InvalidConfig, "{auth:?}");
    }
    // A router taken without serve lets nobody in rather than everybody.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = dashboard().auth(Auth::token("")).router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut b = Browser::new(addr);
    b.cookies.insert("natasks_auth".into(), String::new());
    b.get("/").await.expect(401);
}

#[tokio::test]
async fn queue_names_with_url_characters_link_to_their_own_queue() {
    let f = start(|d| d).await;
    let names = ["a", "a?b", "jobs#1", "x%41", "a/b"];
    for name in names {
        f.client.dispatch(Task::new("t", name), name).await.unwrap();
    }
    let mut b = f.browser();
    let overview = b.get("/").await.expect(200);
    for name in names {
        let row = format!("<tr data-queue=\"{}\">", name.replace('&', "&amp;"));
        let at = overview.body.find(&row).unwrap_or_else(|| panic!("no row {name}"));
        let href = overview.body[at..].split("href=\"").nth(1).unwrap().split('"').next().unwrap();
        let page = b.get(href).await.expect(200);
        assert!(page.body.contains(&format!("<h1>Queue {name}</h1>")), "{href}:\n{}", page.body);
        let dead_href = overview.body[at..].split("href=\"").nth(2).unwrap().split('"').next();
        let dead = b.get(dead_href.unwrap()).await.expect(200);
        assert!(dead.body.contains(&format!("<h1>Queue {name}</h1>")), "{}", dead.body);
    }
    let gone = [("queue", "a?b"), ("state", "pending"), ("all", "1"), ("confirm", "yes")];
    let done = b.post("/actions/delete", &gone).await.expect(303);
    assert_eq!(done.header("location"), Some("/queues/a%3Fb?state=pending"));
    assert_eq!(f.admin.queue("a").await.unwrap().pending, 1, "queue a untouched");
}

#[tokio::test]
async fn confirming_a_dispatch_twice_dispatches_once() {
    let f = start(|d| d).await;
    let mut b = f.browser();
    b.get("/").await.expect(200);
    let confirm = b
        .post("/actions/dispatch", &[("queue", "emails"), ("name", "send"), ("payload", "{}")])
        .await
        .expect(200);
    // The confirmation form's fields, posted twice as a double click would.
    let form = confirm.body.split("id=\"confirm\"").next().unwrap();
    let fields: Vec<(String, String)> = form
        .split("<input type=\"hidden\" name=\"")
        .skip(1)
        .map(|field| {
            let (name, rest) = field.split_once('"').unwrap();
            let value = rest.split("value=\"").nth(1).unwrap().split('"').next().unwrap();
            (name.to_owned(), value.replace("&quot;", "\"").replace("&amp;", "&"))
        })
        .collect();
    let origin = format!("http://{}", f.addr);
    for _ in 0..2 {
        b.post_raw("/actions/dispatch", &fields, &[("Origin", &origin)]).await.expect(303);
    }
    assert_eq!(f.admin.queue("emails").await.unwrap().pending, 1);
}

#[tokio::test]
async fn confirmations_state_exactly_what_will_happen() {
    let f = start(|d| d).await;
    consumer(&f, "emails").await;
    let dead = dead_letter(&f.js, "emails", "send", b"{}", "SMTP timeout", ("X", "1")).await;
    let mut b = f.browser();
    b.get("/").await.expect(200);
    // Every condition of an "all matching" action, labelled.
    let all = [
        ("queue", "emails"),
        ("state", "dead"),
        ("all", "1"),
        ("name", "send"),
        ("header", "X=1"),
        ("payload", "{"),
        ("json", "a=1"),
        ("error", "smtp"),
    ];
    b.post("/actions/delete", &all)
        .await
        .expect(200)
        .contains("Delete every dead task of queue &quot;emails&quot; matching all of:")
        .contains("<li>name is &quot;send&quot;</li>")
        .contains("<li>header X=1</li>")
        .contains("<li>payload contains &quot;{&quot;</li>")
        .contains("<li>JSON field a=1</li>")
        .contains("<li>last error contains &quot;smtp&quot;</li>");
    // A dispatch states its delay and labels its payload.
    let later = [("queue", "emails"), ("name", "send"), ("payload", "hi"), ("delay", "60")];
    b.post("/actions/dispatch", &later)
        .await
        .expect(200)
        .contains("in 60 seconds")
        .contains("Payload (2 bytes)");
    let now = [("queue", "emails"), ("name", "send"), ("payload", "")];
    b.post("/actions/dispatch", &now).await.expect(200).contains("now").contains("empty payload");
    // A one-task action without its state, or any action without a queue, is refused.
    let seq = dead.to_string();
    for confirm in ["no", "yes"] {
        let stateless = [("queue", "emails"), ("seq", seq.as_str()), ("confirm", confirm)];
        b.post("/actions/delete", &stateless).await.expect(400).contains("state");
        for (action, extra) in [("pause", ("x", "")), ("dispatch", ("name", "send"))] {
            let fields = [("queue", ""), extra, ("confirm", confirm)];
            b.post(&format!("/actions/{action}"), &fields).await.expect(400).contains("queue");
        }
    }
    unchanged(&f).await;
    assert!(f.admin.queues().await.unwrap().iter().all(|q| q.pending == 0), "nothing dispatched");
}

#[tokio::test]
async fn the_login_cookie_is_a_session_not_the_token() {
    let token = "ab;cd ef=gh ünïcode";
    let f = start(|d| d.auth(Auth::token(token)).secure_cookies(true)).await;
    let mut b = f.browser();
    b.get("/login").await.expect(200);
    let login = b.post("/login", &[("token", token)]).await.expect(303);
    let set = login.header("set-cookie").unwrap_or_default().to_owned();
    assert!(set.starts_with("natasks_auth=") && set.contains("; Secure"), "{set}");
    let session = b.cookies.get("natasks_auth").cloned().unwrap();
    // A session id: 64 hex digits, not the token nor the part of it before its `;`.
    let is_session_id = session.len() == 64 && session.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(is_session_id, "the cookie holds {session:?}");
    b.get("/").await.expect(200).contains("Log out");
    // Logging out ends the session on the server, not only in this browser.
    b.post("/logout", &[]).await.expect(303);
    b.cookies.insert("natasks_auth".into(), session);
    b.get("/").await.expect(401);
}

#[tokio::test]
async fn a_request_without_host_is_judged_by_its_authority() {
    let f = start(|d| d).await;
    consumer(&f, "emails").await;
    let mut b = f.browser();
    b.get("/").await.expect(200);
    let (addr, csrf) = (f.addr, b.csrf());
    // HTTP/2 carries no Host header, only the URI's authority; so does this request.
    let evil = "GET http://evil.example/ HTTP/1.1\r\nConnection: close\r\n\r\n".to_owned();
    raw_request(addr, evil).await.expect(403);
    let body = format!("queue=emails&confirm=yes&csrf={csrf}");
    let post = format!(
        "POST http://{addr}/actions/pause HTTP/1.1\r\nConnection: close\r\nOrigin: http://{addr}\r\n\
         Cookie: natasks_csrf={csrf}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_request(addr, post).await.expect(303);
    assert!(f.admin.queue("emails").await.unwrap().paused_until.is_some());
}

#[tokio::test]
async fn a_link_from_elsewhere_keeps_the_login_but_not_the_csrf_cookie() {
    let f = start(|d| d.auth(Auth::token("a-long-token"))).await;
    let mut b = f.browser();
    let page = b.get("/login").await.expect(200);
    let csrf = page.header("set-cookie").unwrap_or_default().to_owned();
    assert!(csrf.starts_with("natasks_csrf=") && csrf.contains("SameSite=Strict"), "{csrf}");
    let login = b.post("/login", &[("token", "a-long-token")]).await.expect(303);
    let session = login.header("set-cookie").unwrap_or_default().to_owned();
    assert!(session.starts_with("natasks_auth=") && session.contains("SameSite=Lax"), "{session}");
}

#[tokio::test]
async fn a_queue_page_reads_the_stream_subjects_and_consumers_once() {
    use natasks_test_support::api::{count, ApiRequests};
    let f = start(|d| d).await;
    f.client.dispatch(Task::new("emails.send", "x"), "emails").await.unwrap();
    consumer(&f, "emails").await;
    let mut b = f.browser();
    b.get("/").await.expect(200);
    let mut requests = ApiRequests::watch(&f.server.url()).await;
    b.get("/queues/emails").await.expect(200).contains("Pending (1)");
    let seen = requests.take().await;
    let names: Vec<&str> = seen.iter().map(|r| r.api.as_str()).collect();
    // The stream once when opened, its subjects once, its consumers once.
    assert_eq!(count(&seen, "STREAM.INFO.NATASKS"), 2, "{names:?}");
    assert_eq!(count(&seen, "CONSUMER.LIST.") + count(&seen, "CONSUMER.NAMES."), 1, "{names:?}");
}
