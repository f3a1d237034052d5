"""What the model is conditioned on, decided once from the config (`condition`): the class of each example (digits,
ImageNet), a text prompt's embedding (Stable Diffusion), or nothing (unconditional). The step, the copy of the
perceptual loss, classifier-free guidance and the draws of samples and evaluations take the condition through this
module, and branch on nothing else.

A condition `y` is what the model takes beside x and t, one per example:
- 'class': the example's class, int32; `null` (= num_classes) is the "no class" input of classifier-free guidance and
  of label dropout. Draws are class-balanced and class-sorted (one grid row per class).
- 'text': the text encoder's hidden states of the example's prompt, float32 (L, D) (selfperc_jax/text.py; SD: 77 x
  1024); `null` is the empty prompt's, as Stable Diffusion trains and guides. A data set with captions per class
  (the digits) gives each training example one of its class's captions, drawn per step on the devices
  (`from_labels` with a key; the captions' embeddings are a table of the step); a batch may also carry the
  embeddings themselves (float (B, L, D) labels). Image-caption data (data/captioned.py) give each example its
  caption's token ids (int32 (B, L) labels), which the frozen text encoder (`text_model`, its params an argument
  of the step, never trained or checkpointed) turns into embeddings in the step. A draw is a prompt index per sample
  (sample.prompts, each repeated alike: one grid row per prompt); `model_inputs` turns the indices of a chunk into
  their embeddings on the host (encoding that chunk's prompts then), so no host holds a table of every prompt.
  Guidance's unconditional input is the
  negative prompt's embedding where sample.negative_prompt is set (`guidance_null`), as in diffusers' pipelines.
- 'none': every y is 0 and the U-Net has no class embedding, so y reaches nothing; there is no null condition, no
  label dropout and no guidance (validation refuses settings that need them). Draws are unlabelled: y = 0 for all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("class", "text", "none")


@dataclasses.dataclass(frozen=True, eq=False)
class Conditioning:
  kind: str = "class"
  num_classes: int = 10  # the data set's ('class')
  # 'text': the empty prompt's (L, D) embedding, the prompts' (P, L, D) of a draw (or, for prompts encoded a chunk at
  # a time, prompt_encoder: indices -> their (n, L, D) embeddings, and num_prompts), the negative prompt's (L, D) or
  # None, the data set's captions (classes x K, L, D: K per class, class-major) or None.
  null_embedding: np.ndarray | None = None
  prompt_embeddings: np.ndarray | None = None
  prompt_encoder: object | None = None
  num_prompts: int = 0
  negative_embedding: np.ndarray | None = None
  caption_embeddings: np.ndarray | None = None
  captions_per_class: int = 0
  # 'text' on image-caption data: the text encoder (a flax module, third_party/clip_text) that the step runs on the
  # batch's token ids with the params it is given; its context length.
  text_model: object | None = None
  text_tokens: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"condition={self.kind!r} is not known; choose one of {KINDS}.")
    if self.kind == "text" and self.null_embedding is None:
      raise ValueError("condition='text' needs the empty prompt's embedding (null_embedding).")

  @property
  def conditional(self) -> bool:
    return self.kind != "none"

  @property
  def model_classes(self) -> int:
    """The class count the U-Net embeds (0: no class embedding)."""
    return self.num_classes if self.kind == "class" else 0

  @property
  def null(self):
    """The condition that says "no class" / "no prompt" (label dropout, guidance): the null class (int), the empty
    prompt's embedding (an (L, D) array); None when there is no condition at all."""
    if self.kind == "text":
      return self.null_embedding
    return self.num_classes if self.conditional else None

  @property
  def guidance_null(self):
    """Guidance's unconditional input: the negative prompt's embedding where one is set, else `null`."""
    if self.kind == "text" and self.negative_embedding is not None:
      return self.negative_embedding
    return self.null

  def example(self, batch: int = 1) -> jax.ShapeDtypeStruct:
    """The shape and dtype of a batch of the model's conditions (its init)."""
    if self.kind == "text":
      return jax.ShapeDtypeStruct((batch,) + self.null_embedding.shape, jnp.float32)
    return jax.ShapeDtypeStruct((batch,), jnp.int32)

  def batch_label(self, batch: int) -> jax.ShapeDtypeStruct:
    """The shape and dtype of a training batch's 'label': the class (also for captioned text), or the text
    embeddings where there are no captions to draw from."""
    if self.text_model is not None:
      return jax.ShapeDtypeStruct((batch, self.text_tokens), jnp.int32)
    if self.kind == "text" and self.caption_embeddings is None:
      return self.example(batch)
    return jax.ShapeDtypeStruct((batch,), jnp.int32)

  def from_labels(self, labels: jax.Array, key: jax.Array | None = None, text_params=None) -> jax.Array:
    """The condition of a batch of examples with these data-set labels: the class; for text, one caption of the
    example's class, drawn with `key` (each of its K alike), the text encoder's hidden states of the labels where
    they are token ids (with its `text_params`), or the labels themselves where they are embeddings."""
    if self.kind == "text":
      if self.text_model is not None:
        if text_params is None:
          raise ValueError("token-id labels need the text encoder's params (text_params)")
        hidden = self.text_model.apply(text_params, jnp.asarray(labels, jnp.int32)).last_hidden_state
        return jax.lax.stop_gradient(hidden.astype(jnp.float32))
      if self.caption_embeddings is None:
        return jnp.asarray(labels, jnp.float32)
      k = self.captions_per_class
      pick = jax.random.randint(key, labels.shape, 0, k) if k > 1 else jnp.zeros_like(labels)
      return jnp.asarray(self.caption_embeddings)[labels * k + pick]
    labels = jnp.asarray(labels, jnp.int32)
    return labels if self.conditional else jnp.zeros_like(labels)

  def _null_like(self, y: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(self.null, y.dtype), y.shape)

  def drop(self, key: jax.Array, y: jax.Array, rate: float) -> jax.Array:
    """Each example's condition replaced by the null one with probability `rate` (training for guidance). The draw
    is made whatever the kind, so that the step's other random numbers do not depend on it."""
    dropped = jax.random.uniform(key, y.shape[:1]) < rate
    if not self.conditional:
      return y
    return jnp.where(dropped.reshape((-1,) + (1,) * (y.ndim - 1)), self._null_like(y), y)

  def for_copy(self, y: jax.Array, which: str) -> jax.Array:
    """The condition the perceptual copy sees: the online model's ('same') or the null one ('null')."""
    if which == "same" or not self.conditional:
      return y
    return self._null_like(y)

  def draw(self, num_samples: int, classes=()) -> np.ndarray:
    """The conditions of a draw of num_samples samples: `class_labels` of `classes` (empty: all) for 'class'; prompt
    indices for 'text' (each prompt alike, in order: `class_labels` over the prompts); num_samples zeros for
    'none'."""
    if not self.conditional:
      return np.zeros(int(num_samples), np.int32)
    if self.kind == "text":
      if not self.prompt_count:
        from selfperc_jax import text

        raise text.no_prompts()
      return class_labels(int(num_samples), self.prompt_count)
    return class_labels(int(num_samples), self.num_classes, classes)

  @property
  def prompt_count(self) -> int:
    return len(self.prompt_embeddings) if self.prompt_embeddings is not None else int(self.num_prompts)

  def model_inputs(self, drawn: np.ndarray) -> np.ndarray:
    """What the model takes for the conditions of a draw (on the host, a chunk at a time): the drawn labels
    themselves, or for 'text' the embeddings of the drawn prompt indices (each distinct prompt encoded once)."""
    if self.kind == "text":
      drawn = np.asarray(drawn)
      if self.prompt_embeddings is not None:
        return self.prompt_embeddings[drawn]
      unique, inverse = np.unique(drawn, return_inverse=True)
      return self.prompt_encoder(unique)[inverse.reshape(drawn.shape)]
    return np.asarray(drawn, np.int32)


