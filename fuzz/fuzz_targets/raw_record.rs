//! The raw event record: the local log's layout (`proto::record`) and the `raw_clicks`
//! protobuf value (`proto::raw_pb`), decoded from arbitrary bytes.
//!
//! Asserts: a record that decodes re-encodes to exactly the same bytes; its protobuf
//! value decodes to the same record (flags: the duplicate and fraud bits); a protobuf
//! value that decodes re-encodes (both ways) to the same record; `decode_value` picks
//! the right form.
#![no_main]

use clickgate_proto::raw_pb;
use clickgate_proto::record::{self, encoded_len, RawRecord};
use clickgate_proto::Flags;
use libfuzzer_sys::fuzz_target;

/// The flags a protobuf value carries.
fn pb_flags(f: Flags) -> Flags {
    Flags(f.0 & (Flags::DUPLICATE | Flags::FRAUD))
}

fn same_but_flags(a: &RawRecord<'_>, b: &RawRecord<'_>) {
    assert_eq!(a.click, b.click);
    assert_eq!(a.recv_ms, b.recv_ms);
    assert_eq!(a.rules, b.rules);
    assert_eq!(pb_flags(a.flags), pb_flags(b.flags));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = record::decode(data) {
        assert_eq!(encoded_len(&r.click, &r.rules), data.len());
        let mut again = Vec::new();
        record::encode(&r.click, r.flags, r.recv_ms, &r.rules, &mut again)
            .expect("a decoded record encodes");
        assert_eq!(again, data, "record: encode(decode(x)) != x");
        let mut pb = Vec::new();
        raw_pb::from_log_record(data, &mut pb).expect("a decoded record converts");
        let back = raw_pb::decode(&pb).expect("the protobuf value of a record decodes");
        same_but_flags(&r, &back);
        assert_eq!(raw_pb::decode_value(data).as_ref(), Ok(&r));
    }
    if let Ok(r) = raw_pb::decode(data) {
        let mut pb = Vec::new();
        raw_pb::encode(&r, &mut pb);
        let back = raw_pb::decode(&pb).expect("re-encoded protobuf decodes");
        assert_eq!(back, r);
        let mut rec = Vec::new();
        record::encode(&r.click, r.flags, r.recv_ms, &r.rules, &mut rec)
            .expect("a decoded protobuf value fits a record");
        assert_eq!(record::decode(&rec).as_ref(), Ok(&r));
        if data.first() != Some(&record::RECORD_VERSION) {
            assert_eq!(raw_pb::decode_value(data).as_ref(), Ok(&r));
        }
    }
});
