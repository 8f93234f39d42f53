//! The README quick start: dispatch a task and process it.
//!
//! Run with a server at `NATS_URL` (default `nats://127.0.0.1:4222`):
//! `cargo run --example quickstart`.
use natasks::{Client, HandlerError, Json, Task, Worker};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct SendEmail {
    user_id: u64,
    email: String,
}

async fn send_email(Json(email): Json<SendEmail>) -> Result<(), HandlerError> {
    println!("send email to {} for user {}", email.email, email.user_id);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);

    let client = Client::new(js.clone()).await?;
    let task =
        Task::json("emails.send", &SendEmail { user_id: 42, email: "user@example.com".into() })?;
    client.dispatch(task, "emails").await?;

    let worker = Worker::builder(js, "emails")
        .concurrency(8)
        .max_retries(3)
        .handle("emails.send", send_email)
        .build()
        .await?;
    // Process until Ctrl-C, then finish running tasks and stop.
    worker.run_until(async { tokio::signal::ctrl_c().await.unwrap_or(()) }).await?;
    Ok(())
}
