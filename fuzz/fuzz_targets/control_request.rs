//! The control protocol: arbitrary bytes as a request line, through the
//! request parser and, when it parses, the method/params parser; and the
//! human amounts `sluice ctl` takes ("2.4MW", "60%").
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice::control::{client::parse_amount, protocol};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = protocol::parse_request(data) {
        let _ = protocol::parse_call(&req.method, &req.params);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_amount(s);
    }
});
