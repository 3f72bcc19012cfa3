//! Client-side encryption (`--encryption-key-file`, `deltavol::crypt`), end to end on the
//! host: a real data plane, volumes driven through the queues' handler, and the `deltavol`
//! binary for the commands that read the data plane before a device exists.
//!
//! What each test proves (each can fail: see the sabotage notes in the report of issue 14):
//! - the data plane's files never hold the plaintext written, nor the key (and an unencrypted
//!   volume's do, so the scan sees what it looks for);
//! - with the right key, a recovered volume, a clone and an export read back byte-exact, and
//!   `verify` compares decrypted data;
//! - without the key, and with another key, recover / clone / export / reattach are refused,
//!   saying so (both key ids named), before anything is created or fenced;
//! - a ciphertext changed on the data plane in a way its own crc32c cannot see reads as an
//!   error (EIO), never as data, and every other block still reads.

mod common;
use common::dp::*;
use common::*;
use deltavol::cache::io::{UBLK_IO_OP_DISCARD, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE};
use deltavol::cache::CreateAs;
use deltavol::crypt::{key_id_hex, BlockCodec, VolumeKey, ENVELOPE_MAGIC, SEALED_BLOCK_BYTES};
use deltavol::ship::ShipConfig;
use deltavol::volume::{Volume, VolumeConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Plaintext no byte of the data plane may hold.
const MARKER: &[u8] = b"deltavol-plaintext-marker:";
const NBLOCKS: u64 = 1024;

/// A block of the marker text, repeated (with its LBA, so no two blocks are equal).
fn marker_block(lba: u64) -> Vec<u8> {
    let line = [MARKER, format!("{lba:08}|").as_bytes()].concat();
    line.iter().copied().cycle().take(BS).collect()
}

fn tag_block(tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    fill(tag, &mut b);
    b
}

/// A new key file in `dir`; returns its path and raw bytes.
fn new_key(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    VolumeKey::generate(&p).expect("keygen");
    let hex = std::fs::read_to_string(&p).unwrap();
    let raw = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    (p, raw)
}

fn key_id_of(path: &Path) -> String {
    key_id_hex(&VolumeKey::load(path).unwrap().key_id())
}

fn sealed_ship(dir: &Path, addr: &str, key: Option<&Path>) -> ShipConfig {
    let mut s = ship_cfg(dir, addr);
    s.codec = BlockCodec::from_key_file(key).expect("key file");
    s
}

fn volume_cfg(dir: &Path, name: &str, addr: &str, key: Option<&Path>) -> VolumeConfig {
    let mut cfg = config(dir, NBLOCKS * BS as u64, 1);
    cfg.cache.name = name.into();
    cfg.flush_interval = Duration::from_secs(3600);
    cfg.ship = Some(sealed_ship(dir, addr, key));
    cfg.fetch_timeout = Duration::from_secs(2);
    cfg
}

/// Writes `data` (whole blocks) at `lba` through the queues' handler.
fn write(vol: &Volume, lba: u64, data: &[u8]) {
    let ring = vol.host_ring(0).unwrap();
    let mut buf = data.to_vec();
    let n = (data.len() / BS) as u32;
    let r = smol::block_on(vol.handle(&ring, UBLK_IO_OP_WRITE, 0, lba * 8, n * 8, &mut buf));
    assert!(r >= 0, "write at {lba}: {r}");
}

fn discard(vol: &Volume, lba: u64, n: u64) {
    let ring = vol.host_ring(0).unwrap();
    let r = smol::block_on(vol.handle(
        &ring,
        UBLK_IO_OP_DISCARD,
        0,
        lba * 8,
        (n * 8) as u32,
        &mut [],
    ));
    assert!(r >= 0, "discard at {lba}: {r}");
}

/// Reads `n` blocks at `lba`: the handler's result and the bytes.
fn read(vol: &Volume, lba: u64, n: u64) -> (i32, Vec<u8>) {
    let ring = vol.host_ring(0).unwrap();
    let mut buf = vec![0u8; n as usize * BS];
    let r =
        smol::block_on(vol.handle(&ring, UBLK_IO_OP_READ, 0, lba * 8, (n * 8) as u32, &mut buf));
    (r, buf)
}

/// Every block equals the model, read in runs of 64 blocks.
fn assert_reads(vol: &Volume, model: &[u8], what: &str) {
    for lba in (0..NBLOCKS).step_by(64) {
        let (r, got) = read(vol, lba, 64);
        assert_eq!(r, 64 * BS as i32, "{what}: read at {lba}");
        for i in 0..64usize {
            let b = lba as usize + i;
            assert!(
                got[i * BS..(i + 1) * BS] == model[b * BS..(b + 1) * BS],
                "{what}: block {b} differs from what was written"
            );
        }
    }
}

/// The source volume "testvol", encrypted under `key` (or plain): marker blocks, tagged
/// blocks and never-written ones in a first snapshot, more markers and a discard in a second.
/// Returns the model at the second snapshot and that snapshot's id.
fn make_source(dir: &Path, addr: &str, key: Option<&Path>) -> (Vec<u8>, u64) {
    let (_, model, snap) = make_source_two(dir, addr, key);
    (model, snap)
}

/// [`make_source`], with the model at the first snapshot too (snapshot 1).
fn make_source_two(dir: &Path, addr: &str, key: Option<&Path>) -> (Vec<u8>, Vec<u8>, u64) {
    let cfg = volume_cfg(&dir.join("src"), "testvol", addr, key);
    let vol = Volume::open(&cfg).unwrap();
    // Which regions are read is not the data plane's to learn: an encrypted volume keeps
    // no heat map (a plain one does).
    assert_eq!(vol.heat.is_none(), key.is_some());
    let mut model = vec![0u8; NBLOCKS as usize * BS];
    for b in 0..NBLOCKS {
        let data = match b % 4 {
            0 => marker_block(b),
            1 | 3 => tag_block(1000 + b),
            _ => continue,
        };
        write(&vol, b, &data);
        model[b as usize * BS..(b as usize + 1) * BS].copy_from_slice(&data);
    }
    assert_eq!(vol.cut_and_flush().unwrap().epoch, 1);
    let model1 = model.clone();
    for b in (2..NBLOCKS).step_by(64) {
        let data = marker_block(b);
        write(&vol, b, &data);
        model[b as usize * BS..(b as usize + 1) * BS].copy_from_slice(&data);
    }
    discard(&vol, 512, 32);
    model[512 * BS..544 * BS].fill(0);
    let snap = vol.cut_and_flush().unwrap().epoch;
    let ship = vol.ship.as_ref().unwrap();
    assert!(ship.wait_committed(snap, Duration::from_secs(30)));
    vol.shutdown();
    (model1, model, snap)
}

fn recovered_cfg(dir: &Path, addr: &str, key: Option<&Path>, snap: u64, rate: u64) -> VolumeConfig {
    let mut cfg = volume_cfg(dir, "testvol", addr, key);
    cfg.flush_interval = Duration::from_millis(50);
    cfg.hydrate_rate_bytes_per_s = rate;
    cfg.cache.create_as = Some(hydrating_from(snap, addr));
    cfg
}

/// A clean stop, and the cache dir's lock released (the volume dropped).
fn close(vol: Volume) {
    vol.shutdown();
    drop(vol);
}

fn wait_hydrated(vol: &Volume) {
    let t0 = Instant::now();
    while vol.cache.hydrating().is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "hydration not done: {:?}",
            vol.status().hydration
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file under `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let b = std::fs::read(&p).unwrap();
                out.push((p, b));
            }
        }
    }
    out
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn token_file(dir: &Path) -> String {
    dir.join("dp").with_extension("token").display().to_string()
}

#[test]
fn the_data_plane_never_holds_the_plaintext_nor_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let dp_dir = dir.path().join("dp");
    let dp = Dp::start(&dp_dir, "127.0.0.1:0");
    let (key, raw) = new_key(dir.path(), "vol.key");
    let (model, _) = make_source(dir.path(), &dp.addr, Some(&key));
    let info = common::dp::client(&dp.addr).info().clone();
    assert_eq!(
        info.block_size, SEALED_BLOCK_BYTES,
        "envelopes on the data plane"
    );
    assert_eq!(info.size_bytes, NBLOCKS * u64::from(SEALED_BLOCK_BYTES));
    let (code, out, err) = deltavol(&[
        "volume",
        "info",
        "testvol",
        "--dataplane",
        &dp.addr,
        "--auth-token-file",
        &token_file(dir.path()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(4194304 bytes)"), "the device's size: {out}");
    assert!(
        out.contains("encryption:    client-side, xchacha20poly1305"),
        "{out}"
    );
    // The listing gives the device's size too (the byte counts stay as stored).
    let (code, out, err) = deltavol(&[
        "snapshots",
        "testvol",
        "--json",
        "--dataplane",
        &dp.addr,
        "--auth-token-file",
        &token_file(dir.path()),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for snap in v.as_array().unwrap() {
        assert_eq!(snap["volume_size"], 4194304, "{snap}");
    }

    // A snapshot that waited in the outbox while the data plane was away is sealed too.
    let mut dp = dp;
    let cfg = volume_cfg(&dir.path().join("src"), "testvol", &dp.addr, Some(&key));
    let vol = Volume::open(&cfg).unwrap();
    dp.kill9();
    write(&vol, 7, &marker_block(7));
    write(&vol, 9, &marker_block(9));
    let spooled = vol.cut_and_flush().unwrap().epoch;
    assert!(vol.ship.as_ref().unwrap().status().outbox_entries > 0);
    let outbox = files(&dir.path().join("src/outbox"));
    assert!(
        outbox.iter().any(|(_, b)| count(b, MARKER) > 0),
        "the outbox, on this node, holds plaintext (as the backing file does)"
    );
    let dp = Dp::start(&dp_dir, &dp.addr);
    assert!(vol
        .ship
        .as_ref()
        .unwrap()
        .wait_committed(spooled, Duration::from_secs(30)));
    vol.shutdown();

    // The control: an unencrypted volume's blocks are found by the same scan.
    let plain_dir = dir.path().join("plain");
    let pvol = Volume::open(&volume_cfg(&plain_dir, "plainvol", &dp.addr, None)).unwrap();
    write(&pvol, 0, &marker_block(0));
    let ps = pvol.cut_and_flush().unwrap().epoch;
    assert!(pvol
        .ship
        .as_ref()
        .unwrap()
        .wait_committed(ps, Duration::from_secs(30)));
    pvol.shutdown();
    drop(dp);

    let hex_key: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let (mut envelopes, mut control_hits, mut scanned) = (0, 0, 0);
    let id = VolumeKey::load(&key).unwrap().key_id();
    let sealed_hdr = [&ENVELOPE_MAGIC[..], &id[..]].concat();
    for (p, b) in files(&dp_dir) {
        scanned += b.len();
        if p.components().any(|c| c.as_os_str() == "plainvol") {
            control_hits += count(&b, MARKER);
            continue;
        }
        assert_eq!(count(&b, MARKER), 0, "{} holds plaintext", p.display());
        assert_eq!(count(&b, &raw), 0, "{} holds the key", p.display());
        assert_eq!(
            count(&b, hex_key.as_bytes()),
            0,
            "{} holds the key in hex",
            p.display()
        );
        envelopes += count(&b, &sealed_hdr);
    }
    assert!(
        control_hits > 0,
        "the scan finds an unencrypted volume's marker"
    );
    let written = model
        .chunks(BS)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    assert!(
        envelopes >= written,
        "{envelopes} envelopes under the key found in {scanned} bytes, {written} blocks written"
    );
}

#[test]
fn the_right_key_reads_back_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let (key, _) = new_key(dir.path(), "vol.key");
    let (mut model, snap) = make_source(dir.path(), &dp.addr, Some(&key));

    // Recover: every read, on demand then hydrated, is exact; verify compares decrypted data.
    let cfg = recovered_cfg(&dir.path().join("rec"), &dp.addr, Some(&key), snap, 0);
    let vol = Volume::open(&cfg).unwrap();
    assert_eq!(vol.key_id, Some(VolumeKey::load(&key).unwrap().key_id()));
    assert_reads(&vol, &model, "recovered, hydrating");
    wait_hydrated(&vol);
    assert_reads(&vol, &model, "recovered, hydrated");
    let r = deltavol::verify::verify(&vol, Duration::from_secs(30)).unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.compared_by, "decrypted data");
    assert_eq!(r.blocks_compared, NBLOCKS);
    // The chain goes on, sealed: a second recovery sees the new writes.
    write(&vol, 3, &marker_block(3_000_003));
    model[3 * BS..4 * BS].copy_from_slice(&marker_block(3_000_003));
    let next = vol.cut_and_flush().unwrap().epoch;
    assert!(vol
        .ship
        .as_ref()
        .unwrap()
        .wait_committed(next, Duration::from_secs(30)));
    vol.shutdown();
    let cfg2 = recovered_cfg(&dir.path().join("rec2"), &dp.addr, Some(&key), next, 0);
    let vol2 = Volume::open(&cfg2).unwrap();
    assert_reads(&vol2, &model, "second recovery");
    close(vol2);
    // Reattached with its key: fine.
    let mut again = cfg2.clone();
    again.cache.create_as = None;
    Volume::open(&again).unwrap().shutdown();

    // A clone of that snapshot, with the same key.
    let clone_id: [u8; 16] = rand::random();
    let t = deltavol_dataplane::Timeouts::default();
    let mut c =
        deltavol_dataplane::Client::connect_as(&dp.addr, TOKEN, "clonevol", t, 0, Some(clone_id))
            .unwrap();
    let info = c.clone_volume("testvol", next).unwrap();
    assert_eq!(
        info.block_size, SEALED_BLOCK_BYTES,
        "a clone keeps the envelopes"
    );
    let mut ccfg = volume_cfg(&dir.path().join("clone"), "clonevol", &dp.addr, Some(&key));
    ccfg.cache.create_as = Some(CreateAs {
        flushed_epoch: 0,
        snap_head: 0,
        generation: info.generation,
        hydrate_snap: 0,
        hydrate: true,
        volume_id: clone_id,
    });
    let cv = Volume::open(&ccfg).unwrap();
    assert_reads(&cv, &model, "clone");
    cv.shutdown();

    // Export, from the data plane alone, through the binary.
    let img = dir.path().join("export.img");
    let (code, out, err) = deltavol(&[
        "export",
        &format!("testvol@{next}"),
        "--dataplane",
        &dp.addr,
        "--auth-token-file",
        &token_file(dir.path()),
        "--output",
        img.to_str().unwrap(),
        "--encryption-key-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "export: {out} {err}");
    assert!(
        std::fs::read(&img).unwrap() == model,
        "the export equals the volume"
    );
}

/// `recover --at` an older snapshot: the blocks that differ from the head are fetched (and
/// opened) from it and shipped, sealed, as the chain's next snapshot.
#[test]
fn recover_as_of_an_older_snapshot_writes_the_way_back_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let (key, _) = new_key(dir.path(), "vol.key");
    let (model1, model2, head) = make_source_two(dir.path(), &dp.addr, Some(&key));
    let id = dataplane_volume_id(&dp.addr);
    let t = deltavol_dataplane::Timeouts::default();
    let generation =
        deltavol_dataplane::Client::connect_as(&dp.addr, TOKEN, "testvol", t, 0, Some(id))
            .unwrap()
            .new_generation()
            .unwrap();
    let mut cfg = recovered_cfg(&dir.path().join("back"), &dp.addr, Some(&key), head, 0);
    cfg.cache.create_as = Some(CreateAs {
        flushed_epoch: head,
        snap_head: head,
        generation,
        hydrate_snap: 1,
        hydrate: true,
        volume_id: id,
    });
    let vol = Volume::open(&cfg).unwrap();
    let sc = cfg.ship.clone().unwrap();
    let n = deltavol::resume::write_rollback(&vol, &sc, 1, head).unwrap();
    let differ = model1
        .chunks(BS)
        .zip(model2.chunks(BS))
        .filter(|(a, b)| a != b)
        .count() as u64;
    assert_eq!(
        n, differ,
        "the blocks whose envelopes differ are the changed ones"
    );
    let snap = vol.cut_and_flush().unwrap().epoch;
    assert!(vol
        .ship
        .as_ref()
        .unwrap()
        .wait_committed(snap, Duration::from_secs(30)));
    assert_reads(&vol, &model1, "rolled back");
    close(vol);
    let again = recovered_cfg(&dir.path().join("again"), &dp.addr, Some(&key), snap, 0);
    let vol = Volume::open(&again).unwrap();
    assert_reads(&vol, &model1, "recovered from the way back");
    close(vol);
}

/// `deltavol recover | clone | export` of `testvol` with `key_args`: exit code, stderr.
/// `recover` checks the ublk driver first: on a host without it, its key check (the call it
/// makes before anything is created or fenced) is made here through the library instead.
fn refused_commands(dir: &Path, addr: &str, key_args: &[&str]) -> Vec<(String, i32, String)> {
    let tok = token_file(dir);
    let cache = dir.join("new-cache");
    let backing = dir.join("new-backing.img");
    let img = dir.join("new-export.img");
    let dp = ["--dataplane", addr, "--auth-token-file", &tok];
    let dev = [
        "--cache-dir",
        cache.to_str().unwrap(),
        "--backing",
        backing.to_str().unwrap(),
    ];
    let mut runs: Vec<(&str, Vec<&str>)> = vec![
        (
            "clone",
            [
                &["clone", "testvol@1", "--name", "newclone"][..],
                &dp,
                &dev,
                key_args,
            ]
            .concat(),
        ),
        (
            "export",
            [
                &["export", "testvol@1", "--output", img.to_str().unwrap()][..],
                &dp,
                key_args,
            ]
            .concat(),
        ),
    ];
    let mut out = Vec::new();
    if Path::new("/dev/ublk-control").exists() {
        runs.push((
            "recover",
            [&["recover", "testvol"][..], &dp, &dev, key_args].concat(),
        ));
    } else {
        let codec = BlockCodec::from_key_file(key_args.get(1).map(Path::new)).unwrap();
        let mut c = common::dp::client(addr);
        let info = c.volume_info().unwrap();
        let e = codec
            .check_remote(&mut c, "testvol", &info, info.latest_snap_id)
            .expect_err("refused");
        out.push(("recover (its key check)".into(), 1, e.to_string()));
    }
    for (what, args) in runs {
        let (code, _, err) = deltavol(&args);
        assert!(!cache.exists(), "{what}: no cache dir created: {err}");
        assert!(!backing.exists(), "{what}: no backing created: {err}");
        assert!(!img.exists(), "{what}: no image created: {err}");
        out.push((what.to_string(), code, err));
    }
    out
}

#[test]
fn without_the_key_nothing_is_created_and_the_error_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let (key, _) = new_key(dir.path(), "vol.key");
    let (_, snap) = make_source(dir.path(), &dp.addr, Some(&key));
    let gen0 = common::dp::client(&dp.addr).info().generation;

    for (what, code, err) in refused_commands(dir.path(), &dp.addr, &[]) {
        assert_eq!(code, 1, "{what}: {err}");
        assert!(
            err.contains("volume testvol is encrypted on the data plane: give --encryption-key-file with the key it was created with"),
            "{what}: {err}"
        );
    }
    let c = common::dp::client(&dp.addr);
    assert_eq!(c.info().generation, gen0, "nothing fenced");
    let t = deltavol_dataplane::Timeouts::default();
    let nc = deltavol_dataplane::Client::connect(&dp.addr, TOKEN, "newclone", t).unwrap();
    assert!(!nc.info().exists, "no clone made");

    // Reattaching the volume without its key: refused, naming the key id it needs.
    let id = key_id_of(&key);
    let e = Volume::open(&volume_cfg(
        &dir.path().join("src"),
        "testvol",
        &dp.addr,
        None,
    ))
    .err()
    .expect("refused");
    assert!(
        e.to_string()
            .contains(&format!("is encrypted (key id {id}")),
        "{e}"
    );

    // A volume made from it without the key (the library, past the CLI's checks) reads
    // nothing and ships nothing: both say why.
    let cfg = recovered_cfg(&dir.path().join("nokey"), &dp.addr, None, snap, 0);
    let vol = Volume::open(&cfg).unwrap();
    let (r, _) = read(&vol, 0, 1);
    assert!(r < 0, "a read without the key fails: {r}");
    let h = vol.status().hydration.unwrap();
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("is encrypted on the data plane")),
        "{h:?}"
    );
    write(&vol, 1, &marker_block(1));
    vol.cut_and_flush().unwrap();
    let st = vol.ship.as_ref().unwrap().status();
    assert!(st.outbox_entries > 0, "not shipped: {st:?}");
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("is encrypted on the data plane")),
        "{st:?}"
    );
    vol.crash();

    // And a key for a volume that has none: refused too.
    let plain = dir.path().join("plain");
    let pv = Volume::open(&volume_cfg(&plain, "plainvol", &dp.addr, None)).unwrap();
    write(&pv, 0, &tag_block(5));
    pv.cut_and_flush().unwrap();
    pv.shutdown();
    let e = Volume::open(&volume_cfg(&plain, "plainvol", &dp.addr, Some(&key)))
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("was created without encryption"),
        "{e}"
    );
    let (code, _, err) = deltavol(&[
        "export",
        "plainvol@1",
        "--dataplane",
        &dp.addr,
        "--auth-token-file",
        &token_file(dir.path()),
        "--output",
        dir.path().join("p.img").to_str().unwrap(),
        "--encryption-key-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("volume plainvol is not encrypted on the data plane"),
        "{err}"
    );
}

#[test]
fn a_wrong_key_is_refused_naming_both_key_ids() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let (key, _) = new_key(dir.path(), "vol.key");
    let (other, _) = new_key(dir.path(), "other.key");
    let (right, wrong) = (key_id_of(&key), key_id_of(&other));
    assert_ne!(right, wrong);
    make_source(dir.path(), &dp.addr, Some(&key));
    let gen0 = common::dp::client(&dp.addr).info().generation;

    let other_arg = other.to_str().unwrap();
    for (what, code, err) in
        refused_commands(dir.path(), &dp.addr, &["--encryption-key-file", other_arg])
    {
        assert_eq!(code, 1, "{what}: {err}");
        assert!(
            err.contains(&format!("volume testvol is encrypted with key id {right}, but the key given (--encryption-key-file) has key id {wrong}")),
            "{what}: {err}"
        );
    }
    assert_eq!(
        common::dp::client(&dp.addr).info().generation,
        gen0,
        "nothing fenced"
    );
    let e = Volume::open(&volume_cfg(
        &dir.path().join("src"),
        "testvol",
        &dp.addr,
        Some(&other),
    ))
    .err()
    .expect("refused");
    assert!(
        e.to_string().contains(&format!(
            "encrypted with key id {right}, but the key given (--encryption-key-file) has key id {wrong}"
        )),
        "{e}"
    );
    // A cache dir that lost its record (made without the key while the data plane was away):
    // the data plane's envelopes decide; another key is still refused, the right one
    // repairs the record.
    let src = dir.path().join("src");
    std::fs::remove_file(src.join("cache/encryption")).unwrap();
    let e = Volume::open(&volume_cfg(&src, "testvol", &dp.addr, Some(&other)))
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains(&format!(
            "encrypted with key id {right}, but the key given (--encryption-key-file) has key id {wrong}"
        )),
        "{e}"
    );
    close(Volume::open(&volume_cfg(&src, "testvol", &dp.addr, Some(&key))).unwrap());
    assert!(src.join("cache/encryption").exists(), "the record is back");
    let e = Volume::open(&volume_cfg(&src, "testvol", &dp.addr, None))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("is encrypted (key id"), "{e}");

    // keygen makes a private key file and names its id; it never overwrites one.
    let fresh = dir.path().join("fresh.key");
    let (code, out, err) = deltavol(&["keygen", fresh.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("key id {}", key_id_of(&fresh))),
        "{out}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (code, _, err) = deltavol(&["keygen", key.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("never overwrites"), "{err}");
    assert_eq!(key_id_of(&key), right);
}

/// XORed into data, these 5 bytes leave its crc32c unchanged (the CRC-32C polynomial, in the
/// bit order the CRC reads): a change the data plane's own checksums cannot see, as a store
/// that rewrote a block on purpose would make it.
const CRC_INVISIBLE: [u8; 5] = [0xf1, 0x76, 0xec, 0x05, 0x01];

#[test]
fn tampered_ciphertext_is_an_error_never_data() {
    // The flip really is invisible to crc32c, wherever it lands.
    let mut m: Vec<u8> = (0..9000u32).map(|i| (i * 7 + 3) as u8).collect();
    let before = crc32c::crc32c(&m);
    for (i, x) in CRC_INVISIBLE.iter().enumerate() {
        m[4321 + i] ^= x;
    }
    assert_eq!(crc32c::crc32c(&m), before);

    let dir = tempfile::tempdir().unwrap();
    let dp_dir = dir.path().join("dp");
    let mut dp = Dp::start(&dp_dir, "127.0.0.1:0");
    let (key, _) = new_key(dir.path(), "vol.key");
    let (model, snap) = make_source(dir.path(), &dp.addr, Some(&key));
    let addr = dp.addr.clone();
    dp.kill9();

    // Change one envelope's ciphertext in a segment file (found by its magic and key id): in
    // the first snapshot's (the largest), a quarter in (LBA order: about block 256, which
    // the second snapshot leaves as it is).
    let id = VolumeKey::load(&key).unwrap().key_id();
    let hdr = [&ENVELOPE_MAGIC[..], &id[..]].concat();
    let (seg, b) = files(&dp_dir)
        .into_iter()
        .filter(|(p, _)| p.extension().is_some_and(|x| x == "seg"))
        .max_by_key(|(_, b)| b.len())
        .expect("a segment file");
    let hits: Vec<usize> = b
        .windows(hdr.len())
        .enumerate()
        .filter(|(_, w)| *w == &hdr[..])
        .map(|(i, _)| i)
        .collect();
    assert!(
        hits.len() > 100,
        "{} envelopes in {}",
        hits.len(),
        seg.display()
    );
    let at = hits[hits.len() / 4];
    let mut b = b;
    for (i, x) in CRC_INVISIBLE.iter().enumerate() {
        b[at + 64 + 1000 + i] ^= x;
    }
    std::fs::write(&seg, &b).unwrap();
    let _dp = Dp::start(&dp_dir, &addr);

    // The data plane serves it (its crc32c still matches); the envelope does not open.
    let codec = BlockCodec::from_key_file(Some(&key)).unwrap();
    let mut c = common::dp::client(&addr);
    let mut all = vec![0u8; NBLOCKS as usize * BS];
    let refused = codec
        .read_blocks(&mut c, snap, 0, &mut all, &mut Vec::new())
        .expect("the data plane serves the changed block: its own checksum cannot tell");
    assert_eq!(refused.len(), 1, "{refused:?}");
    let t = refused[0].lba().unwrap();
    assert!(
        matches!(refused[0], deltavol::crypt::CryptError::Tampered { .. }),
        "{refused:?}"
    );
    assert!(all[t as usize * BS..(t as usize + 1) * BS]
        .iter()
        .all(|&x| x == 0));

    // verify on the source names the block and why (its fresh snapshot, which the recovery
    // below starts from, still reads the changed block from the first one).
    let src = Volume::open(&volume_cfg(
        &dir.path().join("src"),
        "testvol",
        &addr,
        Some(&key),
    ))
    .unwrap();
    let r = deltavol::verify::verify(&src, Duration::from_secs(30)).unwrap();
    assert_eq!(r.blocks_differing, 1, "{r:?}");
    assert_eq!(r.blocks_refused, 1, "{r:?}");
    assert_eq!(
        r.ranges,
        vec![deltavol::verify::DiffRange { lba: t, nblocks: 1 }]
    );
    close(src);
    let snap = r.snapshot;

    // A recovered volume: the block is an error (on demand and after hydration), never
    // data; every other block reads exactly, including its neighbours in the same extent.
    let slow = recovered_cfg(&dir.path().join("rec"), &addr, Some(&key), snap, 4096);
    let vol = Volume::open(&slow).unwrap();
    let (r, got) = read(&vol, t, 1);
    assert!(r < 0, "read of the changed block {t}: {r}, never data");
    assert!(got.iter().all(|&x| x == 0), "nothing of it in the buffer");
    let ext = t / 64 * 64;
    for b in ext..ext + 64 {
        if b != t {
            let (r, got) = read(&vol, b, 1);
            assert_eq!(r, BS as i32, "block {b} beside the changed one");
            assert!(
                got == model[b as usize * BS..(b as usize + 1) * BS],
                "block {b}"
            );
        }
    }
    close(vol);
    let mut fast = slow.clone();
    fast.hydrate_rate_bytes_per_s = 0;
    let vol = Volume::open(&fast).unwrap();
    let t0 = Instant::now();
    while vol.cache.hydration.as_ref().unwrap().local.count() < NBLOCKS - 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{:?}",
            vol.status().hydration
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let h = vol.status().hydration.unwrap();
    assert!(
        !h.done,
        "hydration cannot complete without the block: {h:?}"
    );
    assert!(h.blocks_refused >= 1, "{h:?}");
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("failed authentication")),
        "{h:?}"
    );
    for lba in (0..NBLOCKS).step_by(64) {
        let (r, got) = read(&vol, lba, 64);
        if (lba..lba + 64).contains(&t) {
            assert!(r < 0, "a read spanning the changed block fails: {r}");
            continue;
        }
        assert_eq!(r, 64 * BS as i32);
        assert!(
            got == model[lba as usize * BS..(lba as usize + 64) * BS],
            "blocks {lba}+64"
        );
    }
    // Written by the application, the block is local and reads as written.
    write(&vol, t, &tag_block(77));
    assert_eq!(read(&vol, t, 1), (BS as i32, tag_block(77)));
    vol.shutdown();
}
