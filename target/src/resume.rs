//! Resuming a volume whose SSD cache is lost but whose backing file is kept.
//!
//! `add` on a cache dir that holds no volume, over a backing file that does and whose backing
//! label ([`crate::label`]) names this volume, must not start a new volume (a stranger under
//! the same name, with a new id the data plane refuses) nor trust a backing file that is no
//! point in time. It resumes the volume under its own identity (id, generation, chain), in one
//! of two ways, and says which in the log and in `status` (`resumed`):
//!
//! - **continue**: the backing holds exactly an epoch the snapshot chain ends at (label
//!   `Clean(E)`, or `Writing(E)` with snapshot E committed on the data plane — the backing is
//!   synced before a snapshot commits). The volume continues at once from epoch E: no restore,
//!   the outbox ships what it holds, the chain goes on (a data plane that lacks snapshots gets
//!   a full base, as after any gap).
//! - **resync from the data plane**: the backing is a mix (a flush of epoch E was half
//!   written, or the volume was still hydrating), so the volume is brought back to the newest
//!   snapshot H on the data plane: it restarts hydrating from H over the kept backing (reads of
//!   blocks not yet restored are fetched on the fly, a write is never overwritten), and its
//!   next snapshot chains onto H. The device then equals snapshot H, a point in time, instead
//!   of a torn epoch. Without a snapshot to go back to (H = 0 on a volume that is no clone),
//!   the point in time is the empty volume: the backing is zeroed.
//!
//! Refused, with what to do: a backing of another volume, another size, a volume the data
//! plane holds under another id, a volume recovered elsewhere since (a newer generation: this
//! node was fenced), a mixed backing while the data plane is unreachable. Before a resync the
//! outbox is shipped (a temporary shipper, up to two minutes), so the data plane's head is
//! the newest snapshot the volume made; refused if it does not take them.

use crate::cache::meta;
use crate::cache::CreateAs;
use crate::error::{Error, ErrorKind, Result};
use crate::label::{BackingState, Label};
use crate::ship::{is_identity_refusal, ShipConfig};
use crate::volume::VolumeConfig;
use std::os::fd::AsRawFd;
use std::path::Path;

/// What [`plan`] decided.
#[derive(Debug, Clone)]
pub struct Resume {
    pub create_as: CreateAs,
    pub size_bytes: u64,
    /// The backing must be zeroed first (back to the empty volume).
    pub zero_backing: bool,
    /// One line for the log and `status`.
    pub note: String,
}

/// Newest snapshot id in the outbox, 0 when empty.
fn outbox_head(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| crate::ship::outbox_entry_snap(e.file_name().to_str()?))
        .max()
        .unwrap_or(0)
}

/// The data plane's view of the volume, as the label's volume.
struct Remote {
    exists: bool,
    head: u64,
    generation: u64,
    is_clone: bool,
    info: deltavol_dataplane::VolumeInfo,
}

fn remote(sc: &ShipConfig, l: &Label) -> Result<Remote> {
    let (c, _) = sc.connect_as(&l.name, l.generation, Some(l.volume_id))?;
    let i = c.info();
    Ok(Remote {
        exists: i.exists,
        head: i.latest_snap_id,
        generation: i.generation,
        is_clone: !i.clone_source_volume.is_empty(),
        info: i.clone(),
    })
}

