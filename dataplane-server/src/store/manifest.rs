//! The manifest, a volume's truth: reading the current one (local: the `MANIFEST` file;
//! object store: the highest-numbered manifest object) and committing the next one (local:
//! atomically replaced; object store: a create-if-absent put of the next number, an ambiguous
//! answer resolved by reading the nonce back). The encoding is in [`mod@super::format`], the
//! object envelope ([`ObjManifest`]) in [`mod@super::backend`].

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use super::backend::{self, Backend, CreateOutcome, ObjBackend, ObjManifest, Retired};
use super::error::{StoreError, StoreErrorKind};
use super::format::{self, ManifestData};
use super::local::{write_atomic, MANIFEST_NAME};
use super::volume::{stale_generation, Volume};

/// Reads and verifies the current manifest of volume `name`; `Ok(None)` when there is none.
pub async fn read_manifest(
    backend: &Backend,
    name: &str,
) -> Result<Option<ManifestData>, StoreError> {
    Ok(read_manifest_full(backend, name).await?.map(|(m, _)| m))
}

/// [`read_manifest`] with the segment tags of the object backend (empty for local).
pub async fn read_manifest_full(
    backend: &Backend,
    name: &str,
) -> Result<Option<(ManifestData, HashMap<u64, u128>)>, StoreError> {
    match backend {
        Backend::Local { volumes_dir } => {
            let path = volumes_dir.join(name).join(MANIFEST_NAME);
            match std::fs::read(&path) {
                Ok(raw) => Ok(Some((format::decode_manifest(&raw, name)?, HashMap::new()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::io(format!("read {}", path.display()), e)),
            }
        }
        Backend::Object(obj) => Ok(latest_obj_manifest(obj, name)
            .await?
            .map(|(m, om)| (m, om.tags))),
    }
}

/// The highest-numbered manifest object of volume `name`, decoded and checked.
pub async fn latest_obj_manifest(
    obj: &ObjBackend,
    name: &str,
) -> Result<Option<(ManifestData, ObjManifest)>, StoreError> {
    // Manifests below the floor were trimmed: list from it, so a load costs what is live,
    // not every manifest ever committed.
    let floor = read_floor(obj, name).await?;
    let dir = format!("volumes/{name}/manifest");
    let listed = if floor > 1 {
        obj.list_after(&dir, &backend::manifest_file_name(floor - 1))
            .await?
    } else {
        obj.list(&dir).await?
    };
    let mut seq = listed
        .iter()
        .filter_map(|m| m.location.filename().and_then(backend::parse_manifest_name))
        .max();
    // A listing may lag a create: look past what it showed (or from the floor) until a
    // number is free.
    let first = floor.max(1);
    loop {
        let next = seq.map_or(first, |s| s + 1);
        if obj
            .head(&obj.key(&backend::manifest_rel(name, next)))
            .await?
            .is_none()
        {
            break;
        }
        seq = Some(next);
    }
    let Some(seq) = seq else {
        return Ok(None);
    };
    let key = obj.key(&backend::manifest_rel(name, seq));
    let raw = obj.get(&key).await?.ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::Io,
            format!("manifest {key} vanished while being read (garbage collected?): retry"),
        )
    })?;
    let om = backend::decode_obj_manifest(&raw, key.as_ref())?;
    let m = format::decode_manifest(&om.manifest, name)?;
    if m.sequence != seq {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!("manifest {key} says sequence {}", m.sequence),
        ));
    }
    for s in &m.snapshots {
        for id in &s.segments {
            if !om.tags.contains_key(id) {
                return Err(StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!("manifest {key} names segment {id} without its object tag"),
                ));
            }
        }
    }
    Ok(Some((m, om)))
}

/// Volume `name`'s manifest floor (0: nothing was ever trimmed).
pub async fn read_floor(obj: &ObjBackend, name: &str) -> Result<u64, StoreError> {
    let key = obj.key(&backend::floor_rel(name));
    match obj.get(&key).await? {
        None => Ok(0),
        Some(raw) => backend::decode_floor(&raw, key.as_ref()),
    }
}

