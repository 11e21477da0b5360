//! A write-ahead log: the durable half of a commit.
//!
//! Each commit appends one frame `[length: u32 LE][crc32: u32 LE][payload]` and waits for
//! `fdatasync`, which costs one sequential write however many changes the frame holds. A
//! frame cut short by a crash fails its length or checksum and ends replay there: that
//! commit was never acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use muster_core::Mutation;
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Frames larger than this are taken as corruption, not allocated.
const MAX_FRAME: u32 = 256 * 1024 * 1024;

/// One commit as logged.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Frame {
    pub(crate) index: u64,
    pub(crate) mutations: Vec<Mutation>,
}

/// The log file, opened for appending.
#[derive(Debug)]
pub(crate) struct Wal {
    file: File,
    /// Bytes appended since the last truncation.
    pub(crate) len: u64,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl Wal {
    /// Opens (or creates) the log and reads every intact frame in it, oldest first.
    pub(crate) fn open(path: &Path) -> Result<(Wal, Vec<Frame>), StoreError> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let frames = decode(&bytes);
        let len = bytes.len() as u64;
        Ok((Wal { file, len }, frames))
    }

    /// Appends one frame and makes it durable.
    pub(crate) fn append(&mut self, frame: &Frame) -> Result<(), StoreError> {
        let payload = serde_json::to_vec(frame).map_err(io)?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| io("a commit is too large for one log frame"))?;
        let mut buf = Vec::with_capacity(payload.len() + 8);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        buf.extend_from_slice(&payload);
        self.file.write_all(&buf).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Empties the log once everything in it is durable elsewhere.
    pub(crate) fn truncate(&mut self) -> Result<(), StoreError> {
        self.file.set_len(0).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        self.len = 0;
        Ok(())
    }
}

/// The intact frames at the start of `bytes`; decoding stops at the first damaged one.
fn decode(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while bytes.len() >= 8 {
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let Some(payload) = bytes.get(8..8 + len as usize) else {
            break;
        };
        if len > MAX_FRAME || crc32fast::hash(payload) != crc {
            break;
        }
        match serde_json::from_slice(payload) {
            Ok(frame) => frames.push(frame),
            Err(_) => break,
        }
        bytes = &bytes[8 + len as usize..];
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_back_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        {
            let (mut wal, frames) = Wal::open(&path).unwrap();
            assert!(frames.is_empty());
            for index in 1..=3 {
                let frame = Frame {
                    index,
                    mutations: vec![Mutation::DeleteLease(index)],
                };
                wal.append(&frame).unwrap();
            }
        }
        // A crash in the middle of the fourth append leaves half a frame behind.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, b'{']);
        std::fs::write(&path, &bytes).unwrap();
        let (_, frames) = Wal::open(&path).unwrap();
        let indexes: Vec<u64> = frames.iter().map(|f| f.index).collect();
        assert_eq!(indexes, [1, 2, 3]);
    }

    #[test]
    fn a_corrupted_frame_ends_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        {
            let (mut wal, _) = Wal::open(&path).unwrap();
            for index in 1..=2 {
                wal.append(&Frame {
                    index,
                    mutations: vec![],
                })
                .unwrap();
            }
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, frames) = Wal::open(&path).unwrap();
        assert_eq!(frames.len(), 1);
    }
}
