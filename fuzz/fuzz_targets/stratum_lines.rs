//! Framing and message parsing in both directions: arbitrary bytes go
//! through the line decoder, every line through both parsers, and every
//! response's result through the subscribe and configure result parsers.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice::stratum::{
    parse_configure_result, parse_subscribe_result, ClientRequest, Envelope, LineCodec, ServerMessage,
};
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
                        // A pool's answers: any result may be read as the
                        // answer to subscribe or configure.
                        if let Ok(ServerMessage::Response { result: Some(r), .. }) = ServerMessage::from_envelope(&env) {
                            let _ = parse_subscribe_result(r);
                            let _ = parse_configure_result(r);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
