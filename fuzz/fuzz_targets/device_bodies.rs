//! The bodies of device messages, untagged (what is inside a COSE_Mac0 once its tag verified):
//! `wire::from_cbor` for every device -> cloud message type (`device-client/src/wire.rs`), the
//! strict owned forms (`decoded.rs`: `HelloOwned`, `BlockRequestOwned`), and the topic parser.
//!
//! Properties: never panics on any bytes; a body that decodes re-encodes (packed CBOR, as the
//! device writes it) to a body that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfleet_device::decoded::{BlockRequestOwned, HelloOwned};
use tinyfleet_device::wire::{self, BlockRequest, Hello, Progress, Will};
use tinyfleet_fuzz::Input;

fn reencode<'a, T>(value: &T, buf: &'a mut [u8]) -> &'a [u8]
where
    T: serde::Serialize,
{
    let n = wire::to_cbor(value, buf).expect("a decoded message re-encodes");
    &buf[..n]
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let topic = input.frame();
    let body = input.rest();
    if let Ok(topic) = std::str::from_utf8(topic)
        && let Some((id, kind)) = wire::parse_topic(topic)
    {
        assert_eq!(
            wire::Topic::new(id, kind).as_str(),
            topic,
            "topics round-trip"
        );
    }

    let mut buf = vec![0u8; body.len() * 2 + 64];
    if let Ok(h) = wire::from_cbor::<Hello<'_>>(body) {
        let owned = HelloOwned::from(&h);
        let again: Hello<'_> = wire::from_cbor(reencode(&h, &mut buf)).expect("hello round-trip");
        assert_eq!(HelloOwned::from(&again), owned);
    }
    if let Ok(w) = wire::from_cbor::<Will>(body) {
        assert_eq!(wire::from_cbor::<Will>(reencode(&w, &mut buf)), Ok(w));
    }
    if let Ok(p) = wire::from_cbor::<Progress>(body) {
        assert_eq!(wire::from_cbor::<Progress>(reencode(&p, &mut buf)), Ok(p));
    }
    if let Ok(r) = wire::from_cbor::<BlockRequest<'_>>(body) {
        let owned = BlockRequestOwned::try_from(&r);
        if let Ok(o) = &owned {
            assert!((1..=wire::limits::MAX_BLOCK).contains(&usize::from(o.len)));
            assert_eq!(&o.object[..], r.object);
        }
        let again: BlockRequest<'_> =
            wire::from_cbor(reencode(&r, &mut buf)).expect("block request round-trip");
        assert_eq!(again, r);
        assert_eq!(BlockRequestOwned::try_from(&again), owned);
    }
});