/// Decides how to open `cfg` when its cache dir is empty and its backing is labelled:
/// `Ok(None)` when there is nothing to resume (an ordinary open).
pub fn plan(cfg: &VolumeConfig) -> Result<Option<Resume>> {
    let c = &cfg.cache;
    let Some(sc) = &cfg.ship else {
        return Ok(None);
    };
    if c.create_as.is_some() || crate::cache::holds_volume(&c.cache_dir) {
        return Ok(None);
    }
    let backing_len = std::fs::metadata(&c.backing).map_or(0, |m| m.len());
    let label_path = crate::label::path(&sc.outbox_dir);
    let Some(l) = Label::read(&label_path)? else {
        return Ok(None);
    };
    if backing_len == 0 && !is_block_device(&c.backing) {
        // The backing file is gone (or new): the label describes nothing that is here.
        return Err(Error::mismatch(format!(
            "{} labels a backing of volume {:?} (id {}), but {} is empty or missing: give the volume's backing file, or another --outbox-dir for a new volume",
            label_path.display(),
            l.name,
            meta::volume_id_hex(&l.volume_id),
            c.backing.display()
        )));
    }
    if l.name != c.name {
        return Err(Error::mismatch(format!(
            "the backing {} belongs to volume {:?} (id {}), not {:?}: give that name, or another --backing and --outbox-dir",
            c.backing.display(),
            l.name,
            meta::volume_id_hex(&l.volume_id),
            c.name
        )));
    }
    if c.size_bytes.is_some_and(|s| s != l.size_bytes) {
        return Err(Error::mismatch(format!(
            "volume {:?} is {} bytes (its backing label says so), not {}: omit --size",
            l.name,
            l.size_bytes,
            c.size_bytes.unwrap_or(0)
        )));
    }
    let id = meta::volume_id_hex(&l.volume_id);
    tracing::warn!(volume = %l.name, id = %id, backing = %c.backing.display(), state = ?l.state, "the cache dir holds no volume but the backing file does: its SSD cache was lost; resuming the volume under its own identity");
    let mut outbox = outbox_head(&sc.outbox_dir);
    let mut remote = match remote(sc, &l) {
        Ok(r) => Some(r),
        Err(e) if is_identity_refusal(&e) => return Err(e),
        Err(e) => {
            tracing::warn!(volume = %l.name, error = %e, "data plane unreachable while resuming");
            None
        }
    };
    if let Some(r) = &remote {
        // Encrypted there and no key here (or the other way round): refused before anything.
        sc.codec.check_geometry(&l.name, &r.info)?;
    }
    let mixed = !matches!(l.state, BackingState::Clean(_));
    if let (true, Some(r)) = (mixed, &remote) {
        if outbox > r.head && r.generation <= l.generation {
            // A resync goes back to the data plane's head: first make it the newest snapshot
            // this volume made, by shipping what waits in the outbox.
            drain_outbox(sc, &l, outbox)?;
            outbox = outbox_head(&sc.outbox_dir);
            remote = Some(self::remote(sc, &l)?);
        }
    }
    if let Some(r) = &remote {
        if r.generation > l.generation {
            return Err(Error::mismatch(format!(
                "volume {:?} was recovered on another machine since this backing was written (data-plane generation {} > {}): this node is fenced; its backing is kept as it is. Recover the volume here with `deltavol recover` onto a new --backing, or clone a snapshot",
                l.name, r.generation, l.generation
            )));
        }
    }
    let cont = |epoch: u64, why: String| {
        Resume {
        create_as: CreateAs {
            flushed_epoch: epoch,
            snap_head: l.snap_head.max(outbox),
            generation: l.generation,
            hydrate_snap: 0,
            hydrate: false,
            volume_id: l.volume_id,
        },
        size_bytes: l.size_bytes,
        zero_backing: false,
        note: format!("lost SSD cache: continued from epoch {epoch} held by the backing file ({why}); no restore"),
    }
    };
    let resume = match l.state {
        BackingState::Clean(e) if remote.as_ref().is_none_or(|r| r.head <= e) => cont(
            e,
            match &remote {
                Some(r) if r.head == e => "the data plane's head".to_string(),
                Some(r) => format!("the data plane holds up to snapshot {}", r.head),
                None => "the data plane was not reachable".to_string(),
            },
        ),
        BackingState::Writing(e) if remote.as_ref().is_some_and(|r| r.exists && r.head == e) => {
            cont(e, "its snapshot is the data plane's head".into())
        }
        state => {
            // A mix, or the data plane is ahead: back to the data plane's newest snapshot.
            let Some(r) = remote else {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "volume {:?}: the backing file is no point in time ({state:?}) and the data plane, needed to resynchronise it, is unreachable: retry once it is back",
                        l.name
                    ),
                ));
            };
            if !r.exists {
                return Err(Error::mismatch(format!(
                    "volume {:?}: the backing file is no point in time ({state:?}) and the data plane has no such volume to resynchronise from",
                    l.name
                )));
            }
            if outbox > r.head {
                return Err(Error::mismatch(format!(
                    "volume {:?}: the backing file is no point in time ({state:?}) and the outbox holds snapshots up to {outbox} that the data plane (head {}) did not take: resynchronising now would lose them",
                    l.name, r.head
                )));
            }
            // As `recover` does: the volume restarts at the snapshot it hydrates from (its
            // epochs, and so its snapshot ids, go on from there: no id above the head was
            // committed, and the outbox holds none). Starting from a higher epoch would make
            // the flush ship the backing — partial while hydrating — as a full base.
            let epoch = r.head;
            let zero = r.head == 0 && !r.is_clone;
            let note = if zero {
                format!("lost SSD cache: the backing file was no point in time ({state:?}) and the volume has no snapshot: resynchronised to the empty volume (backing zeroed)")
            } else {
                format!("lost SSD cache: the backing file was no point in time ({state:?}): resynchronising from snapshot {} of the data plane (hydrating over the kept backing)", r.head)
            };
            Resume {
                create_as: CreateAs {
                    flushed_epoch: epoch,
                    snap_head: r.head,
                    generation: l.generation,
                    hydrate_snap: r.head,
                    hydrate: !zero,
                    volume_id: l.volume_id,
                },
                size_bytes: l.size_bytes,
                zero_backing: zero,
                note,
            }
        }
    };
    tracing::warn!(volume = %l.name, id = %id, "{}", resume.note);
    Ok(Some(resume))
}

