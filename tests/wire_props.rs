//! Property tests of the wire layer: round trips and no panics on any input.

use bytes::BytesMut;
use proptest::prelude::*;
use sluice::control::{client::parse_amount, protocol};
use sluice::share::PrevHash;
use sluice::stratum::{
    encode, parse_configure_result, parse_subscribe_result, ClientRequest, Envelope, LineCodec, ServerMessage,
};
use tokio_util::codec::Decoder;

proptest! {
    #[test]
    fn notify_round_trips(
        job in "[0-9a-f]{1,16}",
        prev in any::<[u8; 32]>(),
        coinb1 in proptest::collection::vec(any::<u8>(), 0..200),
        coinb2 in proptest::collection::vec(any::<u8>(), 0..200),
        branch in proptest::collection::vec(any::<[u8; 32]>(), 0..14),
        version in any::<u32>(), nbits in any::<u32>(), ntime in any::<u32>(), clean in any::<bool>(),
    ) {
        let line = encode::notify(&encode::NotifyFields {
            job_id: &job, prevhash: PrevHash(prev), coinb1: &[&coinb1], coinb2: &coinb2,
            merkle_branch: &branch, version, nbits, ntime, clean_jobs: clean,
        });
        prop_assert_eq!(line.last(), Some(&b'\n'));
        let env = Envelope::parse(&line[..line.len() - 1]).unwrap();
        let ServerMessage::Notify(n) = ServerMessage::from_envelope(&env).unwrap() else { panic!("not a notify") };
        prop_assert_eq!(n.job_id, job);
        prop_assert_eq!(n.prevhash, PrevHash(prev));
        prop_assert_eq!(n.coinb1, coinb1);
        prop_assert_eq!(n.coinb2, coinb2);
        prop_assert_eq!(n.merkle_branch, branch);
        prop_assert_eq!((n.version, n.nbits, n.ntime, n.clean_jobs), (version, nbits, ntime, clean));
    }

    #[test]
    fn submit_round_trips(worker in "\\PC{0,40}", job in "[0-9a-f]{1,8}", en2 in "[0-9a-f]{8}", ntime in "[0-9a-f]{8}", nonce in "[0-9a-f]{8}", vb in proptest::option::of("[0-9a-f]{8}")) {
        let mut line = Vec::new();
        let mut p = vec![worker.as_str(), &job, &en2, &ntime, &nonce];
        if let Some(v) = &vb { p.push(v); }
        encode::request(&mut line, 7, "mining.submit", &p);
        let env = Envelope::parse(&line).unwrap();
        let ClientRequest::Submit(s) = ClientRequest::from_envelope(&env).unwrap() else { panic!("not a submit") };
        prop_assert_eq!(s.worker.as_ref(), worker.as_str());
        prop_assert_eq!((s.job_id.as_ref(), s.extranonce2, s.ntime, s.nonce), (job.as_str(), en2.as_str(), ntime.as_str(), nonce.as_str()));
        prop_assert_eq!(s.version_bits, vb.as_deref());
    }

    /// Lines survive any split of the byte stream into reads.
    #[test]
    fn framing_is_independent_of_read_boundaries(lines in proptest::collection::vec("[ -~]{1,60}", 1..20), cuts in proptest::collection::vec(1usize..50, 1..40)) {
        let lines: Vec<String> = lines.into_iter().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect();
        let stream: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\r\n").into_bytes()).collect();
        let mut codec = LineCodec::new(128);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        for c in cuts.iter().cycle() {
            if pos >= stream.len() { break; }
            let end = (pos + c).min(stream.len());
            buf.extend_from_slice(&stream[pos..end]);
            pos = end;
            while let Some(l) = codec.decode(&mut buf).unwrap() {
                got.push(String::from_utf8(l.to_vec()).unwrap());
            }
        }
        prop_assert_eq!(got, lines);
    }

    /// Nothing a peer sends makes the parsers panic.
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(env) = Envelope::parse(&bytes) {
            let _ = ClientRequest::from_envelope(&env);
            let _ = ServerMessage::from_envelope(&env);
        }
    }

    #[test]
    fn json_shaped_garbage_never_panics(method in "(mining|client)\\.[a-z_.]{0,20}", params in "\\[[ -~]{0,80}\\]") {
        let line = format!("{{\"id\":1,\"method\":\"{method}\",\"params\":{params}}}");
        if let Ok(env) = Envelope::parse(line.as_bytes()) {
            let _ = ClientRequest::from_envelope(&env);
            let _ = ServerMessage::from_envelope(&env);
        }
    }

    /// Whatever a pool answers to subscribe or configure, parsing it does not
    /// panic, and a subscription id kept for resumption is bounded.
    #[test]
    fn pool_results_never_panic(result in "\\[[ -~]{0,120}\\]|\\{[ -~]{0,120}\\}") {
        let line = format!("{{\"id\":2,\"result\":{result},\"error\":null}}");
        if let Ok(env) = Envelope::parse(line.as_bytes()) {
            if let Ok(ServerMessage::Response { result: Some(r), .. }) = ServerMessage::from_envelope(&env) {
                if let Ok(s) = parse_subscribe_result(r) {
                    prop_assert!(s.session_id.is_none_or(|id| !id.is_empty() && id.len() <= 64));
                }
                let _ = parse_configure_result(r);
            }
        }
    }

    #[test]
    fn subscribe_results_keep_the_session_id(en1 in proptest::collection::vec(any::<u8>(), 0..9), size in 0usize..17, sid in "[0-9a-zA-Z]{1,32}", flat in any::<bool>()) {
        let mut line = Vec::new();
        if flat {
            let r = (["mining.notify", sid.as_str()], hex::encode(&en1), size);
            encode::result(&mut line, None, &r);
        } else {
            encode::subscribe_result(&mut line, None, &sid, &en1, size);
        }
        let env = Envelope::parse(line.trim_ascii_end()).unwrap();
        let ServerMessage::Response { result: Some(r), .. } = ServerMessage::from_envelope(&env).unwrap() else { panic!("not a response") };
        let s = parse_subscribe_result(r).unwrap();
        prop_assert_eq!((s.extranonce1, s.extranonce2_size, s.session_id), (en1, size, Some(sid)));
    }

    /// Nothing a control client sends makes the control parsers panic.
    #[test]
    fn control_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(req) = protocol::parse_request(&bytes) {
            let _ = protocol::parse_call(&req.method, &req.params);
        }
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = parse_amount(s);
        }
    }

    #[test]
    fn json_shaped_control_requests_never_panic(
        method in "(status|set_budget|resume_all|set_protection|subscribe|version|[a-z_]{0,12})",
        params in "\\{[ -~]{0,80}\\}",
        amount in "[0-9.eE+-]{0,12}(W|kW|MW|%|w|)",
    ) {
        let line = format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"{method}\",\"params\":{params}}}");
        if let Ok(req) = protocol::parse_request(line.as_bytes()) {
            let _ = protocol::parse_call(&req.method, &req.params);
        }
        let _ = parse_amount(&amount);
    }
}
