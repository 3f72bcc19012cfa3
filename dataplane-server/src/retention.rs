//! Retention policies: which snapshots of a chain to keep, in the usual grandfather-father-son
//! shape (the `--keep-*` rules of restic and borg): the last N, and the newest snapshot of
//! each of the last N hours, days, ISO weeks and months (UTC), plus every pinned one.
//!
//! [`select`] is pure: it is given the chain (oldest first) with each snapshot's point in time
//! and what protects it, and says which snapshots the policy lets go. The store applies it
//! ([`crate::store`]): deleting merges a snapshot into its successor, so every kept snapshot
//! reads exactly as before.
//!
//! A snapshot's time is its cut, made monotonic along the chain (a snapshot counts as of the
//! latest cut of itself and every snapshot before it, as `recover --at` resolves times), so
//! that a clock stepping back never makes the policy keep an older state in place of a newer.
//!
//! Never let go, whatever the policy: the chain head, pinned snapshots, and snapshots the caller
//! marks protected (a clone's source, a snapshot a hydration is reading).

use std::collections::HashSet;
use std::fmt;

/// How many snapshots of each kind to keep. All zero: keep everything (no policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

impl Policy {
    /// No policy: every snapshot is kept.
    pub fn keeps_all(&self) -> bool {
        *self == Policy::default()
    }

    /// `last=50,hourly=24,daily=7,weekly=4,monthly=12` (any subset, any order); `none` or
    /// the empty string for no policy.
    pub fn parse(s: &str) -> Result<Policy, String> {
        let mut p = Policy::default();
        let s = s.trim();
        if s.is_empty() || s == "none" {
            return Ok(p);
        }
        let mut seen = HashSet::new();
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: write KIND=N, e.g. last=50,hourly=24,daily=7"))?;
            let (k, v) = (k.trim(), v.trim());
            let n: u32 = v
                .parse()
                .map_err(|_| format!("{k}={v:?}: not a count (0 to {})", u32::MAX))?;
            if !seen.insert(k.to_string()) {
                return Err(format!("{k} given twice"));
            }
            match k {
                "last" => p.last = n,
                "hourly" => p.hourly = n,
                "daily" => p.daily = n,
                "weekly" => p.weekly = n,
                "monthly" => p.monthly = n,
                _ => {
                    return Err(format!(
                        "unknown kind {k:?}: use last, hourly, daily, weekly, monthly"
                    ))
                }
            }
        }
        Ok(p)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.keeps_all() {
            return f.write_str("none");
        }
        let mut parts = Vec::new();
        for (k, v) in [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
        ] {
            if v > 0 {
                parts.push(format!("{k}={v}"));
            }
        }
        f.write_str(&parts.join(","))
    }
}

impl From<crate::store::format::RetentionCounts> for Policy {
    fn from(r: crate::store::format::RetentionCounts) -> Self {
        let crate::store::format::RetentionCounts {
            last,
            hourly,
            daily,
            weekly,
            monthly,
        } = r;
        Policy {
            last,
            hourly,
            daily,
            weekly,
            monthly,
        }
    }
}

impl From<Policy> for crate::store::format::RetentionCounts {
    fn from(p: Policy) -> Self {
        let Policy {
            last,
            hourly,
            daily,
            weekly,
            monthly,
        } = p;
        crate::store::format::RetentionCounts {
            last,
            hourly,
            daily,
            weekly,
            monthly,
        }
    }
}

impl Policy {
    /// The policy of a wire `Retention` table.
    pub fn from_wire(r: deltavol_schemas::wire::Retention<'_>) -> Policy {
        Policy {
            last: r.last(),
            hourly: r.hourly(),
            daily: r.daily(),
            weekly: r.weekly(),
            monthly: r.monthly(),
        }
    }

    /// The arguments of a wire `Retention` table holding this policy.
    pub fn to_wire(&self) -> deltavol_schemas::wire::RetentionArgs {
        deltavol_schemas::wire::RetentionArgs {
            last: self.last,
            hourly: self.hourly,
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
        }
    }
}

/// One snapshot of the chain as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub snap_id: u64,
    /// Its point in time, ms since the Unix epoch (the cut; the commit when the cut is
    /// unknown). Made monotonic by [`select`].
    pub time_ms: u64,
    pub pinned: bool,
    /// Why it must stay regardless of the policy (a clone's source, being read), if so.
    pub protected: Option<String>,
}

