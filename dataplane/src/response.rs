//! Responses written by hand into reused buffers: status line, the few headers we send,
//! and the small JSON bodies of docs/api.md. No serde and no allocation on this path.

use clickgate_core::EventError;

/// The statuses the dataplane answers (metrics index them by position).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    Accepted,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    LengthRequired,
    PayloadTooLarge,
    TooManyRequests,
    HeadersTooLarge,
    Unavailable,
}

impl Status {
    pub const ALL: [Status; 10] = [
        Status::Ok,
        Status::Accepted,
        Status::BadRequest,
        Status::NotFound,
        Status::MethodNotAllowed,
        Status::LengthRequired,
        Status::PayloadTooLarge,
        Status::TooManyRequests,
        Status::HeadersTooLarge,
        Status::Unavailable,
    ];

    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::Accepted => 202,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::LengthRequired => 411,
            Status::PayloadTooLarge => 413,
            Status::TooManyRequests => 429,
            Status::HeadersTooLarge => 431,
            Status::Unavailable => 503,
        }
    }

    fn status_line(self) -> &'static [u8] {
        match self {
            Status::Ok => b"HTTP/1.1 200 OK\r\n",
            Status::Accepted => b"HTTP/1.1 202 Accepted\r\n",
            Status::BadRequest => b"HTTP/1.1 400 Bad Request\r\n",
            Status::NotFound => b"HTTP/1.1 404 Not Found\r\n",
            Status::MethodNotAllowed => b"HTTP/1.1 405 Method Not Allowed\r\n",
            Status::LengthRequired => b"HTTP/1.1 411 Length Required\r\n",
            Status::PayloadTooLarge => b"HTTP/1.1 413 Payload Too Large\r\n",
            Status::TooManyRequests => b"HTTP/1.1 429 Too Many Requests\r\n",
            Status::HeadersTooLarge => b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            Status::Unavailable => b"HTTP/1.1 503 Service Unavailable\r\n",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    Json,
    /// Prometheus text exposition format.
    PromText,
}

/// Optional headers of a response.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extra {
    pub retry_after_secs: Option<u32>,
    pub allow: Option<&'static str>,
    pub close: bool,
}

