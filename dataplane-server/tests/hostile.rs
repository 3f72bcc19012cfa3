//! Bad input against a real server on 127.0.0.1: wrong token, another volume's name on an
//! authenticated connection, truncated / oversized / garbage frames, LBAs past the end — each
//! gets a clear error and its connection closes, while a well-behaved client is served; bad
//! pin, delete, retention, snapshot-id and heat map values are refused and change nothing.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use deltavol_dataplane::{Client, ClientErrorKind};
use deltavol_schemas::flatbuffers::FlatBufferBuilder;
use deltavol_schemas::wire::{self, ErrorCode};

const BS: usize = 4096;
const BLOCKS: u64 = 256;
const SIZE: u64 = BLOCKS * BS as u64;

#[test]
fn wrong_token_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let err = Client::connect(server.local_addr(), b"not-the-token", "vol", timeouts())
        .expect_err("refused");
    assert_eq!(
        err.kind(),
        ClientErrorKind::Server(ErrorCode::Unauthorized),
        "{err}"
    );
    assert!(err.to_string().contains("authentication failed"), "{err}");
    // A bad volume name is refused too.
    let (mut s, reply) = raw_auth(server.local_addr(), TOKEN, "../etc");
    let (_, code, _) = reply.expect("a reply");
    assert_eq!(code, Some(ErrorCode::Unauthorized));
    assert!(closed(&mut s));
    server.shutdown();
}

#[test]
fn another_volume_cannot_be_named_after_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let (mut s, reply) = raw_auth(server.local_addr(), TOKEN, "vol-one");
    assert_eq!(reply.expect("auth ok").0, wire::Message::AuthOk);
    // A second Auth naming another volume on the same connection.
    let mut fbb = FlatBufferBuilder::new();
    let v = fbb.create_string("vol-two");
    let m = fbb.create_vector(&[0u8; 32]);
    let body = wire::Auth::create(
        &mut fbb,
        &wire::AuthArgs {
            volume: Some(v),
            mac: Some(m),
            generation: 0,
            volume_id: None,
            ..Default::default()
        },
    );
    let f = frame(&mut fbb, wire::Message::Auth, body.as_union_value(), &[]);
    s.write_all(&f).expect("send");
    let (ty, code, msg) = read_reply(&mut s).expect("error reply");
    assert_eq!(
        (ty, code),
        (wire::Message::Error, Some(ErrorCode::Protocol)),
        "{msg}"
    );
    assert!(closed(&mut s));
    server.shutdown();
}

