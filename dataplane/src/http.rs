//! HTTP/1.1 request framing: the request head parsed by `httparse`, the body found by
//! `Content-Length`, and a per-connection read buffer reused for the connection's life.
//!
//! Sans-I/O: the connection loop feeds bytes into a [`ReadBuf`] and calls
//! [`parse_head`] on what it holds, so the framing is tested without sockets.

/// Request headers parsed per request, at most; more is answered 431.
pub const HEADERS_COUNT_MAX: usize = 64;
/// A connection's read buffer starts at this size and shrinks back to it when a large
/// request has been consumed.
pub const READ_BUF_BYTES_INITIAL: usize = 16 << 10;
/// A drained read buffer larger than this is shrunk back to `READ_BUF_BYTES_INITIAL`.
pub const READ_BUF_BYTES_KEEP: usize = 256 << 10;
const _: () = assert!(READ_BUF_BYTES_INITIAL <= READ_BUF_BYTES_KEEP);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Other,
}

/// The routes of docs/api.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Click,
    Clicks,
    Healthz,
    Readyz,
    Metrics,
    NotFound,
}

impl Route {
    pub const ALL: [Route; 6] = [
        Route::Click,
        Route::Clicks,
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::NotFound,
    ];

    pub fn from_path(path: &str) -> Route {
        let path = match path.find('?') {
            Some(q) => &path[..q],
            None => path,
        };
        match path {
            "/v1/click" => Route::Click,
            "/v1/clicks" => Route::Clicks,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/metrics" => Route::Metrics,
            _ => Route::NotFound,
        }
    }

    /// The method a route answers, for the `Allow` header of a 405.
    pub fn allowed(self) -> Option<Method> {
        match self {
            Route::Click | Route::Clicks => Some(Method::Post),
            Route::Healthz | Route::Readyz | Route::Metrics => Some(Method::Get),
            Route::NotFound => None,
        }
    }

    /// Label value in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Route::Click => "/v1/click",
            Route::Clicks => "/v1/clicks",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::NotFound => "other",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A parsed request head. Offsets are relative to the start of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub method: Method,
    pub route: Route,
    /// Bytes of the request line and headers, including the blank line.
    pub head_len: usize,
    pub body_len: usize,
    /// False for `Connection: close`, and for HTTP/1.0 without `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
}

impl Head {
    pub fn total_len(&self) -> usize {
        self.head_len + self.body_len
    }
}

