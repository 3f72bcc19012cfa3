//! Points in time by the clock: the times a person names (`recover --at`, `NAME@TIME`), the
//! way cut times are shown, and the resolution of a time to the snapshot that holds the volume
//! as of it.
//!
//! Every snapshot carries the wall-clock time of its cut on the compute node (the epoch switch
//! whose state it holds; the node's clock is the source). Snapshots committed before cut times
//! were recorded have none: their commit time stands in, marked as such (it is later than the
//! real cut, so resolving by it never gives a state newer than the time asked).
//!
//! Clocks step back. A cut earlier than its parent's is kept as recorded and flagged, and the
//! chain stays ordered by sequence (the snapshot id is the epoch's sequence). Resolution follows
//! the sequence: a snapshot counts as of the latest cut time of itself and every snapshot
//! before it, so "as of TIME" is the newest snapshot none of whose predecessors was cut after
//! TIME — never a state that includes writes made after an earlier-listed cut past TIME.

use deltavol_dataplane::SnapshotInfo;

/// Longest relative age accepted (`-15m`): about 100 years.
const RELATIVE_MS_MAX: u64 = 100 * 366 * 86_400_000;

/// Parses a time a person names into ms since the Unix epoch: RFC 3339
/// (`2025-03-01T22:39:00Z`, `...+01:00`), `YYYY-MM-DD HH:MM[:SS[.fff]]` (UTC unless a zone
/// follows: `Z`, `UTC`, `+01:00`, or an IANA name like `Europe/Paris`), or a relative age
/// before `now_ms` (`-15m`, `-2h30m`, `-90s`, `-1d`; units s, m, h, d, w).
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, String> {
    let t = s.trim();
    let help = "give RFC 3339 (2025-03-01T22:39:00Z), YYYY-MM-DD HH:MM[:SS] (UTC unless a zone follows, e.g. \"2025-03-01 23:39 Europe/Paris\") or an age like -15m, -2h30m, -1d";
    if let Some(rel) = t.strip_prefix('-') {
        let age = parse_age_ms(rel).map_err(|e| format!("time {s:?}: {e}; {help}"))?;
        return now_ms
            .checked_sub(age)
            .ok_or_else(|| format!("time {s:?} is before 1970"));
    }
    if let Ok(ts) = t.parse::<jiff::Timestamp>() {
        return to_unix_ms(ts, s);
    }
    // Civil date and time, then an optional zone.
    let (dt_part, zone) = match t.rsplit_once(' ') {
        Some((a, z)) if a.contains(' ') || a.contains('T') => (a.trim(), Some(z)),
        _ => (t, None),
    };
    let dt: jiff::civil::DateTime = dt_part
        .parse()
        .map_err(|_| format!("time {s:?} is not a date and time: {help}"))?;
    let tz = match zone {
        None => jiff::tz::TimeZone::UTC,
        Some(z) if z.eq_ignore_ascii_case("utc") || z == "Z" => jiff::tz::TimeZone::UTC,
        Some(z) if z.starts_with('+') || z.starts_with('-') => {
            let off = parse_offset(z).ok_or_else(|| {
                format!("time {s:?}: zone {z:?} is not an offset like +01:00; {help}")
            })?;
            jiff::tz::TimeZone::fixed(off)
        }
        Some(z) => jiff::tz::TimeZone::get(z).map_err(|e| {
            format!("time {s:?}: unknown time zone {z:?} ({e}); give UTC, an offset like +01:00 or an IANA name like Europe/Paris")
        })?,
    };
    let zoned = dt.to_zoned(tz).map_err(|e| format!("time {s:?}: {e}"))?;
    to_unix_ms(zoned.timestamp(), s)
}

fn to_unix_ms(ts: jiff::Timestamp, s: &str) -> Result<u64, String> {
    u64::try_from(ts.as_millisecond()).map_err(|_| format!("time {s:?} is before 1970"))
}

fn parse_offset(z: &str) -> Option<jiff::tz::Offset> {
    let (sign, rest) = (if z.starts_with('-') { -1 } else { 1 }, &z[1..]);
    let (h, m) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => (&rest[..2], &rest[2..]),
        None => (rest, "0"),
    };
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if !(0..=23).contains(&h) || !(0..=59).contains(&m) {
        return None;
    }
    jiff::tz::Offset::from_seconds(sign * (h * 3600 + m * 60)).ok()
}

/// `15m`, `2h30m`, `90s`, `1d`, `1w` → ms.
fn parse_age_ms(s: &str) -> Result<u64, String> {
    if s.is_empty() {
        return Err("an age needs a number and a unit".into());
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit_ms: u64 = match c {
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            'w' => 7 * 86_400_000,
            _ => return Err(format!("unknown unit {c:?} in the age (s, m, h, d, w)")),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("unit {c:?} without a number before it"))?;
        num.clear();
        total = n
            .checked_mul(unit_ms)
            .and_then(|x| total.checked_add(x))
            .filter(|&t| t <= RELATIVE_MS_MAX)
            .ok_or_else(|| "the age is too large".to_string())?;
    }
    if !num.is_empty() {
        return Err(format!("{num} has no unit (s, m, h, d, w)"));
    }
    Ok(total)
}