fn good_client_loop(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> u64 {
    let mut c = connect(addr, "good");
    c.create_volume(SIZE, BS as u32).expect("create");
    let mut rng = Rng::new(77);
    let mut model = vec![0u8; SIZE as usize];
    let mut snap = 0;
    while !stop.load(Ordering::Relaxed) || snap < 3 {
        let changes = random_changes(&mut rng, BLOCKS, BS, 8);
        upload(&mut c, snap + 1, snap, SIZE, BS, &changes);
        snap += 1;
        apply(&mut model, BS, &changes);
        check_snapshot(&mut c, snap, &model, BS, &mut rng);
    }
    snap
}

#[test]
fn bad_frames_get_errors_while_a_good_client_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || good_client_loop(addr, stop))
    };
    let mut setup = connect(addr, "bad");
    setup.create_volume(SIZE, BS as u32).expect("create");
    drop(setup);

    // Oversized header length: refused before reading it.
    let (mut s, _) = raw_auth(addr, TOKEN, "bad");
    s.write_all(&(1u32 << 24).to_le_bytes()).expect("send");
    let (_, code, msg) = read_reply(&mut s).expect("error reply");
    assert_eq!(code, Some(ErrorCode::TooLarge), "{msg}");
    assert!(closed(&mut s));

    // Oversized payload announced by an otherwise valid header.
    {
        let (mut s, _) = raw_auth(addr, TOKEN, "bad");
        let mut fbb = FlatBufferBuilder::new();
        let body = wire::Commit::create(
            &mut fbb,
            &wire::CommitArgs {
                snap_id: 1,
                extent_count: 0,
                total_bytes: 0,
            },
        );
        let mut f = frame(&mut fbb, wire::Message::Commit, body.as_union_value(), &[]);
        // Patch payload_len in place is fragile; build the frame by hand instead.
        let root = wire::Frame::create(
            &mut fbb,
            &wire::FrameArgs {
                body_type: wire::Message::Commit,
                body: None,
                payload_len: 2 << 20,
            },
        );
        wire::finish_frame_buffer(&mut fbb, root);
        let h = fbb.finished_data().to_vec();
        f.clear();
        f.extend_from_slice(&(h.len() as u32).to_le_bytes());
        f.extend_from_slice(&h);
        s.write_all(&f).expect("send");
        let (_, code, msg) = read_reply(&mut s).expect("error reply");
        assert!(
            matches!(code, Some(ErrorCode::TooLarge) | Some(ErrorCode::Malformed)),
            "{code:?} {msg}"
        );
        assert!(closed(&mut s));
    }

    // Garbage flatbuffer.
    let (mut s, _) = raw_auth(addr, TOKEN, "bad");
    let mut junk = 64u32.to_le_bytes().to_vec();
    junk.extend((0..64u8).map(|i| i.wrapping_mul(37)));
    s.write_all(&junk).expect("send");
    let (_, code, msg) = read_reply(&mut s).expect("error reply");
    assert_eq!(code, Some(ErrorCode::Malformed), "{msg}");
    assert!(closed(&mut s));

    // Truncated frame: the prefix promises more than arrives before the peer half-closes.
    let (mut s, _) = raw_auth(addr, TOKEN, "bad");
    let mut part = 200u32.to_le_bytes().to_vec();
    part.extend_from_slice(&[1u8; 20]);
    s.write_all(&part).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("half close");
    let (_, code, msg) = read_reply(&mut s).expect("error reply");
    assert_eq!(code, Some(ErrorCode::Malformed), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");

    // Garbage before authentication.
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&[0xff; 40]).expect("send");
    let (_, code, _) = read_reply(&mut s).expect("error reply");
    assert!(code.is_some());
    assert!(closed(&mut s));

    // LBA past the end of the volume in an upload: refused, connection closed, nothing visible.
    {
        let mut c = connect(addr, "bad");
        c.begin_snapshot(1, 0, SIZE).expect("begin");
        c.put_extent(BLOCKS - 1, 2, &vec![7u8; 2 * BS])
            .expect("batched locally");
        let err = c.commit().expect_err("refused");
        assert_eq!(err.server_code(), Some(ErrorCode::OutOfRange), "{err}");
        assert!(err.to_string().contains("past the end"), "{err}");
        let mut c = connect(addr, "bad");
        assert!(c.list_snapshots().expect("list").is_empty());
    }

    // A bad crc32c in an upload.
    {
        let (mut s, _) = raw_auth(addr, TOKEN, "bad");
        let mut fbb = FlatBufferBuilder::new();
        let body = wire::BeginSnapshot::create(
            &mut fbb,
            &wire::BeginSnapshotArgs {
                snap_id: 1,
                parent_id: 0,
                volume_size: SIZE,
                generation: 0,
                cut_time_ms: 0,
            },
        );
        let f = frame(
            &mut fbb,
            wire::Message::BeginSnapshot,
            body.as_union_value(),
            &[],
        );
        s.write_all(&f).expect("send");
        assert_eq!(
            read_reply(&mut s).expect("begin ok").0,
            wire::Message::BeginOk
        );
        let data = vec![1u8; BS];
        let ex = fbb.create_vector(&[wire::Extent::new(0, 1, 0xdead_beef, wire::ExtentKind::Data)]);
        let body = wire::PutExtents::create(
            &mut fbb,
            &wire::PutExtentsArgs {
                snap_id: 1,
                extents: Some(ex),
            },
        );
        let f = frame(
            &mut fbb,
            wire::Message::PutExtents,
            body.as_union_value(),
            &data,
        );
        s.write_all(&f).expect("send");
        let (_, code, msg) = read_reply(&mut s).expect("error reply");
        assert_eq!(code, Some(ErrorCode::Checksum), "{msg}");
        assert!(closed(&mut s));
    }

    stop.store(true, Ordering::Relaxed);
    let snaps = good.join().expect("good client never failed");
    assert!(snaps >= 3);
    server.shutdown();
}

