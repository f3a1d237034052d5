"""What the model is conditioned on, decided once from the config (`condition`): the class of each example (digits,
ImageNet), or nothing (unconditional). The step, the copy of the perceptual loss, classifier-free guidance and the
draws of samples and evaluations take the condition through this module, and branch on nothing else.

A condition is an int32 per example, `y` (what `models.unet.UNet` takes):
- 'class': the example's class; `null` (= num_classes) is the "no class" input of classifier-free guidance and of
  label dropout. Draws are class-balanced and class-sorted (one grid row per class).
- 'none': every y is 0 and the U-Net has no class embedding, so y reaches nothing; there is no null condition, no
  label dropout and no guidance (validation refuses settings that need them). Draws are unlabelled: y = 0 for all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("class", "none")


@dataclasses.dataclass(frozen=True)
class Conditioning:
  kind: str = "class"
  num_classes: int = 10  # the data set's

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"condition={self.kind!r} is not known; choose one of {KINDS}.")

  @property
  def conditional(self) -> bool:
    return self.kind != "none"

  @property
  def model_classes(self) -> int:
    """The class count the U-Net embeds (0: no class embedding)."""
    return self.num_classes if self.conditional else 0

  @property
  def null(self) -> int | None:
    """The condition that says "no class" (guidance, label dropout); None when there is no condition at all."""
    return self.num_classes if self.conditional else None

  def from_labels(self, labels: jax.Array) -> jax.Array:
    """The condition of a batch of examples with these data-set labels."""
    labels = jnp.asarray(labels, jnp.int32)
    return labels if self.conditional else jnp.zeros_like(labels)

  def drop(self, key: jax.Array, y: jax.Array, rate: float) -> jax.Array:
    """Each example's condition replaced by the null one with probability `rate` (training for guidance). The draw
    is made whatever the kind, so that the step's other random numbers do not depend on it."""
    dropped = jax.random.uniform(key, y.shape[:1]) < rate
    return jnp.where(dropped, self.null, y) if self.conditional else y

  def for_copy(self, y: jax.Array, which: str) -> jax.Array:
    """The condition the perceptual copy sees: the online model's ('same') or the null one ('null')."""
    if which == "same" or not self.conditional:
      return y
    return jnp.full_like(y, self.null)

  def draw(self, num_samples: int, classes=()) -> np.ndarray:
    """The conditions of a draw of num_samples samples: `class_labels` of `classes` (empty: all) for 'class';
    num_samples zeros for 'none'."""
    if not self.conditional:
      return np.zeros(int(num_samples), np.int32)
    return class_labels(int(num_samples), self.num_classes, classes)


def class_labels(num_samples: int, num_classes: int, classes=()) -> np.ndarray:
  """Class-sorted labels of `classes` (empty: all), num_samples rounded up to a multiple of their count (one grid
  row per class); fewer samples than classes: one each of num_samples classes spread evenly over them."""
  classes = np.asarray(classes, np.int32) if len(classes) else np.arange(num_classes, dtype=np.int32)
  if num_samples < len(classes):
    return classes[np.round(np.linspace(0, len(classes) - 1, num_samples)).astype(np.int64)]
  per_class = -(-num_samples // len(classes))
  return np.repeat(classes, per_class)


def from_config(config) -> Conditioning:
  return Conditioning(kind=config.condition, num_classes=int(config.model.num_classes))
