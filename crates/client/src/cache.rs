//! The disk copies of views and of the catalog: written atomically with a checksum, read
//! before the first sync so a process that starts while the registry is down still finds its
//! peers.
//!
//! A file is a text header, a blank line, then the payload (JSON). A view's is
//! `<cache_dir>/<service>.view`, holding the index and the instances:
//!
//! ```text
//! muster-view
//! version 1
//! service payments
//! written 1767225600000
//! length 1234
//! crc32 89abcdef
//!
//! {"index":42,"instances":[...]}
//! ```
//!
//! The catalog's is `<cache_dir>/catalog.registry`, the same header with `muster-catalog`
//! and `name catalog` in its first and third lines, and the same payload with every
//! service's instances by name (`{"index":42,"instances":{"api":[...],...}}`). Its file name
//! ends in `.registry`, so no service's view file can take it.
//!
//! Every line of the header is checked on load, so a file of another kind, another service,
//! another program or a future format, or one cut short by a crash, is recognised and
//! ignored.

// The write time on disk and a stale view's `since` are wall-clock times for people and
// across processes, read at this edge only; every delay and timeout uses tokio's clock.
#![allow(clippy::disallowed_types)]

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metric;

const VERSION: u32 = 1;
/// At most one write per file per this long: a burst of changes (a deploy rolling through a
/// service) costs one fsync, not one per instance. The last state is always written.
pub(crate) const COALESCE: Duration = Duration::from_millis(100);

/// What a kind of file holds, and how its header and name say so. The view's header is the
/// one version 1 has always had, so copies written before the catalog existed still load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kind {
    /// `view`: the header starts `muster-view`, and errors speak of "a view".
    what: &'static str,
    /// The header field naming whose copy it is (`service payments`).
    owner: &'static str,
    /// The file name's ending.
    ext: &'static str,
}

/// One service's view.
pub(crate) const VIEW: Kind = Kind {
    what: "view",
    owner: "service",
    ext: "view",
};
/// Every service: the catalog.
pub(crate) const CATALOG: Kind = Kind {
    what: "catalog",
    owner: "name",
    ext: "registry",
};

/// What is kept on disk: a state with an index and its instances.
pub(crate) trait Persist: Sized + Send + Sync + 'static {
    /// The instances: a view's list, or the catalog's lists by service.
    type Instances: Serialize + DeserializeOwned;
    /// The registry index of this state: the writer skips a state it already wrote.
    fn index(&self) -> u64;
    fn instances(&self) -> &Self::Instances;
    /// The state read back for `owner` from a file written at `written_at`.
    fn from_disk(
        owner: &str,
        index: u64,
        instances: Self::Instances,
        written_at: SystemTime,
    ) -> Self;
}

/// Every file's payload.
#[derive(Serialize, Deserialize)]
struct Payload<I> {
    index: u64,
    instances: I,
}

/// One file in the cache directory: its kind and whose it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CacheFile {
    kind: Kind,
    owner: String,
}

/// A payload read back from disk.
#[derive(Debug)]
pub(crate) struct Cached<'a> {
    pub payload: &'a [u8],
    pub written_at: SystemTime,
}

impl CacheFile {
    /// `service`'s view.
    pub(crate) fn view(service: &str) -> CacheFile {
        CacheFile {
            kind: VIEW,
            owner: service.to_string(),
        }
    }

    /// The catalog.
    pub(crate) fn catalog() -> CacheFile {
        CacheFile {
            kind: CATALOG,
            owner: "catalog".to_string(),
        }
    }

    /// Where the file lives in `dir`.
    pub(crate) fn path(&self, dir: &Path) -> PathBuf {
        // Service names are DNS labels (validated before a view starts): safe as file names.
        dir.join(format!("{}.{}", self.owner, self.kind.ext))
    }

    fn magic(&self) -> String {
        format!("muster-{}", self.kind.what)
    }

    /// The file's bytes for this state.
    pub(crate) fn encode<S: Persist>(&self, state: &S, written_at: SystemTime) -> Vec<u8> {
        let payload = Payload {
            index: state.index(),
            instances: state.instances(),
        };
        self.encode_payload(
            &serde_json::to_vec(&payload).unwrap_or_default(),
            written_at,
        )
    }

