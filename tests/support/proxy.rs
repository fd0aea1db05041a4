//! A delaying TCP proxy: a fixed one-way delay per direction (a WAN-like RTT without netem),
//! order kept, and a switch that cuts the link.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

/// A TCP proxy to `target` that delays every chunk by `delay` in each direction, keeping order,
/// and can cut the link (`down`: connections are closed and new ones refused).
pub struct DelayProxy {
    /// Where to connect.
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
}

impl DelayProxy {
    /// Starts on `rt`.
    pub fn start(rt: &tokio::runtime::Runtime, target: SocketAddr, delay: Duration) -> DelayProxy {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let down = Arc::new(AtomicBool::new(false));
        let d = down.clone();
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::Relaxed) {
                    continue;
                }
                let d = d.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let a = tokio::spawn(pipe(cr, sw, delay, d.clone()));
                    let b = tokio::spawn(pipe(sr, cw, delay, d));
                    let _ = tokio::join!(a, b);
                });
            }
        });
        DelayProxy { addr, down }
    }

    /// Cuts (`true`) or restores the link.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    down: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let d = down.clone();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at + delay).await;
            if d.load(Ordering::Relaxed) || to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if down.load(Ordering::Relaxed) { break; }
                continue;
            }
        };
        if down.load(Ordering::Relaxed)
            || tx
                .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
