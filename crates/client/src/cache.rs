//! The views' copies on disk: written atomically with a checksum, read before the first
//! sync so a process that starts while the registry is down still finds its peers.
//!
//! A file is `<cache_dir>/<service>.view`: a text header, a blank line, then the payload
//! (JSON: the index and the instances):
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
//! Every line of the header is checked on load, so a file from another service, another
//! program or a future format, or one cut short by a crash, is recognised and ignored.

// The write time on disk and a stale view's `since` are wall-clock times for people and
// across processes, read at this edge only; every delay and timeout uses tokio's clock.
#![allow(clippy::disallowed_types)]

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::instance::{Instance, Snapshot};

const MAGIC: &str = "muster-view";
const VERSION: u32 = 1;
/// At most one write per view per this long: a burst of changes (a deploy rolling through a
/// service) costs one fsync, not one per instance. The last state is always written.
pub(crate) const COALESCE: Duration = Duration::from_millis(100);

/// A view read back from disk.
#[derive(Debug)]
pub(crate) struct Cached {
    pub index: u64,
    pub instances: Vec<Instance>,
    pub written_at: SystemTime,
}

#[derive(Serialize)]
struct PayloadOut<'a> {
    index: u64,
    instances: &'a [Instance],
}

#[derive(Deserialize)]
struct PayloadIn {
    index: u64,
    instances: Vec<Instance>,
}

/// The file holding `service`'s view.
pub(crate) fn path_of(dir: &Path, service: &str) -> PathBuf {
    // Service names are DNS labels (validated before a view starts): safe as file names.
    dir.join(format!("{service}.view"))
}

/// The file's bytes for this state.
pub(crate) fn encode(
    service: &str,
    index: u64,
    instances: &[Instance],
    written_at: SystemTime,
) -> Vec<u8> {
    let payload = serde_json::to_vec(&PayloadOut { index, instances }).unwrap_or_default();
    let millis = written_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut out = format!(
        "{MAGIC}\nversion {VERSION}\nservice {service}\nwritten {millis}\nlength {}\ncrc32 {:08x}\n\n",
        payload.len(),
        crc32fast::hash(&payload)
    )
    .into_bytes();
    out.extend_from_slice(&payload);
    out
}

/// Reads a file's bytes back, checking everything; the error says what is wrong.
pub(crate) fn decode(service: &str, bytes: &[u8]) -> Result<Cached, String> {
    let split = bytes
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or("no header (truncated, or not a muster view file)")?;
    let header = std::str::from_utf8(&bytes[..split]).map_err(|_| "the header is not text")?;
    let payload = &bytes[split + 2..];
    let mut lines = header.lines();
    if lines.next() != Some(MAGIC) {
        return Err(format!("not a muster view file (no {MAGIC:?} line)"));
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
    let owner = field("service")?;
    if owner != service {
        return Err(format!("it holds service {owner:?}, not {service:?}"));
    }
    let written: u64 = field("written")?
        .parse()
        .map_err(|_| "the write time is not a number")?;
    let length: usize = field("length")?
        .parse()
        .map_err(|_| "the length is not a number")?;
    let crc = u32::from_str_radix(field("crc32")?, 16).map_err(|_| "the checksum is not hex")?;
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
    let p: PayloadIn =
        serde_json::from_slice(payload).map_err(|e| format!("the payload is not a view: {e}"))?;
    Ok(Cached {
        index: p.index,
        instances: p.instances,
        written_at: UNIX_EPOCH
            .checked_add(Duration::from_millis(written))
            .ok_or_else(|| format!("write time {written} ms is out of range"))?,
    })
}

/// Reads `service`'s view from `dir`: `None` when there is no file, or (with one warning)
/// when it cannot be used.
pub(crate) fn load(dir: &Path, service: &str) -> Option<Cached> {
    let path = path_of(dir, service);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the cached view; ignoring it");
            return None;
        }
    };
    match decode(service, &bytes) {
        Ok(c) => Some(c),
        Err(why) => {
            tracing::warn!(file = %path.display(), problem = %why, "ignoring the cached view");
            None
        }
    }
}

/// Writes `bytes` as `service`'s view: a temporary file in the same directory, written and
/// synced, renamed over the old one, then the directory synced, so a crash at any point
/// leaves either the old file or the new one, never a mix.
pub(crate) fn write_atomic(dir: &Path, service: &str, bytes: &[u8]) -> io::Result<()> {
    let path = path_of(dir, service);
    // The process id and a per-process counter keep writers sharing a directory (other
    // processes, other clients in this one) off each other's temp files.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{service}.view.{}.{n}.tmp", std::process::id()));
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

/// Creates the cache directory; a failure is logged, not returned: the client works
/// without its disk copy.
pub(crate) fn prepare_dir(dir: &Path) -> bool {
    match fs::create_dir_all(dir) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the cache directory; views will not be kept on disk");
            false
        }
    }
}