/// Sends one request frame on `s` and returns the reply's error code (None: a success).
fn ask(
    s: &mut std::net::TcpStream,
    ty: wire::Message,
    build: impl FnOnce(
        &mut FlatBufferBuilder<'static>,
    ) -> deltavol_schemas::flatbuffers::WIPOffset<
        deltavol_schemas::flatbuffers::UnionWIPOffset,
    >,
) -> (Option<ErrorCode>, String) {
    let mut fbb = FlatBufferBuilder::new();
    let body = build(&mut fbb);
    let f = frame(&mut fbb, ty, body, &[]);
    s.write_all(&f).expect("send");
    let (_, code, msg) = read_reply(s).expect("a reply");
    (code, msg)
}

#[test]
fn retention_pin_and_delete_requests_with_bad_values_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let addr = server.local_addr();
    let mut c = connect(addr, "rv");
    c.create_volume(SIZE, BS as u32).expect("create");
    let mut rng = Rng::new(77);
    let mut models = Vec::new();
    let mut model = vec![0u8; SIZE as usize];
    for snap in 1..=3u64 {
        let ch = random_changes(&mut rng, BLOCKS, BS, 4);
        upload(&mut c, snap, snap - 1, SIZE, BS, &ch);
        apply(&mut model, BS, &ch);
        models.push(model.clone());
    }
    let before = c.list_snapshots().expect("list");

    let pin = |s: &mut std::net::TcpStream, snap_id: u64, label: &str| {
        let label = label.to_string();
        ask(s, wire::Message::PinSnapshot, move |fbb| {
            let l = fbb.create_string(&label);
            wire::PinSnapshot::create(
                fbb,
                &wire::PinSnapshotArgs {
                    snap_id,
                    pinned: true,
                    label: Some(l),
                },
            )
            .as_union_value()
        })
    };
    let delete = |s: &mut std::net::TcpStream, snap_id: u64| {
        ask(s, wire::Message::DeleteSnapshot, move |fbb| {
            wire::DeleteSnapshot::create(fbb, &wire::DeleteSnapshotArgs { snap_id })
                .as_union_value()
        })
    };
    let long = "x".repeat(10_000);
    for (what, snap_id, label, want) in [
        (
            "a label past the cap",
            1,
            long.as_str(),
            ErrorCode::Malformed,
        ),
        ("a label with a newline", 1, "a\nb", ErrorCode::Malformed),
        ("an unknown snapshot", 99, "", ErrorCode::NoSuchSnapshot),
        (
            "an id with the high bit",
            1 << 63,
            "",
            ErrorCode::NoSuchSnapshot,
        ),
    ] {
        let (mut s, _) = raw_auth(addr, TOKEN, "rv");
        let (code, msg) = pin(&mut s, snap_id, label);
        assert_eq!(code, Some(want), "pin with {what}: {msg}");
    }
    for (what, snap_id, want) in [
        ("the head", 3, ErrorCode::DeleteHead),
        ("an unknown snapshot", 42, ErrorCode::NoSuchSnapshot),
        (
            "an id with the high bit",
            1 << 63 | 1,
            ErrorCode::NoSuchSnapshot,
        ),
        ("id 0", 0, ErrorCode::NoSuchSnapshot),
    ] {
        let (mut s, _) = raw_auth(addr, TOKEN, "rv");
        let (code, msg) = delete(&mut s, snap_id);
        assert_eq!(code, Some(want), "delete of {what}: {msg}");
    }
    // A snapshot id in compaction's id space is refused at the start of an upload.
    {
        let (mut s, _) = raw_auth(addr, TOKEN, "rv");
        let (code, msg) = ask(&mut s, wire::Message::BeginSnapshot, |fbb| {
            wire::BeginSnapshot::create(
                fbb,
                &wire::BeginSnapshotArgs {
                    snap_id: 1 << 63,
                    parent_id: 3,
                    volume_size: SIZE,
                    generation: 0,
                    cut_time_ms: 0,
                },
            )
            .as_union_value()
        });
        assert_eq!(code, Some(ErrorCode::BadSnapshotId), "{msg}");
    }
    // A SetRetention without its policy table keeps everything (the same as `none`); extreme
    // counts are a policy like any other.
    {
        let (mut s, _) = raw_auth(addr, TOKEN, "rv");
        let (code, msg) = ask(&mut s, wire::Message::SetRetention, |fbb| {
            wire::SetRetention::create(fbb, &wire::SetRetentionArgs { policy: None })
                .as_union_value()
        });
        assert_eq!(code, None, "{msg}");
        let (code, msg) = ask(&mut s, wire::Message::SetRetention, |fbb| {
            let r = wire::Retention::create(
                fbb,
                &wire::RetentionArgs {
                    last: u32::MAX,
                    hourly: u32::MAX,
                    daily: u32::MAX,
                    weekly: u32::MAX,
                    monthly: u32::MAX,
                },
            );
            wire::SetRetention::create(fbb, &wire::SetRetentionArgs { policy: Some(r) })
                .as_union_value()
        });
        assert_eq!(code, None, "{msg}");
    }
    // Nothing changed: the same snapshots, none pinned, each reading as before.
    let mut c = connect(addr, "rv");
    let after = c.list_snapshots().expect("list");
    assert_eq!(
        after
            .iter()
            .map(|s| (s.snap_id, s.pinned))
            .collect::<Vec<_>>(),
        before
            .iter()
            .map(|s| (s.snap_id, s.pinned))
            .collect::<Vec<_>>()
    );
    for (i, m) in models.iter().enumerate() {
        check_snapshot(&mut c, i as u64 + 1, m, BS, &mut rng);
    }
}

