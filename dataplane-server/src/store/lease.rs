//! Volume leases on a shared object store: which data-plane server serves a volume.
//!
//! A lease is a sequence of numbered objects `volumes/<name>/lease/<epoch:020>.lease`, each
//! created with a create-if-absent put: `{holder, expires_ms}`. The newest epoch is the lease.
//! A server takes a volume when the newest epoch is its own, absent, or expired (its
//! `expires_ms`, by the writer's wall clock, is past), by creating the next epoch; of two
//! servers trying at once exactly one creates it. The holder renews by creating the next epoch
//! again every third of the lease duration. It counts its lease valid only until its own
//! put time plus the duration minus a quarter (on its monotonic clock), so with clock skew
//! below a quarter of the duration it stops writing before anyone else may start.
//!
//! Leases keep servers from serving one volume at once; they are not what keeps the chain
//! whole: that is the create-if-absent commit of numbered manifests, which fails for a late
//! writer whatever its lease believes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::backend::{CreateOutcome, ObjBackend};
use super::{now_ms, StoreError, StoreErrorKind};

/// Default lease duration.
pub const LEASE_MS_DEFAULT: u64 = 30_000;
/// Shortest lease accepted (tests use a few seconds).
pub const LEASE_MS_MIN: u64 = 1_000;
/// Cap on a lease object.
const LEASE_OBJECT_MAX_BYTES: usize = 4096;

/// This server's lease settings.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Names this server in lease objects (unique per process).
    pub server_id: String,
    pub duration_ms: u64,
}

/// A lease this server holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    valid_until: Instant,
}

/// The leases of one server.
#[derive(Debug)]
pub struct Leases {
    pub settings: LeaseSettings,
    held: Mutex<HashMap<String, Held>>,
}

/// A lease object's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub epoch: u64,
    pub holder: String,
    pub expires_ms: u64,
}

pub fn lease_rel(volume: &str, epoch: u64) -> String {
    format!("volumes/{volume}/lease/{epoch:020}.lease")
}

fn parse_lease_name(name: &str) -> Option<u64> {
    name.strip_suffix(".lease")?.parse().ok()
}

fn encode(holder: &str, expires_ms: u64) -> Vec<u8> {
    serde_json::json!({"v": 1, "holder": holder, "expires_ms": expires_ms})
        .to_string()
        .into_bytes()
}

fn decode(raw: &[u8], epoch: u64, what: &str) -> Result<LeaseRecord, StoreError> {
    let corrupt = |why: String| StoreError::new(StoreErrorKind::Corrupt, format!("{what}: {why}"));
    if raw.len() > LEASE_OBJECT_MAX_BYTES {
        return Err(corrupt("lease object too large".into()));
    }
    let v: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| corrupt(format!("not a lease: {e}")))?;
    if v["v"] != 1 {
        return Err(corrupt(format!("unknown lease version {}", v["v"])));
    }
    let holder = v["holder"]
        .as_str()
        .ok_or_else(|| corrupt("no holder".into()))?
        .to_string();
    let expires_ms = v["expires_ms"]
        .as_u64()
        .ok_or_else(|| corrupt("no expiry".into()))?;
    Ok(LeaseRecord {
        epoch,
        holder,
        expires_ms,
    })
}

/// The newest lease record of `volume`, if any.
pub async fn latest(obj: &ObjBackend, volume: &str) -> Result<Option<LeaseRecord>, StoreError> {
    let listed = obj.list(&format!("volumes/{volume}/lease")).await?;
    let mut epoch = listed
        .iter()
        .filter_map(|m| m.location.filename().and_then(parse_lease_name))
        .max();
    loop {
        let next = epoch.map_or(1, |e| e + 1);
        if obj
            .head(&obj.key(&lease_rel(volume, next)))
            .await?
            .is_none()
        {
            break;
        }
        epoch = Some(next);
    }
    let Some(epoch) = epoch else {
        return Ok(None);
    };
    let key = obj.key(&lease_rel(volume, epoch));
    match obj.get(&key).await? {
        Some(raw) => decode(&raw, epoch, key.as_ref()).map(Some),
        None => Err(StoreError::new(
            StoreErrorKind::Io,
            format!("lease {key} vanished while being read: retry"),
        )),
    }
}

/// Why a volume cannot be served here.
#[derive(Debug)]
pub enum LeaseRefusal {
    /// Another live server holds it.
    Held(LeaseRecord),
    /// A renewal found the lease no longer this server's.
    Lost,
    Store(StoreError),
}

impl std::fmt::Display for LeaseRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseRefusal::Held(r) => write!(
                f,
                "served by data-plane server {:?} (lease epoch {} valid for {} ms more): \
                 connect to that server, or retry here after its lease expires",
                r.holder,
                r.epoch,
                r.expires_ms.saturating_sub(now_ms())
            ),
            LeaseRefusal::Lost => write!(f, "no longer leased to this server"),
            LeaseRefusal::Store(e) => write!(f, "lease check failed: {e}"),
        }
    }
}