/// How long a resume waits for the outbox to reach the data plane.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Ships the outbox (snapshots up to `outbox`) with a shipper of the label's volume, and
/// waits until it is empty.
fn drain_outbox(sc: &ShipConfig, l: &Label, outbox: u64) -> Result<()> {
    tracing::info!(volume = %l.name, up_to = outbox, "resume: shipping the outbox to the data plane before resynchronising");
    let sink = crate::ship::DataPlaneSink::start(
        sc.clone(),
        &l.name,
        l.volume_id,
        l.size_bytes,
        l.snap_head,
        l.generation,
        // Unchanged: the backing is what the label said.
        l.state,
    )?;
    let h = sink.handle();
    let t0 = std::time::Instant::now();
    loop {
        let st = h.status();
        if st.outbox_entries == 0 {
            return Ok(());
        }
        if st.fenced || t0.elapsed() > DRAIN_TIMEOUT {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "volume {:?}: the backing file is no point in time and the outbox still holds {} snapshots the data plane lacks after {} s (last error: {}): resynchronising now would lose them; retry once the data plane takes them",
                    l.name,
                    st.outbox_entries,
                    t0.elapsed().as_secs(),
                    st.last_error.unwrap_or_else(|| "none".into())
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// Zeroes `size_bytes` of the backing (punching holes in a file), durably.
pub fn zero_backing(path: &Path, size_bytes: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    if is_block_device(path) {
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < size_bytes {
            let n = (size_bytes - off).min(zeros.len() as u64) as usize;
            std::os::unix::fs::FileExt::write_all_at(&f, &zeros[..n], off)
                .map_err(|e| Error::io_at("write", path, off, e))?;
            off += n as u64;
        }
    } else {
        nix::fcntl::fallocate(
            f.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            i64::try_from(size_bytes).unwrap_or(i64::MAX),
        )
        .map_err(|e| Error::io("punch", path, e.into()))?;
    }
    f.sync_data().map_err(|e| Error::io("fdatasync", path, e))
}

/// A resync's first step, before the device is live: every block of the kept backing whose
/// crc32c equals the one the data plane has for it in snapshot `hydrate_snap` counts as
/// already restored (checksum-only reads: no data crosses the network), so hydration fetches
/// only the blocks that differ. Reads the backing once, sequentially. Returns the blocks kept.
/// An encrypted volume keeps none: the data plane's checksums are of ciphertext, which never
/// equals the backing's plaintext, so every block is fetched (and opened).
pub fn seed_from_checksums(cache: &crate::cache::Cache, sc: &ShipConfig) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let Some(h) = cache.hydrating() else {
        return Ok(0);
    };
    if sc.codec.is_encrypted() {
        tracing::info!(volume = %cache.name, "encrypted volume: the data plane's checksums are of ciphertext, so the kept backing is not compared; every block is fetched");
        return Ok(0);
    }
    let (mut c, _) = sc.connect_as(&cache.name, cache.generation(), Some(cache.volume_id))?;
    let bs = meta::BLOCK_SIZE;
    let chunk = deltavol_schemas::CHECKSUM_BLOCKS_MAX;
    let mut buf = vec![0u8; (chunk * bs) as usize];
    let (mut kept, mut lba) = (0u64, 0u64);
    let t0 = std::time::Instant::now();
    let mut last_log = t0;
    while lba < cache.nblocks {
        let n = (cache.nblocks - lba).min(chunk);
        let theirs = c
            .read_checksums(h.snap, lba, n)
            .map_err(|e| Error::new(ErrorKind::Io, format!("data plane: {e}")))?;
        let b = &mut buf[..(n * bs) as usize];
        cache
            .backing
            .read_exact_at(b, lba * bs)
            .map_err(|e| Error::io_at("read", &cache.backing_path, lba * bs, e))?;
        for (i, theirs) in theirs.iter().enumerate() {
            let ours = crc32c::crc32c(&b[i * bs as usize..(i + 1) * bs as usize]);
            if ours == *theirs {
                h.local.set_range(lba + i as u64, 1);
                kept += 1;
            }
        }
        lba += n;
        if last_log.elapsed() >= std::time::Duration::from_secs(5) {
            last_log = std::time::Instant::now();
            tracing::info!(volume = %cache.name, percent = lba * 100 / cache.nblocks, "resync: comparing the backing with the data plane by checksums");
        }
    }
    crate::hydrate::persist_local(cache)?;
    tracing::info!(volume = %cache.name, snapshot = h.snap, blocks_kept = kept, blocks_to_fetch = cache.nblocks - kept, elapsed_ms = t0.elapsed().as_millis() as u64, "resync: blocks equal to the snapshot are kept; the others are fetched");
    Ok(kept)
}

/// Recovering a volume as of an older snapshot than its chain head (`recover --at`): the
/// volume hydrates from `target`, but its snapshots go on from `head`, so the first one must
/// carry the way back — every block whose content differs between `target` and `head`,
/// with `target`'s content — or the data plane's copy would silently differ from the device.
/// This writes those blocks into the volume (a fresh one, hydrating from `target`, not yet
/// live) through the same handler the queues use, then FLUSHes: they are in its first epoch,
/// and hydration never overwrites a written block. Compares checksums (`ReadChecksums`) and
/// fetches only the blocks that differ. Returns how many. For an encrypted volume the
/// checksums are of the stored envelopes: equal ones are the same stored block (the same
/// data); a block rewritten with equal data has a new nonce, so it differs and is written
/// back too, harmlessly. What is fetched is opened, and a block that does not open stops it.
pub fn write_rollback(
    vol: &crate::volume::Volume,
    sc: &ShipConfig,
    target: u64,
    head: u64,
) -> Result<u64> {
    use crate::cache::io::{UBLK_IO_OP_FLUSH, UBLK_IO_OP_WRITE};
    const RUN_BLOCKS_MAX: u64 = 256;
    let c = &vol.cache;
    let (mut client, _) = sc.connect_as(&c.name, c.generation(), Some(c.volume_id))?;
    let dp =
        |e: deltavol_dataplane::ClientError| Error::new(ErrorKind::Io, format!("data plane: {e}"));
    let ring = vol
        .host_ring(0)
        .map_err(|e| Error::io("create a ring for", &c.cache_dir, e))?;
    let bs = meta::BLOCK_SIZE;
    let sectors = bs / 512;
    let mut buf = vec![0u8; (RUN_BLOCKS_MAX * bs) as usize];
    let mut scratch = Vec::new();
    let chunk = deltavol_schemas::CHECKSUM_BLOCKS_MAX;
    let (mut lba, mut written) = (0u64, 0u64);
    let t0 = std::time::Instant::now();
    while lba < c.nblocks {
        let n = (c.nblocks - lba).min(chunk);
        let a = client.read_checksums(target, lba, n).map_err(dp)?;
        let b = client.read_checksums(head, lba, n).map_err(dp)?;
        let mut i = 0u64;
        while i < n {
            if a[i as usize] == b[i as usize] {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && j - i < RUN_BLOCKS_MAX && a[j as usize] != b[j as usize] {
                j += 1;
            }
            let k = j - i;
            let part = &mut buf[..(k * bs) as usize];
            sc.codec
                .read_exact(&mut client, target, lba + i, part, &mut scratch)
                .map_err(|e| Error::new(ErrorKind::Io, format!("data plane: {e}")))?;
            let r = smol::block_on(vol.handle(
                &ring,
                UBLK_IO_OP_WRITE,
                0,
                (lba + i) * sectors,
                (k * sectors) as u32,
                part,
            ));
            if r < 0 {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "writing the way back to snapshot {target} at block {}: errno {}",
                        lba + i,
                        -r
                    ),
                ));
            }
            written += k;
            i = j;
        }
        lba += n;
    }
    let r = smol::block_on(vol.handle(&ring, UBLK_IO_OP_FLUSH, 0, 0, 0, &mut []));
    if r < 0 {
        return Err(Error::new(
            ErrorKind::Io,
            format!("FLUSH after the way back: errno {}", -r),
        ));
    }
    tracing::info!(volume = %c.name, target, head, blocks = written, elapsed_ms = t0.elapsed().as_millis() as u64, "the blocks that differ between the snapshot recovered and the chain head are written back: the next snapshot, on the head, equals the device");
    Ok(written)
}