def class_labels(num_samples: int, num_classes: int, classes=()) -> np.ndarray:
  """Class-sorted labels of `classes` (empty: all), num_samples rounded up to a multiple of their count (one grid
  row per class); fewer samples than classes: one each of num_samples classes spread evenly over them."""
  classes = np.asarray(classes, np.int32) if len(classes) else np.arange(num_classes, dtype=np.int32)
  if num_samples < len(classes):
    return classes[np.round(np.linspace(0, len(classes) - 1, num_samples)).astype(np.int64)]
  per_class = -(-num_samples // len(classes))
  return np.repeat(classes, per_class)


def from_config(config) -> Conditioning:
  """The config's conditioning; 'text' encodes the empty prompt, sample.prompts (+ sample.prompts_file) and
  sample.negative_prompt with the text encoder of config.pretrained (once per process: selfperc_jax/text.py)."""
  if config.condition != "text":
    return Conditioning(kind=config.condition, num_classes=int(config.model.num_classes))
  from selfperc_jax import text

  encoded = text.encode_for_config(config)
  per_class = len(text.captions_of(config)[0]) if encoded.captions is not None else 0
  in_step = {}
  if text.captioned(config):  # the batch holds token ids: the encoder runs in the step
    encoder = text.encoder(text.folder_of(config))
    in_step = {"text_model": encoder.model, "text_tokens": int(encoder.tokenizer.max_length)}
  return Conditioning(kind="text", num_classes=0, null_embedding=encoded.null,
                      prompt_encoder=text.prompt_encoder(text.folder_of(config), encoded.prompts),
                      num_prompts=len(encoded.prompts), negative_embedding=encoded.negative,
                      caption_embeddings=encoded.captions, captions_per_class=per_class, **in_step)


def frozen_params(config):
  """What the step takes beside the state and never trains: {'text': the text encoder's variables} where the
  condition is a caption's token ids (image-caption data), else {} (host arrays; the caller places them)."""
  from selfperc_jax import text

  if config.condition != "text" or not text.captioned(config):
    return {}
  return {"text": jax.tree.map(np.asarray, text.encoder(text.folder_of(config)).variables)}
