//! The JetStream API requests clients make, as the server sees them: a core NATS
//! subscription on `$JS.API.>` receives every request of every connection.

use futures_util::StreamExt as _;

/// Records the JetStream API requests made on a server from the moment it is created.
pub struct ApiRequests {
    client: async_nats::Client,
    subscriber: async_nats::Subscriber,
    marks: u64,
}

/// One JetStream API request.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    /// The subject without `$JS.API.`: `STREAM.INFO.NATASKS`, `CONSUMER.LIST.NATASKS`.
    pub api: String,
    /// The request body (often JSON, often empty).
    pub body: String,
}

impl ApiRequests {
    /// Starts recording on the server at `url`; requests made after this returns are seen.
    pub async fn watch(url: &str) -> Self {
        let client = async_nats::connect(url).await.expect("connect the request recorder");
        let subscriber = client.subscribe("$JS.API.>").await.expect("subscribe to $JS.API.>");
        let mut requests = Self { client, subscriber, marks: 0 };
        // The mark comes back once the server has the subscription.
        requests.take().await;
        requests
    }

    /// The requests made since the last call (or since `watch`), in order. Every request
    /// whose reply came before this call is among them: this publishes a mark under
    /// `$JS.API.` (no JetStream API answers it) and reads up to it, and the server handed
    /// those requests to the subscription before it answered them, so before the mark.
    pub async fn take(&mut self) -> Vec<ApiRequest> {
        self.marks += 1;
        let mark = format!("$JS.API.TEST_RECORDER_MARK.{}", self.marks);
        self.client.publish(mark.clone(), "".into()).await.expect("publish the mark");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut out = Vec::new();
        loop {
            let message = tokio::time::timeout_at(deadline, self.subscriber.next())
                .await
                .expect("the mark comes back within 20 s")
                .expect("the recorder's subscription is open");
            if message.subject.as_str() == mark {
                return out;
            }
            out.push(ApiRequest {
                api: message.subject.trim_start_matches("$JS.API.").to_owned(),
                body: String::from_utf8_lossy(&message.payload).into_owned(),
            });
        }
    }
}

/// How many of `requests` went to an API whose subject starts with `prefix`
/// (`STREAM.INFO.`, `CONSUMER.LIST.`).
pub fn count(requests: &[ApiRequest], prefix: &str) -> usize {
    requests.iter().filter(|r| r.api.starts_with(prefix)).count()
}
