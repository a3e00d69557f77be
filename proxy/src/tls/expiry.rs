//! When a certificate stops being valid: the `notAfter` of its X.509 validity, read from its
//! DER encoding. Only this one field is read, so a small reader of DER's tag-length-value
//! elements does it, rather than an X.509 library and its dependencies. Anything it does not
//! recognise is `None`, never a panic: it reads what owners upload.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
/// `[0] EXPLICIT Version`, present in v2 and v3 certificates.
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The `notAfter` of a DER certificate, in seconds since the Unix epoch.
pub fn not_after(der: &[u8]) -> Option<u64> {
    let cert = expect(SEQUENCE, der)?.0;
    let tbs = expect(SEQUENCE, cert)?.0;
    let (tag, _, after_version) = element(tbs)?;
    let mut rest = if tag == VERSION { after_version } else { tbs };
    // serialNumber, signature, issuer.
    for tag in [INTEGER, SEQUENCE, SEQUENCE] {
        rest = expect(tag, rest)?.1;
    }
    let validity = expect(SEQUENCE, rest)?.0;
    let (_, _, after_not_before) = element(validity)?;
    match element(after_not_before)? {
        (UTC_TIME, time, _) => utc_time(time),
        (GENERALIZED_TIME, time, _) => generalized_time(time),
        _ => None,
    }
}

/// The `notAfter` of the first certificate of a PEM chain (the leaf), in seconds since the
/// Unix epoch.
pub fn pem_not_after(pem: &[u8]) -> Option<u64> {
    let leaf = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    not_after(&leaf)
}

/// The element at the start of `input`: its tag, its contents, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits say how many length bytes follow.
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        (
            bytes.iter().fold(0, |len, b| (len << 8) | usize::from(*b)),
            rest,
        )
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

/// The element at the start of `input` when its tag is `tag`: its contents and what follows.
fn expect(tag: u8, input: &[u8]) -> Option<(&[u8], &[u8])> {
    let (t, contents, rest) = element(input)?;
    (t == tag).then_some((contents, rest))
}

/// `YYMMDDHHMMSSZ`; RFC 5280 reads `YY` below 50 as 20YY.
fn utc_time(t: &[u8]) -> Option<u64> {
    if t.len() != 13 || t[12] != b'Z' {
        return None;
    }
    let yy = number(&t[..2])?;
    epoch(if yy < 50 { 2000 + yy } else { 1900 + yy }, &t[2..12])
}

/// `YYYYMMDDHHMMSSZ`.
fn generalized_time(t: &[u8]) -> Option<u64> {
    if t.len() != 15 || t[14] != b'Z' {
        return None;
    }
    epoch(number(&t[..4])?, &t[4..14])
}

/// Seconds since the epoch of `year` and `rest`, `MMDDHHMMSS`.
fn epoch(year: u64, rest: &[u8]) -> Option<u64> {
    let field = |i: usize, range: std::ops::RangeInclusive<u64>| {
        number(rest.get(i..i + 2)?).filter(|n| range.contains(n))
    };
    let (month, day) = (field(0, 1..=12)?, field(2, 1..=31)?);
    let (hour, minute, second) = (field(4, 0..=23)?, field(6, 0..=59)?, field(8, 0..=60)?);
    let days = u64::try_from(days_from_civil(year, month, day)).ok()?;
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Days from 1970-01-01 to `year-month-day` in the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: u64, month: u64, day: u64) -> i64 {
    let (year, month, day) = (year as i64, month as i64, day as i64);
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A self-signed certificate valid until midnight UTC starting `year-month-day`.
    fn until(year: i32, month: u8, day: u8) -> rcgen::Certificate {
        let mut params = rcgen::CertificateParams::new(vec!["a.example.org".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap()
    }

    #[test]
    fn reads_both_encodings_of_the_time() {
        // Before 2050 the time is a UTCTime, from 2050 a GeneralizedTime (RFC 5280).
        assert_eq!(not_after(until(2031, 5, 17).der()), Some(1_936_742_400));
        assert_eq!(not_after(until(2051, 1, 2).der()), Some(2_556_230_400));
        assert_eq!(utc_time(b"991231235959Z"), Some(946_684_799));
        assert_eq!(generalized_time(b"20510102030405Z"), Some(2_556_241_445));
        assert_eq!(generalized_time(b"19700101000000Z"), Some(0));
    }

    #[test]
    fn reads_the_leaf_of_a_pem_chain() {
        let leaf = until(2031, 5, 17).pem();
        let chain = leaf.clone() + &until(2040, 1, 1).pem();
        assert_eq!(pem_not_after(chain.as_bytes()), Some(1_936_742_400));
        assert_eq!(pem_not_after(b"not a certificate"), None);
    }

    #[test]
    fn refuses_what_is_not_a_time() {
        for bad in [
            &b"991231235959"[..],
            b"991331235959Z",
            b"99123123595Z",
            b"9912312359590Z",
            b"99123a235959Z",
        ] {
            assert_eq!(utc_time(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(generalized_time(b"2031051700000+0100"), None);
    }

    proptest! {
        #[test]
        fn any_bytes_and_any_cut_certificate_are_none_or_a_time(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            cut in 0usize..2000,
        ) {
            let _ = not_after(&bytes);
            let cert = until(2031, 5, 17);
            let der = cert.der();
            if cut < der.len() {
                prop_assert_eq!(not_after(&der[..cut]), None);
            }
        }
    }
}
