"""The compile report as the aligned two-column table `python -m
bitnet_jax.compile` prints (`compile_step.compile_report`'s dict, with
`find_batch` added when searched). Sizes in GiB (MiB below 0.1 GiB).
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
                   f"{report['device_kind']})"),
      ("devices / hosts", f"{report['chips']} / {report['hosts']}"),
      ("mesh", mesh),
      ("parameters", f"{report['parameters'] / 1e6:.1f} M"),
      ("global batch x seq", f"{report['batch_size']} x {report['seq_len']}"
                             f" (grad_accum_steps {report['grad_accum_steps']})"),
      ("tokens per step", f"{report['tokens_per_step']:,}"),
      ("quantization / matmul", f"{report['quantization']} / "
                                f"{report['bitlinear_matmul']} "
                                f"({report['dtype']}, remat "
                                f"{report['remat_policy']}, loss chunk "
                                f"{report['loss_chunk_size'] or 'all'}, "
                                f"mu {report['mu_dtype']})"),
      ("memory: arguments", gib("argument_bytes")),
      ("memory: outputs (donated)", f"{gib('output_bytes')} "
                                    f"({gib('alias_bytes')} aliased)"),
      ("memory: temporaries", gib("temp_bytes")),
      ("memory: total per device", f"{gib('per_chip_bytes')} of "
                                   f"{gib('memory_limit_bytes')} usable "
                                   f"({report['memory_limit_why']}; device "
                                   f"{gib('hbm_bytes')})"),
      ("headroom", f"{100 * report['headroom']:.1f}% of usable"),
      ("fits", "FITS" if report["fits"] else "DOES NOT FIT"),
      ("compile", f"{report['compile_seconds']:.1f} s"
                  + (f" ({report['compile_note']})"
                     if report.get("compile_note") else "")),
      ("kernels", report["kernels"]),
      ("dots: int8 / bf16 / other", f"{report['int8_dots']} / "
                                    f"{report['bf16_dots']} / "
                                    f"{report['other_dots']} (int8: "
                                    f"{report['int8_fused_dots']} dots, "
                                    f"{report['int8_cublas_calls']} cuBLAS "
                                    f"calls; {report['int8_dot_executions']}"
                                    " executions per step)"),
      ("FLOP per device per step", f"{report['flops_per_chip']:.3e} (HLO "
                                   "matmuls + cuDNN attention, loops x trip "
                                   f"count; XLA counts "
                                   f"{report['xla_flops']:.3e})"),
      ("model FLOP per device", f"{report['model_flops_per_chip']:.3e} "
                                "(6N + 12LdT)"),
      ("bytes moved per device", f"{report['bytes_per_chip'] / GIB:.2f} GiB "
                                 "(kernel operands + results, an estimate)"),
      ("roofline", f"{report['roofline_compute_seconds']:.4f} s compute, "
                   f"{report['roofline_memory_seconds']:.4f} s memory "
                   f"({report['roofline_bound']}-bound)"),
      ("est. step time", "n/a" if report["estimated_step_seconds"] is None
                         else f"{report['estimated_step_seconds']:.4f} s "
                              f"({report['step_estimate']})"),
      ("est. MFU", "n/a" if report["mfu"] is None else
                   f"{100 * report['mfu']:.1f}% (an estimate)")]
  if "eval_per_chip_bytes" in report:
    rows.append(("eval step memory", gib("eval_per_chip_bytes")))
  for miss in report["bitlinear_not_int8"]:
    rows.append(("NOT int8", f"{miss['source']}: {miss['why']}"))
  if "find_batch" in report:
    rows.extend(find_batch_rows(report["find_batch"]))
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def find_batch_rows(found: dict) -> list[tuple[str, str]]:
  """`find_batch.find_batch`'s result as report rows: one per remat policy,
  then the best."""
  rows = []
  for policy, result in found["policies"].items():
    if "largest_batch_size" not in result:
      rows.append((f"batch, remat {policy}", "one sequence per device does "
                                            "not fit"))
      continue
    speed = (f", est. {result['tokens_per_sec']:,.0f} tokens/s"
             if result["tokens_per_sec"] else "")
    rows.append((f"batch, remat {policy}",
                 f"{result['largest_batch_size']} "
                 f"({100 * result['headroom']:.1f}% free{speed})"))
  rows.append(("best (>=10% free)",
               f"remat {found['remat_policy']}, batch "
               f"{found['largest_batch_size']}; the config's batch needs "
               f"grad_accum_steps={found['grad_accum_steps']}"))
  return rows
