//! Steady load from inside a pod's namespace, every answer kept: what the lifecycle and fault
//! tests count failures and gaps with.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::super::wait_until;
use super::{HttpAnswer, Pod, http_request};

/// One request of a [`Clients`] run: when it started and ended, and what came back.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub method: &'static str,
    pub started: Instant,
    pub ended: Instant,
    /// (status, `fedmesh-proxy-error`), or how the request failed.
    pub answer: Result<(u16, Option<String>), String>,
    /// The cluster that answered (from the sample app's echo), on a 200.
    pub cluster: Option<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        matches!(self.answer, Ok((200, _)))
    }
    /// Whether it was on the wire at `t`.
    pub fn in_flight_at(&self, t: Instant) -> bool {
        self.started < t && self.ended > t
    }
}

/// Clients in a pod's namespace, each sending `method path` to `ip` one request after another
/// (a new connection each, as the pod's app would, 5 ms apart: a few hundred a second in all)
/// until stopped. Bounded: 20,000 requests or 3 minutes per client.
pub struct Clients {
    stop: Arc<AtomicBool>,
    pub outcomes: Arc<Mutex<Vec<Outcome>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Clients {
    pub fn start(
        pod: &Pod,
        ip: Ipv4Addr,
        host: &str,
        methods: &[&'static str],
        path: &str,
    ) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let threads = methods
            .iter()
            .map(|&method| {
                let (stop, outcomes, path, host) = (
                    stop.clone(),
                    outcomes.clone(),
                    path.to_string(),
                    host.to_string(),
                );
                let ns = File::open(format!("/run/netns/{}", pod.ns)).unwrap();
                std::thread::spawn(move || {
                    use std::os::fd::AsRawFd;
                    assert_eq!(
                        unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                        0
                    );
                    let begin = Instant::now();
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed)
                            || begin.elapsed() > Duration::from_secs(180)
                        {
                            break;
                        }
                        let started = Instant::now();
                        let got =
                            http_request(SocketAddr::from((ip, 80)), method, &path, &host, &[]);
                        let cluster = got
                            .as_ref()
                            .ok()
                            .filter(|a| a.status == 200)
                            .and_then(|a| serde_json::from_str::<serde_json::Value>(&a.body).ok())
                            .and_then(|v| v["cluster"].as_str().map(String::from));
                        let answer = got
                            .map(|a: HttpAnswer| {
                                (a.status, a.header("fedmesh-proxy-error").map(String::from))
                            })
                            .map_err(|e| e.to_string());
                        outcomes.lock().unwrap().push(Outcome {
                            method,
                            started,
                            ended: Instant::now(),
                            answer,
                            cluster,
                        });
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Clients {
            stop,
            outcomes,
            threads,
        }
    }

    /// Waits until `n` requests that started after `t` have succeeded.
    pub fn until_ok_after(&self, t: Instant, n: usize) {
        wait_until(
            &format!("{n} good answers to requests sent after the fault"),
            Duration::from_secs(90),
            || {
                let o = self.outcomes.lock().unwrap();
                o.iter().filter(|o| o.started > t && o.ok()).count() >= n
            },
        );
    }

    pub fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.outcomes.lock().unwrap().clone()
    }
}

/// Requests sent, failed, and the longest time between two successful answers (the outage a
/// client saw).
pub fn report(outcomes: &[Outcome]) -> (usize, usize, Duration) {
    let mut ok: Vec<Instant> = outcomes
        .iter()
        .filter(|o| o.ok())
        .map(|o| o.ended)
        .collect();
    ok.sort();
    let gap = ok.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    (outcomes.len(), failed, gap)
}