/// Hands live snapshots to a background writer without ever waiting for the disk.
#[derive(Debug)]
pub(crate) struct Writer {
    latest: watch::Sender<Option<Arc<Snapshot>>>,
}

impl Writer {
    /// Starts the writer of `service`'s view in `dir`; it ends with `shutdown` once the last
    /// state handed to it is written.
    pub(crate) fn start(
        dir: PathBuf,
        service: &str,
        runtime: &tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> Writer {
        let (latest, rx) = watch::channel(None);
        runtime.spawn(write_loop(dir, service.to_string(), rx, shutdown));
        Writer { latest }
    }

    /// Queues `snap` to be written (replacing any state not yet written).
    pub(crate) fn write(&self, snap: Arc<Snapshot>) {
        self.latest.send_replace(Some(snap));
    }
}

async fn write_loop(
    dir: PathBuf,
    service: String,
    mut rx: watch::Receiver<Option<Arc<Snapshot>>>,
    shutdown: CancellationToken,
) {
    let mut written: Option<u64> = None;
    let mut warned = false;
    loop {
        let stop = tokio::select! {
            r = rx.changed() => r.is_err(),
            () = shutdown.cancelled() => true,
        };
        let snap = rx.borrow_and_update().clone();
        if let Some(snap) = snap.filter(|s| written != Some(s.index)) {
            let bytes = encode(&service, snap.index, &snap.instances, SystemTime::now());
            let (d, s) = (dir.clone(), service.clone());
            let result = tokio::task::spawn_blocking(move || write_atomic(&d, &s, &bytes)).await;
            match result {
                Ok(Ok(())) => {
                    written = Some(snap.index);
                    warned = false;
                }
                Ok(Err(e)) if !warned => {
                    warned = true;
                    tracing::warn!(file = %path_of(&dir, &service).display(), error = %e, "cannot write the cached view");
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
    use crate::Health;

    fn instance(id: &str, port: u16) -> Instance {
        Instance {
            service: "web".into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port,
            tags: vec!["v2".into()],
            meta: [("k".to_string(), "v".to_string())].into(),
            zone: Some("eu-1a".into()),
            weight: 3,
            health: Health::Warning,
            modify_index: 9,
        }
    }

    #[test]
    fn a_written_view_reads_back_whole() {
        let when = UNIX_EPOCH + Duration::from_millis(1_767_225_600_123);
        let instances = vec![instance("a", 1), instance("b", 2)];
        let bytes = encode("web", 42, &instances, when);
        let back = decode("web", &bytes).unwrap();
        assert_eq!(back.index, 42);
        assert_eq!(back.instances, instances);
        assert_eq!(back.written_at, when);
    }

    fn problem(service: &str, bytes: &[u8]) -> String {
        match decode(service, bytes) {
            Err(why) => why,
            Ok(_) => panic!("{:?} was accepted", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn damaged_or_foreign_files_are_refused_with_the_reason() {
        let good = encode("web", 7, &[instance("a", 1)], SystemTime::now());
        assert!(problem("api", &good).contains("holds service \"web\""));
        let cut = &good[..good.len() - 5];
        assert!(problem("web", cut).contains("truncated"));
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x01;
        assert!(problem("web", &flipped).contains("checksum mismatch"));
        let newer = String::from_utf8(good.clone())
            .unwrap()
            .replacen("version 1", "version 2", 1);
        assert!(problem("web", newer.as_bytes()).contains("format version 2"));
        assert!(problem("web", b"{\"index\":1}").contains("no header"));
        assert!(problem("web", b"hello\n\nworld").contains("not a muster view"));
        assert!(problem("web", &[0xff, 0xfe, b'\n', b'\n']).contains("not text"));
        // Every truncation point is refused, none panics.
        for n in 0..good.len() {
            assert!(decode("web", &good[..n]).is_err(), "cut at {n} accepted");
        }
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "web", &encode("web", 1, &[], SystemTime::now())).unwrap();
        write_atomic(
            dir.path(),
            "web",
            &encode("web", 2, &[instance("a", 1)], SystemTime::now()),
        )
        .unwrap();
        let back = load(dir.path(), "web").unwrap();
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
        assert!(load(dir.path(), "web").is_none());
    }

    fn snap(index: u64) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            service: "web".into(),
            index,
            source: crate::Source::Live,
            instances: Arc::from(vec![instance("a", 1)]),
        })
    }

    #[tokio::test]
    async fn a_burst_of_states_ends_with_the_last_one_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let writer = Writer::start(
            dir.path().to_path_buf(),
            "web",
            &tokio::runtime::Handle::current(),
            shutdown.clone(),
        );
        for i in 1..=50 {
            writer.write(snap(i));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if load(dir.path(), "web").is_some_and(|c| c.index == 50) {
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
