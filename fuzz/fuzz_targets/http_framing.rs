//! The ingest server's request framing: `parse_head` over a `ReadBuf` fed the way the
//! connection loop feeds it (parse after every read), the stream cut into pieces at
//! points the fuzzer picks.
//!
//! Input: `k` (one byte, `k % 16` cuts), `k` little-endian `u16` piece lengths, then the
//! byte stream. Asserts: a framed head stays within the limits (`head_len <=
//! header_bytes_max`, `body_len <= body_bytes_max`) and within the buffered bytes; the
//! buffer never holds more than `header_bytes_max + body_bytes_max` (or its initial
//! size); and the requests framed, and whether the stream ends rejected, do not depend on
//! where the stream was cut (same as feeding it in one piece).
#![no_main]

use clickgate_dataplane::http::{
    ndjson_count, ndjson_lines, parse_head, Frame, Limits, Method, ReadBuf, Route,
    READ_BUF_BYTES_INITIAL,
};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    header_bytes_max: 512,
    body_bytes_max: 2048,
};

#[derive(Debug, PartialEq, Eq)]
struct Framed {
    method: Method,
    route: Route,
    keep_alive: bool,
    expect_continue: bool,
    request: Vec<u8>,
    head_len: usize,
}

/// Frames `stream` read in pieces of the given lengths (the rest in one last read):
/// the requests, and whether the connection ended on a reject.
fn frame(stream: &[u8], pieces: &[usize]) -> (Vec<Framed>, bool) {
    let cap_max = LIMITS.header_bytes_max + LIMITS.body_bytes_max;
    let mut rb = ReadBuf::new(cap_max);
    let mut out = Vec::new();
    let mut fed = 0;
    let mut want;
    let mut reads = pieces
        .iter()
        .copied()
        .chain(std::iter::once(usize::MAX))
        .peekable();
    loop {
        // Frame everything complete in the buffer, as the connection does after a read.
        loop {
            match parse_head(rb.data(), &LIMITS) {
                Frame::Head(h) => {
                    assert!(h.head_len <= LIMITS.header_bytes_max, "{h:?}");
                    assert!(h.body_len <= LIMITS.body_bytes_max, "{h:?}");
                    assert!(h.total_len() <= cap_max);
                    assert!(h.head_len > 0 && h.head_len <= rb.len(), "{h:?}");
                    if rb.len() < h.total_len() {
                        want = h.total_len();
                        break;
                    }
                    out.push(Framed {
                        method: h.method,
                        route: h.route,
                        keep_alive: h.keep_alive,
                        expect_continue: h.expect_continue,
                        request: rb.data()[..h.total_len()].to_vec(),
                        head_len: h.head_len,
                    });
                    rb.consume(h.total_len());
                }
                Frame::Partial => {
                    assert!(rb.len() <= LIMITS.header_bytes_max);
                    want = 0;
                    break;
                }
                Frame::Reject(_) => return (out, true),
            }
        }
        if fed == stream.len() {
            return (out, false);
        }
        // One read: at most the next piece, at most the room the buffer offers.
        let piece = reads.peek_mut().expect("the last piece never ends");
        let spare = rb.spare(want);
        assert!(!spare.is_empty());
        let n = spare.len().min(*piece).min(stream.len() - fed).max(1);
        spare[..n].copy_from_slice(&stream[fed..fed + n]);
        rb.filled(n);
        fed += n;
        assert!(rb.len() <= cap_max.max(READ_BUF_BYTES_INITIAL));
        *piece -= n.min(*piece);
        if *piece == 0 {
            reads.next();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = (k % 16) as usize;
    if rest.len() < 2 * k {
        return;
    }
    let (cuts, stream) = rest.split_at(2 * k);
    let pieces: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize)
        .collect();
    let whole = frame(stream, &[]);
    let cut = frame(stream, &pieces);
    assert_eq!(whole, cut, "framing depends on where the stream was cut");
    // Consecutive requests: their bytes are the stream's prefix, in order.
    let framed: Vec<u8> = whole.0.iter().flat_map(|f| f.request.clone()).collect();
    assert!(stream.starts_with(&framed));
    for f in &whole.0 {
        // The NDJSON line counter agrees with the line iterator on every body.
        let body = &f.request[f.head_len..];
        let lines = ndjson_lines(body).count();
        assert_eq!(ndjson_count(body, usize::MAX), lines);
        assert_eq!(ndjson_count(body, 2), lines.min(3));
    }
});