/// Why a snapshot is kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Head,
    Pinned,
    Protected(String),
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Head => f.write_str("head"),
            Reason::Pinned => f.write_str("pinned"),
            Reason::Protected(why) => f.write_str(why),
            Reason::Last => f.write_str("last"),
            Reason::Hourly => f.write_str("hourly"),
            Reason::Daily => f.write_str("daily"),
            Reason::Weekly => f.write_str("weekly"),
            Reason::Monthly => f.write_str("monthly"),
        }
    }
}

/// The policy's verdict on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub snap_id: u64,
    /// Empty: the policy lets it go.
    pub kept_for: Vec<Reason>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.kept_for.is_empty()
    }
}

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Days since 1970-01-01 to (year, month) in the proleptic Gregorian calendar (UTC).
fn year_month(days: i64) -> (i64, u32) {
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

/// The bucket of a time for each calendar rule.
fn bucket(rule: &Reason, t_ms: u64) -> i64 {
    let days = (t_ms / DAY_MS) as i64;
    match rule {
        Reason::Hourly => (t_ms / HOUR_MS) as i64,
        Reason::Daily => days,
        // ISO weeks start on Monday; 1970-01-01 was a Thursday.
        Reason::Weekly => (days + 3).div_euclid(7),
        Reason::Monthly => {
            let (y, m) = year_month(days);
            y * 12 + i64::from(m)
        }
        _ => 0,
    }
}

/// Which snapshots of `chain` (oldest first, the last one the head) `policy` keeps, and why.
/// With no policy everything is kept (for reasons `last`).
pub fn select(policy: &Policy, chain: &[Candidate]) -> Vec<Decision> {
    let n = chain.len();
    // Monotonic times along the chain.
    let mut times = Vec::with_capacity(n);
    let mut t = 0u64;
    for c in chain {
        t = t.max(c.time_ms);
        times.push(t);
    }
    let mut out: Vec<Decision> = chain
        .iter()
        .map(|c| Decision {
            snap_id: c.snap_id,
            kept_for: Vec::new(),
        })
        .collect();
    for (i, c) in chain.iter().enumerate() {
        if i + 1 == n {
            out[i].kept_for.push(Reason::Head);
        }
        if c.pinned {
            out[i].kept_for.push(Reason::Pinned);
        }
        if let Some(why) = &c.protected {
            out[i].kept_for.push(Reason::Protected(why.clone()));
        }
    }
    let last = if policy.keeps_all() {
        n as u32
    } else {
        policy.last
    };
    for d in out.iter_mut().rev().take(last as usize) {
        d.kept_for.push(Reason::Last);
    }
    for (rule, count) in [
        (Reason::Hourly, policy.hourly),
        (Reason::Daily, policy.daily),
        (Reason::Weekly, policy.weekly),
        (Reason::Monthly, policy.monthly),
    ] {
        // Newest first: the first snapshot met in each bucket is that bucket's newest.
        let mut buckets = 0u32;
        let mut prev: Option<i64> = None;
        for i in (0..n).rev() {
            if buckets >= count {
                break;
            }
            let b = bucket(&rule, times[i]);
            if prev != Some(b) {
                prev = Some(b);
                buckets += 1;
                out[i].kept_for.push(rule.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(times: &[u64]) -> Vec<Candidate> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| Candidate {
                snap_id: i as u64 + 1,
                time_ms: *t,
                pinned: false,
                protected: None,
            })
            .collect()
    }

    fn kept(p: &Policy, c: &[Candidate]) -> Vec<u64> {
        select(p, c)
            .into_iter()
            .filter(|d| d.keep())
            .map(|d| d.snap_id)
            .collect()
    }

    #[test]
    fn parse_and_display() {
        let p = Policy::parse("last=50, hourly=24,daily=7").unwrap();
        assert_eq!(
            p,
            Policy {
                last: 50,
                hourly: 24,
                daily: 7,
                weekly: 0,
                monthly: 0
            }
        );
        assert_eq!(p.to_string(), "last=50,hourly=24,daily=7");
        assert!(Policy::parse("none").unwrap().keeps_all());
        assert!(Policy::parse("").unwrap().keeps_all());
        assert!(Policy::parse("yearly=1")
            .unwrap_err()
            .contains("unknown kind"));
        assert!(Policy::parse("last=-1")
            .unwrap_err()
            .contains("not a count"));
        assert!(Policy::parse("last").unwrap_err().contains("KIND=N"));
        assert!(Policy::parse("last=1,last=2")
            .unwrap_err()
            .contains("twice"));
        assert_eq!(Policy::parse(&p.to_string()).unwrap(), p);
    }

    #[test]
    fn no_policy_keeps_everything_and_the_head_is_always_kept() {
        let c = chain(&[1, 2, 3]);
        assert_eq!(kept(&Policy::default(), &c), vec![1, 2, 3]);
        let only_daily = Policy {
            daily: 1,
            ..Default::default()
        };
        // All three in one day: the newest is that day's, and the head.
        assert_eq!(kept(&only_daily, &c), vec![3]);
        assert_eq!(
            kept(
                &Policy {
                    last: 0,
                    ..only_daily
                },
                &chain(&[5])
            ),
            vec![1]
        );
    }

    #[test]
    fn last_n_and_hourly_buckets() {
        // A snapshot every 15 minutes for 10 hours: 40 snapshots.
        let times: Vec<u64> = (0..40)
            .map(|i| 1_700_000_000_000 / HOUR_MS * HOUR_MS + i * 900_000)
            .collect();
        let c = chain(&times);
        let p = Policy {
            last: 3,
            hourly: 4,
            ..Default::default()
        };
        // The last 3 (38, 39, 40), and the newest of each of the last 4 hours: 40, 36, 32, 28.
        assert_eq!(kept(&p, &c), vec![28, 32, 36, 38, 39, 40]);
        let d = select(&p, &c);
        assert_eq!(
            d[39].kept_for,
            vec![Reason::Head, Reason::Last, Reason::Hourly]
        );
        assert_eq!(d[31].kept_for, vec![Reason::Hourly]);
    }

    #[test]
    fn days_weeks_months_in_utc() {
        // 2025-01-31 12:00 UTC, 2025-02-01 12:00, 2025-02-03 (Monday) 12:00, 2025-02-04 12:00.
        let t = |ms: u64| ms;
        let jan31 = 1_738_324_800_000u64;
        let c = chain(&[
            t(jan31),
            jan31 + DAY_MS,
            jan31 + 3 * DAY_MS,
            jan31 + 4 * DAY_MS,
        ]);
        let weekly = Policy {
            weekly: 2,
            ..Default::default()
        };
        // Weeks: Fri 31 and Sat 1 share a week (Mon 27 Jan..), Mon 3 and Tue 4 the next.
        assert_eq!(kept(&weekly, &c), vec![2, 4]);
        let monthly = Policy {
            monthly: 5,
            ..Default::default()
        };
        assert_eq!(kept(&monthly, &c), vec![1, 4]);
        let daily = Policy {
            daily: 3,
            ..Default::default()
        };
        assert_eq!(kept(&daily, &c), vec![2, 3, 4]);
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month((jan31 / DAY_MS) as i64), (2025, 1));
        assert_eq!(year_month((jan31 / DAY_MS) as i64 + 1), (2025, 2));
        assert_eq!(year_month(19_782), (2024, 2)); // 2024-02-29
        assert_eq!(year_month(19_783), (2024, 3));
    }

    #[test]
    fn pins_protection_and_a_clock_stepping_back() {
        let mut c = chain(&[10 * DAY_MS, 11 * DAY_MS, 12 * DAY_MS, 13 * DAY_MS]);
        c[0].pinned = true;
        c[1].protected = Some("source of clone db1-test".into());
        let p = Policy {
            last: 1,
            ..Default::default()
        };
        let d = select(&p, &c);
        assert_eq!(kept(&p, &c), vec![1, 2, 4]);
        assert_eq!(
            d[1].kept_for,
            vec![Reason::Protected("source of clone db1-test".into())]
        );
        // Snapshot 3's clock stepped back a day: it still counts as of day 12, after 2.
        let c = chain(&[10 * DAY_MS, 12 * DAY_MS, 11 * DAY_MS, 13 * DAY_MS]);
        let daily = Policy {
            daily: 2,
            ..Default::default()
        };
        // Days 12 (snapshots 2 and 3: 3 is the newest of that day) and 13.
        assert_eq!(kept(&daily, &c), vec![3, 4]);
    }
}