/// Appends a whole response (head and `body`) to `out`.
pub fn write_response(
    out: &mut Vec<u8>,
    status: Status,
    ct: ContentType,
    extra: Extra,
    body: &[u8],
) {
    let mut num = itoa::Buffer::new();
    out.extend_from_slice(status.status_line());
    out.extend_from_slice(match ct {
        ContentType::Json => b"Content-Type: application/json\r\n",
        ContentType::PromText => b"Content-Type: text/plain; version=0.0.4\r\n",
    });
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(num.format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(secs) = extra.retry_after_secs {
        out.extend_from_slice(b"Retry-After: ");
        out.extend_from_slice(num.format(secs).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(allow) = extra.allow {
        out.extend_from_slice(b"Allow: ");
        out.extend_from_slice(allow.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if extra.close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Appends `s` as the inside of a JSON string (RFC 8259 escapes).
pub fn json_escape_into(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        plain = i + 1;
        if esc.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(esc);
        }
    }
    out.extend_from_slice(&bytes[plain..]);
}

/// `{"error":"<msg>"}`
pub fn body_error(body: &mut Vec<u8>, msg: &str) {
    body.extend_from_slice(b"{\"error\":\"");
    json_escape_into(body, msg);
    body.extend_from_slice(b"\"}");
}

/// `{"error":"<reason>","field":"<field>"|null}`: an invalid single event, or a batch
/// with nothing valid (then the first error).
pub fn body_invalid(body: &mut Vec<u8>, e: &EventError) {
    body.extend_from_slice(b"{\"error\":\"");
    json_escape_into(body, &e.reason);
    body.extend_from_slice(b"\",\"field\":");
    match e.field {
        Some(f) => {
            body.push(b'"');
            json_escape_into(body, f);
            body.push(b'"');
        }
        None => body.extend_from_slice(b"null"),
    }
    body.push(b'}');
}

/// `{"accepted":N,"duplicates":D,"rejected":[{"line":i,"error":"field: reason"}]}`
pub fn body_accepted(
    body: &mut Vec<u8>,
    accepted: u64,
    duplicates: u64,
    rejected: &[(u32, EventError)],
) {
    let mut num = itoa::Buffer::new();
    body.extend_from_slice(b"{\"accepted\":");
    body.extend_from_slice(num.format(accepted).as_bytes());
    body.extend_from_slice(b",\"duplicates\":");
    body.extend_from_slice(num.format(duplicates).as_bytes());
    body.extend_from_slice(b",\"rejected\":[");
    for (k, (line, e)) in rejected.iter().enumerate() {
        if k > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"line\":");
        body.extend_from_slice(num.format(*line).as_bytes());
        body.extend_from_slice(b",\"error\":\"");
        if let Some(f) = e.field {
            json_escape_into(body, f);
            body.extend_from_slice(b": ");
        }
        json_escape_into(body, &e.reason);
        body.extend_from_slice(b"\"}");
    }
    body.extend_from_slice(b"]}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[u8]) -> &str {
        std::str::from_utf8(v).unwrap()
    }

    #[test]
    fn escapes_json_strings() {
        let check = |input: &str, expected: &str| {
            let mut out = Vec::new();
            json_escape_into(&mut out, input);
            assert_eq!(s(&out), expected);
            // Round-trips through a real JSON parser.
            let quoted = format!("\"{}\"", s(&out));
            let back: String = serde_json::from_str(&quoted).unwrap();
            assert_eq!(back, input);
        };
        check("plain", "plain");
        check("a\"b\\c", "a\\\"b\\\\c");
        check("l1\nl2\r\t", "l1\\nl2\\r\\t");
        check("\u{0}\u{1f}\u{7f}", "\\u0000\\u001f\\u007f");
        check("ünïcødé ✓", "ünïcødé ✓");
    }

    #[test]
    fn bodies_match_the_contract() {
        let mut b = Vec::new();
        body_accepted(&mut b, 3, 1, &[]);
        assert_eq!(s(&b), r#"{"accepted":3,"duplicates":1,"rejected":[]}"#);
        b.clear();
        let rejected = [
            (0, EventError::field("ts", "too far in the future")),
            (4, EventError::syntax("expected \"{\"")),
        ];
        body_accepted(&mut b, 1, 0, &rejected);
        assert_eq!(
            s(&b),
            r#"{"accepted":1,"duplicates":0,"rejected":[{"line":0,"error":"ts: too far in the future"},{"line":4,"error":"expected \"{\""}]}"#
        );
        serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        b.clear();
        body_invalid(
            &mut b,
            &EventError::field("country", "must be two uppercase letters"),
        );
        assert_eq!(
            s(&b),
            r#"{"error":"must be two uppercase letters","field":"country"}"#
        );
        b.clear();
        body_invalid(&mut b, &EventError::syntax("bad json"));
        assert_eq!(s(&b), r#"{"error":"bad json","field":null}"#);
        b.clear();
        body_error(&mut b, "rate limited");
        assert_eq!(s(&b), r#"{"error":"rate limited"}"#);
    }

    #[test]
    fn writes_heads() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            Status::TooManyRequests,
            ContentType::Json,
            Extra {
                retry_after_secs: Some(2),
                allow: None,
                close: false,
            },
            b"{}",
        );
        assert_eq!(
            s(&out),
            "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: 2\r\nRetry-After: 2\r\n\r\n{}"
        );
        out.clear();
        write_response(
            &mut out,
            Status::MethodNotAllowed,
            ContentType::Json,
            Extra {
                retry_after_secs: None,
                allow: Some("POST"),
                close: true,
            },
            b"",
        );
        assert_eq!(
            s(&out),
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\nContent-Length: 0\r\nAllow: POST\r\nConnection: close\r\n\r\n"
        );
    }
}
