//! Point in time by the clock, through the `deltavol` binary against a real data plane:
//! `snapshots` shows each snapshot's cut time (and the commit time where it differs), flags a
//! clock that stepped back and marks snapshots whose cut time is unknown (committed by an
//! older client: the manifest's old format); `export NAME@TIME` resolves a time to the newest
//! snapshot cut at or before it, says which and how far, and refuses a time before the first
//! snapshot or after the newest committed cut.

mod common;

use common::dp::*;
use common::*;
use std::time::Duration;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

const NBLOCKS: u64 = 16;

/// Commits snapshot `snap` (block `snap` tagged `snap * 11`) with the given cut time (0: none,
/// as an older client does).
fn commit_at(c: &mut deltavol_dataplane::Client, snap: u64, cut_ms: u64) {
    c.begin_snapshot_cut_at(snap, snap - 1, NBLOCKS * BS as u64, cut_ms)
        .unwrap();
    let mut blk = vec![0u8; BS];
    fill(snap * 11, &mut blk);
    c.put_extent(snap, 1, &blk).unwrap();
    c.commit().unwrap();
}

fn rfc3339(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .unwrap()
        .to_string()
}

#[test]
fn export_as_of_a_time_and_the_listing_of_cut_times() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, TOKEN).unwrap();
    let tok = tok.to_str().unwrap();
    let dp = Dp::start(&dir.path().join("dp"), "127.0.0.1:0");
    // Cuts an hour ago, 10 s apart (on a whole second), committed now; the fourth cut's clock
    // had stepped back 5 s.
    let t0 = (unix_ms() - 3_600_000) / 1000 * 1000;
    let cuts = [t0, t0 + 10_000, t0 + 20_000, t0 + 15_000];
    {
        let mut c = client(&dp.addr);
        c.create_volume(NBLOCKS * BS as u64, BS as u32).unwrap();
        for (i, cut) in cuts.iter().enumerate() {
            commit_at(&mut c, i as u64 + 1, *cut);
        }
    }
    let dpa = ["--dataplane", dp.addr.as_str(), "--auth-token-file", tok];
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&dpa);
        deltavol(&a)
    };

    // The listing: cut times as cut, commit times beside them (an hour later), the clock step.
    let (code, out, err) = run(&["snapshots", "testvol"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("CUT TIME") && out.contains("COMMITTED"),
        "{out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    // The policy first, then the header, then a row per snapshot.
    assert_eq!(
        lines[0], "retention: none (every snapshot is kept)",
        "{out}"
    );
    let header = lines.iter().position(|l| l.contains("CUT TIME")).unwrap();
    for (i, cut) in cuts.iter().enumerate() {
        let t = deltavol::when::format_time_ms(*cut);
        let line = lines[header + 1 + i];
        assert!(line.contains(&t), "snapshot {}: {t} in {line:?}", i + 1);
        assert_eq!(
            line.matches(" UTC").count(),
            2,
            "commit time shown: {line:?}"
        );
        assert_eq!(line.contains(&format!("{t}!")), i == 3, "{line:?}");
    }
    assert!(out.contains("clock stepped back"), "{out}");
    let (code, out, err) = run(&["snapshots", "testvol", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let v = v.as_array().unwrap();
    for (s, cut) in v.iter().zip(cuts) {
        assert_eq!(s["cut_time_unix_ms"].as_u64(), Some(cut));
        assert_eq!(s["point_in_time_unix_ms"].as_u64(), Some(cut));
        assert!(s["commit_time_unix_ms"].as_u64().unwrap() > cut + 3_000_000);
    }
    assert_eq!(
        v.iter()
            .map(|s| s["clock_stepped_back"].as_bool().unwrap())
            .collect::<Vec<_>>(),
        [false, false, false, true]
    );

    let img = dir.path().join("out.img");
    let img_s = img.to_str().unwrap().to_string();
    let export = |spec: &str| run(&["export", spec, "--output", &img_s]);
    let blocks = || {
        let got = std::fs::read(&img).unwrap();
        (1..=4u64)
            .filter(|b| tag_of(&got[*b as usize * BS..(*b as usize + 1) * BS]) == Some(b * 11))
            .collect::<Vec<u64>>()
    };
    // Exactly at a cut (RFC 3339 with ms): that snapshot, 0 s away.
    let (code, _, err) = export(&format!("testvol@{}", rfc3339(cuts[1])));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("snapshot 2, cut at"), "{err}");
    assert!(
        err.contains(&deltavol::when::format_time_ms(cuts[1])),
        "{err}"
    );
    assert!(err.contains("(0.0s before the time asked)"), "{err}");
    assert_eq!(blocks(), [1, 2]);
    // Between two cuts ("YYYY-MM-DD HH:MM:SS", UTC): the earlier one, and how far.
    let between = jiff::Timestamp::from_millisecond((cuts[0] + 7_000) as i64)
        .unwrap()
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string();
    let (code, _, err) = export(&format!("testvol@{between}"));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("snapshot 1, cut at") && err.contains("(7.0s before the time asked)"),
        "{err}"
    );
    assert_eq!(blocks(), [1]);
    // The clock stepped back: 4 was cut (by its clock) before 3, but after it in the chain.
    // At 3's cut, the newest by sequence is 4; between 2's cut and 3's, it is 2 (4 holds
    // writes made after 3's cut).
    let (code, _, err) = export(&format!("testvol@{}", rfc3339(cuts[2])));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("snapshot 4,"), "{err}");
    assert_eq!(blocks(), [1, 2, 3, 4]);
    let (code, _, err) = export(&format!("testvol@{}", rfc3339(cuts[3] + 1000)));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("snapshot 2,"), "{err}");
    assert_eq!(blocks(), [1, 2]);
    // Before the first: refused, naming it.
    let (code, _, err) = export("testvol@-2h");
    assert_ne!(code, 0);
    assert!(
        err.contains("first snapshot, 1") && err.contains("nothing older is kept"),
        "{err}"
    );
    // After the newest committed cut: refused, naming the recovery point.
    let (code, _, err) = export("testvol@-1m");
    assert_ne!(code, 0);
    assert!(
        err.contains("newest committed snapshot, 4")
            && err.contains("the recovery point")
            && err.contains(&deltavol::when::format_time_ms(cuts[3])),
        "{err}"
    );
    // A time that is not one.
    let (code, _, err) = export("testvol@yesterday");
    assert_ne!(code, 0);
    assert!(err.contains("RFC 3339"), "{err}");

    // A snapshot committed without a cut time (an older client; an old manifest reads the
    // same): listed with its commit time, marked.
    {
        let t = deltavol_dataplane::Timeouts {
            connect: Duration::from_secs(2),
            io: Duration::from_secs(10),
        };
        let mut c = deltavol_dataplane::Client::connect(&dp.addr, TOKEN, "oldvol", t).unwrap();
        c.create_volume(NBLOCKS * BS as u64, BS as u32).unwrap();
        commit_at(&mut c, 1, 0);
    }
    let (code, out, err) = run(&["snapshots", "oldvol"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().nth(2).unwrap().contains(" UTC*"), "{out}");
    assert!(out.contains("cut time unknown"), "{out}");
    let (_, out, _) = run(&["snapshots", "oldvol", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v[0]["cut_time_unix_ms"].is_null());
    assert_eq!(v[0]["cut_time_known"].as_bool(), Some(false));
}
