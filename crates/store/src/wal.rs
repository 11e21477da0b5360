//! A write-ahead log in segments: the durable half of a commit.
//!
//! Each commit appends one frame `[length: u32 LE][crc32: u32 LE][payload]` to the current
//! segment and waits for `fdatasync`, which costs one sequential write however many changes
//! the frame holds. The payload is JSON, `{"index":…,"seq":…,"mutations":[…]}`; `seq` counts
//! commits one by one, so the store can tell when history is missing.
//!
//! A failed append (a full disk, an I/O error) may leave part of its frame in the file, or
//! all of it with its durability unknown: before anything else is appended the segment is cut
//! back to its last good length and synced. Until that succeeds, no append is accepted.
//!
//! Replay tells a torn tail from damage. A crash can only cut short the last frame written,
//! so a bad frame with nothing intact after it is the unacknowledged end of the log: it is
//! dropped, with a warning naming the file and offset. A bad frame followed by intact ones
//! means acknowledged commits sit behind damage: opening the log fails, naming the file and
//! offset, unless the caller asks to recover, which replays every intact frame and renames
//! each damaged segment to `<name>.damaged`, keeping it as evidence.
//!
//! Segments are files `muster.wal.<n>` in the data directory, numbered upward. Once one is
//! full the log moves on to the next, and the store deletes the full one when everything in
//! it is durable in the database (a checkpoint). A crash between the two leaves frames that
//! are replayed again, which is harmless: every change is a put or a delete by key.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use muster_core::Mutation;
use serde::Deserialize;
#[cfg(test)]
use serde::Serialize;

use crate::StoreError;
use crate::fault::{Faults, Op};
use std::sync::Arc;

/// Frames larger than this are taken as corruption, not allocated.
const MAX_FRAME: u32 = 256 * 1024 * 1024;

/// The segment name's prefix; `muster.wal` alone is the single log of earlier versions,
/// read as segment 0.
const PREFIX: &str = "muster.wal";

/// One commit as logged.
#[derive(Debug, Deserialize)]
pub(crate) struct Frame {
    pub(crate) index: u64,
    /// The commit's number, one more than the commit before; 0 in logs of earlier versions.
    #[serde(default)]
    pub(crate) seq: u64,
    pub(crate) mutations: Vec<Mutation>,
}

/// A frame as serde would serialize it: the same fields, borrowed. The store writes the same
/// bytes itself (`redb::encode_frame`); the tests compare the two.
#[cfg(test)]
#[derive(Debug, Serialize)]
pub(crate) struct FrameRef<'a> {
    pub(crate) index: u64,
    pub(crate) seq: u64,
    pub(crate) mutations: &'a [Mutation],
}

/// What an opened log found.
#[derive(Debug)]
pub(crate) struct Replay {
    /// Every intact frame, oldest first.
    pub(crate) frames: Vec<Frame>,
    /// The segments they came from; delete them once the frames are durable elsewhere.
    pub(crate) segments: Vec<PathBuf>,
}

/// The log, appending to its newest segment.
#[derive(Debug)]
pub(crate) struct Log {
    dir: PathBuf,
    /// The current segment's number.
    number: u64,
    file: File,
    path: PathBuf,
    /// Bytes in the current segment up to the end of its last good frame.
    pub(crate) len: u64,
    /// Set when a failed append could not be cut off: what failed.
    broken: Option<String>,
    faults: Option<Arc<Faults>>,
}

