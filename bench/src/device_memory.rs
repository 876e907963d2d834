//! Peak device memory during a run, sampled from the CUDA driver (`cuMemGetInfo` through
//! candle's `cudarc`) on a background thread; not measured on the CPU or without `cuda`.

/// Samples the device's used memory until stopped.
pub struct DeviceMemorySampler {
    #[cfg(feature = "cuda")]
    inner: Option<cuda::Sampler>,
}

/// Device memory figures of a run, bytes.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DeviceMemory {
    /// Used before the run (other processes, the context).
    pub baseline_used: u64,
    /// Largest used memory seen during the run.
    pub peak_used: u64,
    /// The device's total memory.
    pub total: u64,
}

impl DeviceMemory {
    /// The run's own peak: peak used minus the baseline.
    pub fn peak_above_baseline(&self) -> u64 {
        self.peak_used.saturating_sub(self.baseline_used)
    }
}

impl DeviceMemorySampler {
    /// Starts sampling the device named `device` (`cuda` or `cuda:N`); samples nothing for
    /// `cpu` or in a build without the `cuda` feature.
    pub fn start(device: &str) -> anyhow::Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let inner = match device {
                "cpu" => None,
                name => Some(cuda::Sampler::start(name)?),
            };
            Ok(Self { inner })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self {})
        }
    }

    /// Stops sampling; `None` when nothing was measured.
    pub fn stop(self) -> Option<DeviceMemory> {
        #[cfg(feature = "cuda")]
        {
            self.inner.and_then(cuda::Sampler::stop)
        }
        #[cfg(not(feature = "cuda"))]
        {
            None
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use candle_core::cuda_backend::cudarc::driver::CudaContext;

    use super::DeviceMemory;

    /// How often the driver is asked.
    const PERIOD: Duration = Duration::from_millis(20);

    pub struct Sampler {
        stop: Arc<AtomicBool>,
        peak: Arc<AtomicU64>,
        baseline_used: u64,
        total: u64,
        thread: JoinHandle<()>,
    }

    fn used(context: &CudaContext) -> Option<(u64, u64)> {
        let (free, total) = context.mem_get_info().ok()?;
        Some(((total - free) as u64, total as u64))
    }

    impl Sampler {
        pub fn start(name: &str) -> anyhow::Result<Self> {
            let device = rfid_moe::pipeline::parse_device(name)?;
            let candle_core::Device::Cuda(cuda) = device else {
                anyhow::bail!("device `{name}` is not a CUDA device");
            };
            let context: Arc<CudaContext> = cuda.cuda_stream().context().clone();
            let (baseline_used, total) =
                used(&context).ok_or_else(|| anyhow::anyhow!("cuMemGetInfo failed on `{name}`"))?;
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicU64::new(baseline_used));
            let (thread_stop, thread_peak) = (stop.clone(), peak.clone());
            let thread = std::thread::spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    if let Some((now, _)) = used(&context) {
                        thread_peak.fetch_max(now, Ordering::Relaxed);
                    }
                    std::thread::sleep(PERIOD);
                }
            });
            Ok(Self {
                stop,
                peak,
                baseline_used,
                total,
                thread,
            })
        }

        pub fn stop(self) -> Option<DeviceMemory> {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().ok()?;
            Some(DeviceMemory {
                baseline_used: self.baseline_used,
                peak_used: self.peak.load(Ordering::Relaxed),
                total: self.total,
            })
        }
    }
}
