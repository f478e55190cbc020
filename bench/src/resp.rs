//! HTTP/1.1 response framing for the load generator: the head by `httparse`, then
//! Content-Length, body skip.
//! Plus a cheap scan of the 202 body counters.

use std::ops::Range;

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// Bytes of the whole response (head + body).
    pub len: usize,
    pub status: u16,
    pub body: Range<usize>,
    /// The server said `Connection: close`.
    pub close: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    BadStatusLine,
    BadHeader,
    NoLength,
    Chunked,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParseError::BadStatusLine => "bad status line",
            ParseError::BadHeader => "bad header",
            ParseError::NoLength => "response without Content-Length",
            ParseError::Chunked => "chunked responses are not supported",
        })
    }
}

/// Largest head we accept before calling the response malformed.
const MAX_HEAD: usize = 64 * 1024;
/// Headers a response may carry.
const MAX_HEADERS: usize = 32;

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t' | b'\r'] = s {
        s = rest;
    }
    s
}

/// Parses one response at the start of `buf` (head by `httparse`). `Ok(None)`: need more
/// bytes.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut headers);
    let pos = match head.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(if head.code.is_some() {
                ParseError::BadHeader
            } else {
                ParseError::BadStatusLine
            })
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::Version | httparse::Error::Status) => {
            return Err(ParseError::BadStatusLine)
        }
        Err(_) => return Err(ParseError::BadHeader),
    };
    let status = head.code.ok_or(ParseError::BadStatusLine)?;
    let mut content_length: Option<usize> = None;
    let mut close = head.version == Some(0); // HTTP/1.0 closes by default
    for h in head.headers.iter() {
        let value = trim(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) || value.len() > 18 {
                return Err(ParseError::BadHeader);
            }
            content_length = Some(
                value
                    .iter()
                    .fold(0usize, |acc, d| acc * 10 + (d - b'0') as usize),
            );
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if value.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ParseError::Chunked);
        }
    }
    let body_len = match content_length {
        Some(n) => n,
        None if status < 200 || status == 204 || status == 304 => 0,
        None => return Err(ParseError::NoLength),
    };
    if buf.len() < pos + body_len {
        return Ok(None);
    }
    Ok(Some(Response {
        len: pos + body_len,
        status,
        body: pos..pos + body_len,
        close,
    }))
}

/// The counters of a 202 body: `{"accepted":N,"duplicates":D,"rejected":[...]}`.
/// `rejected` counts the list's entries (or takes a plain number).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

fn number_after(body: &[u8], key: &[u8]) -> Option<(u64, usize)> {
    let at = memchr::memmem::find(body, key)? + key.len();
    let rest = trim(&body[at..]);
    let skipped = body.len() - at - rest.len();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let v = rest[..digits].iter().fold(0u64, |acc, d| {
        acc.wrapping_mul(10).wrapping_add((d - b'0') as u64)
    });
    Some((v, at + skipped + digits))
}

pub fn parse_counts(body: &[u8]) -> Counts {
    let mut c = Counts::default();
    if let Some((v, _)) = number_after(body, b"\"accepted\":") {
        c.accepted = v;
    }
    if let Some((v, _)) = number_after(body, b"\"duplicates\":") {
        c.duplicates = v;
    }
    if let Some(at) = memchr::memmem::find(body, b"\"rejected\":") {
        let rest = trim(&body[at + 11..]);
        if rest.first() == Some(&b'[') {
            // Count the entries by their "line" keys (an escaped quote inside an
            // error string can't form `"line"`, and brackets inside strings don't matter).
            c.rejected = memchr::memmem::find_iter(rest, b"\"line\"").count() as u64;
            if c.rejected == 0 && rest.get(1) != Some(&b']') {
                c.rejected = memchr::memchr_iter(b'{', rest).count() as u64;
            }
        } else if let Some((v, _)) = number_after(body, b"\"rejected\":") {
            c.rejected = v;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    const R1: &[u8] = b"HTTP/1.1 202 Accepted\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: 44\r\nConnection: keep-alive\r\n\r\n{\"accepted\":1,\"duplicates\":0,\"rejected\":[]}\n";
    const R2: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length:24\r\nretry-after: 1\r\n\r\n{\"error\":\"rate limited\"}";
    const R3: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

    #[test]
    fn parses_whole_responses() {
        let r = parse_response(R1).unwrap().unwrap();
        assert_eq!((r.len, r.status, r.close), (R1.len(), 202, false));
        assert_eq!(
            parse_counts(&R1[r.body]),
            Counts {
                accepted: 1,
                duplicates: 0,
                rejected: 0
            }
        );
        let r = parse_response(R2).unwrap().unwrap();
        assert_eq!((r.len, r.status), (R2.len(), 429));
        assert_eq!(&R2[r.body], b"{\"error\":\"rate limited\"}");
        let r = parse_response(R3).unwrap().unwrap();
        assert_eq!((r.len, r.status, r.close), (R3.len(), 400, true));
    }

    #[test]
    fn split_at_every_byte() {
        for resp in [R1, R2, R3] {
            for cut in 0..resp.len() {
                assert_eq!(parse_response(&resp[..cut]), Ok(None), "cut {cut}");
            }
            // Feeding byte by byte into a growing buffer finds it exactly once, at the end.
            let mut buf = Vec::new();
            let mut found = 0;
            for &b in resp {
                buf.push(b);
                if let Some(r) = parse_response(&buf).unwrap() {
                    assert_eq!(r.len, buf.len());
                    found += 1;
                }
            }
            assert_eq!(found, 1);
        }
    }

    #[test]
    fn pipelined_responses() {
        let mut stream = Vec::new();
        let seq = [R1, R2, R1, R3, R1];
        for r in seq {
            stream.extend_from_slice(r);
        }
        // Consume from a buffer that receives the stream in chunks of every size.
        for chunk in 1..=stream.len() {
            let mut buf: Vec<u8> = Vec::new();
            let mut statuses = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(r) = parse_response(&buf).unwrap() {
                    statuses.push(r.status);
                    buf.drain(..r.len);
                }
            }
            assert!(buf.is_empty());
            assert_eq!(statuses, vec![202, 429, 202, 400, 202], "chunk {chunk}");
        }
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            parse_response(b"HTTX/1.1 200"),
            Err(ParseError::BadStatusLine)
        );
        assert_eq!(parse_response(b"XYZ"), Err(ParseError::BadStatusLine));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\n"),
            Err(ParseError::NoLength)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ParseError::Chunked)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x1\r\n\r\n"),
            Err(ParseError::BadHeader)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\n\r\n")
                .unwrap()
                .map(|r| r.len),
            Some(27)
        );
    }

    #[test]
    fn counts_from_bodies() {
        let b = br#"{"accepted":97,"duplicates":2,"rejected":[{"line":3,"error":"bad ts"},{"line":40,"error":"country: expected [A-Z]{2}"},{"line":41,"error":"x"}]}"#;
        assert_eq!(
            parse_counts(b),
            Counts {
                accepted: 97,
                duplicates: 2,
                rejected: 3
            }
        );
        let b = br#"{ "accepted": 5, "duplicates": 0, "rejected": 3 }"#;
        assert_eq!(
            parse_counts(b),
            Counts {
                accepted: 5,
                duplicates: 0,
                rejected: 3
            }
        );
        assert_eq!(parse_counts(b"{\"error\":\"x\"}"), Counts::default());
    }
}
