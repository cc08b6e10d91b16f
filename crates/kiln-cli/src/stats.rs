//! Latency summaries for benchmarks.

use std::path::PathBuf;
use std::time::Duration;

use kiln_image::cache::Cache;
use kiln_image::progress::PrintProgress;
use kiln_image::template::TemplateImages;
use kiln_vmm::accel::AccelChoice;
use serde::Serialize;

/// Options of every benchmark that runs a daemon in this process and calls its HTTP API.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Artefact cache directory.
    #[arg(long, env = "KILN_CACHE_DIR", default_value = kiln_image::cache::DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of every benchmark that runs an engine in this process.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Artefact cache directory.
    #[arg(long, env = "KILN_CACHE_DIR", default_value = kiln_image::cache::DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

impl EngineArgs {
    /// `template`'s images (spec, directory or name), built into the cache if they are not
    /// there yet.
    pub async fn images(&self, template: &str) -> anyhow::Result<TemplateImages> {
        let spec = crate::template_cmd::resolve_spec(template)?;
        let agent = crate::template_cmd::static_agent()?;
        let cache = Cache::new(&self.cache_dir);
        Ok(tokio::task::spawn_blocking(move || {
            kiln_image::template::build_template(&spec, &agent, &cache, &PrintProgress)
        })
        .await??)
    }
}

/// Percentiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Smallest.
    pub min_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Summary {
    /// Summarises `samples` (must be non-empty).
    pub fn of(samples: &[Duration]) -> Summary {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = ((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
            ms[index]
        };
        Summary {
            count: ms.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
            min_ms: ms.first().copied().unwrap_or(0.0),
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={:.3} ms p99={:.3} ms mean={:.3} ms min={:.3} ms max={:.3} ms",
            self.count, self.p50_ms, self.p99_ms, self.mean_ms, self.min_ms, self.max_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(&samples);
        assert_eq!(
            (s.p50_ms, s.p99_ms, s.min_ms, s.max_ms),
            (50.0, 99.0, 1.0, 100.0)
        );
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
        let one = Summary::of(&[Duration::from_millis(3)]);
        assert_eq!((one.p50_ms, one.p99_ms), (3.0, 3.0));
    }
}
