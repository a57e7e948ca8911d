//! `fedmesh bench`: benchmarks that report ratios against a baseline measured in the same run.

mod identity;

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
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Identity { duration, rounds } => {
            tokio::task::spawn_blocking(move || identity::run(duration, rounds.max(1))).await?
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

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