/// Manifests newer than the floor that a trim keeps besides the newest.
pub const KEEP_MANIFESTS: u64 = 8;
/// The owner trims a volume's manifests every this many commits.
pub const TRIM_EVERY: u64 = 16;

/// What [`trim_manifests`] deleted (or would delete).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Trimmed {
    pub keys: Vec<String>,
    pub bytes: u64,
}

/// Deletes the manifest objects of volume `name` numbered below `latest - keep`: first the
/// floor object is raised to that number (so loads list from it, and a stale writer whose
/// create lands in a deleted number learns it lost, see [`commit_obj_manifest`]), then the
/// objects below it are deleted. An interrupted trim leaves objects below the floor, which
/// the next trim deletes. Never touches the newest `keep + 1`.
pub async fn trim_manifests(
    obj: &ObjBackend,
    name: &str,
    latest: u64,
    keep: u64,
    dry_run: bool,
) -> Result<Trimmed, StoreError> {
    let mut out = Trimmed::default();
    let new_floor = latest.saturating_sub(keep);
    if new_floor <= 1 {
        return Ok(out);
    }
    let old_floor = read_floor(obj, name).await?;
    if new_floor > old_floor && !dry_run {
        obj.put(
            &obj.key(&backend::floor_rel(name)),
            backend::encode_floor(new_floor),
        )
        .await?;
    }
    let floor = new_floor.max(old_floor);
    for m in obj.list(&format!("volumes/{name}/manifest")).await? {
        let Some(seq) = m.location.filename().and_then(backend::parse_manifest_name) else {
            continue;
        };
        if seq >= floor {
            continue;
        }
        if !dry_run {
            obj.delete(&m.location).await?;
        }
        out.bytes += m.size;
        out.keys.push(m.location.to_string());
    }
    Ok(out)
}

impl Volume {
    /// Writes `nm` as the volume's manifest (local: atomically replaced; object: created as
    /// number `nm.sequence`, which fails when another server committed that number first: the
    /// state is then reloaded from the store and the change refused).
    pub(super) async fn write_manifest(
        &self,
        nm: &ManifestData,
        tags: &HashMap<u64, u128>,
    ) -> Result<(), StoreError> {
        let retired = self.state.borrow().retired.clone();
        self.write_manifest_with(nm, tags, &retired).await
    }

    /// [`Volume::write_manifest`] with the object backend's retired segments given (a
    /// compaction adds the segments it replaced).
    pub(super) async fn write_manifest_with(
        &self,
        nm: &ManifestData,
        tags: &HashMap<u64, u128>,
        retired: &[Retired],
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local { .. } => {
                write_atomic(&self.dir, MANIFEST_NAME, format::encode_manifest(nm)).await
            }
            Backend::Object(obj) if obj.leases().is_some_and(|l| !l.valid(&self.name)) => {
                // Io, not StaleGeneration: the writer is not fenced, this server just stopped
                // serving the volume; the compute side retries and fails over to the server
                // that holds the lease now.
                Err(StoreError::new(
                    StoreErrorKind::Io,
                    format!(
                        "this data-plane server no longer holds the lease of volume {}: \
                         another server may serve it now; reconnect",
                        self.name
                    ),
                ))
            }
            Backend::Object(obj) => {
                match commit_obj_manifest(obj, &self.name, nm, tags, retired).await? {
                    CreateOutcome::Created => {
                        if nm.sequence % TRIM_EVERY == 0 {
                            spawn_trim(obj, &self.name, nm.sequence);
                        }
                        Ok(())
                    }
                    CreateOutcome::Exists => {
                        tracing::warn!(volume = %self.name, sequence = nm.sequence, "another server committed this manifest number first: reloading");
                        if let Err(e) = self.reload().await {
                            tracing::error!(volume = %self.name, error = %e, "reload after a lost manifest race failed");
                        }
                        let cur = self.state.borrow().manifest.generation;
                        if cur > nm.generation {
                            return Err(stale_generation(&self.name, cur, nm.generation));
                        }
                        Err(StoreError::new(
                        StoreErrorKind::BadParent,
                        format!(
                            "volume {}: another server committed manifest {} first (the chain moved): retry",
                            self.name, nm.sequence
                        ),
                    ))
                    }
                }
            }
        }
    }
}

