//! Tests of MQTT framing: known headers, the length encoding, and properties over any bytes.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

#[test]
fn headers() {
    assert_eq!(parse_header(&[], 10), Ok(None));
    assert_eq!(parse_header(&[0x30], 10), Ok(None));
    let h = parse_header(&[0x30, 0x02, 0, 0], 10).unwrap().unwrap();
    assert_eq!((h.kind(), h.header_len, h.remaining), (3, 2, 2));
    assert_eq!(h.frame_len(), 4);
    // 321 = 0xC1 0x02
    let h = parse_header(&[0x30, 0xc1, 0x02], 1000).unwrap().unwrap();
    assert_eq!((h.header_len, h.remaining), (3, 321));
    assert_eq!(parse_header(&[0x30, 0xc1], 1000), Ok(None));
    let max = [0x30, 0xff, 0xff, 0xff, 0x7f];
    let h = parse_header(&max, usize::MAX).unwrap().unwrap();
    assert_eq!(h.remaining, MAX_REMAINING_LENGTH);
    assert_eq!(
        parse_header(&max, 1 << 20),
        Err(FrameError::TooLarge {
            size: MAX_REMAINING_LENGTH,
            max: 1 << 20
        })
    );
    assert_eq!(
        parse_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
        Err(FrameError::BadLength)
    );
    assert_eq!(
        parse_header(&[0x00, 0x00], 10),
        Err(FrameError::ReservedType)
    );
}

#[test]
fn remaining_length_round_trips() {
    for len in [
        0,
        1,
        127,
        128,
        16_383,
        16_384,
        2_097_151,
        2_097_152,
        MAX_REMAINING_LENGTH,
    ] {
        let mut out = vec![0x30];
        put_remaining_length(&mut out, len);
        let h = parse_header(&out, usize::MAX).unwrap().unwrap();
        assert_eq!((h.remaining, h.header_len), (len, out.len()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes and any limit: an answer, never a panic, and a header that is consistent
    /// with the bytes it was read from.
    #[test]
    fn any_bytes_give_an_answer(
        buf in proptest::collection::vec(any::<u8>(), 0..8),
        max in prop_oneof![Just(usize::MAX), Just(MAX_REMAINING_LENGTH), 0usize..300],
    ) {
        match parse_header(&buf, max) {
            Ok(Some(h)) => {
                prop_assert!((2..=5).contains(&h.header_len));
                prop_assert!(h.header_len <= buf.len());
                prop_assert!(h.remaining <= max && h.remaining <= MAX_REMAINING_LENGTH);
                prop_assert_eq!(h.byte1, buf[0]);
                prop_assert_ne!(h.kind(), 0);
                prop_assert_eq!(h.frame_len(), h.header_len + h.remaining);
                // More bytes after the header do not change it.
                let mut longer = buf.clone();
                longer.extend_from_slice(&[0xff; 4]);
                prop_assert_eq!(parse_header(&longer, max), Ok(Some(h)));
            }
            // Too few bytes to tell: a prefix of something longer, never of more than 5 bytes.
            Ok(None) => prop_assert!(buf.len() < 5),
            Err(_) => {}
        }
    }

    /// Every length MQTT can encode reads back as written, in the fewest bytes.
    #[test]
    fn lengths_round_trip(len in prop_oneof![0usize..=16_384, 0usize..=MAX_REMAINING_LENGTH], byte1 in 0x10u8..) {
        let mut out = vec![byte1];
        put_remaining_length(&mut out, len);
        let h = parse_header(&out, usize::MAX).unwrap().unwrap();
        prop_assert_eq!((h.remaining, h.header_len), (len, out.len()));
        let fewest = match len {
            0..=127 => 2,
            128..=16_383 => 3,
            16_384..=2_097_151 => 4,
            _ => 5,
        };
        prop_assert_eq!(out.len(), fewest);
    }
}