impl Leases {
    pub fn new(settings: LeaseSettings) -> Leases {
        Leases {
            settings,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this server may write `volume` now.
    pub fn valid(&self, volume: &str) -> bool {
        self.held()
            .get(volume)
            .is_some_and(|h| h.valid_until > Instant::now())
    }

    /// Takes or renews the lease of `volume`. `Ok(true)` when it was newly taken (the caller
    /// reloads the volume's state: another server may have changed it).
    pub async fn ensure(&self, obj: &ObjBackend, volume: &str) -> Result<bool, LeaseRefusal> {
        if self.valid(volume) {
            return Ok(false);
        }
        self.take(obj, volume, None).await.map(|()| true)
    }

    /// One attempt series at creating the next epoch with this server as holder. With
    /// `renew_of`, only as the successor of that epoch of this server's (else `Lost`).
    async fn take(
        &self,
        obj: &ObjBackend,
        volume: &str,
        renew_of: Option<u64>,
    ) -> Result<(), LeaseRefusal> {
        let me = &self.settings.server_id;
        let duration = self.settings.duration_ms;
        for _ in 0..4 {
            let cur = latest(obj, volume).await.map_err(LeaseRefusal::Store)?;
            if let Some(e) = renew_of {
                if !cur
                    .as_ref()
                    .is_some_and(|r| r.epoch == e && &r.holder == me)
                {
                    return Err(LeaseRefusal::Lost);
                }
            }
            if let Some(r) = &cur {
                if &r.holder != me && r.expires_ms > now_ms() {
                    return Err(LeaseRefusal::Held(r.clone()));
                }
            }
            let epoch = cur.map_or(1, |r| r.epoch + 1);
            let started = Instant::now();
            let key = obj.key(&lease_rel(volume, epoch));
            match obj
                .put_create(&key, encode(me, now_ms() + duration))
                .await
                .map_err(LeaseRefusal::Store)?
            {
                CreateOutcome::Created => {
                    let valid_until = started + Duration::from_millis(duration - duration / 4);
                    self.held()
                        .insert(volume.to_string(), Held { epoch, valid_until });
                    tracing::debug!(volume, epoch, "lease taken");
                    return Ok(());
                }
                CreateOutcome::Exists => continue,
            }
        }
        Err(LeaseRefusal::Store(StoreError::new(
            StoreErrorKind::Io,
            format!("lease of volume {volume}: lost four races in a row"),
        )))
    }

    /// Renews every lease held; a lease found taken by another server is dropped.
    pub async fn renew_all(&self, obj: &ObjBackend) {
        let names: Vec<(String, u64)> = self
            .held()
            .iter()
            .map(|(k, v)| (k.clone(), v.epoch))
            .collect();
        for (volume, epoch) in names {
            match self.take(obj, &volume, Some(epoch)).await {
                Ok(()) => {}
                Err(LeaseRefusal::Store(e)) => {
                    // Kept until it runs out: the next round tries again.
                    tracing::warn!(volume, error = %e, "lease renewal failed: retrying");
                }
                Err(e) => {
                    tracing::warn!(volume, error = %e, "lease lost: no longer serving writes");
                    self.held().remove(&volume);
                }
            }
        }
    }

    /// Starts the renewal loop on the object-store runtime; it ends when `obj` is dropped.
    pub fn start_renewal(obj: &Arc<ObjBackend>) {
        let Some(leases) = obj.leases() else {
            return;
        };
        let period = Duration::from_millis((leases.settings.duration_ms / 3).max(100));
        let weak: Weak<ObjBackend> = Arc::downgrade(obj);
        obj.spawn_detached(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(obj) = weak.upgrade() else {
                    return;
                };
                if let Some(l) = obj.leases() {
                    l.renew_all(&obj).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_record_round_trip_and_refusals() {
        let raw = encode("srv-1", 1234);
        let r = decode(&raw, 7, "l").unwrap();
        assert_eq!(
            r,
            LeaseRecord {
                epoch: 7,
                holder: "srv-1".into(),
                expires_ms: 1234
            }
        );
        assert!(decode(b"{\"v\":2,\"holder\":\"a\",\"expires_ms\":1}", 1, "l").is_err());
        assert!(decode(b"{\"v\":1,\"expires_ms\":1}", 1, "l").is_err());
        assert!(decode(b"garbage", 1, "l").is_err());
        assert!(decode(&vec![b' '; 5000], 1, "l").is_err());
        assert_eq!(parse_lease_name("00000000000000000012.lease"), Some(12));
        assert_eq!(parse_lease_name("x.lease"), None);
    }
}