/// Commits `nm` as manifest object number `nm.sequence` of volume `name` (create-if-absent).
/// After an ambiguous error (the put may or may not have landed), reads the number back and
/// compares its nonce with this attempt's: ours → committed, another → lost the race.
pub(super) async fn commit_obj_manifest(
    obj: &ObjBackend,
    name: &str,
    nm: &ManifestData,
    tags: &HashMap<u64, u128>,
    retired: &[Retired],
) -> Result<CreateOutcome, StoreError> {
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce)
        .map_err(|e| StoreError::io("manifest nonce from getrandom", io::Error::other(e)))?;
    let bytes = backend::encode_obj_manifest(&ObjManifest {
        nonce,
        writer_generation: nm.generation,
        tags: tags.clone(),
        retired: retired.to_vec(),
        manifest: format::encode_manifest(nm),
    });
    let key = obj.key(&backend::manifest_rel(name, nm.sequence));
    let outcome = match obj.put_create(&key, bytes).await {
        Ok(o) => o,
        Err(put_err) => {
            tracing::warn!(volume = name, key = %key, error = %put_err, "manifest put failed: reading it back");
            let back = obj.get(&key).await.map_err(|e| {
                StoreError::io(
                    format!("commit of {key}: outcome unknown ({put_err}; read-back: {e})"),
                    io::Error::other("ambiguous commit"),
                )
            })?;
            match back {
                None => return Err(put_err),
                Some(raw) => {
                    let om = backend::decode_obj_manifest(&raw, key.as_ref())?;
                    if om.nonce == nonce {
                        CreateOutcome::Created
                    } else {
                        CreateOutcome::Exists
                    }
                }
            }
        }
    };
    if outcome == CreateOutcome::Created {
        // A number below the floor was taken and trimmed since: this writer is stale, its
        // create only filled the hole. Not a commit.
        let floor = read_floor(obj, name).await?;
        if floor > nm.sequence {
            tracing::warn!(
                volume = name,
                sequence = nm.sequence,
                floor,
                "manifest number below the trim floor: a stale writer"
            );
            obj.delete(&key).await?;
            return Ok(CreateOutcome::Exists);
        }
    }
    Ok(outcome)
}

