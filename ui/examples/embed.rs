//! Mounts the natasks dashboard under `/natasks` in an axum app of your own, beside your
//! own routes, protected by a token.
//!
//! ```sh
//! nats-server -js &
//! DASHBOARD_TOKEN=secret cargo run -p natasks-ui --example embed
//! # open http://127.0.0.1:3000/natasks/ and log in with the token
//! ```
use axum::{routing::get, Router};
use natasks::admin::Admin;
use natasks_ui::{Auth, Dashboard};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let token = std::env::var("DASHBOARD_TOKEN").unwrap_or_else(|_| "change-me".into());

    let dashboard = Dashboard::new(Admin::new(js.clone()), natasks::Client::new(js).await?)
        .auth(Auth::token(token));
    let app = Router::new()
        .route("/", get(|| async { "my service; the dashboard is at /natasks/" }))
        .nest("/natasks", dashboard.router());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}/natasks/", listener.local_addr()?);
    // Stops on Ctrl-C; set EMBED_EXIT_AFTER_MS to stop sooner (used by the tests).
    let stop = async {
        match std::env::var("EMBED_EXIT_AFTER_MS").ok().and_then(|ms| ms.parse().ok()) {
            Some(ms) => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
            None => drop(tokio::signal::ctrl_c().await),
        }
    };
    axum::serve(listener, app).with_graceful_shutdown(stop).await?;
    Ok(())
}
