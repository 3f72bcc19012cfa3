//! The fuzz targets' seed corpus (`fuzz/corpus/`): valid inputs that the fuzzer mutates.
//!
//! This test checks the committed seeds: every frame seed is accepted by the frame decoder and
//! together they cover every message type of the wire protocol; every store seed is decoded by
//! the store harness (the fuzz target's own code, included by path) and together they cover
//! every store decoder. When the formats change, regenerate them with
//! `DELTAVOL_WRITE_FUZZ_SEEDS=1 cargo test -p deltavol-dataplane --test fuzz_seeds`.

// The harness names the decoders `crate::store_format` (the fuzz crate compiles format.rs
// itself); here that is the data plane's own module.
use deltavol_dataplane::store::format as store_format;

#[path = "../../fuzz/src/store.rs"]
#[allow(dead_code)]
mod store_harness;

use std::collections::BTreeSet;
use std::path::PathBuf;

use deltavol_dataplane::store::format::{
    encode_manifest, encode_segment_footer, encode_segment_header, encode_segment_trailer,
    CloneSourceData, FooterMeta, ManifestData, SegExtent, SnapEntry, KIND_DATA, KIND_ZERO,
    SEGMENT_HEADER_BYTES,
};
use deltavol_schemas::flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use deltavol_schemas::{append_frame, decode_frame, finish_header, fuzz_decode_one, wire};
use store_harness::Reached;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn frame(
    fbb: &mut FlatBufferBuilder<'static>,
    ty: wire::Message,
    body: WIPOffset<UnionWIPOffset>,
    payload: &[u8],
) -> Vec<u8> {
    let h = finish_header(fbb, ty, body, payload.len()).expect("header");
    let mut out = Vec::new();
    append_frame(&mut out, h, payload).expect("frame");
    fbb.reset();
    out
}