    fn encode_payload(&self, payload: &[u8], written_at: SystemTime) -> Vec<u8> {
        let millis = written_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut out = format!(
            "{}\nversion {VERSION}\n{} {}\nwritten {millis}\nlength {}\ncrc32 {:08x}\n\n",
            self.magic(),
            self.kind.owner,
            self.owner,
            payload.len(),
            crc32fast::hash(payload)
        )
        .into_bytes();
        out.extend_from_slice(payload);
        out
    }

    /// Reads a file's bytes back, checking everything but the payload's own shape; the
    /// error says what is wrong.
    pub(crate) fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Cached<'a>, String> {
        let magic = self.magic();
        let what = self.kind.what;
        let split = bytes
            .windows(2)
            .position(|w| w == b"\n\n")
            .ok_or_else(|| format!("no header (truncated, or not a muster {what} file)"))?;
        let header = std::str::from_utf8(&bytes[..split]).map_err(|_| "the header is not text")?;
        let payload = &bytes[split + 2..];
        let mut lines = header.lines();
        if lines.next() != Some(magic.as_str()) {
            return Err(format!("not a muster {what} file (no {magic:?} line)"));
        }
        let mut field = |name: &str| -> Result<&str, String> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .ok_or_else(|| format!("the header has no {name:?} line where expected"))
        };
        let version = field("version")?;
        if version != VERSION.to_string() {
            return Err(format!(
                "format version {version}, this client reads {VERSION}"
            ));
        }
        let owner = field(self.kind.owner)?;
        if owner != self.owner {
            return Err(format!(
                "it holds {} {owner:?}, not {:?}",
                self.kind.owner, self.owner
            ));
        }
        let written: u64 = field("written")?
            .parse()
            .map_err(|_| "the write time is not a number")?;
        let length: usize = field("length")?
            .parse()
            .map_err(|_| "the length is not a number")?;
        let crc =
            u32::from_str_radix(field("crc32")?, 16).map_err(|_| "the checksum is not hex")?;
        if payload.len() != length {
            return Err(format!(
                "truncated or padded: the header says {length} payload bytes, the file has {}",
                payload.len()
            ));
        }
        let actual = crc32fast::hash(payload);
        if actual != crc {
            return Err(format!(
                "checksum mismatch (header {crc:08x}, payload {actual:08x}): corrupt"
            ));
        }
        Ok(Cached {
            payload,
            written_at: UNIX_EPOCH
                .checked_add(Duration::from_millis(written))
                .ok_or_else(|| format!("write time {written} ms is out of range"))?,
        })
    }

    /// The state in `bytes`, header and payload checked.
    pub(crate) fn read<S: Persist>(&self, bytes: &[u8]) -> Result<S, String> {
        let c = self.decode(bytes)?;
        let p: Payload<S::Instances> = serde_json::from_slice(c.payload)
            .map_err(|e| format!("the payload is not a {}: {e}", self.kind.what))?;
        Ok(S::from_disk(
            &self.owner,
            p.index,
            p.instances,
            c.written_at,
        ))
    }

    /// Reads the file from `dir`: `None` when there is none, or (with one warning) when it
    /// cannot be used.
    pub(crate) fn load<S: Persist>(&self, dir: &Path) -> Option<S> {
        let path = self.path(dir);
        let what = self.kind.what;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the cached {what}; ignoring it");
                return None;
            }
        };
        match self.read(&bytes) {
            Ok(s) => Some(s),
            Err(why) => {
                tracing::warn!(file = %path.display(), problem = %why, "ignoring the cached {what}");
                None
            }
        }
    }

    /// Writes `bytes` as the file: a temporary file in the same directory, written and
    /// synced, renamed over the old one, then the directory synced, so a crash at any point
    /// leaves either the old file or the new one, never a mix.
    pub(crate) fn write_atomic(&self, dir: &Path, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(dir);
        // The process id and a per-process counter keep writers sharing a directory (other
        // processes, other clients in this one) off each other's temp files.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".{}.{}.{}.{n}.tmp",
            self.owner,
            self.kind.ext,
            std::process::id()
        ));
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        // Makes the rename itself durable. Not every platform can open a directory (Windows
        // cannot); the file is complete either way.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Creates the cache directory; a failure is logged, not returned: the client works
/// without its disk copy.
pub(crate) fn prepare_dir(dir: &Path) -> bool {
    match fs::create_dir_all(dir) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the cache directory; nothing will be kept on disk");
            false
        }
    }
}

