//! The ingest journal: an append-only file of received messages, the durability point.
//!
//! In journal mode the shell appends each batch of raw messages here and fsyncs before it
//! acknowledges them, and checkpoints the pipeline's state to the store only periodically: a
//! device window is then written once per checkpoint instead of once per summary. After a
//! crash, the messages since the last checkpoint are replayed through the pipeline; dedup state
//! is part of the checkpoint, so replaying a message that was already checkpointed is a
//! harmless duplicate.
//!
//! Record: `len: u32 LE` (of what follows), `received_ms: i64 LE`, `topic_len: u16 LE`, topic,
//! payload, `crc32: u32 LE` over everything between `len` and the CRC. A torn or corrupt tail
//! (a crash mid-append, before the fsync returned and so before any acknowledgement) ends the
//! replay; its messages are redelivered by the broker.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One journaled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub received_ms: i64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The journal file.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

/// Largest record accepted on replay (a guard against a corrupt length).
const MAX_RECORD: usize = 16 * 1024 * 1024;

/// Appends the encoding of one record to `out`.
pub fn encode(out: &mut Vec<u8>, received_ms: i64, topic: &str, payload: &[u8]) {
    let topic = &topic.as_bytes()[..topic.len().min(u16::MAX as usize)];
    let body_len = 8 + 2 + topic.len() + payload.len();
    out.extend_from_slice(&((body_len + 4) as u32).to_le_bytes());
    let start = out.len();
    out.extend_from_slice(&received_ms.to_le_bytes());
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Decodes the valid prefix of a journal.
pub fn decode(bytes: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if !(14..=MAX_RECORD).contains(&len) || rest.len() < 4 + len {
            break;
        }
        let body = &rest[4..4 + len - 4];
        let crc = &rest[4 + len - 4..4 + len];
        if crc32fast::hash(body).to_le_bytes() != crc {
            break;
        }
        let received_ms = i64::from_le_bytes(body[..8].try_into().unwrap_or([0; 8]));
        let topic_len = u16::from_le_bytes([body[8], body[9]]) as usize;
        if 10 + topic_len > body.len() {
            break;
        }
        let Ok(topic) = std::str::from_utf8(&body[10..10 + topic_len]) else {
            break;
        };
        out.push(Record {
            received_ms,
            topic: topic.to_owned(),
            payload: body[10 + topic_len..].to_vec(),
        });
        rest = &rest[4 + len..];
    }
    out
}

impl Journal {
    /// Opens (creating) the journal at `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every intact record, oldest first.
    pub fn read_all(&mut self) -> std::io::Result<Vec<Record>> {
        let mut bytes = Vec::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_end(&mut bytes)?;
        Ok(decode(&bytes))
    }

    /// Appends encoded records and waits until they are on disk. On failure the file is cut
    /// back to where it was, so a retry does not land after a torn record (which replay would
    /// stop at, losing the retried records).
    pub fn append(&mut self, encoded: &[u8]) -> std::io::Result<()> {
        let before = self.file.metadata()?.len();
        let result = self
            .file
            .write_all(encoded)
            .and_then(|()| self.file.sync_data());
        if result.is_err() {
            let _ = self.file.set_len(before);
        }
        result
    }

    /// Empties the journal after a checkpoint holds everything in it.
    pub fn truncate(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn append_read_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        let mut buf = Vec::new();
        encode(&mut buf, 5, "tf/v1/a/sum", b"\x01\x02");
        encode(&mut buf, 6, "tf/v1/b/hello", b"");
        j.append(&buf).unwrap();
        drop(j);
        let mut j = Journal::open(&path).unwrap();
        let recs = j.read_all().unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].topic, "tf/v1/a/sum");
        assert_eq!(recs[1].received_ms, 6);
        j.truncate().unwrap();
        assert!(j.read_all().unwrap().is_empty());
        // Appends after a truncate land at the start.
        j.append(&buf[..buf.len() / 2]).unwrap();
        assert!(j.read_all().unwrap().len() <= 1);
    }

    proptest! {
        #[test]
        fn a_torn_or_corrupt_tail_keeps_the_intact_prefix(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..8),
            cut in any::<proptest::sample::Index>(), flip in any::<proptest::sample::Index>()) {
            let mut buf = Vec::new();
            let mut ends = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                encode(&mut buf, i as i64, "t", m);
                ends.push(buf.len());
            }
            prop_assert_eq!(decode(&buf).len(), msgs.len());
            let at = cut.index(buf.len());
            let whole = ends.iter().filter(|&&e| e <= at).count();
            prop_assert_eq!(decode(&buf[..at]).len(), whole);
            let mut bad = buf.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 0x10;
            let before = ends.iter().filter(|&&e| e <= i).count();
            let got = decode(&bad);
            prop_assert!(got.len() >= before && got.len() < msgs.len() + 1);
            for (r, m) in got.iter().zip(&msgs).take(before) {
                prop_assert_eq!(&r.payload, m);
            }
        }
    }
}
