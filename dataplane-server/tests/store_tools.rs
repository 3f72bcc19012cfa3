//! `deltavol-dataplane verify` and `gc` on the local (embedded) store: a clean store verifies,
//! a flipped data byte is named by volume, snapshot and LBA range, a damaged batch header is
//! named too; gc refuses while a server holds the data dir and removes stray files after.

mod common;

use std::process::Command;

use common::*;

const BS: usize = 4096;
const BLOCKS: u64 = 512;
const SIZE: u64 = BLOCKS * BS as u64;

fn tool(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deltavol-dataplane"))
        .args(args)
        .output()
        .expect("run deltavol-dataplane");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (lba, nblocks, data offset) of every data extent of a segment file, in order.
fn data_extents(raw: &[u8]) -> Vec<(u64, u32, usize)> {
    let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap());
    let footer_at = u64_at(raw.len() - 32) as usize;
    let mut out = Vec::new();
    let mut pos = 64;
    while pos < footer_at {
        let count = u32_at(pos + 4) as usize;
        let payload = u32_at(pos + 8) as usize;
        let mut data = pos + 32 + count * 24;
        for k in 0..count {
            let r = pos + 32 + k * 24;
            if raw[r + 16] == 0 {
                let n = u32_at(r + 8);
                out.push((u64_at(r), n, data));
                data += n as usize * BS;
            }
        }
        pos += 32 + count * 24 + payload;
    }
    out
}

#[test]
fn verify_names_a_flipped_byte_and_gc_cleans_strays() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let server = in_process(&data, 2);
    let mut c = connect(server.local_addr(), "vol-v");
    c.create_volume(SIZE, BS as u32).unwrap();
    let mut rng = Rng::new(0x7e51);
    for snap in 1..=3 {
        let changes = random_changes(&mut rng, BLOCKS, BS, 25);
        upload(&mut c, snap, snap - 1, SIZE, BS, &changes);
    }
    drop(c);
    // gc refuses while the server holds the data dir.
    let (code, _, err) = tool(&["gc", "--data-dir", d]);
    assert_ne!(code, 0);
    assert!(err.contains("in use"), "{err}");
    server.shutdown();

    let (code, out, err) = tool(&["verify", "--data-dir", d]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("1 volumes, 3 snapshots, 3 segments"), "{out}");
    assert!(out.contains("all good"), "{out}");

    // Flip one byte of the last data extent of snapshot 2's segment.
    let seg = data.join("volumes/vol-v/snap-2.seg");
    let mut raw = std::fs::read(&seg).unwrap();
    let (lba, n, at) = *data_extents(&raw).last().expect("a data extent");
    raw[at + 100] ^= 1;
    std::fs::write(&seg, &raw).unwrap();
    let (code, out, _) = tool(&["verify", "--data-dir", d, "--volume", "vol-v"]);
    assert_eq!(code, 1, "{out}");
    let want = format!(
        "CORRUPT volume vol-v snapshot 2 segment 2 extent lba {lba}..{}: data fails its crc32c",
        lba + u64::from(n)
    );
    assert!(out.contains(&want), "expected {want:?} in:\n{out}");
    assert!(out.contains("1 problems"), "{out}");
    raw[at + 100] ^= 1;
    // A damaged batch header instead: named by segment, the walk stops there.
    raw[64 + 4] ^= 0xff;
    std::fs::write(&seg, &raw).unwrap();
    let (code, out, _) = tool(&["verify", "--data-dir", d]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("CORRUPT volume vol-v snapshot 2 segment 2: batch header at offset 64"),
        "{out}"
    );
    raw[64 + 4] ^= 0xff;
    std::fs::write(&seg, &raw).unwrap();
    // An unknown volume is an error, not "all good".
    let (code, _, err) = tool(&["verify", "--data-dir", d, "--volume", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");

    // Strays: a temp file and a segment no manifest names.
    std::fs::write(data.join("volumes/vol-v/snap-9.seg"), b"junk").unwrap();
    std::fs::write(data.join("volumes/vol-v/snap-4.seg.1.tmp"), b"junk").unwrap();
    let (code, out, err) = tool(&["gc", "--data-dir", d, "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("would remove 2 objects"), "{out}");
    assert!(data.join("volumes/vol-v/snap-9.seg").exists());
    let (code, out, err) = tool(&["gc", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed 2 objects (8 bytes)"), "{out}");
    assert!(!data.join("volumes/vol-v/snap-9.seg").exists());
    assert!(!data.join("volumes/vol-v/snap-4.seg.1.tmp").exists());
    let (code, out, _) = tool(&["verify", "--data-dir", d]);
    assert_eq!(code, 0, "{out}");
}
