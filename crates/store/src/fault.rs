//! Injected storage failures, for fault-injection tests.
//!
//! A [`Faults`] plan handed to [`crate::RedbOptions`] makes chosen file operations of the log
//! and of the database fail the way a full or failing disk makes them fail: a write that puts
//! part of its bytes in the file and then reports `ENOSPC`, an `fdatasync` that reports `EIO`.
//! The store must answer each such commit with an error, lose nothing it acknowledged, and
//! accept writes again once the disk recovers. Without a plan (the default) every check is
//! one branch on a `None`.

use std::io;
use std::sync::{Arc, Mutex};

/// A file operation of the store that a plan can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// Writing a frame to the log.
    LogWrite,
    /// `fdatasync` of the log after a frame.
    LogSync,
    /// Cutting the log back to its last commit after a failed append.
    LogTruncate,
    /// Creating the next log segment.
    SegmentCreate,
    /// Writing or growing the database file (checkpoints).
    DbWrite,
    /// Syncing the database file (checkpoints).
    DbSync,
}

/// How an operation fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    kind: io::ErrorKind,
    written: usize,
}

impl Fault {
    /// No space left on the device.
    pub const fn enospc() -> Fault {
        Fault {
            kind: io::ErrorKind::StorageFull,
            written: 0,
        }
    }

    /// An I/O error from the device.
    pub const fn eio() -> Fault {
        Fault {
            kind: io::ErrorKind::Other,
            written: 0,
        }
    }

    /// Lets the first `bytes` of a write reach the file before it fails, as a write cut short
    /// by a full disk does.
    pub const fn after(self, bytes: usize) -> Fault {
        Fault {
            written: bytes,
            ..self
        }
    }

    /// Bytes of a failing write that still reach the file.
    pub(crate) fn written(&self) -> usize {
        self.written
    }

    /// The error the operation reports.
    pub(crate) fn error(&self) -> io::Error {
        let what = match self.kind {
            io::ErrorKind::StorageFull => "no space left on device",
            _ => "input/output error",
        };
        io::Error::new(self.kind, format!("{what} (injected)"))
    }
}

/// A plan of failures, shared between a test and the store it opened.
#[derive(Debug, Default)]
pub struct Faults {
    plan: Mutex<Plan>,
}

#[derive(Debug, Default)]
struct Plan {
    /// Each fails the next call of its operation, then is gone.
    once: Vec<(Op, Fault)>,
    /// Each fails every call of its operation until cleared.
    always: Vec<(Op, Fault)>,
    injected: u64,
}

impl Faults {
    /// An empty plan: nothing fails until told to.
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// Makes the next `op` fail with `fault`.
    pub fn once(&self, op: Op, fault: Fault) {
        self.plan().once.push((op, fault));
    }

    /// Makes every `op` fail with `fault` until [`Faults::clear`] (a disk that stays full).
    pub fn always(&self, op: Op, fault: Fault) {
        self.plan().always.push((op, fault));
    }

    /// Ends every planned failure: the disk has recovered.
    pub fn clear(&self) {
        let mut plan = self.plan();
        plan.once.clear();
        plan.always.clear();
    }

    /// How many operations have failed so far.
    pub fn injected(&self) -> u64 {
        self.plan().injected
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The failure planned for this call of `op`, if any.
    pub(crate) fn hit(faults: Option<&Arc<Faults>>, op: Op) -> Option<Fault> {
        let mut plan = faults?.plan();
        let fault = match plan.once.iter().position(|(o, _)| *o == op) {
            Some(i) => Some(plan.once.remove(i).1),
            None => plan.always.iter().find(|(o, _)| *o == op).map(|(_, f)| *f),
        };
        if fault.is_some() {
            plan.injected += 1;
        }
        fault
    }

    /// Fails `op` if planned, else does nothing.
    pub(crate) fn check(faults: Option<&Arc<Faults>>, op: Op) -> io::Result<()> {
        match Faults::hit(faults, op) {
            Some(fault) => Err(fault.error()),
            None => Ok(()),
        }
    }
}

/// redb's file backend with the plan's `DbWrite` and `DbSync` failures.
#[derive(Debug)]
pub(crate) struct FaultyBackend {
    file: redb::backends::FileBackend,
    faults: Arc<Faults>,
}

impl FaultyBackend {
    pub(crate) fn new(
        file: std::fs::File,
        faults: Arc<Faults>,
    ) -> Result<Self, redb::DatabaseError> {
        Ok(FaultyBackend {
            file: redb::backends::FileBackend::new(file)?,
            faults,
        })
    }
}

impl redb::StorageBackend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        Faults::check(Some(&self.faults), Op::DbWrite)?;
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        Faults::check(Some(&self.faults), Op::DbSync)?;
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if let Some(fault) = Faults::hit(Some(&self.faults), Op::DbWrite) {
            let n = fault.written().min(data.len());
            self.file.write(offset, &data[..n])?;
            return Err(fault.error());
        }
        self.file.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }

    fn try_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.file.query_lock_range(start, end)
    }
}
