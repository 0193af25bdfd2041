//! Framing and message parsing in both directions: arbitrary bytes go
//! through the line decoder, and every line through both parsers.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice::stratum::{ClientRequest, Envelope, LineCodec, ServerMessage};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = LineCodec::new(4096);
    // Feed in two reads to exercise resumption of the newline scan.
    let (a, b) = data.split_at(data.len() / 2);
    let mut buf = BytesMut::from(a);
    for chunk in [None, Some(b)] {
        if let Some(c) = chunk {
            buf.extend_from_slice(c);
        }
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(line)) => {
                    if let Ok(env) = Envelope::parse(&line) {
                        let _ = ClientRequest::from_envelope(&env);
                        let _ = ServerMessage::from_envelope(&env);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
