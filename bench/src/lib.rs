//! Benchmarks of rfid-moe on random checkpoints with the exact shapes of real MoE models: the
//! `decode` binary times the runtime against candle-transformers' own `qwen3_moe` on
//! the same weights; the `compress` binary times compression per stage and layer, with its peak
//! memory and a LAPACK reference of the same matrices. `scripts/gpu-check.sh` runs
//! both, with the checkpoints of [`variants`], on a lent GPU (and on the CPU in CI).

pub mod compressed;
pub mod device_memory;
pub mod host_memory;
pub mod measure;
pub mod reference;
pub mod report;
pub mod synthetic;
pub mod variants;
