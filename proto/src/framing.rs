//! Length + CRC record framing, the one encoder and decoder of every record file:
//!
//! ```text
//! u32 len | u32 crc | body (len bytes)        integers little-endian
//! ```
//!
//! Two flavours differ only in what the CRC covers ([`Crc`]):
//!
//! - [`Crc::Body`]: `crc32c(body)`: the store WAL and snapshot (`controlplane::durable`)
//!   and the Redis outbox (`controlplane::redis::outbox`).
//! - [`Crc::LenAndBody`]: `crc32c(len as 4 LE bytes ++ body)`: the local log's frames
//!   ([`crate::segment`], which adds its own rules: a zero `len` ends the data, a payload
//!   has a maximum size).
//!
//! Decoding never panics: a record cut short or with a bad CRC is a torn tail ([`Torn`]),
//! and [`split`] returns the valid prefix.

/// `u32 len | u32 crc`.
pub const HEADER_BYTES: usize = 8;

/// What the CRC of a record covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crc {
    /// `crc32c(body)`.
    Body,
    /// `crc32c(len as 4 LE bytes ++ body)`.
    LenAndBody,
}

impl Crc {
    /// The CRC of a record holding `body`.
    #[inline]
    pub fn of(self, body: &[u8]) -> u32 {
        match self {
            Crc::Body => crc32c::crc32c(body),
            Crc::LenAndBody => {
                let len = (body.len() as u32).to_le_bytes();
                crc32c::crc32c_append(crc32c::crc32c(&len), body)
            }
        }
    }
}

/// Why the bytes at a record position are not a whole record: the end of the valid data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Torn {
    #[error("torn record: {0} bytes, shorter than a record header")]
    ShortHeader(usize),
    /// The header says `len` body bytes; fewer are available.
    #[error("torn record: the header says {len} bytes, fewer follow")]
    ShortBody { len: usize },
    #[error("torn record: crc mismatch")]
    BadCrc,
}

/// Writes the [`HEADER_BYTES`]-byte header of a record holding `body` into `header`.
#[inline]
pub fn put_header(crc: Crc, header: &mut [u8], body: &[u8]) {
    header[0..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    header[4..8].copy_from_slice(&crc.of(body).to_le_bytes());
}

/// Appends one record holding `body` to `out`.
pub fn encode(crc: Crc, body: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + HEADER_BYTES, 0);
    put_header(crc, &mut out[at..], body);
    out.extend_from_slice(body);
}

/// The `len` field of the record header at the start of `buf`, if a header is there.
#[inline]
pub fn body_len(buf: &[u8]) -> Option<usize> {
    let len = buf.get(0..4)?;
    Some(u32::from_le_bytes(len.try_into().expect("4")) as usize)
}

/// Decodes the record at the start of `buf`: its body and the bytes it takes
/// (`HEADER_BYTES + body.len()`).
#[inline]
pub fn decode(crc: Crc, buf: &[u8]) -> Result<(&[u8], usize), Torn> {
    if buf.len() < HEADER_BYTES {
        return Err(Torn::ShortHeader(buf.len()));
    }
    let len = body_len(buf).expect("header present");
    let stored = u32::from_le_bytes(buf[4..8].try_into().expect("4"));
    let Some(body) = HEADER_BYTES
        .checked_add(len)
        .and_then(|end| buf.get(HEADER_BYTES..end))
    else {
        return Err(Torn::ShortBody { len });
    };
    if crc.of(body) != stored {
        return Err(Torn::BadCrc);
    }
    Ok((body, HEADER_BYTES + len))
}

/// Splits `buf` into records up to the first torn one (or its end); returns their bodies
/// and the length of the valid prefix.
pub fn split(crc: Crc, buf: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok((body, used)) = decode(crc, &buf[at..]) {
        out.push(body);
        at += used;
    }
    (out, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_len_crc_body() {
        let mut out = Vec::new();
        encode(Crc::Body, b"abc", &mut out);
        assert_eq!(&out[0..4], &3u32.to_le_bytes());
        assert_eq!(&out[4..8], &crc32c::crc32c(b"abc").to_le_bytes());
        assert_eq!(&out[8..], b"abc");
        let mut log = Vec::new();
        encode(Crc::LenAndBody, b"abc", &mut log);
        let mut covered = 3u32.to_le_bytes().to_vec();
        covered.extend_from_slice(b"abc");
        assert_eq!(&log[4..8], &crc32c::crc32c(&covered).to_le_bytes());
    }

    #[test]
    fn torn_tails_are_told_apart() {
        let mut out = Vec::new();
        encode(Crc::Body, b"hello", &mut out);
        assert_eq!(decode(Crc::Body, &out[..5]), Err(Torn::ShortHeader(5)));
        assert_eq!(
            decode(Crc::Body, &out[..10]),
            Err(Torn::ShortBody { len: 5 })
        );
        assert_eq!(decode(Crc::LenAndBody, &out), Err(Torn::BadCrc));
        let mut huge = out.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(Crc::Body, &huge),
            Err(Torn::ShortBody {
                len: u32::MAX as usize
            })
        );
    }

    proptest! {
        #[test]
        fn any_truncation_splits_into_a_prefix(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut buf = Vec::new();
            let mut ends = vec![0];
            for b in &bodies {
                encode(Crc::Body, b, &mut buf);
                ends.push(buf.len());
            }
            let cut = cut.index(buf.len() + 1);
            let (got, valid) = split(Crc::Body, &buf[..cut]);
            let whole = ends.iter().filter(|&&e| e <= cut).count() - 1;
            prop_assert_eq!(got.len(), whole);
            prop_assert_eq!(valid, ends[whole]);
            for (g, b) in got.iter().zip(&bodies) {
                prop_assert_eq!(*g, b.as_slice());
            }
        }
    }
}
