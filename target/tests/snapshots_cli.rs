//! `deltavol snapshots` against a real data-plane server: retention set and shown, prune with
//! and without --dry-run (text and --json), pin / unpin with a label, delete, and the errors
//! (bad policy, a time for delete, the head, a pinned snapshot) that change nothing.

mod common;
use common::dp::*;
use common::*;

const HOUR: u64 = 3_600_000;
const T0: u64 = 1_700_000_000_000 / HOUR * HOUR;

/// Five snapshots of volume "testvol", one an hour.
fn five_snapshots(addr: &str) {
    let mut c = client(addr);
    c.create_volume(1 << 20, BS as u32).expect("create");
    let data = vec![7u8; BS];
    for i in 1..=5u64 {
        c.begin_snapshot_cut_at(i, i - 1, 1 << 20, T0 + i * HOUR)
            .expect("begin");
        c.put_extent(i, 1, &data).expect("put");
        c.commit().expect("commit");
    }
}

fn ids(addr: &str) -> Vec<u64> {
    client(addr)
        .list_snapshots()
        .expect("list")
        .iter()
        .map(|s| s.snap_id)
        .collect()
}

#[test]
fn retention_prune_pin_delete_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    let tok = dir.path().join("token");
    std::fs::write(&tok, TOKEN).unwrap();
    let tok = tok.to_str().unwrap();
    let a = dp.addr.as_str();
    five_snapshots(a);
    let with_dp = |args: &[&str]| {
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--dataplane", a, "--auth-token-file", tok]);
        deltavol(&v)
    };

    // No policy yet.
    let (rc, out, err) = with_dp(&["snapshots", "retention", "testvol"]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        out.contains("retention none (every snapshot is kept) (5 snapshot(s))"),
        "{out}"
    );

    // Pin 2 with a label; the listing shows it.
    let (rc, out, err) = with_dp(&["snapshots", "pin", "testvol@2", "--label", "before-upgrade"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out.trim(), "testvol@2 (before-upgrade) pinned");
    let (rc, out, _) = with_dp(&["snapshots", "testvol"]);
    assert_eq!(rc, 0);
    let row2 = out
        .lines()
        .find(|l| l.trim_start().starts_with("2 "))
        .unwrap();
    assert!(row2.ends_with("pinned before-upgrade"), "{out}");
    assert!(out.contains(" OWN ") && out.contains(" SHARED "), "{out}");
    // Each snapshot wrote one block no later one overwrote: nothing own, 4 KiB shared.
    let (rc, out, err) = with_dp(&["snapshots", "testvol", "--json"]);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for s in v.as_array().unwrap() {
        assert_eq!(
            (s["own_bytes"].as_u64(), s["shared_bytes"].as_u64()),
            (Some(0), Some(4096)),
            "{s}"
        );
    }

    // A dry run deletes nothing and says why each one stays.
    let (rc, out, err) = with_dp(&["snapshots", "retention", "testvol", "last=1"]);
    // Setting the policy applies it: 1, 3 and 4 go; 2 is pinned, 5 is the head.
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("retention last=1 (2 snapshot(s))"), "{out}");
    assert_eq!(ids(a), vec![2, 5]);
    let (rc, out, err) = with_dp(&["snapshots", "prune", "testvol", "--dry-run", "--json"]);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["deleted"], serde_json::json!([]));
    assert_eq!(
        v["kept"],
        serde_json::json!([{"id": 2, "kept_for": "pinned"}, {"id": 5, "kept_for": "head,last"}])
    );

    // Errors change nothing.
    let (rc, _, err) = with_dp(&["snapshots", "retention", "testvol", "yearly=3"]);
    assert_eq!(rc, 1);
    assert!(err.contains("unknown kind \"yearly\""), "{err}");
    let (rc, _, err) = with_dp(&["snapshots", "delete", "testvol@2"]);
    assert_eq!(rc, 1);
    assert!(
        err.contains("pinned (before-upgrade): unpin it first"),
        "{err}"
    );
    let (rc, _, err) = with_dp(&["snapshots", "delete", "testvol@5"]);
    assert_eq!(rc, 1);
    assert!(err.contains("chain head"), "{err}");
    let (rc, _, err) = with_dp(&["snapshots", "delete", "testvol@-1h"]);
    assert_eq!(rc, 1);
    assert!(err.contains("delete takes NAME@ID"), "{err}");
    assert_eq!(ids(a), vec![2, 5]);

    // Unpinned, the next prune removes it.
    let (rc, out, err) = with_dp(&["snapshots", "unpin", "testvol@2"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out.trim(), "testvol@2 (before-upgrade) unpinned");
    let (rc, out, err) = with_dp(&["snapshots", "prune", "testvol"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("testvol: deleted 1 snapshot(s): 2"), "{out}");
    assert_eq!(ids(a), vec![5]);

    // Delete by hand (policy off first, so that a new snapshot stays).
    let (rc, _, err) = with_dp(&["snapshots", "retention", "testvol", "none"]);
    assert_eq!(rc, 0, "{err}");
    let mut c = client(a);
    c.begin_snapshot_cut_at(6, 5, 1 << 20, T0 + 6 * HOUR)
        .unwrap();
    c.commit().unwrap();
    let (rc, out, err) = with_dp(&["snapshots", "delete", "testvol@5", "--json"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!({"deleted": 5, "merged_into": 6})
    );
    assert_eq!(ids(a), vec![6]);
}

#[test]
fn add_retention_needs_a_data_plane_and_a_valid_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let cache = format!("{d}/cache");
    let backing = format!("{d}/b.img");
    let (rc, _, err) = deltavol(&[
        "add",
        "--name",
        "v",
        "--size",
        "1MiB",
        "--cache-dir",
        &cache,
        "--backing",
        &backing,
        "--retention",
        "last=5",
    ]);
    assert_eq!(rc, 1);
    assert!(
        err.contains("--retention") && err.contains("--dataplane"),
        "{err}"
    );
    let tok = format!("{d}/token");
    std::fs::write(&tok, TOKEN).unwrap();
    let (rc, _, err) = deltavol(&[
        "add",
        "--name",
        "v",
        "--size",
        "1MiB",
        "--cache-dir",
        &cache,
        "--backing",
        &backing,
        "--dataplane",
        "127.0.0.1:1",
        "--auth-token-file",
        &tok,
        "--retention",
        "last=x",
    ]);
    assert_eq!(rc, 1);
    assert!(
        err.contains("--retention \"last=x\"") && err.contains("not a count"),
        "{err}"
    );
}
