//! Volume identity on the data plane: a volume is its id, not its name. A client with another
//! id under an existing name is refused (naming the volume it holds and what to do), a client
//! without an id reads by name, `DeleteVolume` frees the name (confirmed by the id, refused
//! while a clone depends on the volume), and a deletion survives a restart.

mod common;

use common::*;
use deltavol_dataplane::Client;
use deltavol_schemas::wire::ErrorCode;

const BS: usize = 4096;
const BLOCKS: u64 = 256;
const SIZE: u64 = BLOCKS * BS as u64;

fn connect_as(
    addr: std::net::SocketAddr,
    volume: &str,
    id: [u8; 16],
) -> Result<Client, deltavol_dataplane::ClientError> {
    Client::connect_as(addr, TOKEN, volume, timeouts(), 0, Some(id))
}

#[test]
fn another_id_under_a_used_name_is_refused_and_delete_frees_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("dp");
    let old_id = [0x11u8; 16];
    let new_id = [0x22u8; 16];
    let mut rng = Rng::new(7);
    let model_old = {
        let server = in_process(&data, 2);
        let mut c =
            connect_as(server.local_addr(), "v1", old_id).expect("connect as the old volume");
        let info = c.create_volume(SIZE, BS as u32).expect("create");
        assert_eq!(
            info.volume_id,
            Some(old_id),
            "the volume takes the creator's id"
        );
        let mut model = vec![0u8; SIZE as usize];
        for snap in 1..=3 {
            let ch = random_changes(&mut rng, BLOCKS, BS, 20);
            upload(&mut c, snap, snap - 1, SIZE, BS, &ch);
            apply(&mut model, BS, &ch);
        }

        // The same name with another id: refused at the handshake, naming the old volume.
        let err = connect_as(server.local_addr(), "v1", new_id).expect_err("another id");
        assert_eq!(
            err.server_code(),
            Some(ErrorCode::IdentityMismatch),
            "{err}"
        );
        let msg = err.to_string();
        for want in [
            "1111111111111111111111111111111",
            "2222222222222222222222222222222",
            &SIZE.to_string(),
            "chain head 3",
            "deltavol volume delete v1 --id",
        ] {
            assert!(msg.contains(want), "refusal lacks {want:?}: {msg}");
        }
        // A reader by name still reads it.
        let mut r = connect(server.local_addr(), "v1");
        assert_eq!(r.info().latest_snap_id, 3);
        assert_eq!(r.info().volume_id, Some(old_id));
        check_snapshot(&mut r, 3, &model, BS, &mut rng);

        // Delete needs the volume's own id.
        let err = r.delete_volume(new_id).expect_err("wrong id");
        assert_eq!(
            err.server_code(),
            Some(ErrorCode::IdentityMismatch),
            "{err}"
        );
        let mut r = connect(server.local_addr(), "v1");
        assert_eq!(r.info().latest_snap_id, 3, "nothing deleted by a wrong id");

        // A clone depends on it: refused, naming the clone.
        let clone_id = [0x33u8; 16];
        let mut cl = connect_as(server.local_addr(), "v1-clone", clone_id).expect("connect clone");
        let ci = cl.clone_volume("v1", 2).expect("clone");
        assert_eq!(ci.volume_id, Some(clone_id), "a clone has its own id");
        let err = r.delete_volume(old_id).expect_err("a clone depends on it");
        assert_eq!(err.server_code(), Some(ErrorCode::InUse), "{err}");
        assert!(err.to_string().contains("v1-clone"), "{err}");
        let mut cl = connect(server.local_addr(), "v1-clone");
        cl.delete_volume(clone_id).expect("delete the clone");
        model
    };
    // A restart between the refusal and the deletion: the ids are durable.
    let server = in_process(&data, 2);
    assert!(
        connect_as(server.local_addr(), "v1", new_id).is_err(),
        "still refused after a restart"
    );
    let mut r = connect(server.local_addr(), "v1");
    check_snapshot(&mut r, 3, &model_old, BS, &mut rng);
    let gone = r.delete_volume(old_id).expect("delete");
    assert!(!gone.exists);
    drop(r);
    assert!(
        !connect(server.local_addr(), "v1-clone").info().exists,
        "the clone was deleted"
    );

    // The name is free: the new volume starts its own chain.
    let mut c = connect_as(server.local_addr(), "v1", new_id).expect("name is free");
    assert!(!c.info().exists);
    let info = c
        .create_volume(SIZE, BS as u32)
        .expect("create the new volume");
    assert_eq!(info.volume_id, Some(new_id));
    assert_eq!(info.latest_snap_id, 0, "nothing of the old chain");
    let ch = random_changes(&mut rng, BLOCKS, BS, 20);
    upload(&mut c, 1, 0, SIZE, BS, &ch);
    let mut model_new = vec![0u8; SIZE as usize];
    apply(&mut model_new, BS, &ch);
    drop(c);
    drop(server);

    // After a restart the new volume is what the name holds; nothing of the old one is left.
    let server = in_process(&data, 2);
    let mut r = connect(server.local_addr(), "v1");
    assert_eq!(r.info().volume_id, Some(new_id));
    assert_eq!(r.info().snapshot_count, 1);
    check_snapshot(&mut r, 1, &model_new, BS, &mut rng);
    let leftovers: Vec<_> = std::fs::read_dir(data.join("volumes"))
        .expect("volumes dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        leftovers,
        vec!["v1".to_string()],
        "only the new volume's files"
    );
}

