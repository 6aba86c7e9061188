//! The OTA service over a real store and artifact directory: versions registered with
//! anti-rollback, offers signed and verified by the device's own code, patches that rebuild the
//! image exactly, and the full image when a patch would not be smaller.

use sha2::{Digest, Sha256};
use tinyfleet_device::ota::manifest::{MAX_OFFER, TrustedKey, verify_offer};
use tinyfleet_device::ota::patch::apply_in_memory;
use tinyfleet_ota_service::{Ota, OtaConfig, OtaError, Upload};
use tinyfleet_store::Store;

fn upload(version: &str, seq: u32) -> Upload {
    Upload {
        model_id: "kws".into(),
        model_version: version.into(),
        seq,
        hw: "nrf52840".into(),
        min_fw: 7,
        arena: 40_000,
        by: "ops".into(),
    }
}

fn model(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn offers_verify_on_the_device_and_patches_rebuild_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let config = OtaConfig {
        public_url: "https://fleet.example.com".into(),
        ..OtaConfig::default()
    };
    let ota = Ota::open(store.clone(), dir.path(), config.clone()).unwrap();
    let v1 = model(50_000, 3);
    // v2: every byte moves by -1, 0 or +1 (a warm retrain).
    let v2: Vec<u8> = v1
        .iter()
        .enumerate()
        .map(|(i, b)| b.wrapping_add([0, 1, 255][i % 3]))
        .collect();
    let r1 = ota.register(&upload("1.0", 1), &v1, 1).unwrap();
    let r2 = ota.register(&upload("1.1", 2), &v2, 2).unwrap();
    assert_eq!(r2.sha256, hex::encode(Sha256::digest(&v2)));

    // Anti-rollback and duplicates are refused.
    assert!(matches!(
        ota.register(&upload("0.9", 2), &v1, 3),
        Err(OtaError::Conflict(_))
    ));
    assert!(matches!(
        ota.register(&upload("1.1", 3), &v1, 3),
        Err(OtaError::Conflict(_))
    ));
    assert!(matches!(
        ota.register(&upload("x/y", 9), &v1, 3),
        Err(OtaError::Invalid(_))
    ));
    assert!(matches!(
        ota.register(&upload("2.0", 9), &[], 3),
        Err(OtaError::Invalid(_))
    ));

    // The device on v1 gets a signed delta offer.
    let offer = ota.offer(&r2, Some(&r1.sha256), 5).unwrap();
    let kid = ota.signer().kid();
    let trusted = [TrustedKey {
        kid: &kid,
        public: ota.signer().public_key(),
    }];
    let mut scratch = [0u8; MAX_OFFER + 64];
    let m = verify_offer(&offer, &trusted, &mut scratch).unwrap();
    assert_eq!(
        (m.model_id, m.model_version, m.seq, m.hw),
        ("kws", "1.1", 2, "nrf52840")
    );
    assert_eq!((m.min_fw, m.arena), (7, 40_000));
    let delta = m.delta.expect("a delta from v1");
    assert_eq!(hex::encode(delta.base_sha256.0), r1.sha256);
    assert_eq!(delta.base_size as usize, v1.len());
    let object = hex::encode(m.object.0);
    assert_eq!(
        m.url,
        format!("https://fleet.example.com/ota/v1/objects/{object}")
    );
    let patch = ota.artifacts().get(&object).unwrap().unwrap();
    assert_eq!(patch.len() as u32, delta.patch_size);
    assert!(patch.len() < v2.len() / 3, "{} bytes", patch.len());
    assert_eq!(
        hex::encode(Sha256::digest(&patch)),
        hex::encode(delta.patch_sha256.0)
    );

    // The device's patcher rebuilds exactly the signed image.
    let rebuilt = apply_in_memory(&v1, &patch, m.block_size as usize).unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&rebuilt)),
        hex::encode(m.image_sha256.0)
    );

    // A second offer reuses the cached patch; an unknown base or a fresh device gets the image.
    let again = ota.offer(&r2, Some(&r1.sha256), 6).unwrap();
    let m2 = verify_offer(&again, &trusted, &mut scratch).unwrap();
    assert_eq!(m2.object, m.object);
    let full = ota.offer(&r2, Some(&"ab".repeat(32)), 6).unwrap();
    let m3 = verify_offer(&full, &trusted, &mut scratch).unwrap();
    assert!(m3.delta.is_none());
    assert_eq!(m3.object, m3.image_sha256);

    // Unrelated images: the patch is not smaller, so the image itself is offered.
    let other = model(50_000, 99);
    let r3 = ota.register(&upload("2.0", 3), &other, 7).unwrap();
    let m4_bytes = ota.offer(&r3, Some(&r2.sha256), 8).unwrap();
    let m4 = verify_offer(&m4_bytes, &trusted, &mut scratch).unwrap();
    assert!(m4.delta.is_none());

    // A flipped bit in any byte of an offer is refused by the device.
    for i in 0..offer.len() {
        let mut bad = offer.clone();
        bad[i] ^= 1 << (i % 8);
        assert!(
            verify_offer(&bad, &trusted, &mut scratch).is_err(),
            "byte {i}"
        );
    }

    // Restart: the same key and the registered versions survive.
    let public = ota.signer().public_key();
    drop(ota);
    let ota = Ota::open(Store::open(dir.path()).unwrap(), dir.path(), config).unwrap();
    assert_eq!(ota.signer().public_key(), public);
    assert_eq!(ota.versions("kws").unwrap().len(), 3);
}
