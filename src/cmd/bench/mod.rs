//! `fedmesh bench`: benchmarks that report ratios against a baseline measured in the same run.

mod authz;
mod callgrind;
mod dataplane;
mod federation;
mod files;
mod identity;
mod instructions;
mod load;
mod pairs;
mod policy;
mod rollout;
mod slowloris;
mod sni;
mod soak;
mod thirdparty;
mod traces;
mod tracing;

use std::time::Duration;

use clap::Subcommand;

use super::parse_duration;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// SVID signings/s and mTLS handshakes/s through fedmesh's configs, against plain rustls.
    Identity {
        /// How long to run each measurement.
        #[arg(long, value_parser = parse_duration, default_value = "3s")]
        duration: Duration,
        /// Rounds; each measures fedmesh and the baseline alternately, the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Instructions per request of each proxy on the cross-cluster path (callgrind), HTTP/1.1
    /// and HTTP/2; `--check FILE` fails when one grew by more than 10% over FILE's figures.
    Instructions {
        /// Requests counted per protocol.
        #[arg(long, default_value_t = 400)]
        requests: usize,
        /// Compare with these committed figures (e.g. benchmarks/instructions.txt).
        #[arg(long, value_name = "FILE")]
        check: Option<std::path::PathBuf>,
        /// Record this run's figures here.
        #[arg(long, value_name = "FILE")]
        write: Option<std::path::PathBuf>,
        /// Keep each proxy's callgrind dumps in this directory, for `callgrind_annotate` (the
        /// dump of the counted HTTP/1.1 requests ends in `.1`, HTTP/2's in `.2`).
        #[arg(long, value_name = "DIR")]
        keep: Option<std::path::PathBuf>,
    },
    /// Export propagation time across a clusterset, hub RSS and CPU (real hub process); with
    /// `--mode files`, from a YAML file written into a cluster's source directory to DNS answers.
    Federation {
        #[arg(long, default_value_t = 50)]
        clusters: usize,
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Changes to time after steady state.
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// `hub`: simulated control planes against a hub process, change to every cluster.
        /// `files`: two whole clusters in-process, file written to visible in DNS.
        #[arg(long, value_enum, default_value = "hub")]
        mode: FederationMode,
        /// The hub's store (`hub` mode): redb in its data directory, or a real etcd the
        /// benchmark starts on loopback (Debian's etcd-server).
        #[arg(long, value_enum, default_value = "redb")]
        store: BenchStore,
    },
    /// Latency, throughput, CPU and memory of the sidecar and gateway against a direct
    /// connection; the gateway's SNI passthrough beside HAProxy and nginx (real processes).
    Dataplane {
        /// Requests per second of the fixed-rate (latency) runs.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Length of each fixed-rate run.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        /// Request and response body size in bytes.
        #[arg(long, default_value_t = 1024)]
        body: usize,
        /// Requests (or connections) in flight in the maximum-throughput runs.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Length of each SNI passthrough measurement.
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        sni_duration: Duration,
        /// Run only these parts (repeatable); memory and goals are always reported.
        #[arg(long, value_enum)]
        only: Vec<dataplane::Part>,
    },
    /// What zero trust costs at the callee: instructions per request with 50 AuthorizationPolicies
    /// of 10 rules and with a RequestAuthentication against no policy (callgrind), and JWT
    /// validations per CPU second on one thread.
    Authz {
        /// Request and response body size in bytes.
        #[arg(long, default_value_t = 1024)]
        body: usize,
        /// How long the JWT validation loop runs.
        #[arg(long, value_parser = parse_duration, default_value = "3s")]
        duration: Duration,
    },
    /// Hours-long steadiness: cross-cluster load through real proxy processes with config churn
    /// and a new SVID for every proxy each minute; fails if a process's memory or file
    /// descriptors still grow over the last half of the run.
    Soak(SoakArgs),
    /// How fast a rollout decides: from a step's sample to the next weights in the sidecar, and
    /// from a failing canary to stable-only traffic (goals: 1 s).
    Rollout {
        /// Steps of the promotion measured.
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Rollbacks measured.
        #[arg(long, default_value_t = 10)]
        rollbacks: usize,
        /// Canary requests each step needs before it is judged.
        #[arg(long, default_value_t = 20)]
        min_requests: u64,
    },
    /// The hub's span intake on one core (decode + trace window, against decoding alone) and
    /// the window's memory when full.
    Traces {
        /// Spans the window holds (the hub's default).
        #[arg(long, default_value_t = 100_000)]
        window: usize,
        /// Memory the window may take, in MiB (the hub's default).
        #[arg(long, default_value_t = 128)]
        window_mib: usize,
        /// Spans per OTLP export.
        #[arg(long, default_value_t = 512)]
        batch: usize,
        /// Length of each measurement.
        #[arg(long, value_parser = parse_duration, default_value = "3s")]
        duration: Duration,
        /// Rounds; each measures the baseline and the intake alternately, the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

/// Arguments of `fedmesh bench soak`.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long to run (the figures of 30m are in benchmarks/RELIABILITY.md).
    #[arg(long, value_parser = parse_duration, default_value = "30m")]
    duration: Duration,
    /// Requests per second in all, half HTTP/1.1 and half HTTP/2.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// How often every process is sampled and the configuration changes.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    every: Duration,
    /// Request and response body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body: usize,
}

/// The store of the hub `fedmesh bench federation` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchStore {
    Redb,
    Etcd,
}

