//! Pipelined publishes are gathered into runs by the daemon (one hub lock
//! and one buffer per subscriber for consecutive small publishes on a
//! topic). Whatever the mix, replies must come in request order and a
//! subscriber must get every event once, in order, with contiguous
//! sequence numbers.

mod common;

use bytes::Bytes;
use common::{DaemonProcess, RawConn};
use keyhole::message::{ErrorCode, RequestBody, ServerMessage};

fn publish(topic: &str, payload: Vec<u8>) -> RequestBody {
    RequestBody::Publish {
        topic: topic.into(),
        payload: Bytes::from(payload),
    }
}

#[test]
fn pipelined_mixed_requests_keep_reply_and_event_order() {
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let mut sub = daemon.raw();
    sub.authenticate(&token);
    sub.send(&RawConn::request_bytes(
        1,
        RequestBody::Subscribe { topic: "t".into() },
    ));
    assert_eq!(sub.read_msg(), ServerMessage::Ack { id: 1 });

    let mut publisher = daemon.raw();
    publisher.authenticate(&token);
    let large = vec![0xabu8; 20 * 1024];
    // (request, expected reply, payload expected on "t")
    let mut plan: Vec<(RequestBody, Option<ErrorCode>, Option<Vec<u8>>)> = Vec::new();
    for round in 0..3u8 {
        for i in 0..40u8 {
            plan.push((publish("t", vec![round, i]), None, Some(vec![round, i])));
        }
        plan.push((publish("", vec![1]), Some(ErrorCode::InvalidTopic), None));
        plan.push((publish("t", vec![round, 200]), None, Some(vec![round, 200])));
        plan.push((RequestBody::Ping, None, None));
        plan.push((publish("u", vec![round]), None, None));
        plan.push((publish("t", large.clone()), None, Some(large.clone())));
        plan.push((publish("t", vec![round, 201]), None, Some(vec![round, 201])));
        plan.push((RequestBody::Status, None, None));
    }
    let mut wire = Vec::new();
    for (n, (body, _, _)) in plan.iter().enumerate() {
        wire.extend_from_slice(&RawConn::request_bytes(n as u64 + 1, body.clone()));
    }
    publisher.send(&wire);

    for (n, (body, error, _)) in plan.iter().enumerate() {
        let id = n as u64 + 1;
        let reply = publisher.read_msg();
        match (body, error, reply) {
            (
                _,
                Some(code),
                ServerMessage::Error {
                    id: got, code: c, ..
                },
            ) => {
                assert_eq!((got, c), (Some(id), *code), "request {id}");
            }
            (RequestBody::Ping, None, ServerMessage::Pong { id: got })
            | (RequestBody::Publish { .. }, None, ServerMessage::Ack { id: got }) => {
                assert_eq!(got, id)
            }
            (RequestBody::Status, None, ServerMessage::StatusReport { id: got, .. }) => {
                assert_eq!(got, id)
            }
            (_, _, other) => panic!("request {id}: unexpected {other:?}"),
        }
    }

    let expected: Vec<Vec<u8>> = plan.into_iter().filter_map(|(_, _, p)| p).collect();
    let mut last = None;
    for (k, want) in expected.iter().enumerate() {
        match sub.read_msg() {
            ServerMessage::Event {
                topic,
                sequence,
                payload,
            } => {
                assert_eq!(topic, "t");
                assert_eq!(&payload[..], &want[..], "event {k}");
                if let Some(prev) = last {
                    assert_eq!(sequence, prev + 1, "event {k}");
                }
                last = Some(sequence);
            }
            other => panic!("event {k}: unexpected {other:?}"),
        }
    }
}
