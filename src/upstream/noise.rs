//! The encrypted transport of a Stratum V2 pool connection: the Noise NX
//! handshake as the initiator, checked against the pool's authority key,
//! then SV2 frames in and out. The handshake, the frame encryption and the
//! framing are the reference implementation's (`codec_sv2`, `noise_sv2`);
//! this module only moves their bytes over a tokio socket.

use crate::config::AuthorityKey;
use std::time::Duration;
use stratum_core::codec_sv2::{
    Decoded, Decrypted, EncodableFrame, Handshake, InitiatorSent, NoiseDecoder, NoiseEncoder, SerializedFrame,
    TransportDecryptState, TransportEncryptState,
};
use stratum_core::framing_sv2::header::Header;
use stratum_core::noise_sv2::{
    Initiator, Responder, ELLSWIFT_ENCODING_SIZE, INITIATOR_EXPECTED_HANDSHAKE_MESSAGE_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Reads frames. `read_frame` is cancel-safe: what a cancelled call read is
/// kept in `buf`, so it can sit in a `select!` beside other work.
pub struct Reader {
    io: OwnedReadHalf,
    decoder: NoiseDecoder,
    state: Option<TransportDecryptState>,
    buf: Vec<u8>,
    filled: usize,
}

/// Writes frames: encrypts into `out`, which the caller writes.
pub struct Writer {
    pub io: OwnedWriteHalf,
    encoder: NoiseEncoder,
    state: TransportEncryptState,
}

/// Why a handshake as the initiator failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The pool's certificate is not signed by the URL's key: asking again
    /// gets the same answer.
    NotAuthenticated(String),
    /// The path or the pool failed (closed, timed out, garbage).
    Failed(String),
}

impl From<String> for ConnectError {
    fn from(s: String) -> Self {
        ConnectError::Failed(s)
    }
}

/// The handshake as the initiator (the proxy side of a pool connection):
/// fails with the reason when the pool's certificate is not signed by `key`
/// or the pool does not answer within `limit`.
pub async fn connect(stream: TcpStream, key: AuthorityKey, limit: Duration) -> Result<(Reader, Writer), ConnectError> {
    let pk = secp256k1::XOnlyPublicKey::from_slice(&key.0)
        .map_err(|_| ConnectError::NotAuthenticated("the authority key is not on the curve".into()))?;
    let (mut r, mut w) = stream.into_split();
    let mut decoder = NoiseDecoder::new();
    let mut encoder = NoiseEncoder::new();
    let (first, hs) = Handshake::initiator(Initiator::new(Some(pk))).step_0().map_err(|e| format!("noise: {e:?}"))?;
    w.write_all(encoder.encode_handshake(first).as_ref()).await.map_err(|e| format!("write: {e}"))?;
    let reply = tokio::time::timeout(limit, read_handshake::<InitiatorSent>(&mut r, &mut decoder))
        .await
        .map_err(|_| format!("the pool did not finish the Noise handshake within {limit:?}"))??;
    let reply: [u8; INITIATOR_EXPECTED_HANDSHAKE_MESSAGE_SIZE] =
        reply.try_into().map_err(|_| "the pool's handshake reply has the wrong size".to_owned())?;
    let transport = hs.step_2(reply).map_err(|e| {
        ConnectError::NotAuthenticated(format!(
            "the pool's Noise certificate is not signed by the authority key in its URL ({e:?}): \
             a wrong key, or someone else answering at that address"
        ))
    })?;
    let (enc, dec) = transport.split();
    Ok((Reader { io: r, decoder, state: Some(dec), buf: Vec::new(), filled: 0 }, Writer { io: w, encoder, state: enc }))
}

/// The handshake as the responder, with the authority key pair `public`,
/// `secret` (a pool or a template provider side: the simulators).
pub async fn accept(
    stream: TcpStream,
    public: &[u8; 32],
    secret: &[u8; 32],
    limit: Duration,
) -> Result<(Reader, Writer), String> {
    let responder = Responder::from_authority_kp(public, secret, Duration::from_secs(3600))
        .map_err(|e| format!("authority key pair: {e:?}"))?;
    let (mut r, mut w) = stream.into_split();
    let mut decoder = NoiseDecoder::new();
    let mut encoder = NoiseEncoder::new();
    let first = tokio::time::timeout(limit, read_handshake::<Responder>(&mut r, &mut decoder))
        .await
        .map_err(|_| "no Noise handshake in time".to_owned())??;
    let first: [u8; ELLSWIFT_ENCODING_SIZE] = first.try_into().map_err(|_| "bad handshake size".to_owned())?;
    let (reply, transport) = Handshake::responder(responder).step_1(first).map_err(|e| format!("noise: {e:?}"))?;
    w.write_all(encoder.encode_handshake(reply).as_ref()).await.map_err(|e| format!("write: {e}"))?;
    let (enc, dec) = transport.split();
    Ok((Reader { io: r, decoder, state: Some(dec), buf: Vec::new(), filled: 0 }, Writer { io: w, encoder, state: enc }))
}

async fn read_handshake<R: stratum_core::codec_sv2::ExpectsHandshakeMessage>(
    r: &mut OwnedReadHalf,
    decoder: &mut NoiseDecoder,
) -> Result<Vec<u8>, String> {
    loop {
        let mut b = vec![0u8; decoder.writable_len()];
        r.read_exact(&mut b).await.map_err(|e| format!("during the Noise handshake: {e}"))?;
        decoder.writable().copy_from_slice(&b);
        match decoder.next_handshake_frame::<R>() {
            Ok(Decoded::Frame(f)) => return Ok(f.payload().to_vec()),
            Ok(Decoded::Incomplete(_)) => continue,
            Err(e) => return Err(format!("noise: {e:?}")),
        }
    }
}

impl Reader {
    /// The next frame: its header and its (decrypted) payload.
    pub async fn read_frame(&mut self) -> Result<(Header, Vec<u8>), String> {
        loop {
            let want = self.decoder.writable_len();
            if self.buf.len() != want {
                self.buf.resize(want, 0);
                self.filled = 0;
            }
            while self.filled < want {
                let n = self.io.read(&mut self.buf[self.filled..]).await.map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("pool closed the connection".into());
                }
                self.filled += n;
            }
            self.decoder.writable().copy_from_slice(&self.buf);
            self.filled = 0;
            let state = self.state.take().ok_or("the decryption state was lost after an error")?;
            match self.decoder.next_transport_frame(state) {
                Ok(Decrypted::Frame(mut f, s)) => {
                    self.state = Some(s);
                    return Ok(frame_parts(&mut f));
                }
                Ok(Decrypted::Incomplete(_, s)) => self.state = Some(s),
                Err(e) => return Err(format!("undecryptable frame from the pool: {e:?}")),
            }
        }
    }
}

fn frame_parts(f: &mut SerializedFrame) -> (Header, Vec<u8>) {
    (f.header(), f.payload().to_vec())
}

impl Writer {
    /// Encrypt one frame onto the end of `out`.
    pub fn encode<F: EncodableFrame>(&mut self, frame: F, out: &mut Vec<u8>) -> Result<(), String> {
        let b = self.encoder.encode_transport(frame, &mut self.state).map_err(|e| format!("encode: {e:?}"))?;
        out.extend_from_slice(b.as_ref());
        Ok(())
    }
}