/// A request the connection answers and then closes (the stream can no longer be
/// framed, or the body is too large to read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// 400: malformed request line or headers.
    BadRequest(&'static str),
    /// 431: the head is over `header_bytes_max` or has too many headers.
    HeadersTooLarge,
    /// 411: a POST without `Content-Length`, or a chunked body.
    LengthRequired(&'static str),
    /// 413: `Content-Length` over `body_bytes_max`.
    PayloadTooLarge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The head is not complete yet.
    Partial,
    /// The head is complete; the request is complete once `head.total_len()` bytes are
    /// buffered.
    Head(Head),
    Reject(Reject),
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_bytes_max: usize,
    pub body_bytes_max: usize,
}

/// Parses the request head at the start of `buf`. Never panics on any input.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Frame {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_COUNT_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > limits.header_bytes_max {
                Frame::Reject(Reject::HeadersTooLarge)
            } else {
                Frame::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Frame::Reject(Reject::HeadersTooLarge),
        Err(e) => return Frame::Reject(Reject::BadRequest(parse_error_text(e))),
    };
    if head_len > limits.header_bytes_max {
        return Frame::Reject(Reject::HeadersTooLarge);
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    let route = Route::from_path(req.path.unwrap_or(""));
    let http10 = req.version == Some(0);
    let mut keep_alive = !http10;
    let mut expect_continue = false;
    let mut content_length: Option<usize> = None;
    let mut transfer_encoding = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let Some(n) = parse_content_length(h.value) else {
                return Frame::Reject(Reject::BadRequest("invalid content-length"));
            };
            if content_length.is_some_and(|prev| prev != n) {
                return Frame::Reject(Reject::BadRequest("conflicting content-length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect")
            && h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue")
        {
            expect_continue = true;
        }
    }
    if transfer_encoding {
        // A body we cannot frame: the rest of the stream is unreadable, so this closes.
        return Frame::Reject(Reject::LengthRequired(
            "chunked transfer-encoding is not supported: send Content-Length",
        ));
    }
    let body_len = match content_length {
        Some(n) => n,
        None if method == Method::Post => {
            return Frame::Reject(Reject::LengthRequired("length required"))
        }
        None => 0,
    };
    if body_len > limits.body_bytes_max {
        return Frame::Reject(Reject::PayloadTooLarge);
    }
    Frame::Head(Head {
        method,
        route,
        head_len,
        body_len,
        keep_alive,
        expect_continue: expect_continue && !http10,
    })
}

fn parse_content_length(v: &[u8]) -> Option<usize> {
    let v = v.trim_ascii();
    // 19 digits fit in u64 and bound the work on hostile input.
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = v.iter().fold(0u64, |acc, &d| acc * 10 + (d - b'0') as u64);
    usize::try_from(n).ok()
}

fn parse_error_text(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token in request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// A connection's read buffer: `buf[start..end]` holds received, unconsumed bytes.
/// Grows only up to `cap_max` (header_bytes_max + body_bytes_max) and never allocates
/// once warm unless a larger request than any before arrives.
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    cap_max: usize,
}

impl ReadBuf {
    pub fn new(cap_max: usize) -> ReadBuf {
        ReadBuf {
            buf: vec![0; READ_BUF_BYTES_INITIAL],
            start: 0,
            end: 0,
            cap_max,
        }
    }

    /// Prepares the buffer for a new connection with these limits, back at its initial
    /// size: a pooled buffer holds no more than a fresh one.
    pub fn reset(&mut self, cap_max: usize) {
        self.start = 0;
        self.end = 0;
        self.cap_max = cap_max;
        if self.buf.len() > READ_BUF_BYTES_INITIAL {
            self.buf.truncate(READ_BUF_BYTES_INITIAL);
            self.buf.shrink_to_fit();
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Bytes the buffer holds allocated (what a connection costs its core).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Marks `n` bytes at the front as consumed.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.shrink_if_large();
        }
    }

    /// The size [`ReadBuf::spare`] will give the buffer for a request of `want` bytes:
    /// the buffer grows only when it is full, by doubling, and never past what the
    /// request needs (or `cap_max`) — so a head announcing a large body costs memory as
    /// the body arrives, not when it is announced.
    pub fn next_capacity(&self, want: usize) -> usize {
        let need = want.max(self.len() + 1);
        let len = self.buf.len();
        if need <= len || self.len() < len {
            // Fits, or there is still room once compacted: no growth now.
            return len;
        }
        (len * 2).min(self.cap_max).min(need).max(self.len() + 1)
    }

    /// Room to read into towards a request of `want` bytes (head + body, as far as known;
    /// 0 when unknown), which must end up contiguous from the front. Never empty. Grows
    /// to [`ReadBuf::next_capacity`].
    pub fn spare(&mut self, want: usize) -> &mut [u8] {
        let need = want.max(self.len() + 1);
        if self.start > 0 && (self.start + need > self.buf.len() || self.end == self.buf.len()) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let grown = self.next_capacity(want);
        if grown > self.buf.len() {
            self.buf.resize(grown, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into the slice returned by `spare`.
    pub fn filled(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.end += n;
    }

    fn shrink_if_large(&mut self) {
        if self.buf.len() > READ_BUF_BYTES_KEEP {
            self.buf.truncate(READ_BUF_BYTES_INITIAL);
            self.buf.shrink_to_fit();
        }
    }
}

/// Iterates the lines of an NDJSON body: (0-based line number, line without `\r\n`),
/// skipping lines that are blank (only ASCII whitespace). Line numbers count every
/// physical line, blank ones included, so they point into the body the client sent.
pub fn ndjson_lines(body: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    body.split(|&b| b == b'\n')
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                Some((i as u32, line))
            }
        })
}

/// Counts the non-blank lines of an NDJSON body without parsing them (for the rate
/// limit and the line bound, both checked before any event is parsed). Stops counting
/// past `stop_after`.
pub fn ndjson_count(body: &[u8], stop_after: usize) -> usize {
    let mut count = 0;
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len())) {
        if nl < start {
            continue;
        }
        let line = &body[start..nl];
        start = nl + 1;
        if !line.iter().all(u8::is_ascii_whitespace) {
            count += 1;
            if count > stop_after {
                break;
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        header_bytes_max: 1024,
        body_bytes_max: 4096,
    };

    fn head(buf: &[u8]) -> Head {
        match parse_head(buf, &LIMITS) {
            Frame::Head(h) => h,
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn check_reject(buf: &[u8], expected: Reject) {
        assert_eq!(
            parse_head(buf, &LIMITS),
            Frame::Reject(expected),
            "{}",
            String::from_utf8_lossy(buf)
        );
    }

    #[test]
    fn parses_routes_methods_and_lengths() {
        let h = head(b"POST /v1/click HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(
            (h.method, h.route, h.body_len, h.keep_alive),
            (Method::Post, Route::Click, 12, true)
        );
        assert_eq!(h.head_len, 56);
        let h = head(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n");
        assert_eq!(
            (h.method, h.route, h.body_len),
            (Method::Get, Route::Metrics, 0)
        );
        assert_eq!(head(b"GET /nope HTTP/1.1\r\n\r\n").route, Route::NotFound);
        assert_eq!(
            head(b"DELETE /v1/clicks HTTP/1.1\r\n\r\n").method,
            Method::Other
        );
    }

    #[test]
    fn keep_alive_rules() {
        assert!(!head(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head(b"GET /healthz HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head(b"GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!head(b"GET /healthz HTTP/1.1\r\nConnection: upgrade, close\r\n\r\n").keep_alive);
        assert!(
            head(b"POST /v1/clicks HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n")
                .expect_continue
        );
    }

    #[test]
    fn rejects() {
        check_reject(
            b"POST /v1/click HTTP/1.1\r\n\r\n",
            Reject::LengthRequired("length required"),
        );
        check_reject(
            b"POST /v1/click HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            Reject::LengthRequired(
                "chunked transfer-encoding is not supported: send Content-Length",
            ),
        );
        check_reject(
            b"POST /v1/click HTTP/1.1\r\nContent-Length: 4097\r\n\r\n",
            Reject::PayloadTooLarge,
        );
        check_reject(
            b"POST /v1/click HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            Reject::BadRequest("invalid content-length"),
        );
        check_reject(
            b"POST /v1/click HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            Reject::BadRequest("conflicting content-length headers"),
        );
        check_reject(
            b"GARBAGE\r\n\r\n",
            Reject::BadRequest("invalid token in request line"),
        );
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2000));
        check_reject(&big, Reject::HeadersTooLarge);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for _ in 0..HEADERS_COUNT_MAX + 1 {
            many.extend_from_slice(b"A: b\r\n");
        }
        many.extend_from_slice(b"\r\n");
        check_reject(&many, Reject::HeadersTooLarge);
    }

    /// Drives `ReadBuf` + `parse_head` as the connection loop does, feeding `stream` in
    /// pieces of the given sizes; returns each request's (route, body).
    fn frame_all(stream: &[u8], cuts: &[usize]) -> Vec<(Route, Vec<u8>)> {
        let mut rb = ReadBuf::new(LIMITS.header_bytes_max + LIMITS.body_bytes_max);
        let mut out = Vec::new();
        let mut fed = 0;
        let mut pieces = cuts.iter().copied().chain(std::iter::once(stream.len()));
        let mut want = 0;
        loop {
            loop {
                match parse_head(rb.data(), &LIMITS) {
                    Frame::Head(h) if rb.len() >= h.total_len() => {
                        out.push((h.route, rb.data()[h.head_len..h.total_len()].to_vec()));
                        rb.consume(h.total_len());
                        want = 0;
                    }
                    Frame::Head(h) => {
                        want = h.total_len();
                        break;
                    }
                    Frame::Partial => break,
                    Frame::Reject(r) => panic!("{r:?}"),
                }
            }
            let Some(until) = pieces.next() else { break };
            let until = until.clamp(fed, stream.len());
            // Feed [fed, until), possibly in several reads when the spare room is short.
            while fed < until {
                let spare = rb.spare(want);
                let n = spare.len().min(until - fed);
                spare[..n].copy_from_slice(&stream[fed..fed + n]);
                rb.filled(n);
                fed += n;
            }
        }
        assert!(rb.is_empty());
        out
    }

    fn pipeline() -> (Vec<u8>, Vec<(Route, Vec<u8>)>) {
        let mut s = Vec::new();
        let mut expected = Vec::new();
        let body1 = br#"{"event_id":"a"}"#.to_vec();
        s.extend_from_slice(
            format!(
                "POST /v1/click HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                body1.len()
            )
            .as_bytes(),
        );
        s.extend_from_slice(&body1);
        expected.push((Route::Click, body1));
        s.extend_from_slice(b"GET /healthz HTTP/1.1\r\n\r\n");
        expected.push((Route::Healthz, vec![]));
        let body2 = b"{\"a\":1}\n\n{\"b\":2}\r\n".to_vec();
        s.extend_from_slice(
            format!(
                "POST /v1/clicks HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                body2.len()
            )
            .as_bytes(),
        );
        s.extend_from_slice(&body2);
        expected.push((Route::Clicks, body2));
        (s, expected)
    }

    #[test]
    fn pipelined_requests_split_at_every_byte_boundary() {
        let (s, expected) = pipeline();
        assert_eq!(frame_all(&s, &[]), expected);
        for cut in 0..=s.len() {
            assert_eq!(frame_all(&s, &[cut]), expected, "cut at {cut}");
        }
        // And byte by byte.
        let cuts: Vec<usize> = (0..s.len()).collect();
        assert_eq!(frame_all(&s, &cuts), expected);
    }

    #[test]
    fn read_buf_grows_to_the_request_and_shrinks_back() {
        let limits = Limits {
            header_bytes_max: 1024,
            body_bytes_max: 1 << 20,
        };
        let mut rb = ReadBuf::new(limits.header_bytes_max + limits.body_bytes_max);
        let body = vec![b'x'; 600 << 10];
        let mut s = format!(
            "POST /v1/clicks HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        s.extend_from_slice(&body);
        let mut fed = 0;
        let mut want = 0;
        loop {
            if let Frame::Head(h) = parse_head(rb.data(), &limits) {
                want = h.total_len();
                if rb.len() >= want {
                    break;
                }
            }
            let spare = rb.spare(want);
            let n = spare.len().min(4096).min(s.len() - fed);
            spare[..n].copy_from_slice(&s[fed..fed + n]);
            rb.filled(n);
            fed += n;
        }
        assert!(rb.capacity() <= limits.header_bytes_max + limits.body_bytes_max);
        rb.consume(want);
        assert_eq!(rb.capacity(), READ_BUF_BYTES_INITIAL);
    }

    #[test]
    fn read_buf_grows_as_the_body_arrives_not_as_announced() {
        let limits = Limits {
            header_bytes_max: 1024,
            body_bytes_max: 8 << 20,
        };
        let mut rb = ReadBuf::new(limits.header_bytes_max + limits.body_bytes_max);
        let mut s = b"POST /v1/clicks HTTP/1.1\r\nContent-Length: 8000000\r\n\r\n".to_vec();
        let head_len = s.len();
        s.resize(head_len + 300_000, b'x');
        let mut fed = 0;
        let mut want = 0;
        while fed < s.len() {
            if let Frame::Head(h) = parse_head(rb.data(), &limits) {
                want = h.total_len();
            }
            let before = rb.capacity();
            let next = rb.next_capacity(want);
            let spare = rb.spare(want);
            assert_eq!(rb_cap_after(spare.len(), fed), next.max(before));
            let n = spare.len().min(1000).min(s.len() - fed);
            spare[..n].copy_from_slice(&s[fed..fed + n]);
            rb.filled(n);
            fed += n;
            // Never more than twice what arrived, once past the first buffer.
            assert!(
                rb.capacity() <= READ_BUF_BYTES_INITIAL.max(2 * fed),
                "{} bytes for {fed} received",
                rb.capacity()
            );
        }
        assert_eq!(want, head_len + 8_000_000);
        assert!(rb.capacity() < 1 << 20);
    }

    /// The buffer's size, from the spare room it gave after `filled` bytes.
    fn rb_cap_after(spare: usize, filled: usize) -> usize {
        spare + filled
    }

    #[test]
    fn ndjson_splitting() {
        let body = b"{\"a\":1}\n\n  \r\n{\"b\":2}\r\n{\"c\":3}";
        let lines: Vec<(u32, &[u8])> = ndjson_lines(body).collect();
        assert_eq!(
            lines,
            vec![
                (0, &b"{\"a\":1}"[..]),
                (3, &b"{\"b\":2}"[..]),
                (4, &b"{\"c\":3}"[..])
            ]
        );
        assert_eq!(ndjson_count(body, 100), 3);
        assert_eq!(ndjson_count(body, 1), 2);
        assert_eq!(ndjson_count(b"", 10), 0);
        assert_eq!(ndjson_count(b"\n\n \n", 10), 0);
        assert_eq!(ndjson_count(b"x", 10), 1);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_head(&bytes, &LIMITS);
        }

        #[test]
        fn truncated_requests_never_panic(cut in 0usize..200, junk in proptest::collection::vec(any::<u8>(), 0..40)) {
            let (s, _) = pipeline();
            let mut b = s[..cut.min(s.len())].to_vec();
            b.extend_from_slice(&junk);
            let _ = parse_head(&b, &LIMITS);
            let _ = ndjson_count(&b, 5);
            let _ = ndjson_lines(&b).count();
        }
    }
}
