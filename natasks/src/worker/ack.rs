//! Acknowledgements without a JetStream context per delivery.
//!
//! async-nats' `jetstream::Message` clones the whole JetStream context for every message it
//! wraps (two allocations), only to publish its acks on the context's client. The worker
//! keeps the plain message instead, and publishes the same ack bodies (`AckKind`'s own
//! encoding) to the message's reply subject on one client shared by the whole worker.

use std::future::Future;

use async_nats::client::PublishError;
use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};

/// Sends `kind` for the delivery whose reply subject is `reply`: what
/// `jetstream::Message::ack_with` sends.
///
/// Returns the client's own future rather than wrapping it in another: what is awaited
/// is kept in the processing future of every task.
pub(super) fn send(
    client: &Client,
    reply: Subject,
    kind: AckKind,
) -> impl Future<Output = Result<(), PublishError>> + Send + '_ {
    client.publish(reply, kind.into())
}

/// The delivery count (at least 1) and the stream sequence of a delivery, read from its
/// JetStream reply subject as `jetstream::Message::info` reads it: `$JS.ACK.` followed by
/// `<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>`, or
/// (ADR-15) by `<domain>.<account hash>.` and those seven, and possibly more tokens. `None`
/// when the subject has neither form or a number does not parse.
pub(super) fn delivery_info(reply: &str) -> Option<(u64, u64)> {
    let fields = fields(reply)?;
    let delivered: u64 = fields[2].parse().ok()?;
    let stream_sequence: u64 = fields[3].parse().ok()?;
    // The other numbers are checked as the client checks them.
    fields[4].parse::<u64>().ok()?;
    fields[5].parse::<i128>().ok()?;
    fields[6].parse::<u64>().ok()?;
    Some((delivered.max(1), stream_sequence))
}

/// How many messages the consumer still had pending after this delivery, from its reply
/// subject (see [`delivery_info`]).
pub(super) fn pending(reply: &str) -> Option<u64> {
    fields(reply)?[6].parse().ok()
}

/// The seven fields after `$JS.ACK.` (and the domain and account hash, when present).
fn fields(reply: &str) -> Option<[&str; 7]> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    // The first nine tokens and how many there are, in one pass over the bytes (cheaper
    // than `split` for a subject read for every task).
    let mut tokens: [&str; 9] = [""; 9];
    let mut count = 0;
    let mut start = 0;
    for (at, byte) in rest.bytes().enumerate() {
        if byte == b'.' {
            if let Some(token) = tokens.get_mut(count) {
                *token = &rest[start..at];
            }
            count += 1;
            start = at + 1;
        }
    }
    if let Some(token) = tokens.get_mut(count) {
        *token = &rest[start..];
    }
    count += 1;
    let fields = match count {
        7 => &tokens[..7],
        n if n >= 9 => &tokens[2..9],
        _ => return None,
    };
    fields.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::delivery_info;

    #[test]
    fn reads_the_original_form() {
        let reply = "$JS.ACK.NATASKS.natasks-default.3.1042.17.1700000000000000000.5";
        assert_eq!(delivery_info(reply), Some((3, 1042)));
        assert_eq!(super::pending(reply), Some(5));
        assert_eq!(super::pending("$JS.ACK.hub.H.S.c.1.2.3.1700000000000000000.0"), Some(0));
        assert_eq!(super::pending("not.an.ack"), None);
    }

    #[test]
    fn reads_the_form_with_domain_and_account_hash() {
        let reply = "$JS.ACK.hub.ACCHASH.NATASKS.worker.2.77.9.1700000000000000000.0";
        assert_eq!(delivery_info(reply), Some((2, 77)));
        let no_domain = "$JS.ACK._.ACCHASH.NATASKS.worker.1.5.5.1700000000000000000.0";
        assert_eq!(delivery_info(no_domain), Some((1, 5)));
        // A trailing random token, and anything after it, is ignored.
        let token = "$JS.ACK.hub.ACCHASH.NATASKS.worker.4.8.2.1700000000000000000.0.tok.more";
        assert_eq!(delivery_info(token), Some((4, 8)));
    }

    #[test]
    fn counts_a_zero_delivery_as_the_first() {
        let reply = "$JS.ACK.S.C.0.1.1.1700000000000000000.0";
        assert_eq!(delivery_info(reply), Some((1, 1)));
    }

    /// The same answers as async-nats' own parser, on both forms and on malformed subjects.
    #[tokio::test]
    async fn agrees_with_the_client() {
        // Never connects: the client only carries the context `info` does not use.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("a client that retries in the background");
        let context = async_nats::jetstream::new(client);
        let cases = [
            "$JS.ACK.S.C.3.10.4.1700000000000000000.2",
            "$JS.ACK.D.H.S.C.3.10.4.1700000000000000000.2",
            "$JS.ACK._.H.S.C.3.10.4.1700000000000000000.2",
            "$JS.ACK.D.H.S.C.3.10.4.1700000000000000000.2.T",
            "$JS.ACK.D.H.S.C.3.10.4.1700000000000000000.2.T.X.Y",
            "$JS.ACK.S.C.3.10.4.1700000000000000000",
            "$JS.ACK.S.C.3.10.4.1700000000000000000.2.X",
            "$JS.ACK.S.C.x.10.4.1700000000000000000.2",
            "$JS.ACK.S.C.3.-1.4.1700000000000000000.2",
            "$JS.ACK.S.C.3.10.4.now.2",
            "$JS.ACK.S.C.3.10.4.1700000000000000000.-2",
            "$JS.ACKS.S.C.3.10.4.1700000000000000000.2",
            "_INBOX.abc",
            "",
        ];
        for reply in cases {
            let message = async_nats::jetstream::Message {
                message: async_nats::Message {
                    subject: "tasks".into(),
                    reply: Some(reply.into()),
                    payload: Default::default(),
                    headers: None,
                    status: None,
                    description: None,
                    length: 0,
                },
                context: context.clone(),
            };
            let theirs = message.info().ok().map(|info| {
                (u64::try_from(info.delivered).unwrap_or(1).max(1), info.stream_sequence)
            });
            assert_eq!(delivery_info(reply), theirs, "{reply}");
        }
    }
}