/// Where decoding a segment stopped.
#[derive(Debug, PartialEq)]
enum Stop {
    /// At the end of the file, or where only zeros follow (a prepared segment's unused rest).
    End,
    /// At a frame that is cut short, fails its checksum or does not parse.
    Damaged(u64),
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn open_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The segment number of a file name, if it names a segment.
fn segment_number(name: &str) -> Option<u64> {
    match name.strip_prefix(PREFIX)? {
        "" => Some(0),
        rest => rest.strip_prefix('.')?.parse().ok(),
    }
}

impl Log {
    /// Reads every segment in `dir`, oldest first, and starts a new, empty one after them.
    ///
    /// Fails if a damaged frame has intact ones after it, unless `recover` is set.
    pub(crate) fn open(
        dir: &Path,
        recover: bool,
        faults: Option<Arc<Faults>>,
    ) -> Result<(Log, Replay), StoreError> {
        let found = segments(dir)?;
        let mut frames = Vec::new();
        // The first damaged frame, and the intact frames found after it.
        let mut damage: Option<(PathBuf, u64)> = None;
        let mut after_damage: Vec<u64> = Vec::new();
        let mut damaged_segments = Vec::new();
        for (_, path) in &found {
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| open_err(path, e))?;
            let mut at = 0;
            loop {
                let stop = decode(&bytes, &mut at, &mut |frame: Frame| {
                    if damage.is_some() {
                        after_damage.push(frame.index);
                    }
                    if damage.is_none() || recover {
                        frames.push(frame);
                    }
                });
                let Stop::Damaged(offset) = stop else { break };
                if damage.is_none() {
                    damage = Some((path.clone(), offset));
                }
                if damaged_segments.last() != Some(path) {
                    damaged_segments.push(path.clone());
                }
                // Whatever intact frame comes next in this segment, if any.
                match next_intact(&bytes, offset + 1) {
                    Some(next) => at = next,
                    None => break,
                }
            }
        }
        let mut segments: Vec<PathBuf> = found.iter().map(|(_, p)| p.clone()).collect();
        if let Some((path, offset)) = damage {
            if after_damage.is_empty() {
                // Only the end of the log: a crash cut its last write short, before it was
                // acknowledged.
                tracing::warn!(
                    file = %path.display(),
                    offset,
                    "dropped an incomplete commit at the end of the write-ahead log (the last \
                     write before a crash or a failed write, never acknowledged)"
                );
            } else if !recover {
                return Err(StoreError::DamagedLog {
                    path: path.display().to_string(),
                    offset,
                    following: after_damage.len(),
                    first_index: after_damage.iter().copied().min().unwrap_or(0),
                    last_index: after_damage.iter().copied().max().unwrap_or(0),
                });
            } else {
                for damaged in &damaged_segments {
                    let kept = set_aside(damaged)?;
                    tracing::warn!(
                        file = %damaged.display(),
                        kept = %kept.display(),
                        "--recover: replayed every intact commit of a damaged log segment and \
                         kept the segment as evidence; commits inside the damage are lost"
                    );
                    segments.retain(|p| p != damaged);
                }
            }
        }
        let number = found.last().map_or(1, |(n, _)| n + 1);
        let log = Log::create(dir, number, faults)?;
        Ok((log, Replay { frames, segments }))
    }

    /// Creates segment `number` and makes its name durable in the directory.
    fn create(dir: &Path, number: u64, faults: Option<Arc<Faults>>) -> Result<Log, StoreError> {
        let path = segment_path(dir, number);
        Faults::check(faults.as_ref(), Op::SegmentCreate).map_err(|e| open_err(&path, e))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| open_err(&path, e))?;
        // Without this, a crash could lose the new file's directory entry, and with it
        // every frame fdatasync'd into it.
        sync_dir(dir)?;
        Ok(Log {
            dir: dir.to_path_buf(),
            number,
            file,
            path,
            len: 0,
            broken: None,
            faults,
        })
    }

    /// The current segment's number.
    pub(crate) fn number(&self) -> u64 {
        self.number
    }

    /// Appends one frame, whose payload is a serialized [`Frame`], and makes it durable.
    ///
    /// On failure the frame is not in the log: the segment is cut back to its last good
    /// length first. If even that fails, every later append fails until it succeeds.
    pub(crate) fn append(&mut self, payload: &[u8]) -> Result<(), StoreError> {
        if let Some(failed) = self.broken.clone() {
            self.cut_back().map_err(|e| {
                io(format!(
                    "the write-ahead log {} still ends in a failed write ({failed}) and cannot \
                     be cut back to its last commit: {e}",
                    self.path.display()
                ))
            })?;
        }
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| io("a commit is too large for one log frame"))?;
        let mut buf = Vec::with_capacity(payload.len() + 8);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        buf.extend_from_slice(payload);
        if let Err(e) = self.write(&buf) {
            let failed = format!("cannot append to {}: {e}", self.path.display());
            if let Err(cut) = self.cut_back() {
                self.broken = Some(e.to_string());
                return Err(io(format!(
                    "{failed}; nor cut it back to its last commit ({cut}), so no write is \
                     accepted until it can be"
                )));
            }
            return Err(io(failed));
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Writes `buf` at the end of the log and syncs it.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let faults = self.faults.as_ref();
        if let Some(fault) = Faults::hit(faults, Op::LogWrite) {
            let n = fault.written().min(buf.len());
            self.file.write_all(&buf[..n])?;
            return Err(fault.error());
        }
        self.file.write_all(buf)?;
        Faults::check(faults, Op::LogSync)?;
        self.file.sync_data()
    }

    /// Cuts the segment back to the end of its last good frame, durably. After a failed
    /// `fdatasync` the frame's pages may or may not reach the disk later; cutting them off
    /// makes the outcome the one the caller was told.
    fn cut_back(&mut self) -> std::io::Result<()> {
        Faults::check(self.faults.as_ref(), Op::LogTruncate)?;
        self.file.set_len(self.len)?;
        self.file.seek(SeekFrom::Start(self.len))?;
        self.file.sync_all()?;
        self.broken = None;
        Ok(())
    }

    /// Starts the next segment, in `spare` if it was prepared for it; returns the path of
    /// the one it closed.
    pub(crate) fn rotate(&mut self, spare: Option<Spare>) -> Result<PathBuf, StoreError> {
        let next = match spare {
            Some(s) if s.number == self.number + 1 => Log {
                dir: self.dir.clone(),
                number: s.number,
                file: s.file,
                path: s.path,
                len: 0,
                broken: None,
                faults: self.faults.clone(),
            },
            _ => Log::create(&self.dir, self.number + 1, self.faults.clone())?,
        };
        let closed = std::mem::replace(self, next);
        Ok(closed.path)
    }

    /// The current segment's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// A segment made ahead of time: filled with zeros to its full size and synced, so that
