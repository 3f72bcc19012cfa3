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