/// One valid frame of each message type (deterministic), named by type.
fn frame_seeds() -> Vec<(String, Vec<u8>)> {
    use wire::Message as M;
    let mut fbb = FlatBufferBuilder::new();
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut push = |name: &str, f: Vec<u8>| out.push((name.to_string(), f));

    let n = fbb.create_string("deltavol");
    let b = wire::Hello::create(
        &mut fbb,
        &wire::HelloArgs {
            protocol_version: deltavol_schemas::PROTOCOL_VERSION,
            client_name: Some(n),
        },
    );
    push("hello", frame(&mut fbb, M::Hello, b.as_union_value(), &[]));

    let nonce = fbb.create_vector(&[0x11u8; 32]);
    let b = wire::Challenge::create(
        &mut fbb,
        &wire::ChallengeArgs {
            nonce: Some(nonce),
            protocol_version: 1,
        },
    );
    push(
        "challenge",
        frame(&mut fbb, M::Challenge, b.as_union_value(), &[]),
    );

    let v = fbb.create_string("vol-1");
    let mac = fbb.create_vector(&[0x22u8; 32]);
    let id = fbb.create_vector(&[0x33u8; 16]);
    let b = wire::Auth::create(
        &mut fbb,
        &wire::AuthArgs {
            volume: Some(v),
            mac: Some(mac),
            generation: 3,
            volume_id: Some(id),
            ..Default::default()
        },
    );
    push("auth", frame(&mut fbb, M::Auth, b.as_union_value(), &[]));
    let v = fbb.create_string("vol-a");
    let cred = fbb.create_string("0123456789abcdef");
    let proof = fbb.create_vector(&[7u8; 32]);
    let b = wire::Auth::create(
        &mut fbb,
        &wire::AuthArgs {
            volume: Some(v),
            generation: 3,
            credential_id: Some(cred),
            proof: Some(proof),
            ..Default::default()
        },
    );
    push(
        "auth-credential",
        frame(&mut fbb, M::Auth, b.as_union_value(), &[]),
    );

    let info = volume_info(&mut fbb);
    let b = wire::AuthOk::create(&mut fbb, &wire::AuthOkArgs { info: Some(info) });
    push(
        "auth_ok",
        frame(&mut fbb, M::AuthOk, b.as_union_value(), &[]),
    );

    let b = wire::CreateVolume::create(
        &mut fbb,
        &wire::CreateVolumeArgs {
            size_bytes: 1 << 30,
            block_size: 4096,
        },
    );
    push(
        "create_volume",
        frame(&mut fbb, M::CreateVolume, b.as_union_value(), &[]),
    );

    let b = wire::GetVolumeInfo::create(&mut fbb, &wire::GetVolumeInfoArgs { reserved: 0 });
    push(
        "get_volume_info",
        frame(&mut fbb, M::GetVolumeInfo, b.as_union_value(), &[]),
    );

    let b = volume_info(&mut fbb);
    push(
        "volume_info",
        frame(&mut fbb, M::VolumeInfo, b.as_union_value(), &[]),
    );

    let b = wire::BeginSnapshot::create(
        &mut fbb,
        &wire::BeginSnapshotArgs {
            snap_id: 2,
            parent_id: 1,
            volume_size: 1 << 30,
            generation: 3,
            cut_time_ms: 1_699_999_990_000,
        },
    );
    push(
        "begin_snapshot",
        frame(&mut fbb, M::BeginSnapshot, b.as_union_value(), &[]),
    );

    let b = wire::BeginOk::create(&mut fbb, &wire::BeginOkArgs { snap_id: 2 });
    push(
        "begin_ok",
        frame(&mut fbb, M::BeginOk, b.as_union_value(), &[]),
    );

    let info = snapshot_info(&mut fbb, 2);
    let b =
        wire::AlreadyCommitted::create(&mut fbb, &wire::AlreadyCommittedArgs { info: Some(info) });
    push(
        "already_committed",
        frame(&mut fbb, M::AlreadyCommitted, b.as_union_value(), &[]),
    );

    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    let ex = fbb.create_vector(&[
        wire::Extent::new(0, 1, crc32c::crc32c(&data[..4096]), wire::ExtentKind::Data),
        wire::Extent::new(10, 4, 0, wire::ExtentKind::Zero),
        wire::Extent::new(20, 1, crc32c::crc32c(&data[4096..]), wire::ExtentKind::Data),
    ]);
    let b = wire::PutExtents::create(
        &mut fbb,
        &wire::PutExtentsArgs {
            snap_id: 2,
            extents: Some(ex),
        },
    );
    push(
        "put_extents",
        frame(&mut fbb, M::PutExtents, b.as_union_value(), &data),
    );

    let b = wire::Commit::create(
        &mut fbb,
        &wire::CommitArgs {
            snap_id: 2,
            extent_count: 3,
            total_bytes: 8192,
        },
    );
    push(
        "commit",
        frame(&mut fbb, M::Commit, b.as_union_value(), &[]),
    );

    let info = snapshot_info(&mut fbb, 2);
    let b = wire::Committed::create(&mut fbb, &wire::CommittedArgs { info: Some(info) });
    push(
        "committed",
        frame(&mut fbb, M::Committed, b.as_union_value(), &[]),
    );

    let b = wire::ListSnapshots::create(
        &mut fbb,
        &wire::ListSnapshotsArgs {
            after_snap_id: 0,
            max_count: 10,
        },
    );
    push(
        "list_snapshots",
        frame(&mut fbb, M::ListSnapshots, b.as_union_value(), &[]),
    );

    let infos: Vec<_> = (1..=3).map(|i| snapshot_info(&mut fbb, i)).collect();
    let snaps = fbb.create_vector(&infos);
    let b = wire::SnapshotList::create(
        &mut fbb,
        &wire::SnapshotListArgs {
            snapshots: Some(snaps),
            more: true,
        },
    );
    push(
        "snapshot_list",
        frame(&mut fbb, M::SnapshotList, b.as_union_value(), &[]),
    );

    let b = wire::ReadExtents::create(
        &mut fbb,
        &wire::ReadExtentsArgs {
            snap_id: 2,
            lba: 0,
            nblocks: 64,
        },
    );
    push(
        "read_extents",
        frame(&mut fbb, M::ReadExtents, b.as_union_value(), &[]),
    );

    let ex = fbb.create_vector(&[
        wire::Extent::new(0, 1, crc32c::crc32c(&data[..4096]), wire::ExtentKind::Data),
        wire::Extent::new(1, 63, 0, wire::ExtentKind::Zero),
    ]);
    let b = wire::ReadData::create(
        &mut fbb,
        &wire::ReadDataArgs {
            snap_id: 2,
            extents: Some(ex),
            last: true,
        },
    );
    push(
        "read_data",
        frame(&mut fbb, M::ReadData, b.as_union_value(), &data[..4096]),
    );

    let b = wire::DeleteSnapshot::create(&mut fbb, &wire::DeleteSnapshotArgs { snap_id: 1 });
    push(
        "delete_snapshot",
        frame(&mut fbb, M::DeleteSnapshot, b.as_union_value(), &[]),
    );

    let b = wire::Deleted::create(
        &mut fbb,
        &wire::DeletedArgs {
            snap_id: 1,
            merged_into: 2,
        },
    );
    push(
        "deleted",
        frame(&mut fbb, M::Deleted, b.as_union_value(), &[]),
    );

    let m = fbb.create_string("snapshot 9 does not exist");
    let b = wire::Error::create(
        &mut fbb,
        &wire::ErrorArgs {
            code: wire::ErrorCode::NoSuchSnapshot,
            message: Some(m),
        },
    );
    push("error", frame(&mut fbb, M::Error, b.as_union_value(), &[]));

    let b = wire::NewGeneration::create(&mut fbb, &wire::NewGenerationArgs { reserved: 0 });
    push(
        "new_generation",
        frame(&mut fbb, M::NewGeneration, b.as_union_value(), &[]),
    );

    let s = fbb.create_string("vol-src");
    let b = wire::CloneVolume::create(
        &mut fbb,
        &wire::CloneVolumeArgs {
            source_volume: Some(s),
            source_snap_id: 4,
        },
    );
    push(
        "clone_volume",
        frame(&mut fbb, M::CloneVolume, b.as_union_value(), &[]),
    );

    let id = fbb.create_vector(&[0x33u8; 16]);
    let b = wire::DeleteVolume::create(
        &mut fbb,
        &wire::DeleteVolumeArgs {
            volume_id: Some(id),
        },
    );
    push(
        "delete_volume",
        frame(&mut fbb, M::DeleteVolume, b.as_union_value(), &[]),
    );

    let b = wire::ReadChecksums::create(
        &mut fbb,
        &wire::ReadChecksumsArgs {
            snap_id: 2,
            lba: 16,
            nblocks: 64,
        },
    );
    push(
        "read_checksums",
        frame(&mut fbb, M::ReadChecksums, b.as_union_value(), &[]),
    );

    let crcs = fbb.create_vector(&[0xdead_beefu32, 0, 7, 0x1234_5678]);
    let b = wire::Checksums::create(
        &mut fbb,
        &wire::ChecksumsArgs {
            snap_id: 2,
            lba: 16,
            crcs: Some(crcs),
        },
    );
    push(
        "checksums",
        frame(&mut fbb, M::Checksums, b.as_union_value(), &[]),
    );

    let policy = wire::Retention::create(
        &mut fbb,
        &wire::RetentionArgs {
            last: 50,
            hourly: 24,
            daily: 7,
            weekly: 0,
            monthly: 0,
        },
    );
    let b = wire::SetRetention::create(
        &mut fbb,
        &wire::SetRetentionArgs {
            policy: Some(policy),
        },
    );
    push(
        "set_retention",
        frame(&mut fbb, M::SetRetention, b.as_union_value(), &[]),
    );

    let label = fbb.create_string("before-upgrade");
    let b = wire::PinSnapshot::create(
        &mut fbb,
        &wire::PinSnapshotArgs {
            snap_id: 2,
            pinned: true,
            label: Some(label),
        },
    );
    push(
        "pin_snapshot",
        frame(&mut fbb, M::PinSnapshot, b.as_union_value(), &[]),
    );

    let info = snapshot_info(&mut fbb, 3);
    let b = wire::Pinned::create(&mut fbb, &wire::PinnedArgs { info: Some(info) });
    push(
        "pinned",
        frame(&mut fbb, M::Pinned, b.as_union_value(), &[]),
    );

    let b = wire::Prune::create(&mut fbb, &wire::PruneArgs { dry_run: true });
    push("prune", frame(&mut fbb, M::Prune, b.as_union_value(), &[]));

    let deleted = fbb.create_vector(&[1u64, 2, 4]);
    let kept = fbb.create_vector(&[3u64, 5]);
    let why: Vec<_> = ["pinned", "head,last"]
        .iter()
        .map(|w| fbb.create_string(w))
        .collect();
    let kept_for = fbb.create_vector(&why);
    let b = wire::Pruned::create(
        &mut fbb,
        &wire::PrunedArgs {
            deleted: Some(deleted),
            kept: Some(kept),
            kept_for: Some(kept_for),
            dry_run: false,
        },
    );
    push(
        "pruned",
        frame(&mut fbb, M::Pruned, b.as_union_value(), &[]),
    );

    let heat: Vec<u8> = (0..64u32).map(|i| (i * 37) as u8).collect();
    let b = wire::PutHeat::create(
        &mut fbb,
        &wire::PutHeatArgs {
            region_blocks: 16,
            total_bytes: 64,
            offset: 0,
        },
    );
    push(
        "put_heat",
        frame(&mut fbb, M::PutHeat, b.as_union_value(), &heat),
    );
    let b = wire::HeatStored::create(
        &mut fbb,
        &wire::HeatStoredArgs {
            received_bytes: 64,
            stored: true,
        },
    );
    push(
        "heat_stored",
        frame(&mut fbb, M::HeatStored, b.as_union_value(), &[]),
    );
    let b = wire::GetHeat::create(&mut fbb, &wire::GetHeatArgs { reserved: 0 });
    push(
        "get_heat",
        frame(&mut fbb, M::GetHeat, b.as_union_value(), &[]),
    );
    let b = wire::Heat::create(
        &mut fbb,
        &wire::HeatArgs {
            region_blocks: 16,
            present: true,
            total_bytes: 64,
            offset: 0,
            last: true,
        },
    );
    push("heat", frame(&mut fbb, M::Heat, b.as_union_value(), &heat));

    // A connection's worth: hello, auth, begin, put, commit, read, in one stream.
    let stream: Vec<u8> = [
        "hello",
        "auth",
        "begin_snapshot",
        "put_extents",
        "commit",
        "read_extents",
    ]
    .iter()
    .flat_map(|n| out.iter().find(|(k, _)| k == n).expect("seed").1.clone())
    .collect();
    out.push(("stream".to_string(), stream));
    out
}

