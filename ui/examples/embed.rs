//! Mounts the natasks dashboard under `/natasks` in an axum app of your own, beside your
//! own routes, behind a token; dispatches a task, reads the dashboard's overview once as a
//! client would, and exits. With `--serve` it keeps serving until Ctrl-C instead: open
//! http://127.0.0.1:3000/natasks and log in with the token.
//!
//! ```sh
//! nats-server -js &
//! DASHBOARD_TOKEN=secret cargo run -p natasks-ui --example embed -- --serve
//! ```
use axum::{routing::get, Router};
use natasks::admin::Admin;
use natasks::{Client, Task};
use natasks_ui::{Auth, Dashboard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let token = std::env::var("DASHBOARD_TOKEN").unwrap_or_else(|_| "change-me-please".into());
    let client = Client::new(js.clone()).await?;
    client.dispatch(Task::new("hello", r#"{"from":"embed"}"#), "example-dashboard").await?;

    let dashboard = Dashboard::new(Admin::new(js), client).auth(Auth::token(token.clone()));
    let app = Router::new()
        .route("/", get(|| async { "my service; the dashboard is at /natasks" }))
        .nest("/natasks", dashboard.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    let addr = listener.local_addr()?;
    println!("dashboard at http://{addr}/natasks");
    let serve = std::env::args().any(|arg| arg == "--serve");
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    });
    if serve {
        return Ok(server.await??);
    }

    // What a script with the token sees: the overview, listing the queue.
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "GET /natasks HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut page = String::new();
    stream.read_to_string(&mut page).await?;
    println!("{}", page.lines().next().unwrap_or(""));
    println!("lists example-dashboard: {}", page.contains(r#"data-queue="example-dashboard""#));
    server.abort();
    Ok(())
}