/// `2025-03-01 22:39:05.123 UTC`.
pub fn format_time_ms(ms: u64) -> String {
    match jiff::Timestamp::from_millisecond(ms as i64) {
        Ok(ts) => format!("{}.{:03} UTC", ts.strftime("%Y-%m-%d %H:%M:%S"), ms % 1000),
        Err(_) => format!("{ms} ms since 1970"),
    }
}

/// A signed distance between two times, for people: `3m 12.5s`, `1h 2m 3.0s`, `0.8s`.
pub fn format_gap_ms(ms: u64) -> String {
    let (h, m, s) = (
        ms / 3_600_000,
        ms / 60_000 % 60,
        (ms % 60_000) as f64 / 1000.0,
    );
    match (h, m) {
        (0, 0) => format!("{s:.1}s"),
        (0, _) => format!("{m}m {s:.1}s"),
        _ => format!("{h}h {m}m {s:.1}s"),
    }
}

/// One snapshot as the clock sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timed {
    pub snap_id: u64,
    /// The cut time, or the commit time when the cut time is unknown.
    pub time_ms: u64,
    /// Whether `time_ms` is the cut time.
    pub is_cut: bool,
    /// The cut is earlier than an earlier snapshot's (the node's clock stepped back).
    pub stepped_back: bool,
    /// The latest time of this snapshot and every one before it: the time it counts as of.
    pub effective_ms: u64,
}

/// The chain's snapshots (oldest first, by sequence) with their times.
pub fn timeline(snaps: &[SnapshotInfo]) -> Vec<Timed> {
    let mut max = 0u64;
    snaps
        .iter()
        .map(|s| {
            let (time_ms, is_cut) = s.point_in_time_ms();
            let stepped_back = time_ms < max;
            max = max.max(time_ms);
            Timed {
                snap_id: s.snap_id,
                time_ms,
                is_cut,
                stepped_back,
                effective_ms: max,
            }
        })
        .collect()
}

