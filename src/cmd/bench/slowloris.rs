//! A good client's tail while slow-loris connections are held open against the proxies it goes
//! through: the cross-cluster path's p99 at the fixed rate, unloaded and then with `HELD`
//! connections against each of the client's sidecar, the gateway and the server's sidecar, each
//! dribbling one byte a second of an opening that never completes (an HTTP head to the sidecar's
//! listener, a ClientHello to the gateway and the inbound). A connection the proxy cuts is opened
//! again at once, so the count stays up for the whole measurement. Unloaded and attacked runs
//! alternate over `ROUNDS` rounds; each attacked run is compared with the better of the unloaded
//! runs just before and just after it, and the median of the rounds' ratios is reported (the
//! machine's noise moves single runs by several times).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dataplane::{Params, Path3};
use super::load::{Proto, fixed_rate, http_client, ms, pct};

/// Slow-loris connections held against each proxy.
pub const HELD: usize = 1000;

/// Attacked runs, each between two unloaded ones.
const ROUNDS: usize = 3;

/// The opening of a TLS record that claims 512 bytes and never delivers them.
const TLS_OPENING: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
const HTTP_OPENING: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nX-Slow: ";

/// What the run found: per round, p99 unloaded (the better of the runs around it) and under the
/// attack, and the connections open meanwhile.
pub struct SlowlorisRow {
    pub rounds: Vec<(Duration, Duration)>,
    pub errors: u64,
    /// Connections open against each target when the last attacked run ended, and reconnects
    /// during it.
    pub held: Vec<(&'static str, usize, usize)>,
}

impl SlowlorisRow {
    /// The median of the rounds' ratios (attacked p99 over unloaded p99).
    pub fn ratio(&self) -> f64 {
        super::median(
            self.rounds
                .iter()
                .map(|(u, l)| l.as_secs_f64() / u.as_secs_f64().max(1e-9))
                .collect(),
        )
    }
}

/// One target's attackers: `HELD` tasks, each keeping one slow connection open.
struct Attack {
    name: &'static str,
    open: Arc<AtomicUsize>,
    reconnects: Arc<AtomicUsize>,
}

fn attack(
    name: &'static str,
    addr: SocketAddr,
    opening: &'static [u8],
    stop: Arc<AtomicBool>,
) -> Attack {
    let open = Arc::new(AtomicUsize::new(0));
    let reconnects = Arc::new(AtomicUsize::new(0));
    for i in 0..HELD {
        let (open, reconnects, stop) = (open.clone(), reconnects.clone(), stop.clone());
        tokio::spawn(async move {
            // Spread the first connects over half a second.
            tokio::time::sleep(Duration::from_micros(500 * i as u64)).await;
            while !stop.load(Ordering::Relaxed) {
                let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let (mut rd, mut wr) = s.into_split();
                if wr.write_all(opening).await.is_err() {
                    continue;
                }
                open.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    // A cut shows as the read ending (or failing); any answer is read past.
                    let cut = tokio::select! {
                        r = rd.read(&mut buf) => !matches!(r, Ok(n) if n > 0),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            wr.write_all(b"a").await.is_err()
                        }
                    };
                    if cut {
                        break;
                    }
                }
                open.fetch_sub(1, Ordering::Relaxed);
                reconnects.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    Attack {
        name,
        open,
        reconnects,
    }
}

/// Raises this process's open-file limit to its hard limit: the attack holds thousands of
/// sockets, and the proxy processes started after inherit the limit.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Measures `path` (HTTP/1.1) unloaded, then with the attack on `sidecar` (an HTTP listener),
/// `gateway` and `inbound` (TLS).
pub async fn compare(
    path: &Path3,
    targets: (SocketAddr, SocketAddr, SocketAddr),
    body: &Bytes,
    p: &Params,
) -> anyhow::Result<SlowlorisRow> {
    let uri: http::Uri = path.url.parse()?;
    let client = http_client(Proto::H1);
    let _ = fixed_rate(&client, &uri, body, p.rate, Duration::from_secs(1)).await;
    let mut unloaded = vec![fixed_rate(&client, &uri, body, p.rate, p.duration).await];
    let mut attacked = Vec::new();
    let mut held = Vec::new();
    for _ in 0..ROUNDS {
        let (run, h) = under_attack(&client, &uri, body, targets, p).await;
        attacked.push(run);
        held = h;
        unloaded.push(fixed_rate(&client, &uri, body, p.rate, p.duration).await);
    }
    let p99 = |r: &super::load::FixedRate| pct(&r.latencies, 0.99);
    let row = SlowlorisRow {
        rounds: attacked
            .iter()
            .enumerate()
            .map(|(i, a)| (p99(&unloaded[i]).min(p99(&unloaded[i + 1])), p99(a)))
            .collect(),
        errors: unloaded.iter().chain(&attacked).map(|r| r.errors).sum(),
        held,
    };
    let rounds: Vec<String> = row
        .rounds
        .iter()
        .map(|(u, l)| format!("{:.3} → {:.3} ms", ms(*u), ms(*l)))
        .collect();
    println!(
        "\n  slow-loris: {} HTTP/1.1 at {} rps, p99 unloaded → with {HELD} slow connections held against each proxy, {ROUNDS} rounds: {} (median {:.2}×){}",
        path.name,
        p.rate,
        rounds.join(", "),
        row.ratio(),
        if row.errors > 0 {
            format!(", {} ERRORS", row.errors)
        } else {
            String::new()
        }
    );
    for (name, open, reconnects) in &row.held {
        println!(
            "    {name:<24} {open} open at the end, {reconnects} cut and opened again during the last run"
        );
    }
    Ok(row)
}

/// One attacked run: the attack on `targets` (client sidecar, gateway, server inbound) held
/// while the client measures, then stopped and its connections gone. The run, and per target
/// the connections open at its end and the cuts during it.
async fn under_attack(
    client: &super::load::HttpClient,
    uri: &http::Uri,
    body: &Bytes,
    targets: (SocketAddr, SocketAddr, SocketAddr),
    p: &Params,
) -> (super::load::FixedRate, Vec<(&'static str, usize, usize)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (sidecar, gateway, inbound) = targets;
    let attacks = [
        attack("client sidecar", sidecar, HTTP_OPENING, stop.clone()),
        attack("gateway", gateway, TLS_OPENING, stop.clone()),
        attack("server sidecar inbound", inbound, TLS_OPENING, stop.clone()),
    ];
    // Until (nearly) all are open, at most 20 s.
    for _ in 0..200 {
        if attacks
            .iter()
            .all(|a| a.open.load(Ordering::Relaxed) >= HELD * 95 / 100)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reconnects_before: Vec<usize> = attacks
        .iter()
        .map(|a| a.reconnects.load(Ordering::Relaxed))
        .collect();
    let run = fixed_rate(client, uri, body, p.rate, p.duration).await;
    let held = attacks
        .iter()
        .zip(reconnects_before)
        .map(|(a, before)| {
            (
                a.name,
                a.open.load(Ordering::Relaxed),
                a.reconnects.load(Ordering::Relaxed) - before,
            )
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    // The attackers notice within a second; then the proxies have their connections back.
    for _ in 0..100 {
        if attacks.iter().all(|a| a.open.load(Ordering::Relaxed) == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (run, held)
}

pub fn print_goal(row: &Option<SlowlorisRow>) {
    if let Some(r) = row {
        println!(
            "    good client's p99 within 2× of unloaded with {HELD} slow-loris connections per proxy: {:.2}× (median of {ROUNDS} rounds) — {}",
            r.ratio(),
            if r.ratio() <= 2.0 && r.errors == 0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}