/// Trims volume `name`'s old manifests in the background (see [`trim_manifests`]).
fn spawn_trim(obj: &Arc<ObjBackend>, name: &str, latest: u64) {
    let (obj2, name) = (Arc::clone(obj), name.to_string());
    obj.spawn_detached(async move {
        match trim_manifests(&obj2, &name, latest, KEEP_MANIFESTS, false).await {
            Ok(t) if !t.keys.is_empty() => {
                tracing::debug!(volume = %name, deleted = t.keys.len(), "old manifests trimmed")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(volume = %name, error = %e, "trimming old manifests"),
        }
    });
}

#[cfg(test)]
mod obj_tests {
    //! The object layout against an in-memory store with fault injection: an ambiguous
    //! manifest put (it landed, or another writer's did, but the answer was an error) is
    //! resolved by reading the nonce back; a racing writer that overwrites a create is caught
    //! by the read-back.

    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;

    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::path::Path as ObjPath;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMultipartOptions, PutOptions, PutPayload, PutResult,
    };

    use super::*;

    /// What the next conditional put does besides (or instead of) its work.
    const NORMAL: u8 = 0;
    /// The put lands, then the answer is an error (a lost response).
    const LAND_THEN_FAIL: u8 = 1;
    /// Another writer's object lands first, then this put fails with a plain error.
    const OTHER_THEN_FAIL: u8 = 2;
    /// Nothing lands; the answer is an error.
    const FAIL: u8 = 3;
    /// Another writer's create "wins" after ours (a store whose conditional put is not
    /// atomic): ours reports success, the object holds the other's bytes.
    const OVERWRITTEN: u8 = 4;

    #[derive(Debug)]
    struct Faulty {
        inner: InMemory,
        next_put: AtomicU8,
        /// What "another writer" puts for `OTHER_THEN_FAIL`.
        other: std::sync::Mutex<Vec<u8>>,
    }

    impl std::fmt::Display for Faulty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Faulty(InMemory)")
        }
    }

    fn injected() -> object_store::Error {
        object_store::Error::Generic {
            store: "Faulty",
            source: "injected: connection reset after the request was sent".into(),
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Faulty {
        async fn put_opts(
            &self,
            location: &ObjPath,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            match self.next_put.swap(NORMAL, Ordering::SeqCst) {
                LAND_THEN_FAIL => {
                    self.inner.put_opts(location, payload, opts).await?;
                    Err(injected())
                }
                OTHER_THEN_FAIL => {
                    let other = PutPayload::from(self.other.lock().unwrap().clone());
                    self.inner.put_opts(location, other, opts).await?;
                    Err(injected())
                }
                FAIL => Err(injected()),
                OVERWRITTEN => {
                    let r = self.inner.put_opts(location, payload, opts).await?;
                    let other = PutPayload::from_static(b"another writer's bytes");
                    self.inner
                        .put_opts(location, other, PutOptions::default())
                        .await?;
                    Ok(r)
                }
                _ => self.inner.put_opts(location, payload, opts).await,
            }
        }

        async fn put_multipart_opts(
            &self,
            location: &ObjPath,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &ObjPath,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<ObjPath>>,
        ) -> BoxStream<'static, object_store::Result<ObjPath>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&ObjPath>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjPath>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &ObjPath,
            to: &ObjPath,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    fn setup() -> (Arc<Faulty>, Arc<ObjBackend>) {
        let f = Arc::new(Faulty {
            inner: InMemory::new(),
            next_put: AtomicU8::new(NORMAL),
            other: std::sync::Mutex::new(Vec::new()),
        });
        let store: Arc<dyn ObjectStore> = Arc::clone(&f) as Arc<dyn ObjectStore>;
        let obj = ObjBackend::with_store(store, "t".into(), "faulty in-memory".into())
            .expect("object backend");
        (f, Arc::new(obj))
    }

    fn manifest(seq: u64) -> ManifestData {
        ManifestData {
            volume_name: "v".into(),
            volume_id: [9; 16],
            sequence: seq,
            size_bytes: 1 << 20,
            block_size: 4096,
            generation: 3,
            created_ms: 1,
            snapshots: Vec::new(),
            clone_source: None,
            retention: Default::default(),
        }
    }

    #[test]
    fn ambiguous_manifest_puts_are_resolved_by_the_nonce() {
        let (f, obj) = setup();
        let tags = HashMap::new();
        let commit = |seq: u64| {
            futures::executor::block_on(commit_obj_manifest(&obj, "v", &manifest(seq), &tags, &[]))
        };
        // Plain create, then the same number again: the second writer loses.
        assert_eq!(commit(1).unwrap(), CreateOutcome::Created);
        assert_eq!(commit(1).unwrap(), CreateOutcome::Exists);
        // Our put landed but the answer was lost: the nonce read back says it is ours.
        f.next_put.store(LAND_THEN_FAIL, Ordering::SeqCst);
        assert_eq!(commit(2).unwrap(), CreateOutcome::Created);
        let (m, om) = futures::executor::block_on(latest_obj_manifest(&obj, "v"))
            .unwrap()
            .unwrap();
        assert_eq!((m.sequence, om.writer_generation), (2, 3));
        // Nothing landed: an error, and the number stays free.
        f.next_put.store(FAIL, Ordering::SeqCst);
        assert_eq!(commit(3).unwrap_err().kind(), StoreErrorKind::Io);
        assert_eq!(commit(3).unwrap(), CreateOutcome::Created);
        // Another writer's manifest landed at our number, our answer was an error: the
        // nonce read back is not ours, we lost.
        *f.other.lock().unwrap() = backend::encode_obj_manifest(&ObjManifest {
            nonce: [0xee; 16],
            writer_generation: 3,
            tags: HashMap::new(),
            retired: Vec::new(),
            manifest: format::encode_manifest(&manifest(4)),
        });
        f.next_put.store(OTHER_THEN_FAIL, Ordering::SeqCst);
        assert_eq!(commit(4).unwrap(), CreateOutcome::Exists);
        let (_, om) = futures::executor::block_on(latest_obj_manifest(&obj, "v"))
            .unwrap()
            .unwrap();
        assert_eq!(om.nonce, [0xee; 16]);
        // Garbage at our number after an error: refused as corrupt, never taken as ours.
        *f.other.lock().unwrap() = b"not a manifest".to_vec();
        f.next_put.store(OTHER_THEN_FAIL, Ordering::SeqCst);
        assert_eq!(commit(5).unwrap_err().kind(), StoreErrorKind::Corrupt);
    }

    #[test]
    fn trimmed_manifests_are_deleted_and_a_stale_writer_cannot_refill_one() {
        let (_, obj) = setup();
        let tags = HashMap::new();
        let commit = |seq: u64| {
            futures::executor::block_on(commit_obj_manifest(&obj, "v", &manifest(seq), &tags, &[]))
        };
        for seq in 1..=20 {
            assert_eq!(commit(seq).unwrap(), CreateOutcome::Created);
        }
        let t = futures::executor::block_on(trim_manifests(&obj, "v", 20, 8, false)).unwrap();
        assert_eq!(t.keys.len(), 11, "1..=11 go, 12..=20 stay");
        assert_eq!(
            futures::executor::block_on(read_floor(&obj, "v")).unwrap(),
            12
        );
        let left: Vec<u64> = futures::executor::block_on(obj.list("volumes/v/manifest"))
            .unwrap()
            .iter()
            .filter_map(|m| m.location.filename().and_then(backend::parse_manifest_name))
            .collect();
        assert_eq!(left, (12..=20).collect::<Vec<_>>());
        // The newest is found listing from the floor.
        let (m, _) = futures::executor::block_on(latest_obj_manifest(&obj, "v"))
            .unwrap()
            .unwrap();
        assert_eq!(m.sequence, 20);
        // A stale writer's create of a deleted number lands, then is taken back: not a commit.
        assert_eq!(commit(5).unwrap(), CreateOutcome::Exists);
        assert!(
            futures::executor::block_on(obj.head(&obj.key(&backend::manifest_rel("v", 5))))
                .unwrap()
                .is_none()
        );
        // Trimming again is idempotent; a dry run deletes nothing.
        let t = futures::executor::block_on(trim_manifests(&obj, "v", 20, 8, false)).unwrap();
        assert!(t.keys.is_empty());
        assert_eq!(commit(21).unwrap(), CreateOutcome::Created);
        let t = futures::executor::block_on(trim_manifests(&obj, "v", 21, 2, true)).unwrap();
        assert_eq!(t.keys.len(), 7, "12..=18 would go");
        assert_eq!(
            futures::executor::block_on(read_floor(&obj, "v")).unwrap(),
            12
        );
        // A corrupt floor is an error, never a silent 0.
        futures::executor::block_on(obj.put(&obj.key(&backend::floor_rel("v")), b"junk".to_vec()))
            .unwrap();
        assert_eq!(
            futures::executor::block_on(latest_obj_manifest(&obj, "v"))
                .unwrap_err()
                .kind(),
            StoreErrorKind::Corrupt
        );
    }

    #[test]
    fn a_create_overwritten_by_a_racing_writer_is_not_a_win() {
        let (f, obj) = setup();
        let key = obj.key("x/y");
        f.next_put.store(OVERWRITTEN, Ordering::SeqCst);
        let r = futures::executor::block_on(obj.put_create(&key, b"mine".to_vec())).unwrap();
        assert_eq!(r, CreateOutcome::Exists);
        let r =
            futures::executor::block_on(obj.put_create(&obj.key("x/z"), b"mine".to_vec())).unwrap();
        assert_eq!(r, CreateOutcome::Created);
    }

    #[test]
    fn probe_accepts_an_atomic_store() {
        let (_, obj) = setup();
        futures::executor::block_on(obj.probe_conditional_put()).expect("InMemory is atomic");
        // The probe cleans up after itself.
        assert!(futures::executor::block_on(obj.list("probe"))
            .unwrap()
            .is_empty());
    }
}