/// What `fedmesh bench federation` measures.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum FederationMode {
    Hub,
    Files,
}

/// Runs a benchmark; Ctrl-C or SIGTERM stops it, and what it started (proxy processes, nginx,
/// HAProxy, the in-process clusterset) is stopped with it rather than left running.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    tokio::select! {
        r = run_one(cmd) => r,
        _ = super::shutdown_signal() => anyhow::bail!("interrupted; what the benchmark started is stopped"),
    }
}

async fn run_one(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Identity { duration, rounds } => {
            tokio::task::spawn_blocking(move || identity::run(duration, rounds.max(1))).await?
        }
        BenchCommand::Dataplane {
            rate,
            duration,
            body,
            concurrency,
            sni_duration,
            only,
        } => {
            dataplane::run(dataplane::Params {
                rate,
                duration,
                body,
                concurrency,
                sni_duration,
                only,
            })
            .await
        }
        BenchCommand::Authz { body, duration } => {
            authz::run(authz::Params {
                body: body.max(1),
                duration,
            })
            .await
        }
        BenchCommand::Traces {
            window,
            window_mib,
            batch,
            duration,
            rounds,
        } => {
            let p = traces::Params {
                window: window.max(1),
                window_bytes: window_mib.clamp(1, 65536) << 20,
                batch: batch.clamp(3, 100_000),
                duration,
                rounds: rounds.max(1),
            };
            tokio::task::spawn_blocking(move || traces::run(p)).await?
        }
        BenchCommand::Rollout {
            steps,
            rollbacks,
            min_requests,
        } => {
            rollout::run(rollout::Params {
                steps,
                rollbacks,
                min_requests: min_requests.max(1),
            })
            .await
        }
        BenchCommand::Soak(a) => {
            soak::run(soak::Params {
                duration: a.duration,
                rate: a.rate,
                every: a.every,
                body: a.body,
            })
            .await
        }
        BenchCommand::Instructions {
            requests,
            check,
            write,
            keep,
        } => {
            instructions::run(instructions::Params {
                requests,
                check,
                write,
                keep,
            })
            .await
        }
        BenchCommand::Federation {
            mode: FederationMode::Files,
            changes,
            ..
        } => files::run(files::Params { changes }).await,
        BenchCommand::Federation {
            clusters,
            services,
            changes,
            mode: FederationMode::Hub,
            store,
        } => {
            federation::run(federation::Params {
                clusters,
                services,
                changes,
                store,
            })
            .await
        }
    }
}

/// Runs `f` repeatedly for `duration`; returns operations per second.
pub(crate) fn rate(
    duration: Duration,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        f()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The median (the upper one of an even count); 0 for none.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Fields of `/proc/<pid>/status` given in KiB (`VmRSS:`, `VmHWM:`...), 0 when absent.
pub(crate) fn status_kib(pid: u32, fields: &[&str]) -> Vec<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    fields
        .iter()
        .map(|name| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// The binary a meshed pod runs for `sidecar`/`gateway`: `fedmesh-proxy`, beside this one (cargo
/// builds both). Measuring `fedmesh sidecar` instead would count the pages of the whole `fedmesh`
/// binary in the proxies' memory.
pub(crate) fn proxy_exe() -> anyhow::Result<std::path::PathBuf> {
    let me = std::env::current_exe()?;
    let proxy = me.with_file_name("fedmesh-proxy");
    anyhow::ensure!(
        proxy.is_file(),
        "{} is missing: the benchmarks run the proxies from it (build both binaries with \
         `cargo build --release`)",
        proxy.display()
    );
    Ok(proxy)
}
