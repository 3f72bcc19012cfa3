//! Property tests: the frame decoder never panics on random or mutated input, and accepts what
//! the encoder produces.

use deltavol_schemas::flatbuffers::FlatBufferBuilder;
use deltavol_schemas::{append_frame, decode_frame, finish_header, fuzz_decode_one, wire};
use proptest::prelude::*;

fn valid_frames() -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let data = vec![0x5au8; 4096];
    {
        let mut fbb = FlatBufferBuilder::new();
        let ex = fbb.create_vector(&[
            wire::Extent::new(0, 8, crc32c::crc32c(&data), wire::ExtentKind::Data),
            wire::Extent::new(64, 8, 0, wire::ExtentKind::Zero),
        ]);
        let body = wire::PutExtents::create(
            &mut fbb,
            &wire::PutExtentsArgs {
                snap_id: 3,
                extents: Some(ex),
            },
        );
        let h = finish_header(
            &mut fbb,
            wire::Message::PutExtents,
            body.as_union_value(),
            data.len(),
        )
        .unwrap();
        let mut out = Vec::new();
        append_frame(&mut out, h, &data).unwrap();
        frames.push(out);
    }
    {
        let mut fbb = FlatBufferBuilder::new();
        let vol = fbb.create_string("vol-a");
        let mac = fbb.create_vector(&[1u8; 32]);
        let body = wire::Auth::create(
            &mut fbb,
            &wire::AuthArgs {
                volume: Some(vol),
                mac: Some(mac),
                generation: 9,
                volume_id: None,
                ..Default::default()
            },
        );
        let h = finish_header(&mut fbb, wire::Message::Auth, body.as_union_value(), 0).unwrap();
        let mut out = Vec::new();
        append_frame(&mut out, h, &[]).unwrap();
        frames.push(out);
    }
    {
        let mut fbb = FlatBufferBuilder::new();
        let infos: Vec<_> = (1..5u64)
            .map(|i| {
                wire::SnapshotInfo::create(
                    &mut fbb,
                    &wire::SnapshotInfoArgs {
                        snap_id: i,
                        parent_id: i - 1,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let v = fbb.create_vector(&infos);
        let body = wire::SnapshotList::create(
            &mut fbb,
            &wire::SnapshotListArgs {
                snapshots: Some(v),
                more: false,
            },
        );
        let h = finish_header(
            &mut fbb,
            wire::Message::SnapshotList,
            body.as_union_value(),
            0,
        )
        .unwrap();
        let mut out = Vec::new();
        append_frame(&mut out, h, &[]).unwrap();
        frames.push(out);
    }
    frames
}

#[test]
fn valid_frames_decode() {
    for f in valid_frames() {
        let d = decode_frame(&f).expect("valid frame");
        assert_eq!(d.frame_bytes, f.len());
        fuzz_decode_one(&f);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        fuzz_decode_one(&data);
        let _ = decode_frame(&data);
    }

    #[test]
    fn random_bytes_with_plausible_prefix_never_panic(
        body in proptest::collection::vec(any::<u8>(), 8..1024),
    ) {
        let mut data = (body.len() as u32).to_le_bytes().to_vec();
        data.extend_from_slice(b"\0\0\0\0DVW1");
        data.extend_from_slice(&body);
        fuzz_decode_one(&data);
    }

    #[test]
    fn mutated_frames_never_panic(
        which in 0usize..3,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut f = valid_frames().swap_remove(which);
        for (pos, val) in flips {
            let i = pos % f.len();
            f[i] = val;
        }
        if let Some(c) = cut {
            let len = f.len();
            f.truncate(c % (len + 1));
        }
        fuzz_decode_one(&f);
    }
}