fn volume_info(fbb: &mut FlatBufferBuilder<'static>) -> WIPOffset<wire::VolumeInfo<'static>> {
    let name = fbb.create_string("vol-1");
    let src = fbb.create_string("vol-src");
    let id = fbb.create_vector(&[0x33u8; 16]);
    let retention = wire::Retention::create(
        fbb,
        &wire::RetentionArgs {
            last: 50,
            hourly: 24,
            daily: 7,
            weekly: 4,
            monthly: 12,
        },
    );
    wire::VolumeInfo::create(
        fbb,
        &wire::VolumeInfoArgs {
            name: Some(name),
            exists: true,
            size_bytes: 1 << 30,
            block_size: 4096,
            latest_snap_id: 2,
            generation: 3,
            snapshot_count: 2,
            clone_source_volume: Some(src),
            clone_source_snap_id: 4,
            volume_id: Some(id),
            latest_commit_ms: 1_700_000_000_000,
            created_ms: 1_600_000_000_000,
            latest_cut_ms: 1_699_999_990_000,
            retention: Some(retention),
        },
    )
}

fn snapshot_info(
    fbb: &mut FlatBufferBuilder<'static>,
    snap_id: u64,
) -> WIPOffset<wire::SnapshotInfo<'static>> {
    let label = (snap_id % 2 == 1).then(|| fbb.create_string("before-upgrade"));
    wire::SnapshotInfo::create(
        fbb,
        &wire::SnapshotInfoArgs {
            snap_id,
            parent_id: snap_id - 1,
            commit_time_ms: 1_700_000_000_000,
            bytes: 8192,
            extent_count: 3,
            volume_size: 1 << 30,
            generation: 3,
            cut_time_ms: 1_699_999_990_000,
            pinned: snap_id % 2 == 1,
            label,
            own_bytes: 4096,
            shared_bytes: 4096,
        },
    )
}

