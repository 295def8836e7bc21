//! criterion micro-benchmarks of the hot paths under the daemon:
//! frame encode and decode of a small message (Ping, Pong) and of a 64 KiB
//! publish, and handshake parsing + verification.
//!
//! `cargo bench --bench micro`; CI: `cargo bench --bench micro -- --quick
//! --warm-up-time 0.2 --measurement-time 0.5`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keyhole::codec::{
    FrameCodec, decode_request, decode_request_shared, decode_server_message, encode_message,
};
use keyhole::handshake::{HandshakeParser, Progress, encode_handshake};
use keyhole::limits::MAX_FRAME_LEN;
use keyhole::message::{Request, RequestBody, ServerMessage};
use keyhole::token::SessionToken;

fn publish(len: usize) -> Request {
    Request {
        id: 42,
        body: RequestBody::Publish {
            topic: "bench.topic".into(),
            payload: Bytes::from(vec![0x5a; len]),
        },
    }
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let ping = Request {
        id: 42,
        body: RequestBody::Ping,
    };
    let pong = ServerMessage::Pong { id: 42 };
    for (name, len) in [("small", 64usize), ("64KiB", 64 * 1024)] {
        let msg = publish(len);
        let mut wire = BytesMut::new();
        encode_message(&msg, &mut wire, MAX_FRAME_LEN).unwrap();
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(BenchmarkId::new("encode_publish", name), |b| {
            let mut buf = BytesMut::with_capacity(wire.len() * 2);
            b.iter(|| {
                buf.clear();
                encode_message(black_box(&msg), &mut buf, MAX_FRAME_LEN).unwrap();
                black_box(buf.len())
            })
        });
        g.bench_function(BenchmarkId::new("decode_publish", name), |b| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| {
                    let mut codec = FrameCodec::default();
                    let len = codec.next_payload_len(buf).unwrap().unwrap();
                    black_box(decode_request(black_box(&buf[..len])).unwrap())
                },
                BatchSize::SmallInput,
            )
        });
        // What the daemon does with a large publish: the payload is a
        // slice of the read buffer, not a copy.
        g.bench_function(BenchmarkId::new("decode_publish_shared", name), |b| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| {
                    let mut codec = FrameCodec::default();
                    let len = codec.next_payload_len(buf).unwrap().unwrap();
                    let frame = buf.split_to(len).freeze();
                    black_box(decode_request_shared(black_box(&frame)).unwrap())
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
            encode_message(black_box(&ping), &mut buf, MAX_FRAME_LEN).unwrap();
            black_box(buf.len())
        })
    });
    let mut ping_wire = BytesMut::new();
    encode_message(&ping, &mut ping_wire, MAX_FRAME_LEN).unwrap();
    g.bench_function("decode_ping", |b| {
        b.iter_batched_ref(
            || ping_wire.clone(),
            |buf| {
                let mut codec = FrameCodec::default();
                let len = codec.next_payload_len(buf).unwrap().unwrap();
                black_box(decode_request(black_box(&buf[..len])).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("encode_pong", |b| {
        let mut buf = BytesMut::with_capacity(64);
        b.iter(|| {
            buf.clear();
            encode_message(black_box(&pong), &mut buf, MAX_FRAME_LEN).unwrap();
            black_box(buf.len())
        })
    });
    let mut pong_wire = BytesMut::new();
    encode_message(&pong, &mut pong_wire, MAX_FRAME_LEN).unwrap();
    g.bench_function("decode_pong", |b| {
        b.iter_batched_ref(
            || pong_wire.clone(),
            |buf| {
                let mut codec = FrameCodec::default();
                let len = codec.next_payload_len(buf).unwrap().unwrap();
                black_box(decode_server_message(black_box(&buf[..len])).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let token = SessionToken::generate().expect("OS RNG");
    let frame = encode_handshake(&token);
    let mut bad = *frame;
    bad[20] ^= 1;
    let mut g = c.benchmark_group("handshake");
    g.bench_function("parse_and_verify_ok", |b| {
        b.iter(|| {
            let mut parser = HandshakeParser::new();
            let p = parser.feed(black_box(&frame[..])).unwrap();
            assert!(matches!(p, Progress::Complete { .. }));
            black_box(parser.verify(&token)).unwrap()
        })
    });
    g.bench_function("parse_and_verify_bad_token", |b| {
        b.iter(|| {
            let mut parser = HandshakeParser::new();
            parser.feed(black_box(&bad[..])).unwrap();
            black_box(parser.verify(&token)).unwrap_err()
        })
    });
    g.bench_function("encode", |b| {
        b.iter(|| black_box(encode_handshake(black_box(&token))))
    });
    g.finish();
}

criterion_group!(benches, frames, handshake);
criterion_main!(benches);