#[test]
fn a_writer_of_a_deleted_volume_cannot_write_into_its_successor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 1);
    let (a, b) = ([0xaau8; 16], [0xbbu8; 16]);
    let mut old = connect_as(server.local_addr(), "v2", a).expect("connect");
    old.create_volume(SIZE, BS as u32).expect("create");
    let mut rng = Rng::new(9);
    upload(
        &mut old,
        1,
        0,
        SIZE,
        BS,
        &random_changes(&mut rng, BLOCKS, BS, 5),
    );
    // Deleted and recreated by someone else while the old writer stays connected.
    connect(server.local_addr(), "v2")
        .delete_volume(a)
        .expect("delete");
    let mut new = connect_as(server.local_addr(), "v2", b).expect("connect new");
    new.create_volume(SIZE, BS as u32).expect("create new");
    let err = old
        .begin_snapshot(2, 1, SIZE)
        .expect_err("old writer on the new volume");
    assert_eq!(
        err.server_code(),
        Some(ErrorCode::IdentityMismatch),
        "{err}"
    );
    let mut old = connect(server.local_addr(), "v2");
    assert_eq!(old.info().volume_id, Some(b));
    assert_eq!(old.info().latest_snap_id, 0);
    let err = old
        .delete_volume(a)
        .expect_err("the old id deletes nothing");
    assert_eq!(
        err.server_code(),
        Some(ErrorCode::IdentityMismatch),
        "{err}"
    );
}

#[test]
fn malformed_volume_id_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 1);
    let mut c = connect(server.local_addr(), "v3");
    c.create_volume(SIZE, BS as u32).expect("create");
    // DeleteVolume without an id is refused, the volume kept.
    let err = c
        .delete_volume([0; 16])
        .expect_err("zero id is not the volume's");
    assert_eq!(
        err.server_code(),
        Some(ErrorCode::IdentityMismatch),
        "{err}"
    );
    assert!(connect(server.local_addr(), "v3").info().exists);
}

/// Hostile or broken input on the new messages: an Auth volume id of the wrong length, a
/// DeleteVolume without an id or with a short one, ReadChecksums of 0 or too many blocks. Each
/// gets a clear error; nothing is deleted; the connection (where the error is not fatal) and the
/// server go on serving.
#[test]
fn bad_volume_ids_and_checksum_reads_are_refused() {
    use deltavol_schemas::flatbuffers::FlatBufferBuilder;
    use deltavol_schemas::{wire, CHECKSUM_BLOCKS_MAX};
    let dir = tempfile::tempdir().expect("tempdir");
    let server = in_process(dir.path(), 1);
    let addr = server.local_addr();
    let mut c = connect(addr, "v4");
    c.create_volume(SIZE, BS as u32).expect("create");
    let mut rng = Rng::new(4);
    upload(
        &mut c,
        1,
        0,
        SIZE,
        BS,
        &random_changes(&mut rng, BLOCKS, BS, 5),
    );

    // An id of 5 bytes: refused at the handshake, the connection closed.
    let (mut s, reply) = raw_auth_with_id(addr, TOKEN, "v4", Some(&[1, 2, 3, 4, 5]));
    let (_, code, msg) = reply.expect("an answer");
    assert_eq!(code, Some(ErrorCode::Malformed), "{msg}");
    assert!(msg.contains("volume id of 5 bytes"), "{msg}");
    assert!(closed(&mut s));

    let (mut s, reply) = raw_auth(addr, TOKEN, "v4");
    assert_eq!(reply.expect("auth answer").1, None);
    let mut fbb = FlatBufferBuilder::new();
    let ask = |s: &mut std::net::TcpStream, f: Vec<u8>| {
        use std::io::Write;
        s.write_all(&f).expect("send");
        read_reply(s).expect("an answer")
    };
    // DeleteVolume without an id, and with 3 bytes.
    for id in [None, Some(&[9u8, 9, 9][..])] {
        let id = id.map(|b| fbb.create_vector(b));
        let body = wire::DeleteVolume::create(&mut fbb, &wire::DeleteVolumeArgs { volume_id: id });
        let f = frame(
            &mut fbb,
            wire::Message::DeleteVolume,
            body.as_union_value(),
            &[],
        );
        let (_, code, msg) = ask(&mut s, f);
        assert_eq!(code, Some(ErrorCode::Malformed), "{msg}");
    }
    // ReadChecksums of 0 blocks and of one block too many.
    for nblocks in [0, CHECKSUM_BLOCKS_MAX + 1] {
        let body = wire::ReadChecksums::create(
            &mut fbb,
            &wire::ReadChecksumsArgs {
                snap_id: 1,
                lba: 0,
                nblocks,
            },
        );
        let f = frame(
            &mut fbb,
            wire::Message::ReadChecksums,
            body.as_union_value(),
            &[],
        );
        let (_, code, msg) = ask(&mut s, f);
        assert_eq!(code, Some(ErrorCode::TooLarge), "{nblocks}: {msg}");
    }
    // The same connection is still served.
    let body = wire::ReadChecksums::create(
        &mut fbb,
        &wire::ReadChecksumsArgs {
            snap_id: 1,
            lba: 0,
            nblocks: 8,
        },
    );
    let f = frame(
        &mut fbb,
        wire::Message::ReadChecksums,
        body.as_union_value(),
        &[],
    );
    let (ty, code, msg) = ask(&mut s, f);
    assert_eq!((ty, code), (wire::Message::Checksums, None), "{msg}");
    let info = connect(addr, "v4").info().clone();
    assert_eq!(
        (info.exists, info.snapshot_count),
        (true, 1),
        "nothing deleted"
    );
}
