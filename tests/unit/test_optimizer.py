"""Two-stage schedule, the weight-decay switch and the decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bitnet_jax.model.transformer import Transformer
from bitnet_jax.optim import optimizer


@pytest.fixture
def d20(load_config):
  return load_config("configs/d20.py")


def _expected_lr(config, step):
  """The documented formula, written independently of optimizer.py."""
  o, total = config.optimizer, config.train.steps
  boundary = round(o.stage_boundary * total)
  if step < o.warmup_steps:
    return o.learning_rate * step / o.warmup_steps
  progress = (step - o.warmup_steps) / (total - 1 - o.warmup_steps)
  line = 1.0 - (1.0 - o.final_learning_rate_fraction) * progress
  return (o.learning_rate if step < boundary else o.stage2_learning_rate) * line


def test_learning_rate_at_the_recipe_milestones(d20):
  schedule = optimizer.learning_rate_schedule(d20)
  boundary = optimizer.stage_boundary_step(d20)
  assert boundary == 10000, "boundary must sit at 50% of 20000 steps"
  for step in (0, 1, 374, 375, 376, 5000, boundary - 1, boundary,
               boundary + 1, 15000, 19999):
    np.testing.assert_allclose(
        schedule(step), _expected_lr(d20, step), rtol=1e-5, atol=1e-9,
        err_msg=f"learning rate at step {step}")
  assert float(schedule(0)) == 0.0, "warmup must start from 0"
  np.testing.assert_allclose(schedule(375), 1.5e-3, rtol=1e-6,
                             err_msg="peak LR not reached at warmup's end")
  drop = float(schedule(boundary)) / float(schedule(boundary - 1))
  np.testing.assert_allclose(drop, 1e-3 / 1.5e-3, rtol=1e-3,
                             err_msg="LR does not drop by stage2/stage1")


def test_weight_decay_switches_off_at_the_boundary(d20):
  schedule = optimizer.weight_decay_schedule(d20)
  boundary = optimizer.stage_boundary_step(d20)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(boundary - 1)) == pytest.approx(0.1), "stage-1 wd"
  assert float(schedule(boundary)) == 0.0, "stage-2 weight decay must be 0.0"
  assert float(schedule(d20.train.steps - 1)) == 0.0


def _params(config):
  model = Transformer(config.model, rngs=nnx.Rngs(0))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _layer_prefixes(config):
  """"layers/0/", "layers/1/", ... unrolled; "layers/" when scanned."""
  if config.model.scan_layers:
    return ["layers/"]
  return [f"layers/{i}/" for i in range(config.model.n_layers)]


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_mask_covers_exactly_the_bitlinear_kernels(tiny_config,
                                                   decay_embeddings,
                                                   scan_layers):
  tiny_config.model.scan_layers = scan_layers
  params = _params(tiny_config)
  mask = _flat(optimizer.weight_decay_mask(params, decay_embeddings))
  decayed = {path for path, on in mask.items() if on}
  expected = {f"{prefix}{module}/{name}/kernel"
              for prefix in _layer_prefixes(tiny_config)
              for module, names in (("self_attn", "qkvo"), ("mlp", None))
              for name in ([f"{c}_proj" for c in names] if names else
                           ["gate_proj", "up_proj", "down_proj"])}
  if decay_embeddings:
    expected |= {"embed_tokens/embedding", "lm_head/kernel"}
  assert decayed == expected, (
      f"decayed but should not: {sorted(decayed - expected)}; "
      f"not decayed but should: {sorted(expected - decayed)}")


def test_applied_hyperparams_follow_the_schedules(tiny_config):
  """The injected values are the ones the update used, step by step."""
  tiny_config.train.steps = 8
  tiny_config.optimizer.warmup_steps = 2
  params = {"w": jnp.ones((2, 2))}
  tx = optimizer.make_optimizer(tiny_config)
  state = tx.init(params)
  lr = optimizer.learning_rate_schedule(tiny_config)
  wd = optimizer.weight_decay_schedule(tiny_config)
  for step in range(8):
    _, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    applied = optimizer.current_hyperparams(state)
    np.testing.assert_allclose(applied["learning_rate"], lr(step), rtol=1e-6,
                               err_msg=f"applied LR at step {step}")
    np.testing.assert_allclose(applied["weight_decay"], wd(step),
                               err_msg=f"applied weight decay at step {step}")


@pytest.mark.slow
def test_weight_decay_shrinks_bitlinear_kernels_only_in_stage_one(tiny_config):
  tiny_config.train.steps = 4
  tiny_config.optimizer.warmup_steps = 0
  tiny_config.optimizer.grad_clip_norm = 0.0
  params = _params(tiny_config)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  tx = optimizer.make_optimizer(tiny_config)
  state = tx.init(params)
  changed = []
  for _ in range(tiny_config.train.steps):  # boundary at step 2
    updates, state = tx.update(zero_grads, state, params)
    changed.append({p for p, u in _flat(updates).items()
                    if np.any(np.asarray(u) != 0)})
  kernel = _layer_prefixes(tiny_config)[0] + "mlp/gate_proj/kernel"
  assert kernel in changed[0] and kernel in changed[1], "no decay in stage 1"
  assert not changed[2] and not changed[3], (
      f"stage 2 still decays {sorted(changed[2])}")
  assert all(not p.endswith("scale") and "embed" not in p
             for p in changed[0]), f"decayed norms/embeddings: {changed[0]}"


def test_gradients_are_clipped_to_the_global_norm_before_adam(tiny_config):
  tiny_config.optimizer.warmup_steps = 0
  tiny_config.optimizer.weight_decay = 0.0
  o = tiny_config.optimizer
  params = {"w": jnp.ones(3)}
  grads = [{"w": jnp.array([300.0, -400.0, 0.0])},  # norm 500 -> clipped
           {"w": jnp.array([0.3, 0.1, -0.2])}]  # norm < 1 -> unchanged
  tx = optimizer.make_optimizer(tiny_config)
  lr = optimizer.learning_rate_schedule(tiny_config)
  reference = optax.inject_hyperparams(optax.adamw)(
      learning_rate=lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=0.0)
  state, ref_state = tx.init(params), reference.init(params)
  for g in grads:
    norm = float(optax.global_norm(g))
    clipped = jax.tree.map(lambda x, n=norm: x * min(1.0, 1.0 / n), g)
    update, state = tx.update(g, state, params)
    expected, ref_state = reference.update(clipped, ref_state, params)
    np.testing.assert_allclose(
        update["w"], expected["w"], rtol=1e-5,
        err_msg="updates differ from AdamW on grads clipped to norm 1.0")