/// appends overwrite allocated blocks and each `fdatasync` has no file size or extent to
/// record (about 40% less time and CPU per commit on ext4).
#[derive(Debug)]
pub(crate) struct Spare {
    number: u64,
    file: File,
    path: PathBuf,
}

impl Spare {
    /// Prepares segment `number` of `bytes` in `dir`. On failure (a full disk) nothing is
    /// left behind.
    pub(crate) fn prepare(dir: &Path, number: u64, bytes: u64) -> Result<Spare, StoreError> {
        let path = segment_path(dir, number);
        let result = Spare::fill(&path, bytes).and_then(|file| {
            sync_dir(dir)?;
            Ok(file)
        });
        match result {
            Ok(file) => Ok(Spare { number, file, path }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn fill(path: &Path, bytes: u64) -> Result<File, StoreError> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        // Page by page: the page cache sizes a folio by the write that creates it, and the
        // whole folio is written back when any byte of it is dirtied. Zeros written a
        // megabyte at a time would make each later commit's fdatasync write up to that much.
        let zeros = [0u8; 4096];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n]).map_err(io)?;
            left -= n as u64;
        }
        file.sync_all().map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        Ok(file)
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{PREFIX}.{number}"))
}

/// The log segments in `dir`, oldest first.
pub(crate) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| open_err(dir, e))? {
        let entry = entry.map_err(|e| open_err(dir, e))?;
        if let Some(number) = entry.file_name().to_str().and_then(segment_number) {
            found.push((number, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Renames a damaged segment so that it is kept but no longer replayed.
fn set_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let mut kept = path.as_os_str().to_owned();
    kept.push(".damaged");
    let kept = PathBuf::from(kept);
    std::fs::rename(path, &kept).map_err(|e| open_err(path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(kept)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| open_err(dir, e))
}

/// The frame at `at`, if one is intact there, and where the next one starts.
fn frame_at(bytes: &[u8], at: usize) -> Option<(Frame, usize)> {
    let header = bytes.get(at..at + 8)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_FRAME {
        return None;
    }
    let end = at + 8 + len as usize;
    let payload = bytes.get(at + 8..end)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let frame = serde_json::from_slice(payload).ok()?;
    Some((frame, end))
}

/// Hands every intact frame from `*at` on to `out`, advancing `*at`, until the end of the
/// data or a damaged frame.
fn decode(bytes: &[u8], at: &mut usize, out: &mut dyn FnMut(Frame)) -> Stop {
    loop {
        let rest = &bytes[*at..];
        if rest.iter().all(|b| *b == 0) {
            return Stop::End;
        }
        match frame_at(bytes, *at) {
            Some((frame, next)) => {
                out(frame);
                *at = next;
            }
            None => return Stop::Damaged(*at as u64),
        }
    }
}

/// Where the first intact frame at or after `from` starts. Every payload begins with
/// `{"index":`, which cannot occur inside a JSON string, so only those places are tried.
fn next_intact(bytes: &[u8], from: u64) -> Option<usize> {
    const MARK: &[u8] = b"{\"index\":";
    let from = usize::try_from(from).ok()?;
    let mut search = from.saturating_add(8);
    while search < bytes.len() {
        let found = bytes[search..]
            .windows(MARK.len())
            .position(|w| w == MARK)?;
        let payload = search + found;
        let header = payload - 8;
        if header >= from && frame_at(bytes, header).is_some() {
            return Some(header);
        }
        search = payload + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Log {
        fn append_frame(&mut self, index: u64, mutations: &[Mutation]) -> Result<(), StoreError> {
            let payload = serde_json::to_vec(&FrameRef {
                index,
                seq: index,
                mutations,
            })
            .map_err(io)?;
            self.append(&payload)
        }
    }

    fn indexes(replay: &Replay) -> Vec<u64> {
        replay.frames.iter().map(|f| f.index).collect()
    }

    #[test]
    fn frames_are_read_back_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let (mut log, replay) = Log::open(dir.path(), false, None).unwrap();
            assert!(replay.frames.is_empty());
            for index in 1..=3 {
                log.append_frame(index, &[Mutation::DeleteLease(index)])
                    .unwrap();
            }
            log.path().to_path_buf()
        };
        // A crash in the middle of the fourth append leaves half a frame behind.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, b'{']);
        std::fs::write(&path, &bytes).unwrap();
        let (_, replay) = Log::open(dir.path(), false, None).unwrap();
        assert_eq!(indexes(&replay), [1, 2, 3]);
    }

    #[test]
    fn a_corrupted_frame_ends_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let (mut log, _) = Log::open(dir.path(), false, None).unwrap();
            for index in 1..=2 {
                log.append_frame(index, &[]).unwrap();
            }
            log.path().to_path_buf()
        };
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, replay) = Log::open(dir.path(), false, None).unwrap();
        assert_eq!(replay.frames.len(), 1);
    }

    #[test]
    fn segments_are_replayed_in_order_and_reopening_starts_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (closed, current) = {
            let (mut log, _) = Log::open(dir.path(), false, None).unwrap();
            log.append_frame(1, &[]).unwrap();
            let closed = log.rotate(None).unwrap();
            log.append_frame(2, &[]).unwrap();
            log.append_frame(3, &[]).unwrap();
            (closed, log.path().to_path_buf())
        };
        let (log, replay) = Log::open(dir.path(), false, None).unwrap();
        assert_eq!(indexes(&replay), [1, 2, 3]);
        assert_eq!(replay.segments, [closed, current.clone()]);
        assert!(log.path() != current && log.len == 0);
    }

    #[test]
    fn a_prepared_segment_is_used_and_its_zeros_end_replay_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = Log::open(dir.path(), false, None).unwrap();
            log.append_frame(1, &[]).unwrap();
            let spare = Spare::prepare(dir.path(), log.number() + 1, 64 * 1024).unwrap();
            let spare_path = spare.path().to_path_buf();
            log.rotate(Some(spare)).unwrap();
            assert_eq!(log.path(), spare_path);
            log.append_frame(2, &[]).unwrap();
            // Prepared for the next rotation and never used: all zeros.
            Spare::prepare(dir.path(), log.number() + 1, 4096).unwrap();
        }
        let (_, replay) = Log::open(dir.path(), false, None).unwrap();
        assert_eq!(indexes(&replay), [1, 2]);
        assert_eq!(replay.segments.len(), 3);
    }

    /// Bytes this thread has caused to be written so far (the kernel counts a page, or a
    /// larger folio, each time a write dirties it).
    #[cfg(target_os = "linux")]
    fn thread_write_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("task I/O accounting");
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("a write_bytes line")
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn small_commits_into_a_prepared_segment_write_pages_not_megabytes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), false, None).unwrap();
        let spare = Spare::prepare(dir.path(), log.number() + 1, 8 << 20).unwrap();
        log.rotate(Some(spare)).unwrap();
        let before = thread_write_bytes();
        let commits = 200;
        for index in 0..commits {
            log.append_frame(index, &[Mutation::DeleteLease(index)])
                .unwrap();
        }
        let per_commit = (thread_write_bytes() - before) / commits;
        // Each frame is a few dozen bytes: at most the page it ends in, and the one it
        // started in, are written again.
        assert!(
            per_commit <= 2 * 4096,
            "{per_commit} bytes written per commit"
        );
    }

    /// Writes frames 1 and 2 into one segment and 3 into the next, then flips a byte of
    /// frame 2; returns the damaged segment and the damaged frame's offset.
    fn log_damaged_before_intact_frames(dir: &Path) -> (PathBuf, u64) {
        let (first, offset) = {
            let (mut log, _) = Log::open(dir, false, None).unwrap();
            log.append_frame(1, &[]).unwrap();
            let offset = log.len;
            log.append_frame(2, &[]).unwrap();
            let first = log.rotate(None).unwrap();
            log.append_frame(3, &[]).unwrap();
            (first, offset)
        };
        let mut bytes = std::fs::read(&first).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&first, &bytes).unwrap();
        (first, offset)
    }

    #[test]
    fn damage_followed_by_intact_frames_refuses_to_open_and_names_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let (first, offset) = log_damaged_before_intact_frames(dir.path());
        let err = Log::open(dir.path(), false, None).unwrap_err();
        let StoreError::DamagedLog {
            path,
            offset: at,
            following,
            first_index,
            last_index,
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(path, &first.display().to_string());
        assert_eq!(
            (*at, *following, *first_index, *last_index),
            (offset, 1, 3, 3)
        );
        assert!(err.to_string().contains("--recover"), "{err}");
        // Nothing was deleted or renamed.
        assert!(first.exists());
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn recovery_replays_every_intact_frame_and_keeps_the_damaged_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = log_damaged_before_intact_frames(dir.path());
        let (_, replay) = Log::open(dir.path(), true, None).unwrap();
        assert_eq!(indexes(&replay), [1, 3]);
        let mut kept = first.clone().into_os_string();
        kept.push(".damaged");
        assert!(std::path::Path::new(&kept).exists());
        assert!(!replay.segments.contains(&first));
    }

    #[test]
    fn damage_in_the_middle_of_a_segment_is_found_past_a_broken_length() {
        let dir = tempfile::tempdir().unwrap();
        let (path, offset) = {
            let (mut log, _) = Log::open(dir.path(), false, None).unwrap();
            log.append_frame(1, &[]).unwrap();
            let offset = log.len;
            for index in 2..=30 {
                log.append_frame(index, &[Mutation::DeleteLease(index)])
                    .unwrap();
            }
            (log.path().to_path_buf(), offset)
        };
        // Frame 2's length field: decoding cannot step over it to frame 3.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offset as usize + 2] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = Log::open(dir.path(), false, None).unwrap_err();
        assert!(
            matches!(err, StoreError::DamagedLog { following: 28, offset: o, .. } if o == offset),
            "{err}"
        );
        let (_, replay) = Log::open(dir.path(), true, None).unwrap();
        assert_eq!(replay.frames.len(), 29);
    }

    #[test]
    fn the_single_log_of_earlier_versions_is_read_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _) = Log::open(dir.path(), false, None).unwrap();
            log.append_frame(7, &[]).unwrap();
            std::fs::rename(log.path(), dir.path().join("muster.wal")).unwrap();
        }
        let (_, replay) = Log::open(dir.path(), false, None).unwrap();
        assert_eq!(indexes(&replay), [7]);
        assert_eq!(replay.segments[0], dir.path().join("muster.wal"));
    }

    use crate::fault::Fault;

    #[test]
    fn a_failed_append_leaves_no_torn_frame_before_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        {
            let (mut log, _) = Log::open(dir.path(), false, Some(faults.clone())).unwrap();
            log.append_frame(1, &[]).unwrap();
            // A full disk takes half a frame, then one whose fdatasync fails.
            faults.once(Op::LogWrite, Fault::enospc().after(20));
            assert!(log.append_frame(2, &[Mutation::DeleteLease(2)]).is_err());
            faults.once(Op::LogSync, Fault::eio());
            assert!(log.append_frame(3, &[]).is_err());
            log.append_frame(4, &[]).unwrap();
            assert_eq!(faults.injected(), 2);
        }
        let (_, replay) = Log::open(dir.path(), false, None).unwrap();
        assert_eq!(indexes(&replay), [1, 4]);
    }

    #[test]
    fn a_log_that_cannot_be_cut_back_accepts_nothing_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        {
            let (mut log, _) = Log::open(dir.path(), false, Some(faults.clone())).unwrap();
            log.append_frame(1, &[]).unwrap();
            faults.once(Op::LogWrite, Fault::eio().after(12));
            faults.always(Op::LogTruncate, Fault::eio());
            let err = log.append_frame(2, &[]).unwrap_err().to_string();
            assert!(err.contains("no write is accepted"), "{err}");
            // The disk still fails: the torn frame stays, and so does the refusal.
            let err = log.append_frame(3, &[]).unwrap_err().to_string();
            assert!(err.contains("cannot be cut back"), "{err}");
            faults.clear();
            log.append_frame(4, &[]).unwrap();
        }
        let (_, replay) = Log::open(dir.path(), false, None).unwrap();
        assert_eq!(indexes(&replay), [1, 4]);
    }
}
