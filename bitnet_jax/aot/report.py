"""The compile report as the aligned two-column table `python -m
bitnet_jax.compile` prints (`compile_step.compile_report`'s dict, with
`find_batch` added when searched).
"""

from bitnet_jax.aot.tpu import GIB


def format_table(report: dict) -> str:
  """The report as the aligned two-column table the command prints."""
  def gib(key):
    size = report[key]
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else (
        f"{size / 2**20:.1f} MiB")
  mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
  rows = [
      ("topology", f"{report['topology']} ({report['topology_shape']}, "
                   f"{report['num_slices']} slice(s), {report['device_kind']})"),
      ("chips", report["chips"]), ("mesh", mesh),
      ("parameters", f"{report['parameters'] / 1e6:.1f} M"),
      ("global batch x seq", f"{report['batch_size']} x {report['seq_len']}"
                             f" (grad_accum_steps {report['grad_accum_steps']})"),
      ("tokens per step", f"{report['tokens_per_step']:,}"),
      ("quantization / matmul", f"{report['quantization']} / "
                                f"{report['bitlinear_matmul']} "
                                f"({report['dtype']}, remat "
                                f"{report['remat_policy']})"),
      ("memory: arguments", gib("argument_bytes")),
      ("memory: outputs (donated)", f"{gib('output_bytes')} "
                                    f"({gib('alias_bytes')} aliased)"),
      ("memory: temporaries", gib("temp_bytes")),
      ("memory: total per chip", f"{gib('per_chip_bytes')} of "
                                 f"{gib('hbm_bytes')} HBM"),
      ("headroom", f"{100 * report['headroom']:.1f}%"),
      ("fits", "FITS" if report["fits"] else "DOES NOT FIT"),
      ("compile", f"{report['compile_seconds']:.1f} s"),
      ("dots: int8 / bf16 / other", f"{report['int8_dots']} / "
                                    f"{report['bf16_dots']} / "
                                    f"{report['other_dots']}"),
      ("FLOP per chip per step", f"{report['flops_per_chip']:.3e} (HLO, loops "
                                 f"x trip count; XLA counts "
                                 f"{report['xla_flops']:.3e})"),
      ("model FLOP per chip", f"{report['model_flops_per_chip']:.3e} "
                              "(6N + 12LdT)"),
      ("est. step time", "n/a (no cost-model estimate for this slice)"
                         if report["estimated_step_seconds"] is None else
                         f"{report['estimated_step_seconds']:.3f} s (XLA cost "
                         "model, an estimate)"),
      ("est. MFU", "n/a" if report["mfu"] is None else
                   f"{100 * report['mfu']:.1f}%")]
  if "eval_per_chip_bytes" in report:
    rows.append(("eval step memory", gib("eval_per_chip_bytes")))
  for miss in report["bitlinear_not_int8"]:
    rows.append(("NOT int8", f"{miss['source']}: {miss['why']}"))
  if "find_batch" in report:
    f = report["find_batch"]
    rows.append(("largest batch (>=10% free)",
                 f"{f['largest_batch_size']} (remat {f['remat_policy']}, "
                 f"{100 * f['headroom']:.1f}% free); config batch needs "
                 f"grad_accum_steps={f['grad_accum_steps']}"))
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