/// The snapshot that holds `volume` as of `at_ms`: the newest committed one (by sequence) cut
/// at or before it. Refused, with what the data plane has, when `at_ms` is before the first
/// snapshot or after the newest committed cut (the recovery point).
pub fn resolve(snaps: &[SnapshotInfo], volume: &str, at_ms: u64) -> Result<Timed, String> {
    let tl = timeline(snaps);
    let (Some(first), Some(last)) = (tl.first(), tl.last()) else {
        return Err(format!(
            "volume {volume} has no committed snapshot on the data plane: nothing as of {}",
            format_time_ms(at_ms)
        ));
    };
    let what = |t: &Timed| {
        format!(
            "{} at {}",
            if t.is_cut {
                "cut"
            } else {
                "committed (cut time unknown)"
            },
            format_time_ms(t.time_ms)
        )
    };
    if at_ms > last.effective_ms {
        return Err(format!(
            "volume {volume} has no snapshot as of {}: its newest committed snapshot, {}, was {} — the recovery point, {} before the time asked. Writes after it are not on the data plane (a node's outbox may still hold newer snapshots: `deltavol status {volume}` there shows them). Give a time at or before that, or {volume}@{}",
            format_time_ms(at_ms),
            last.snap_id,
            what(last),
            format_gap_ms(at_ms - last.effective_ms),
            last.snap_id
        ));
    }
    match tl.iter().rposition(|t| t.effective_ms <= at_ms) {
        Some(i) => Ok(tl[i].clone()),
        None => Err(format!(
            "volume {volume} has no snapshot as of {}: its first snapshot, {}, was {} ({} later); nothing older is kept",
            format_time_ms(at_ms),
            first.snap_id,
            what(first),
            format_gap_ms(first.effective_ms - at_ms)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_740_868_740_000; // 2025-03-01 22:39:00 UTC

    fn snap(id: u64, cut: u64, commit: u64) -> SnapshotInfo {
        SnapshotInfo {
            snap_id: id,
            parent_id: id.saturating_sub(1),
            commit_time_ms: commit,
            bytes: 0,
            extent_count: 0,
            volume_size: 1 << 20,
            generation: 0,
            cut_time_ms: cut,
            ..Default::default()
        }
    }

    #[test]
    fn parses_the_forms_a_person_writes() {
        let now = T0 + 3_600_000;
        for (s, want) in [
            ("2025-03-01T22:39:00Z", T0),
            ("2025-03-01T22:39:00.250Z", T0 + 250),
            ("2025-03-01T23:39:00+01:00", T0),
            ("2025-03-01 22:39", T0),
            ("2025-03-01 22:39:00", T0),
            ("2025-03-01 22:39:07", T0 + 7000),
            ("2025-03-01 23:39 +01:00", T0),
            ("2025-03-01 22:39 UTC", T0),
            ("-15m", now - 900_000),
            ("-1h", T0),
            ("-2h30m", now - 9_000_000),
            ("-90s", now - 90_000),
            ("-1d", now - 86_400_000),
        ] {
            assert_eq!(parse_time(s, now), Ok(want), "{s}");
        }
        for bad in [
            "",
            "yesterday",
            "-15",
            "-m",
            "-15x",
            "2025-13-01 22:39",
            "2025-03-01 22:39 +25:00",
            "2025-03-01 22:39 Nowhere/Atlantis",
            "-99999999w",
        ] {
            let e = parse_time(bad, now).expect_err(bad);
            assert!(e.contains(bad.trim()) || bad.is_empty(), "{e}");
        }
        assert_eq!(format_time_ms(T0 + 5), "2025-03-01 22:39:00.005 UTC");
        assert_eq!(format_gap_ms(192_500), "3m 12.5s");
    }

    #[test]
    fn resolves_to_the_newest_cut_at_or_before_the_time() {
        // Cuts 10 s apart, all committed much later (the data plane was away).
        let late = T0 + 3_600_000;
        let snaps: Vec<_> = (1..=4)
            .map(|i| snap(i, T0 + (i - 1) * 10_000, late + i))
            .collect();
        // Exactly at a cut.
        assert_eq!(resolve(&snaps, "v", T0 + 10_000).unwrap().snap_id, 2);
        assert_eq!(resolve(&snaps, "v", T0).unwrap().snap_id, 1);
        // Between two cuts: the earlier.
        assert_eq!(resolve(&snaps, "v", T0 + 19_999).unwrap().snap_id, 2);
        // At the newest cut: the newest.
        assert_eq!(resolve(&snaps, "v", T0 + 30_000).unwrap().snap_id, 4);
        // Before the first.
        let e = resolve(&snaps, "v", T0 - 1).unwrap_err();
        assert!(
            e.contains("first snapshot, 1") && e.contains("nothing older"),
            "{e}"
        );
        // After the newest cut, even though before its commit: refused, naming the
        // recovery point.
        let e = resolve(&snaps, "v", T0 + 30_001).unwrap_err();
        assert!(
            e.contains("newest committed snapshot, 4") && e.contains("recovery point"),
            "{e}"
        );
        assert!(e.contains("2025-03-01 22:39:30.000 UTC"), "{e}");
        assert!(resolve(&[], "v", T0).is_err());
    }

    #[test]
    fn unknown_cut_times_count_as_their_commit_time() {
        let snaps = vec![
            snap(1, 0, T0),
            snap(2, 0, T0 + 60_000),
            snap(3, T0 + 90_000, T0 + 91_000),
        ];
        let tl = timeline(&snaps);
        assert!(!tl[0].is_cut && tl[0].time_ms == T0);
        assert!(tl[2].is_cut);
        assert_eq!(resolve(&snaps, "v", T0 + 59_999).unwrap().snap_id, 1);
        assert_eq!(resolve(&snaps, "v", T0 + 60_000).unwrap().snap_id, 2);
        let e = resolve(&snaps, "v", T0 - 1).unwrap_err();
        assert!(e.contains("committed (cut time unknown)"), "{e}");
    }

    #[test]
    fn a_clock_stepped_back_is_flagged_and_resolution_follows_the_sequence() {
        // Snapshot 3 was cut after 2 but the clock had stepped back 20 s.
        let snaps = vec![
            snap(1, T0, T0 + 1),
            snap(2, T0 + 30_000, T0 + 30_001),
            snap(3, T0 + 10_000, T0 + 10_001),
            snap(4, T0 + 40_000, T0 + 40_001),
        ];
        let tl = timeline(&snaps);
        assert_eq!(
            tl.iter().map(|t| t.stepped_back).collect::<Vec<_>>(),
            [false, false, true, false]
        );
        assert_eq!(tl[2].time_ms, T0 + 10_000, "kept as recorded");
        // At T0+15s, 3's own cut time is before it, but 2 (before it in the chain) was cut
        // after it: 3 holds writes made after T0+30s. The answer is 1.
        assert_eq!(resolve(&snaps, "v", T0 + 15_000).unwrap().snap_id, 1);
        // From 2's cut on, the newest by sequence: 3.
        assert_eq!(resolve(&snaps, "v", T0 + 30_000).unwrap().snap_id, 3);
        assert_eq!(resolve(&snaps, "v", T0 + 39_999).unwrap().snap_id, 3);
        assert_eq!(resolve(&snaps, "v", T0 + 40_000).unwrap().snap_id, 4);
    }
}
