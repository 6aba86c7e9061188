//! MQTT block transfer: answers a device's verified block request with one `block` message
//! (`docs/protocol.md`) read from the content-addressed artifacts.

use tinyfleet_device::wire::{self, Block};

use crate::artifacts::Artifacts;

/// Largest block a device may ask for (the protocol's limit).
pub const MAX_BLOCK: u16 = 4096;

/// Why a block request gets no answer.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("no object {0}")]
    UnknownObject(String),
    #[error("offset {offset} is past the end of the object ({total} bytes)")]
    Offset { offset: u32, total: u64 },
    #[error("block length {0} must be 1..=4096")]
    Length(u16),
    #[error("artifact storage: {0}")]
    Io(#[from] std::io::Error),
}

/// The `block` message answering a request for `len` bytes at `offset` of `object` (a SHA-256),
/// and the topic to publish it on.
pub fn answer(
    artifacts: &Artifacts,
    device: &str,
    object: &[u8; 32],
    offset: u32,
    len: u16,
) -> Result<(String, Vec<u8>), BlockError> {
    if len == 0 || len > MAX_BLOCK {
        return Err(BlockError::Length(len));
    }
    let sha = hex::encode(object);
    let total = artifacts
        .size(&sha)?
        .ok_or_else(|| BlockError::UnknownObject(sha.clone()))?;
    if u64::from(offset) >= total {
        return Err(BlockError::Offset { offset, total });
    }
    let data = artifacts
        .read_range(&sha, u64::from(offset), u64::from(len))?
        .ok_or_else(|| BlockError::UnknownObject(sha.clone()))?;
    let block = Block {
        object,
        offset,
        total: u32::try_from(total).unwrap_or(u32::MAX),
        data: &data,
    };
    let mut buf = vec![0u8; data.len() + 64];
    let n = wire::to_cbor(&block, &mut buf)
        .map_err(|e| std::io::Error::other(format!("cannot encode a block: {e:?}")))?;
    buf.truncate(n);
    Ok((format!("tf/v1/{device}/ota/blk"), buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_answer_within_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let sha = a.put(&bytes).unwrap();
        let object: [u8; 32] = hex::decode(&sha).unwrap().try_into().unwrap();
        let (topic, msg) = answer(&a, "dev-1", &object, 4096, 4096).unwrap();
        assert_eq!(topic, "tf/v1/dev-1/ota/blk");
        let block: Block<'_> = wire::from_cbor(&msg).unwrap();
        assert_eq!((block.offset, block.total), (4096, 5000));
        assert_eq!(block.data, &bytes[4096..]);
        assert!(matches!(
            answer(&a, "d", &object, 5000, 10),
            Err(BlockError::Offset { .. })
        ));
        assert!(matches!(
            answer(&a, "d", &object, 0, 0),
            Err(BlockError::Length(0))
        ));
        assert!(matches!(
            answer(&a, "d", &[0; 32], 0, 10),
            Err(BlockError::UnknownObject(_))
        ));
    }
}