/// Valid inputs of the store harness, one or more per mode (deterministic).
fn store_seeds() -> Vec<(String, Vec<u8>)> {
    let vid: [u8; 16] = *b"0123456789abcdef";
    let snaps = vec![
        SnapEntry {
            snap_id: 1,
            parent_id: 0,
            commit_time_ms: 1_700_000_000_000,
            bytes: 8192,
            extent_count: 2,
            volume_size: 1 << 20,
            generation: 1,
            segments: vec![1],
            cut_time_ms: 1_699_999_990_000,
            pinned: true,
            label: "before-upgrade".into(),
        },
        SnapEntry {
            snap_id: 2,
            parent_id: 1,
            commit_time_ms: 1_700_000_001_000,
            bytes: 4096,
            extent_count: 1,
            volume_size: 1 << 20,
            generation: 1,
            segments: vec![2, 3],
            cut_time_ms: 0,
            pinned: false,
            label: String::new(),
        },
    ];
    let plain = ManifestData {
        volume_name: "vol-1".into(),
        volume_id: vid,
        sequence: 7,
        size_bytes: 1 << 20,
        block_size: 4096,
        generation: 1,
        created_ms: 1_700_000_000_000,
        snapshots: snaps.clone(),
        clone_source: None,
        retention: store_format::RetentionCounts {
            last: 50,
            hourly: 24,
            daily: 7,
            weekly: 4,
            monthly: 0,
        },
    };
    let clone = ManifestData {
        volume_name: "vol-clone".into(),
        clone_source: Some(CloneSourceData {
            volume: "vol-1".into(),
            volume_id: *b"fedcba9876543210",
            snap_id: 2,
        }),
        snapshots: vec![snaps[0].clone()],
        ..plain.clone()
    };
    let extents = [
        SegExtent {
            lba: 0,
            nblocks: 2,
            kind: KIND_DATA,
            crc32c: 0x1234_5678,
            offset: SEGMENT_HEADER_BYTES as u64 + 32,
        },
        SegExtent {
            lba: 100,
            nblocks: 8,
            kind: KIND_ZERO,
            crc32c: 0,
            offset: 0,
        },
    ];
    let meta = FooterMeta {
        snap_id: 2,
        parent_id: 1,
        block_size: 4096,
        volume_size: 1 << 20,
        generation: 1,
        data_bytes: 8192,
    };
    let footer = encode_segment_footer(&vid, &meta, &extents);
    let footer_offset = SEGMENT_HEADER_BYTES as u64 + 32 + 8192;
    let with_mode = |mode: u8, parts: &[&[u8]]| {
        let mut v = vec![mode];
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let trailer = encode_segment_trailer(footer_offset, &footer);
    let file_len = footer_offset + footer.len() as u64 + trailer.len() as u64;
    vec![
        ("manifest".into(), with_mode(0, &[&encode_manifest(&plain)])),
        (
            "manifest_clone".into(),
            with_mode(0, &[&encode_manifest(&clone)]),
        ),
        (
            "footer".into(),
            with_mode(1, &[&footer_offset.to_le_bytes(), &footer]),
        ),
        (
            "segment_header".into(),
            with_mode(2, &[&encode_segment_header(&vid, 2, 4096)]),
        ),
        (
            "trailer".into(),
            with_mode(3, &[&file_len.to_le_bytes(), &trailer]),
        ),
    ]
}

fn write_or_read(target: &str, seeds: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    if std::env::var_os("DELTAVOL_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).expect("write seed");
        }
    }
    let mut out = Vec::new();
    let rd = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate the seeds with DELTAVOL_WRITE_FUZZ_SEEDS=1",
            dir.display()
        )
    });
    for ent in rd {
        let ent = ent.expect("dir entry");
        let name = ent.file_name().to_string_lossy().into_owned();
        out.push((name, std::fs::read(ent.path()).expect("read seed")));
    }
    out.sort();
    out
}

