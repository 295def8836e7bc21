//! Pipelined publishes are gathered into runs by the daemon (one hub lock
//! and one buffer per subscriber for consecutive small publishes on a
//! topic). Whatever the mix, replies must come in request order and a
//! subscriber must get every event once, in order, with contiguous
//! sequence numbers.

mod common;

use common::{DaemonProcess, Msg, Req, publish, request_bytes, subscribe};
use keyhole::hub::{HubError, HubEvent, HubReply, HubRequest};
use keyhole::transport::ErrorCode;

#[test]
fn pipelined_mixed_requests_keep_reply_and_event_order() {
    let daemon = DaemonProcess::start(&[]);
    let token = daemon.token();
    let mut sub = daemon.raw();
    sub.authenticate(&token);
    sub.send(&request_bytes(1, subscribe("t")));
    assert_eq!(sub.read_msg(), Msg::Reply(1, HubReply::Subscribed));

    let mut publisher = daemon.raw();
    publisher.authenticate(&token);
    let large = vec![0xabu8; 20 * 1024];
    // (request, expected reply, payload expected on "t")
    let mut plan: Vec<(Req, Option<ErrorCode>, Option<Vec<u8>>)> = Vec::new();
    for round in 0..3u8 {
        for i in 0..40u8 {
            plan.push((publish("t", vec![round, i]), None, Some(vec![round, i])));
        }
        let invalid = ErrorCode::Service(HubError::INVALID_TOPIC);
        plan.push((publish("", vec![1]), Some(invalid), None));
        plan.push((publish("t", vec![round, 200]), None, Some(vec![round, 200])));
        plan.push((Req::Ping, None, None));
        plan.push((publish("u", vec![round]), None, None));
        plan.push((publish("t", large.clone()), None, Some(large.clone())));
        plan.push((publish("t", vec![round, 201]), None, Some(vec![round, 201])));
        plan.push((Req::Hub(HubRequest::Status), None, None));
    }
    let mut wire = Vec::new();
    for (n, (body, _, _)) in plan.iter().enumerate() {
        wire.extend_from_slice(&request_bytes(n as u64 + 1, body.clone()));
    }
    publisher.send(&wire);

    for (n, (body, error, _)) in plan.iter().enumerate() {
        let id = n as u64 + 1;
        let reply = publisher.read_msg();
        match (body, error, reply) {
            (
                _,
                Some(code),
                Msg::Error {
                    id: got, code: c, ..
                },
            ) => {
                assert_eq!((got, c), (Some(id), *code), "request {id}");
            }
            (Req::Ping, None, Msg::Ack(got))
            | (
                Req::Hub(HubRequest::Publish { .. }),
                None,
                Msg::Reply(got, HubReply::Published { .. }),
            ) => {
                assert_eq!(got, id)
            }
            (Req::Hub(HubRequest::Status), None, Msg::Reply(got, HubReply::Status(_))) => {
                assert_eq!(got, id)
            }
            (_, _, other) => panic!("request {id}: unexpected {other:?}"),
        }
    }

    let expected: Vec<Vec<u8>> = plan.into_iter().filter_map(|(_, _, p)| p).collect();
    let mut last = None;
    for (k, want) in expected.iter().enumerate() {
        match sub.read_msg() {
            Msg::Event(
                _,
                HubEvent::Message {
                    topic,
                    sequence,
                    payload,
                },
            ) => {
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
