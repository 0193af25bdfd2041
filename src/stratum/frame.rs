//! Line framing: Stratum V1 is one JSON object per `\n`-terminated line.
//!
//! The decoder hands out each line as a `BytesMut` split off the read buffer
//! (no copy), skips blank lines and strips a trailing `\r`. A line longer than
//! the limit is an error for that connection only: the caller closes it.

use bytes::BytesMut;
use thiserror::Error;
use tokio_util::codec::Decoder;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Newline framing with a maximum line length.
#[derive(Debug, Clone)]
pub struct LineCodec {
    max_len: usize,
    /// Where to resume the newline search, so a slow trickle of bytes is not
    /// rescanned from the start each time.
    scanned: usize,
}

impl LineCodec {
    pub fn new(max_len: usize) -> Self {
        LineCodec { max_len, scanned: 0 }
    }
}

impl Decoder for LineCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        loop {
            let Some(off) = memchr::memchr(b'\n', &buf[self.scanned..]) else {
                if buf.len() > self.max_len {
                    return Err(FrameError::LineTooLong(self.max_len));
                }
                self.scanned = buf.len();
                return Ok(None);
            };
            let end = self.scanned + off;
            self.scanned = 0;
            if end > self.max_len {
                return Err(FrameError::LineTooLong(self.max_len));
            }
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            while line.last().is_some_and(|b| b.is_ascii_whitespace()) {
                line.truncate(line.len() - 1);
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return Ok(Some(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_skips_blanks() {
        let mut c = LineCodec::new(64);
        let mut b = BytesMut::from(&b"{\"a\":1}\r\n\n  \n{\"b\""[..]);
        assert_eq!(&c.decode(&mut b).unwrap().unwrap()[..], b"{\"a\":1}");
        assert!(c.decode(&mut b).unwrap().is_none());
        b.extend_from_slice(b":2}\n");
        assert_eq!(&c.decode(&mut b).unwrap().unwrap()[..], b"{\"b\":2}");
        assert!(b.is_empty());
    }

    #[test]
    fn too_long_is_an_error_with_or_without_newline() {
        let mut c = LineCodec::new(8);
        let mut b = BytesMut::from(&b"123456789"[..]);
        assert!(matches!(c.decode(&mut b), Err(FrameError::LineTooLong(8))));
        let mut c = LineCodec::new(8);
        let mut b = BytesMut::from(&b"123456789\n"[..]);
        assert!(matches!(c.decode(&mut b), Err(FrameError::LineTooLong(8))));
        let mut b = BytesMut::from(&b"12345678\n"[..]);
        assert_eq!(&c.decode(&mut b).unwrap().unwrap()[..], b"12345678");
    }
}
