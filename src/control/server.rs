//! The control listeners: a Unix socket (file permissions are the access
//! control) and an optional TCP port (bearer token on every request).

use super::protocol::{self, Call, RpcError};
use super::types::{Event, Stamped};
use crate::curtail::Curtailer;
use crate::stratum::LineCodec;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tracing::{info, warn};

const MAX_LINE: usize = 64 * 1024;

/// Bind the Unix control socket with the given mode and serve it.
pub fn serve_unix(path: &Path, mode: u32, c: Curtailer) -> std::io::Result<JoinHandle<()>> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            std::fs::remove_file(path)?; // a stale socket from an earlier run
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    info!(path = %path.display(), mode = format!("{mode:o}"), "control socket listening");
    let origin: PathBuf = path.to_owned();
    Ok(tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve_conn(s, format!("unix:{}", origin.display()), None, c.clone()));
                }
                Err(e) => {
                    warn!("control accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

/// Serve the TCP control port; every request must carry the token.
pub async fn serve_tcp(
    addr: std::net::SocketAddr,
    token: String,
    c: Curtailer,
) -> std::io::Result<(std::net::SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind(addr).await?;
    let bound = l.local_addr()?;
    info!(%bound, "control TCP listening (token required)");
    Ok((
        bound,
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, peer)) => {
                        tokio::spawn(serve_conn(s, format!("tcp:{peer}"), Some(token.clone()), c.clone()));
                    }
                    Err(e) => {
                        warn!("control accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }),
    ))
}

/// Compare without an early exit, so timing does not reveal a prefix.
fn token_ok(given: Option<&str>, want: &str) -> bool {
    let Some(g) = given.and_then(|g| g.strip_prefix("Bearer ")) else { return false };
    g.len() == want.len() && g.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(s: S, origin: String, token: Option<String>, c: Curtailer) {
    let (r, mut w) = tokio::io::split(s);
    let mut lines = FramedRead::new(r, LineCodec::new(MAX_LINE));
    let mut events: Option<broadcast::Receiver<Arc<Stamped>>> = None;
    loop {
        let out = tokio::select! {
            line = lines.next() => match line {
                Some(Ok(l)) => handle(&l, &origin, token.as_deref(), &c, &mut events).await,
                _ => break,
            },
            ev = recv(&mut events) => match ev {
                Ok(e) => protocol::event(&e),
                Err(broadcast::error::RecvError::Lagged(n)) => protocol::event(&Stamped {
                    at_ms: crate::stats::unix_ms(),
                    event: Event::EventsLost { count: n },
                }),
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        if w.write_all(out.as_bytes()).await.is_err() {
            break;
        }
    }
}

async fn recv(rx: &mut Option<broadcast::Receiver<Arc<Stamped>>>) -> Result<Arc<Stamped>, broadcast::error::RecvError> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn handle(
    line: &[u8],
    origin: &str,
    token: Option<&str>,
    c: &crate::curtail::Curtailer,
    events: &mut Option<broadcast::Receiver<Arc<Stamped>>>,
) -> String {
    let req = match protocol::parse_request(line) {
        Ok(r) => r,
        Err((id, e)) => return protocol::error(&id, &e),
    };
    if let Some(t) = token {
        if !token_ok(req.auth.as_deref(), t) {
            warn!(origin, method = %req.method, "control request refused: missing or wrong token");
            return protocol::error(
                &req.id,
                &RpcError {
                    code: protocol::UNAUTHORIZED,
                    message: "unauthorized: send \"auth\": \"Bearer <token>\"".into(),
                },
            );
        }
    }
    let reason = req.params.get("reason").and_then(Value::as_str).unwrap_or("");
    info!(origin, method = %req.method, reason, "control request");
    let call = match protocol::parse_call(&req.method, &req.params) {
        Ok(c) => c,
        Err(e) => return protocol::error(&req.id, &e),
    };
    match call {
        Call::Version => protocol::response(
            &req.id,
            json!(crate::api::Version {
                protocol: protocol::PROTOCOL.into(),
                sluice: env!("CARGO_PKG_VERSION").into()
            }),
        ),
        Call::Subscribe => {
            *events = Some(c.subscribe());
            protocol::response(&req.id, json!({"subscribed": true}))
        }
        Call::Control(r) => match c.request(r).await {
            Ok(v) => protocol::response(&req.id, serde_json::to_value(v).unwrap_or_default()),
            Err(e) => protocol::error(&req.id, &RpcError::from(&e)),
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison() {
        assert!(super::token_ok(Some("Bearer s3cret"), "s3cret"));
        assert!(!super::token_ok(Some("Bearer s3cre"), "s3cret"));
        assert!(!super::token_ok(Some("s3cret"), "s3cret"));
        assert!(!super::token_ok(None, "s3cret"));
    }
}
