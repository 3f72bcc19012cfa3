//! deltavol: a ublk block-device target with an SSD writeback cache, point-in-time epochs
//! and a flush thread that writes them to permanent storage.
//!
//! The data path, in the order a request meets it:
//! [`queue`] (ublk queue threads and their handlers) → [`cache`] (mirror pair, epochs,
//! bitmaps, read cache) → [`flush`] (cut, write back, ship deltas). [`ring`] is the one place
//! that pushes io_uring SQEs. [`volume`] ties a volume's parts together; [`daemon`] and
//! [`cli`] are the edge, [`metrics`] exports [`volume::Volume::status`] to Prometheus.
//! [`crypt`] seals what crosses to the data plane for an encrypted volume, and opens what
//! comes back. [`zerocopy`] decides whether a device's requests reach the engine in their own
//! pages (`UBLK_F_AUTO_BUF_REG`) or through a copy.

pub mod agent;
pub mod cache;
pub mod cli;
pub mod control;
pub mod crypt;
pub mod daemon;
pub mod error;
pub mod fault;
pub mod flush;
pub mod heat;
pub mod hydrate;
pub mod label;
pub mod metrics;
pub mod prio;
pub mod procmem;
pub mod queue;
pub mod resume;
pub mod ring;
pub mod ship;
pub mod size;
pub mod top;
pub mod verify;
pub mod volume;
pub mod when;
pub mod zerocopy;
