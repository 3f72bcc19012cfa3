//! Prometheus metrics of attached volumes (`deltavol add --metrics-listen ADDR`): every
//! sample is read from [`Volume::status`] at scrape time, labelled `volume="NAME"`, so the I/O
//! path does no work for them beyond the per-queue counters it already keeps.
//!
//! Served by the data plane's small HTTP responder ([`deltavol_dataplane::metrics`]: one
//! thread, `GET /metrics`, bounded request size and deadline). Metrics of the shipper
//! (`deltavol_outbox_*`, `deltavol_recovery_point_*`, ...) appear only for a volume attached
//! with `--dataplane`, those of hydration only while one ran in this daemon.
//!
//! `deltavol_io_latency_seconds{op}` is a histogram of request latency per op, from the
//! per-queue buckets the handler fills ([`crate::cache::LatencyStats`]: two clock reads and two
//! relaxed adds on the queue's own counters per request).

use std::sync::Arc;

use deltavol_dataplane::metrics::{counters, gauges, Sample};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::cache::{
    LATENCY_BUCKETS, LATENCY_BUCKET_BOUNDS_US, LATENCY_FLUSH, LATENCY_READ, LATENCY_WRITE,
};
use crate::volume::{Volume, VolumeStatus};

/// The prefix of every metric name.
pub const PREFIX: &str = "deltavol";

/// Reads the volumes' status at each scrape.
pub struct VolumeCollector {
    volumes: Vec<Arc<Volume>>,
}

impl std::fmt::Debug for VolumeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeCollector")
            .field("volumes", &self.volumes.len())
            .finish()
    }
}

/// The registry of `volumes`: every metric named `deltavol_*`, labelled by volume. Turns on
/// their request timing (the latency histograms).
pub fn registry(volumes: Vec<Arc<Volume>>) -> Registry {
    // Exported latency histograms need their requests timed (off otherwise: not free).
    for v in &volumes {
        v.cache
            .time_requests
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let mut r = Registry::with_prefix(PREFIX);
    r.register_collector(Box::new(VolumeCollector { volumes }));
    r
}

fn flag(b: bool) -> u64 {
    u64::from(b)
}

/// The samples of one metric, one per volume that has it (`f` gives `None` otherwise).
fn per_volume<'a, V>(
    st: &'a [VolumeStatus],
    labels: &'a [[(&'a str, &'a str); 1]],
    f: impl Fn(&VolumeStatus) -> Option<V>,
) -> Vec<Sample<'a, V>> {
    st.iter()
        .zip(labels)
        .filter_map(|(s, l)| Some((&l[..], f(s)?)))
        .collect()
}