#[test]
fn frame_seeds_decode_and_cover_every_message() {
    let committed = write_or_read("frame_decode", &frame_seeds());
    let mut seen = BTreeSet::new();
    for (name, bytes) in &committed {
        let n = fuzz_decode_one(bytes);
        assert!(n >= 1, "seed {name} is refused by the frame decoder");
        // Walk the stream to see which message types it holds.
        let mut rest = &bytes[..];
        while let Ok(f) = decode_frame(rest) {
            seen.insert(f.header.body_type().0);
            rest = &rest[f.frame_bytes..];
        }
        assert!(rest.is_empty(), "seed {name} has trailing bytes");
    }
    let all: BTreeSet<u8> = wire::Message::ENUM_VALUES
        .iter()
        .filter(|m| **m != wire::Message::NONE)
        .map(|m| m.0)
        .collect();
    let missing: Vec<_> = all
        .difference(&seen)
        .map(|t| wire::Message(*t).variant_name().unwrap_or("?"))
        .collect();
    assert!(
        missing.is_empty(),
        "no seed for message type(s) {missing:?}: add them to frame_seeds() and regenerate"
    );
    println!(
        "{} frame seeds cover {} message types",
        committed.len(),
        seen.len()
    );
}

#[test]
fn store_seeds_decode_and_cover_every_decoder() {
    let committed = write_or_read("store_decode", &store_seeds());
    let mut modes = BTreeSet::new();
    for (name, bytes) in &committed {
        assert_eq!(
            store_harness::run(bytes),
            Reached::Decoded,
            "seed {name} is refused by the store decoders"
        );
        modes.insert(bytes[0] % 4);
    }
    assert_eq!(modes.len(), 4, "a store decoder has no seed: {modes:?}");
}

/// The harness itself refuses what it must: a flipped bit in a crc-protected region that the
/// harness does not repair, or a truncated record, is refused rather than decoded.
#[test]
fn store_harness_refuses_damage() {
    for (name, seed) in store_seeds() {
        let mut short = seed.clone();
        short.truncate(seed.len() / 2);
        assert_ne!(
            store_harness::run(&short),
            Reached::Decoded,
            "{name} cut in half was decoded"
        );
    }
    // A manifest whose magic is damaged.
    let mut m = store_seeds()[0].1.clone();
    m[1] ^= 0xff;
    assert_eq!(store_harness::run(&m), Reached::Refused);
    // Random bytes through every mode never panic.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..2000usize {
        let mut buf = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(x as u8);
        }
        let _ = store_harness::run(&buf);
        let _ = fuzz_decode_one(&buf);
    }
}
