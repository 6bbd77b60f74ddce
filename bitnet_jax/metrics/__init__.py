"""Metrics: what is measured and where it is written.

  statistics  prediction statistics of the eval set, summed on device in the
              jitted eval step and summarized on the host (accuracy and the
              collapse signals)
  throughput  tokens/s, step time, FLOPs per token, MFU (`Throughput`)
  writers     metrics.jsonl, TensorBoard, samples.jsonl and the console line
              (`MetricWriter`, `read_records`)

The names below are the package's public interface.
"""

from bitnet_jax.metrics.statistics import prediction_statistics, summarize_eval
from bitnet_jax.metrics.throughput import (
                                           PEAK_FLOPS_PER_DEVICE,
                                           Throughput,
                                           device_peak_flops,
                                           flops_per_token,
                                           matmul_params,
                                           peak_flops,
)
from bitnet_jax.metrics.writers import (
                                           MetricWriter,
                                           RunFileError,
                                           console_line,
                                           final_metrics,
                                           log_console,
                                           read_records,
)

__all__ = ["PEAK_FLOPS_PER_DEVICE", "MetricWriter", "RunFileError",
           "Throughput",
           "console_line", "device_peak_flops", "final_metrics",
           "flops_per_token", "log_console", "matmul_params", "peak_flops",
           "prediction_statistics", "read_records", "summarize_eval"]
