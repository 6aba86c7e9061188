//! The packed `counts` bitstream of summaries (`device-client/src/counts.rs`).
//!
//! Properties: reading any bytes as any sequence of vector lengths never panics; every vector
//! read back re-encodes and decodes to the same values (`decode(encode(x)) == x`), and a whole
//! stream that decoded cleanly re-encodes to a stream that decodes cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::counts::{BitReader, BitWriter};
use tinyfleet_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // Up to 8 vector lengths (up to 4096 + 3 values each, the protocol's largest), then the
    // stream.
    let n = usize::from(input.byte() % 9);
    let lens: Vec<usize> = (0..n).map(|_| usize::from(input.u16() % 4100)).collect();
    let stream = input.rest();

    let mut reader = BitReader::new(stream);
    let mut vectors: Vec<Vec<u32>> = Vec::new();
    for &len in &lens {
        let mut v = Vec::new();
        if reader.vector(len, |x| v.push(x)).is_err() {
            return;
        }
        assert_eq!(v.len(), len);
        vectors.push(v);
    }
    let clean = reader.finish().is_ok();

    // An Exp-Golomb code of a u32 takes at most 64 bits; 4 bits of order per vector.
    let values: usize = vectors.iter().map(Vec::len).sum();
    let mut buf = vec![0u8; values * 8 + vectors.len() + 1];
    let mut writer = BitWriter::new(&mut buf);
    for v in &vectors {
        writer
            .vector(v.iter().copied())
            .expect("a decoded vector re-encodes");
    }
    let len = writer.byte_len();
    let mut again = BitReader::new(&buf[..len]);
    for v in &vectors {
        let mut w = Vec::new();
        again
            .vector(v.len(), |x| w.push(x))
            .expect("a re-encoded vector decodes");
        assert_eq!(&w, v, "decode(encode(x)) == x");
    }
    again.finish().expect("a re-encoded stream ends cleanly");
    if clean {
        // The encoder picks the best order per vector: never longer than what it decoded.
        assert!(
            len <= stream.len(),
            "re-encoding grew {} -> {len}",
            stream.len()
        );
    }
});
