"""The condition of an example (its class, or nothing): label dropout, the copy's condition, draws, and the U-Net
without a class embedding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import device_array
from selfperc_jax import conditioning
from selfperc_jax.models.unet import UNet

CLASS, NONE = conditioning.Conditioning("class", 10), conditioning.Conditioning("none", 10)


def test_class_conditions_are_the_labels_and_dropout_gives_the_null_class_at_its_rate():
  labels = jnp.arange(4000, dtype=jnp.int32) % 10
  y = CLASS.from_labels(labels)
  np.testing.assert_array_equal(y, labels)
  dropped = CLASS.drop(jax.random.key(0), y, 0.25)
  null = np.asarray(dropped) == 10
  assert 0.22 < null.mean() < 0.28  # 1000 expected of 4000
  np.testing.assert_array_equal(np.asarray(dropped)[~null], np.asarray(labels)[~null])
  assert CLASS.null == 10 and CLASS.model_classes == 10
  np.testing.assert_array_equal(CLASS.for_copy(y, "null"), np.full(4000, 10))
  np.testing.assert_array_equal(CLASS.for_copy(y, "same"), labels)


def test_unconditional_has_no_condition_to_drop_or_guide_with():
  labels = jnp.arange(100, dtype=jnp.int32) % 10
  y = NONE.from_labels(labels)
  np.testing.assert_array_equal(y, np.zeros(100))  # the data set's labels never reach the model
  np.testing.assert_array_equal(NONE.drop(jax.random.key(0), y, 0.5), y)
  np.testing.assert_array_equal(NONE.for_copy(y, "null"), y)
  assert NONE.null is None and NONE.model_classes == 0 and not NONE.conditional


def test_draws_are_class_balanced_or_unlabelled():
  np.testing.assert_array_equal(CLASS.draw(25), np.repeat(np.arange(10), 3))  # rounded up to 3 per class
  np.testing.assert_array_equal(CLASS.draw(4, classes=(7, 2)), [7, 7, 2, 2])
  np.testing.assert_array_equal(conditioning.class_labels(5, 1000), [0, 250, 500, 749, 999])
  np.testing.assert_array_equal(NONE.draw(25), np.zeros(25))  # exactly as many as asked, not rounded to classes


def test_an_unknown_kind_is_refused():
  with pytest.raises(ValueError, match="condition='text2' is not known"):
    conditioning.Conditioning("text2", 10)


def test_the_unconditional_unet_has_no_class_embedding_and_ignores_y():
  kw = dict(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), out_channels=1)
  x, t = jax.random.normal(jax.random.key(1), (3, 8, 8, 1)), jnp.array([0.1, 0.5, 0.9])
  model = UNet(num_classes=NONE.model_classes, **kw)
  # The trees' shapes (abstract inits: running the initialisers adds nothing here), then values that are not zero
  # (a fresh output conv is).
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, jnp.zeros(3, jnp.int32))["params"]
  assert "class_embed" not in shapes
  conditional = jax.eval_shape(UNet(num_classes=10, **kw).init, jax.random.key(0), x, t, jnp.zeros(3, jnp.int32))
  assert set(conditional["params"]) - set(shapes) == {"class_embed"}
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: device_array(0.3 * rng.normal(size=s.shape)), shapes)
  apply = jax.jit(model.apply)  # one program for both calls (eagerly, one per operation)
  a = apply({"params": params}, x, t, jnp.zeros(3, jnp.int32))
  b = apply({"params": params}, x, t, jnp.array([3, 7, 9], jnp.int32))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a).max()) > 0
