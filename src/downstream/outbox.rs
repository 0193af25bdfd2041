//! What a session has to send: answers it encoded itself, then possibly one
//! shared line (a job's `mining.notify`, the same bytes for every miner on
//! the connection). The shared line is written straight from its `Bytes`
//! with a vectored write, so fanning a job out to N miners copies nothing
//! and allocates nothing per miner.

use bytes::Bytes;
use std::io::IoSlice;
use tokio::io::AsyncWriteExt;

/// A session's own buffer is given back past this size, so one burst does
/// not pin memory for the life of the connection.
const KEEP_CAPACITY: usize = 512;

#[derive(Default)]
pub struct Outbox {
    buf: Vec<u8>,
    /// Goes out after `buf`.
    shared: Option<Bytes>,
}

impl Outbox {
    /// The buffer to encode into. A shared line already queued is copied in
    /// first, so bytes leave in the order they were queued.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        if let Some(b) = self.shared.take() {
            self.buf.extend_from_slice(&b);
        }
        &mut self.buf
    }

    /// Queue a shared line after everything queued so far.
    pub fn push_shared(&mut self, line: &Bytes) {
        if self.buf.is_empty() && self.shared.is_none() {
            self.shared = Some(line.clone());
        } else {
            self.buf().extend_from_slice(line);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.shared.is_none()
    }

    /// Write everything queued.
    pub async fn flush<W: tokio::io::AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        let shared = self.shared.take().unwrap_or_default();
        let (mut a, mut b) = (0, 0);
        while a < self.buf.len() || b < shared.len() {
            let n = w.write_vectored(&[IoSlice::new(&self.buf[a..]), IoSlice::new(&shared[b..])]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let from_buf = n.min(self.buf.len() - a);
            a += from_buf;
            b += n - from_buf;
        }
        self.buf.clear();
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most 3 bytes per call, to exercise partial writes.
    struct Trickle(Vec<u8>);
    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bytes_leave_in_the_order_they_were_queued() {
        let job = Bytes::from_static(b"{notify}\n");
        let mut o = Outbox::default();
        o.buf().extend_from_slice(b"{diff}\n");
        o.push_shared(&job);
        o.buf().extend_from_slice(b"{answer}\n");
        let mut w = Trickle(Vec::new());
        o.flush(&mut w).await.unwrap();
        assert_eq!(w.0, b"{diff}\n{notify}\n{answer}\n");
        assert!(o.is_empty());

        // A shared line alone is written from the shared bytes, partial writes and all.
        o.push_shared(&job);
        assert!(o.buf.is_empty(), "nothing copied into the session's buffer");
        assert_eq!(o.shared.as_ref().map(|s| s.as_ptr()), Some(job.as_ptr()));
        let mut w = Trickle(Vec::new());
        o.flush(&mut w).await.unwrap();
        assert_eq!(w.0, b"{notify}\n");
    }
}