/// Sends one `PutHeat` piece on `s` and returns the reply: (message type, error code, message).
fn heat_piece(
    s: &mut std::net::TcpStream,
    region_blocks: u32,
    total_bytes: u32,
    offset: u32,
    payload: &[u8],
) -> (wire::Message, Option<ErrorCode>, String) {
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::PutHeat::create(
        &mut fbb,
        &wire::PutHeatArgs {
            region_blocks,
            total_bytes,
            offset,
        },
    );
    let f = frame(
        &mut fbb,
        wire::Message::PutHeat,
        body.as_union_value(),
        payload,
    );
    s.write_all(&f).expect("send");
    read_reply(s).expect("a reply")
}

#[test]
fn heat_maps_with_bad_values_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 2);
    let addr = server.local_addr();
    let mut c = connect(addr, "hv");
    c.create_volume(SIZE, BS as u32).expect("create");
    // 256 blocks in regions of 16: 16 entries.
    let (mut s, _) = raw_auth(addr, TOKEN, "hv");
    let e = ErrorCode::Malformed;
    for (what, region, total, offset, len, want) in [
        ("region_blocks 0", 0, 16, 0, 16, e),
        ("region_blocks 3", 3, 86, 0, 86, e),
        ("region_blocks u32::MAX", u32::MAX, 1, 0, 1, e),
        ("a total one short", 16, 15, 0, 15, e),
        ("a total one long", 16, 17, 0, 17, e),
        (
            "a total over the cap",
            16,
            u32::MAX,
            0,
            16,
            ErrorCode::TooLarge,
        ),
        ("a piece past its total", 16, 16, 0, 17, e),
        ("a piece without its start", 16, 16, 8, 8, e),
        ("an offset at u32::MAX", 16, 16, u32::MAX, 8, e),
        ("an empty map", 16, 0, 0, 0, e),
    ] {
        let (_, code, msg) = heat_piece(&mut s, region, total, offset, &vec![0xab; len]);
        assert_eq!(code, Some(want), "{what}: {msg}");
        assert!(msg.contains("heat map"), "{what}: {msg}");
    }
    // A first piece is taken; then an overlapping one, and after that refusal even the piece
    // that would have followed, is refused: the map is dropped, nothing stored.
    let (ty, code, msg) = heat_piece(&mut s, 16, 16, 0, &[1; 8]);
    assert_eq!((ty, code), (wire::Message::HeatStored, None), "{msg}");
    let (_, code, msg) = heat_piece(&mut s, 16, 16, 4, &[2; 8]);
    assert_eq!(code, Some(e), "overlap: {msg}");
    let (_, code, msg) = heat_piece(&mut s, 16, 16, 8, &[3; 8]);
    assert_eq!(code, Some(e), "after a refusal: {msg}");
    // Another region size in the middle of a map, and an empty piece before its end.
    heat_piece(&mut s, 16, 16, 0, &[1; 8]);
    let (_, code, msg) = heat_piece(&mut s, 32, 8, 8, &[]);
    assert_eq!(code, Some(e), "another map's piece: {msg}");
    heat_piece(&mut s, 16, 16, 0, &[1; 8]);
    let (_, code, msg) = heat_piece(&mut s, 16, 16, 8, &[]);
    assert_eq!(code, Some(e), "an empty piece: {msg}");
    assert_eq!(c.get_heat().expect("get"), None, "nothing stored");

    // A stored map stays as it was through refusals.
    let good: Vec<u8> = (0..16u8).collect();
    c.put_heat(16, &good).expect("put");
    let (_, code, _) = heat_piece(&mut s, 16, 16, 0, &[9; 15]);
    assert_eq!(code, None, "a first piece");
    let (_, code, _) = heat_piece(&mut s, 16, 16, 15, &[9; 2]);
    assert_eq!(code, Some(e), "past the end");
    assert_eq!(c.get_heat().expect("get"), Some((16, good.clone())));

    // A payload on GetHeat is a protocol violation: the connection closes.
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::GetHeat::create(&mut fbb, &wire::GetHeatArgs { reserved: 0 });
    let f = frame(
        &mut fbb,
        wire::Message::GetHeat,
        body.as_union_value(),
        &[1, 2, 3],
    );
    s.write_all(&f).expect("send");
    let (_, code, msg) = read_reply(&mut s).expect("a reply");
    assert_eq!(code, Some(ErrorCode::Protocol), "{msg}");
    assert!(closed(&mut s));

    // A piece over the frame payload cap is refused before its payload is read: the header
    // alone announces it, the connection closes.
    let (mut s, _) = raw_auth(addr, TOKEN, "hv");
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::PutHeat::create(
        &mut fbb,
        &wire::PutHeatArgs {
            region_blocks: 16,
            total_bytes: 16,
            offset: 0,
        },
    );
    let root = wire::Frame::create(
        &mut fbb,
        &wire::FrameArgs {
            body_type: wire::Message::PutHeat,
            body: Some(body.as_union_value()),
            payload_len: (deltavol_schemas::FRAME_PAYLOAD_MAX_BYTES + 1) as u32,
        },
    );
    wire::finish_frame_buffer(&mut fbb, root);
    let h = fbb.finished_data();
    let mut f = (h.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(h);
    s.write_all(&f).expect("send");
    let (_, code, msg) = read_reply(&mut s).expect("a reply");
    assert_eq!(code, Some(ErrorCode::TooLarge), "{msg}");
    assert!(closed(&mut s));

    // On a volume that does not exist: refused, and nothing appears.
    let (mut s, _) = raw_auth(addr, TOKEN, "no-such-volume");
    let (_, code, msg) = heat_piece(&mut s, 1, 1, 0, &[1]);
    assert_eq!(code, Some(ErrorCode::NoSuchVolume), "{msg}");
    let (code, msg) = ask(&mut s, wire::Message::GetHeat, |fbb| {
        wire::GetHeat::create(fbb, &wire::GetHeatArgs { reserved: 0 }).as_union_value()
    });
    assert_eq!(code, Some(ErrorCode::NoSuchVolume), "{msg}");
    assert!(dir.path().join("volumes/hv").is_dir());
    assert!(!dir.path().join("volumes/no-such-volume").exists());
    assert_eq!(c.get_heat().expect("get"), Some((16, good)));
    server.shutdown();
}
