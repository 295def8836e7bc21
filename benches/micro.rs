//! criterion micro-benchmarks of the hot paths under the daemon: request
//! frames encoded and decoded (a transport `Ping`, a hub `Publish` of 64 B
//! and of 64 KiB, copied or shared), the `Ack` and `Reply` the daemon sends,
//! and handshake parsing + verification.
//!
//! `cargo bench --bench micro`; CI: `cargo bench --bench micro -- --quick
//! --warm-up-time 0.2 --measurement-time 0.5`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keyhole::codec::FrameCodec;
use keyhole::encoding::{self, Payload};
use keyhole::fuzzing::{HandshakeParser, Progress};
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::{HubReply, HubRequest};
use keyhole::limits::MAX_FRAME_LEN;
use keyhole::token::SessionToken;
use keyhole::transport::{
    DaemonFrame, REQUEST_HEADER_LEN, RequestHeader, RequestKind, encode_ack, encode_reply,
    encode_request,
};

fn publish(len: usize) -> HubRequest {
    HubRequest::Publish {
        topic: "bench.topic".into(),
        payload: Payload::from(vec![0x5a; len]),
    }
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for (name, len) in [("small", 64usize), ("64KiB", 64 * 1024)] {
        let msg = publish(len);
        let mut wire = BytesMut::new();
        encode_request(&mut wire, 42, RequestKind::Call, Some(&msg), MAX_FRAME_LEN).unwrap();
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(BenchmarkId::new("encode_publish", name), |b| {
            let mut buf = BytesMut::with_capacity(wire.len() * 2);
            b.iter(|| {
                buf.clear();
                encode_request(
                    &mut buf,
                    42,
                    RequestKind::Call,
                    Some(black_box(&msg)),
                    MAX_FRAME_LEN,
                )
                .unwrap();
                black_box(buf.len())
            })
        });
        // Only the decode is timed: the input is a fresh copy of the frame.
        g.bench_function(BenchmarkId::new("decode_publish", name), |b| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| {
                    let mut codec = FrameCodec::default();
                    let len = codec.next_payload_len(buf).unwrap().unwrap();
                    let header = RequestHeader::parse(&buf[..len]).unwrap();
                    let body = &buf[REQUEST_HEADER_LEN..len];
                    black_box((
                        header,
                        encoding::decode::<HubRequest>(black_box(body)).unwrap(),
                    ))
                },
                BatchSize::SmallInput,
            )
        });
        // What the daemon does with a frame of 16 KiB or more: the payload is
        // a slice of the read buffer, not a copy.
        g.bench_function(BenchmarkId::new("decode_publish_shared", name), |b| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| {
                    let mut codec = FrameCodec::default();
                    let len = codec.next_payload_len(buf).unwrap().unwrap();
                    let frame: Bytes = buf.split_to(len).freeze();
                    let body = frame.slice(REQUEST_HEADER_LEN..);
                    black_box(encoding::decode_shared::<HubRequest>(black_box(&body)).unwrap())
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_ping", |b| {
        let mut buf = BytesMut::with_capacity(64);
        b.iter(|| {
            buf.clear();
            encode_request::<()>(
                &mut buf,
                black_box(42),
                RequestKind::Ping,
                None,
                MAX_FRAME_LEN,
            )
            .unwrap();
            black_box(buf.len())
        })
    });
    let mut ping_wire = BytesMut::new();
    encode_request::<()>(&mut ping_wire, 42, RequestKind::Ping, None, MAX_FRAME_LEN).unwrap();
    g.bench_function("decode_ping", |b| {
        b.iter_batched_ref(
            || ping_wire.clone(),
            |buf| {
                let mut codec = FrameCodec::default();
                let len = codec.next_payload_len(buf).unwrap().unwrap();
                black_box(RequestHeader::parse(black_box(&buf[..len])).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("encode_ack", |b| {
        let mut buf = BytesMut::with_capacity(64);
        b.iter(|| {
            buf.clear();
            encode_ack(&mut buf, black_box(42));
            black_box(buf.len())
        })
    });
    g.bench_function("encode_reply_published", |b| {
        let mut buf = BytesMut::with_capacity(64);
        b.iter(|| {
            buf.clear();
            encode_reply(
                &mut buf,
                black_box(42),
                &HubReply::Published { receivers: 3 },
                MAX_FRAME_LEN,
            )
            .unwrap();
            black_box(buf.len())
        })
    });
    let mut ack_wire = BytesMut::new();
    encode_ack(&mut ack_wire, 42);
    g.bench_function("decode_ack", |b| {
        b.iter_batched_ref(
            || ack_wire.clone(),
            |buf| {
                let mut codec = FrameCodec::default();
                let len = codec.next_payload_len(buf).unwrap().unwrap();
                let frame: Bytes = buf.split_to(len).freeze();
                black_box(DaemonFrame::decode(black_box(&frame)).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let token = SessionToken::generate().expect("OS RNG");
    let frame = HandshakeFrame::new(&token);
    let mut bad = *frame.as_bytes();
    bad[20] ^= 1;
    let mut g = c.benchmark_group("handshake");
    g.bench_function("parse_and_verify_ok", |b| {
        b.iter(|| {
            let mut parser = HandshakeParser::new();
            let (_, p) = parser.feed(black_box(&frame[..]));
            assert_eq!(p, Ok(Progress::Complete));
            black_box(parser.verify(&token)).unwrap()
        })
    });
    g.bench_function("parse_and_verify_bad_token", |b| {
        b.iter(|| {
            let mut parser = HandshakeParser::new();
            let _ = parser.feed(black_box(&bad[..]));
            black_box(parser.verify(&token)).unwrap_err()
        })
    });
    g.bench_function("encode", |b| {
        b.iter(|| black_box(HandshakeFrame::new(black_box(&token))))
    });
    g.finish();
}

criterion_group!(benches, frames, handshake);
criterion_main!(benches);