/// With a cache directory: the state `file` holds there (counted as a disk fallback under
/// `label`), and the writer that keeps it current. Without one, or where the directory
/// cannot be created, no writer.
pub(crate) fn open<S: Persist>(
    dir: Option<&Path>,
    file: CacheFile,
    label: &str,
    runtime: &tokio::runtime::Handle,
    shutdown: &CancellationToken,
) -> (Option<S>, Option<Writer<S>>) {
    let Some(dir) = dir else {
        return (None, None);
    };
    let loaded = file.load::<S>(dir);
    if let Some(s) = &loaded {
        tracing::info!(service = label, file = %file.path(dir).display(), index = s.index(), "loaded the disk copy");
        metrics::counter!(metric::DISK_FALLBACKS, "service" => label.to_string()).increment(1);
    }
    let writer =
        prepare_dir(dir).then(|| Writer::start(dir.to_path_buf(), file, runtime, shutdown.clone()));
    (loaded, writer)
}

/// Hands live states to a background writer without ever waiting for the disk.
#[derive(Debug)]
pub(crate) struct Writer<S> {
    latest: watch::Sender<Option<Arc<S>>>,
}

impl<S: Persist> Writer<S> {
    /// Starts the writer of `file` in `dir`; it ends with `shutdown` once the last state
    /// handed to it is written.
    pub(crate) fn start(
        dir: PathBuf,
        file: CacheFile,
        runtime: &tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> Writer<S> {
        let (latest, rx) = watch::channel(None);
        runtime.spawn(write_loop(dir, file, rx, shutdown));
        Writer { latest }
    }

    /// Queues `state` to be written (replacing any state not yet written).
    pub(crate) fn write(&self, state: Arc<S>) {
        self.latest.send_replace(Some(state));
    }
}

async fn write_loop<S: Persist>(
    dir: PathBuf,
    file: CacheFile,
    mut rx: watch::Receiver<Option<Arc<S>>>,
    shutdown: CancellationToken,
) {
    let mut written: Option<u64> = None;
    let mut warned = false;
    loop {
        let stop = tokio::select! {
            r = rx.changed() => r.is_err(),
            () = shutdown.cancelled() => true,
        };
        let state = rx.borrow_and_update().clone();
        if let Some(state) = state.filter(|s| written != Some(s.index())) {
            let index = state.index();
            let (d, f) = (dir.clone(), file.clone());
            // Encoding is off the runtime too: the catalog's payload is every instance.
            let result = tokio::task::spawn_blocking(move || {
                f.write_atomic(&d, &f.encode(&*state, SystemTime::now()))
            })
            .await;
            match result {
                Ok(Ok(())) => {
                    written = Some(index);
                    warned = false;
                }
                Ok(Err(e)) if !warned => {
                    warned = true;
                    tracing::warn!(file = %file.path(&dir).display(), error = %e, "cannot write the disk copy");
                }
                _ => {}
            }
        }
        if stop {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(COALESCE) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogSnapshot;
    use crate::{Health, Instance, Snapshot, Source};

    fn instance(id: &str, port: u16) -> Instance {
        Instance {
            service: "web".into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port,
            tags: vec!["v2".into()],
            meta: [("k", "v")].into_iter().collect(),
            zone: Some("eu-1a".into()),
            weight: 3,
            health: Health::Warning,
            modify_index: 9,
        }
    }

    fn snap(index: u64, instances: Vec<Instance>) -> Snapshot {
        Snapshot {
            service: "web".into(),
            index,
            source: Source::Live,
            instances: Arc::from(instances),
        }
    }

    #[test]
    fn a_written_view_reads_back_whole() {
        let when = UNIX_EPOCH + Duration::from_millis(1_767_225_600_123);
        let instances = vec![instance("a", 1), instance("b", 2)];
        let file = CacheFile::view("web");
        let bytes = file.encode(&snap(42, instances.clone()), when);
        let back: Snapshot = file.read(&bytes).unwrap();
        assert_eq!(back.index, 42);
        assert_eq!(*back.instances, instances[..]);
        assert_eq!(back.source, Source::Disk { written_at: when });
    }

    #[test]
    fn a_view_file_keeps_the_version_1_header() {
        // Copies written before the catalog existed must still load: the view's header is
        // byte for byte what it was.
        let when = UNIX_EPOCH + Duration::from_millis(5);
        let bytes = CacheFile::view("web").encode(&snap(1, vec![]), when);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("muster-view\nversion 1\nservice web\nwritten 5\nlength "),
            "{text}"
        );
    }

    #[test]
    fn a_written_catalog_reads_back_whole() {
        let when = UNIX_EPOCH + Duration::from_millis(1_767_225_600_123);
        let catalog = CatalogSnapshot {
            index: 42,
            source: Source::Live,
            services: [
                ("api".to_string(), Arc::from(vec![instance("a", 1)])),
                ("web".to_string(), Arc::from(vec![instance("b", 2)])),
            ]
            .into(),
        };
        let file = CacheFile::catalog();
        let bytes = file.encode(&catalog, when);
        assert!(bytes.starts_with(b"muster-catalog\nversion 1\nname catalog\n"));
        let back: CatalogSnapshot = file.read(&bytes).unwrap();
        assert_eq!(
            back,
            CatalogSnapshot {
                source: Source::Disk { written_at: when },
                ..catalog
            }
        );
    }

    fn problem<S: Persist + std::fmt::Debug>(file: &CacheFile, bytes: &[u8]) -> String {
        match file.read::<S>(bytes) {
            Err(why) => why,
            Ok(s) => panic!("{:?} was accepted as {s:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn damaged_or_foreign_files_are_refused_with_the_reason() {
        let web = CacheFile::view("web");
        let good = web.encode(&snap(7, vec![instance("a", 1)]), SystemTime::now());
        let view_problem = |bytes: &[u8]| problem::<Snapshot>(&web, bytes);
        assert!(
            problem::<Snapshot>(&CacheFile::view("api"), &good).contains("holds service \"web\"")
        );
        let cut = &good[..good.len() - 5];
        assert!(view_problem(cut).contains("truncated"));
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x01;
        assert!(view_problem(&flipped).contains("checksum mismatch"));
        let newer = String::from_utf8(good.clone())
            .unwrap()
            .replacen("version 1", "version 2", 1);
        assert!(view_problem(newer.as_bytes()).contains("format version 2"));
        assert!(view_problem(b"{\"index\":1}").contains("no header"));
        assert!(view_problem(b"hello\n\nworld").contains("not a muster view"));
        assert!(view_problem(&[0xff, 0xfe, b'\n', b'\n']).contains("not text"));
        // Every truncation point is refused, none panics.
        for n in 0..good.len() {
            assert!(
                web.read::<Snapshot>(&good[..n]).is_err(),
                "cut at {n} accepted"
            );
        }
        // A well-formed file whose payload is not a view.
        let odd = web.encode_payload(b"{\"index\":1}", SystemTime::now());
        assert!(view_problem(&odd).contains("the payload is not a view"));
    }

    #[test]
    fn a_view_file_is_not_a_catalog_and_the_other_way_round() {
        let catalog = CatalogSnapshot::unsynced();
        let as_catalog = CacheFile::catalog().encode(&catalog, SystemTime::now());
        let as_view = CacheFile::view("web").encode(&snap(3, vec![]), SystemTime::now());
        assert!(
            problem::<Snapshot>(&CacheFile::view("web"), &as_catalog)
                .contains("not a muster view file")
        );
        assert!(
            problem::<CatalogSnapshot>(&CacheFile::catalog(), &as_view)
                .contains("not a muster catalog file")
        );
        // A service named like the catalog's file still has a file of its own.
        let dir = Path::new("/cache");
        assert_ne!(
            CacheFile::view("catalog").path(dir),
            CacheFile::catalog().path(dir)
        );
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let web = CacheFile::view("web");
        web.write_atomic(dir.path(), &web.encode(&snap(1, vec![]), SystemTime::now()))
            .unwrap();
        web.write_atomic(
            dir.path(),
            &web.encode(&snap(2, vec![instance("a", 1)]), SystemTime::now()),
        )
        .unwrap();
        let back: Snapshot = web.load(dir.path()).unwrap();
        assert_eq!((back.index, back.instances.len()), (2, 1));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["web.view"]);
    }

    #[test]
    fn a_missing_file_is_no_copy_and_no_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            CacheFile::view("web")
                .load::<Snapshot>(dir.path())
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_burst_of_states_ends_with_the_last_one_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let web = CacheFile::view("web");
        let writer = Writer::start(
            dir.path().to_path_buf(),
            web.clone(),
            &tokio::runtime::Handle::current(),
            shutdown.clone(),
        );
        for i in 1..=50 {
            writer.write(Arc::new(snap(i, vec![instance("a", 1)])));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if web
                .load::<Snapshot>(dir.path())
                .is_some_and(|c| c.index == 50)
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "index 50 never written"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.cancel();
    }
}