impl Collector for VolumeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let st: Vec<VolumeStatus> = self.volumes.iter().map(|v| v.status()).collect();
        let vl: Vec<[(&str, &str); 1]> = st.iter().map(|s| [("volume", s.name.as_str())]).collect();
        let e = &mut enc;

        const OPS: [&str; 3] = ["read", "write", "flush"];
        let ol: Vec<[(&str, &str); 2]> = st
            .iter()
            .flat_map(|s| OPS.map(|o| [("volume", s.name.as_str()), ("op", o)]))
            .collect();
        let by_op = |f: &dyn Fn(&VolumeStatus, &str) -> Option<u64>| -> Vec<Sample<'_, u64>> {
            ol.iter()
                .enumerate()
                .filter_map(|(i, l)| Some((&l[..], f(&st[i / OPS.len()], OPS[i % OPS.len()])?)))
                .collect()
        };
        let requests = by_op(&|s, op| match op {
            "read" => Some(s.reads),
            "write" => Some(s.writes),
            _ => Some(s.flush_requests),
        });
        counters(
            e,
            "io_requests",
            "Block requests completed, by op.",
            &requests,
        )?;
        let bytes = by_op(&|s, op| match op {
            "read" => Some(s.read_bytes),
            "write" => Some(s.write_bytes),
            _ => None,
        });
        counters(
            e,
            "io_bytes",
            "Bytes read and written by block requests.",
            &bytes,
        )?;

        // Latency histograms: one descriptor, a family per (volume, op).
        {
            let mut m = e.encode_descriptor(
                "io_latency_seconds",
                "Block request latency, by op (from the handler's start to its result).",
                None,
                MetricType::Histogram,
            )?;
            for (i, l) in ol.iter().enumerate() {
                let cache = &self.volumes[i / OPS.len()].cache;
                let timed = [LATENCY_READ, LATENCY_WRITE, LATENCY_FLUSH][i % OPS.len()];
                let (counts, sum_ns) = cache.latency_sum(timed);
                let mut buckets = [(f64::MAX, 0u64); LATENCY_BUCKETS];
                for (j, (b, n)) in buckets.iter_mut().zip(counts).enumerate() {
                    if let Some(us) = LATENCY_BUCKET_BOUNDS_US.get(j) {
                        b.0 = *us as f64 / 1e6;
                    }
                    b.1 = n;
                }
                let count = counts.iter().sum();
                m.encode_family(&&l[..])?.encode_histogram::<NoLabelSet>(
                    sum_ns as f64 / 1e9,
                    count,
                    &buckets,
                    None,
                )?;
            }
        }

        let c = |e: &mut DescriptorEncoder,
                 name: &str,
                 help: &str,
                 f: &dyn Fn(&VolumeStatus) -> Option<u64>| {
            counters(e, name, help, &per_volume(&st, &vl, f))
        };
        let g = |e: &mut DescriptorEncoder,
                 name: &str,
                 help: &str,
                 f: &dyn Fn(&VolumeStatus) -> Option<u64>| {
            gauges(e, name, help, &per_volume(&st, &vl, f))
        };
        let gf = |e: &mut DescriptorEncoder,
                  name: &str,
                  help: &str,
                  f: &dyn Fn(&VolumeStatus) -> Option<f64>| {
            gauges(e, name, help, &per_volume(&st, &vl, f))
        };

        c(
            e,
            "read_cache_hits",
            "Reads served by the in-memory read cache.",
            &|s| Some(s.read_cache_hits),
        )?;
        c(
            e,
            "read_cache_misses",
            "Reads the in-memory read cache could not serve.",
            &|s| Some(s.read_cache_misses),
        )?;
        g(
            e,
            "read_cache_blocks",
            "Blocks held by the read cache.",
            &|s| Some(s.read_cache_blocks),
        )?;
        c(
            e,
            "backpressure_waits",
            "Writes that waited for the flush thread because the SSD cache was full.",
            &|s| Some(s.backpressure_waits),
        )?;
        g(e, "size_bytes", "Volume size.", &|s| Some(s.size_bytes))?;
        g(
            e,
            "dirty_bytes",
            "Bytes on the SSD cache not yet on permanent storage.",
            &|s| Some(s.dirty_bytes),
        )?;
        g(
            e,
            "ssd_used_bytes",
            "Bytes of the SSD cache in use.",
            &|s| Some(s.ssd_used_bytes),
        )?;
        g(
            e,
            "ssd_allocated_bytes",
            "Bytes allocated by the SSD cache files.",
            &|s| Some(s.ssd_allocated_bytes),
        )?;
        g(
            e,
            "cache_limit_bytes",
            "The SSD cache limit (--cache-limit).",
            &|s| Some(s.cache_limit_bytes),
        )?;
        g(e, "epoch", "The epoch writes go to now.", &|s| {
            Some(s.epoch)
        })?;
        g(
            e,
            "flushed_epoch",
            "The newest epoch on permanent storage.",
            &|s| Some(s.flushed_epoch),
        )?;
        g(
            e,
            "durability_failed",
            "1 when the SSD cache could not be made durable (writes are refused).",
            &|s| Some(flag(s.durability_failed)),
        )?;
        c(e, "flushes", "Epochs flushed to permanent storage.", &|s| {
            Some(s.flush.flushes)
        })?;
        c(
            e,
            "flush_failures",
            "Failed flush attempts (each is retried).",
            &|s| Some(s.flush.failed_attempts),
        )?;
        g(
            e,
            "flush_consecutive_failures",
            "Failed flush attempts since the last success (0 when healthy).",
            &|s| Some(s.flush.consecutive_failures),
        )?;
        gf(
            e,
            "last_flush_duration_seconds",
            "How long the last flush took.",
            &|s| Some(s.flush.last.as_ref()?.duration_ms as f64 / 1000.0),
        )?;
        c(
            e,
            "flushed_bytes",
            "Dirty bytes written to permanent storage by flushes.",
            &|s| Some(s.flush.data_bytes_total),
        )?;

        // With --dataplane.
        g(
            e,
            "shipper_connected",
            "1 while the shipper is connected to a data-plane server.",
            &|s| Some(flag(s.shipping.as_ref()?.connected)),
        )?;
        g(
            e,
            "fenced",
            "1 once the volume was recovered elsewhere (this node ships nothing more).",
            &|s| Some(flag(s.shipping.as_ref()?.fenced)),
        )?;
        g(
            e,
            "snapshot_head",
            "Newest snapshot made durable (committed on the data plane or in the outbox).",
            &|s| Some(s.shipping.as_ref()?.head),
        )?;
        g(
            e,
            "last_committed_snapshot",
            "Newest snapshot committed on the data plane.",
            &|s| s.shipping.as_ref()?.last_committed,
        )?;
        g(
            e,
            "outbox_entries",
            "Snapshots spooled in the outbox, not yet on the data plane.",
            &|s| Some(s.shipping.as_ref()?.outbox_entries),
        )?;
        g(e, "outbox_bytes", "Bytes spooled in the outbox.", &|s| {
            Some(s.shipping.as_ref()?.outbox_bytes)
        })?;
        c(e, "shipped_bytes", "Bytes sent to the data plane.", &|s| {
            Some(s.shipping.as_ref()?.bytes_sent)
        })?;
        // The recovery point: the cut of the newest committed snapshot (its commit time when
        // the cut time is unknown).
        let rp_ms = |s: &VolumeStatus| {
            let sh = s.shipping.as_ref()?;
            sh.last_committed_cut_unix_ms.or(sh.last_committed_unix_ms)
        };
        gf(
            e,
            "recovery_point_timestamp_seconds",
            "Cut time (unix) of the newest snapshot committed on the data plane.",
            &|s| Some(rp_ms(s)? as f64 / 1000.0),
        )?;
        let now_ms = crate::cache::now_unix_ms();
        gf(
            e,
            "recovery_point_age_seconds",
            "Age of the newest committed snapshot: the writes a recovery now would lose.",
            &|s| Some(now_ms.saturating_sub(rp_ms(s)?) as f64 / 1000.0),
        )?;

        // While hydrating (recover, clone).
        g(
            e,
            "hydration_local_bytes",
            "Bytes of the volume already local.",
            &|s| Some(s.hydration.as_ref()?.local_bytes),
        )?;
        g(
            e,
            "hydration_total_bytes",
            "Bytes to hydrate in all.",
            &|s| Some(s.hydration.as_ref()?.total_bytes),
        )?;
        g(e, "hydration_done", "1 once hydration is complete.", &|s| {
            Some(flag(s.hydration.as_ref()?.done))
        })?;
        c(
            e,
            "hydration_extents_fetched",
            "Extents read from the data plane (for reads, ahead of them and in the background).",
            &|s| Some(s.hydration.as_ref()?.extents_fetched),
        )?;
        c(
            e,
            "hydration_fetched_on_demand",
            "Extents fetched for reads of blocks not yet local.",
            &|s| Some(s.hydration.as_ref()?.fetched_on_demand),
        )?;
        c(
            e,
            "hydration_extents_read_ahead",
            "Extents fetched ahead of reads of blocks not yet local in order (readahead).",
            &|s| Some(s.hydration.as_ref()?.extents_read_ahead),
        )?;
        Ok(())
    }
}
