"""The end-of-run summary: outcome, files and the next commands."""

import shlex

from bitnet_jax.training import summary


def test_the_next_commands_name_this_runs_workdir():
  text = summary.end_of_run(
      "runs/my run", "stdlib", 100,
      {"step": 100, "loss": 4.5, "eval_loss": 4.75,
       "unique_predictions": 241}, ["copying"], "performance: 99 steps")
  lines = text.splitlines()
  assert lines[0] == "run finished: step 100/100 in runs/my run", lines[0]
  assert "eval_loss 4.7500" in text and "unique_predictions 241" in text
  assert "alarms: copying" in text, text
  commands = lines[lines.index("next:") + 1:]
  for module in ("bitnet_jax.generate", "bitnet_jax.evaluate",
                 "bitnet_jax.convert"):
    command = next((c for c in commands if module in c), None)
    assert command is not None, f"no {module} command in:\n{text}"
    assert "--workdir=runs/my run" in shlex.split(command), (
        f"{command!r} does not give this run's workdir as one argument")


def test_a_stopped_run_says_how_to_continue():
  text = summary.end_of_run("runs/a", "stdlib", 100, {"step": 40}, [], None)
  assert text.startswith("run stopped at step 40 (rerun the same command"), (
      text)
