"""The CLIP text encoder Stable Diffusion conditions on, in Flax linen, with the layout of Hugging Face transformers'
`CLIPTextModel`.

The network is the text tower of CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural
Language Supervision"): OpenAI's ViT-L/14 text transformer for Stable Diffusion 1.x, and the text tower of OpenCLIP's
ViT-H/14 (LAION-2B) for Stable Diffusion 2.x, as diffusers' pipelines store them in `text_encoder/` (transformers'
`CLIPTextModel`). The submodule names follow that model's state dict, so its tensors map onto the Flax variables name
for name (`convert.py` does that and checks it):

    transformers (PyTorch)                                   Flax, under params
    embeddings.token_embedding.weight (vocab, hidden)        ['embeddings']['token_embedding']['embedding']
    embeddings.position_embedding.weight (77, hidden)        ['embeddings']['position_embedding']['embedding']
    encoder.layers.3.self_attn.q_proj.weight (out, in)       ['encoder']['layers_3']['self_attn']['q_proj']['kernel']
    encoder.layers.3.mlp.fc1.weight / .bias                  ['encoder']['layers_3']['mlp']['fc1']['kernel'] / ['bias']
    encoder.layers.3.layer_norm1.weight                      ['encoder']['layers_3']['layer_norm1']['scale']
    final_layer_norm.weight                                  ['final_layer_norm']['scale']

(the published `text_encoder/model.safetensors` files, written by transformers 4.x, have every name under
`text_model.`; transformers 5 dropped that prefix; the converter reads both).

The architecture (configurable by `CLIPTextConfig`; `SD1` and `SD2` are the full-size ones):

- embeddings: token_embedding(ids) + position_embedding(0 .. L-1) (learned absolute positions, L <= 77).
- `num_hidden_layers` pre-LayerNorm transformer layers: x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x)),
  mlp = fc2(act(fc1(x))). Self-attention: q/k/v/out projections with bias, `num_attention_heads` heads, scale
  1/sqrt(head dim), CAUSAL (each token sees itself and the tokens before it), computed by
  jax.nn.dot_product_attention with is_causal=True (or an explicit lower-triangular mask: `explicit_causal_mask`).
  act: `quick_gelu` x * sigmoid(1.702 x) (SD 1.x, OpenAI CLIP) or `gelu`, the exact erf GELU (SD 2.x, OpenCLIP).
- final_layer_norm (LayerNorm eps `layer_norm_eps`, 1e-5).

Outputs (`CLIPTextOutput`):

- `last_hidden_state` (N, L, hidden): the last layer's output after final_layer_norm. This is what SD 1.x and SD 2.x
  condition their U-Net on: diffusers' StableDiffusionPipeline.encode_prompt passes
  `prompt_embeds = text_encoder(input_ids, attention_mask=None)[0]`, i.e. last_hidden_state (no attention mask:
  the SD 1.x / 2.x text_encoder configs do not set use_attention_mask). With `clip_skip=k` the pipeline instead
  takes hidden_states[-(k + 1)] through final_layer_norm; `__call__(..., clip_skip=k)` does the same (and runs only
  the layers it needs). SD 2.x's "penultimate layer" of OpenCLIP's 24-layer tower is built into the stored folder,
  which keeps 23 layers only: its last_hidden_state IS the penultimate layer, normed.
- `pooler_output` (N, hidden): the EOS token's row of last_hidden_state, picked as transformers' CLIPTextModel picks
  it: with `eos_token_id == 2` (the legacy value in the SD 1.x / SD 2.x configs) at the argmax of the input ids (the
  EOS token 49407 is CLIP's highest id; the first occurrence wins), otherwise at the first position whose id equals
  `eos_token_id`. SD 1.x / 2.x do not use it (SDXL's text_encoder_2, which does, adds a projection not here).
- `hidden_states` (with output_hidden_states=True): transformers' tuple, the embeddings' output and then each layer's
  output, before the final norm (num_hidden_layers + 1 arrays).

Tokenization is not part of this module: it takes token ids (N, L) (SD: L = 77, padded as the tokenizer of the
folder pads).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfperc_jax.errors import UserError

ACTIVATIONS = ("quick_gelu", "gelu")
LEGACY_EOS_TOKEN_ID = 2  # transformers: pooled output at argmax(ids) for this value


class CLIPTextInputError(UserError, ValueError):
  """Inputs or a config the text encoder cannot take."""


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The hyperparameters of the layout, under transformers' CLIPTextConfig keys of the same names. The defaults are
  SD 2.x's OpenCLIP ViT-H/14 text tower as stored (23 layers); `SD1` is OpenAI's CLIP ViT-L/14 text tower."""

  vocab_size: int = 49408
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 23
  num_attention_heads: int = 16
  max_position_embeddings: int = 77
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = LEGACY_EOS_TOKEN_ID

  def __post_init__(self):
    problems = []
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"{name} must be a positive int (got {value!r})")
    if not problems and self.hidden_size % self.num_attention_heads:
      problems.append(f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}")
    if self.hidden_act not in ACTIVATIONS:
      problems.append(f"hidden_act {self.hidden_act!r} is not implemented (only {' / '.join(ACTIVATIONS)})")
    if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
      problems.append(f"eos_token_id must be an int (got {self.eos_token_id!r})")
    if problems:
      raise CLIPTextInputError("invalid CLIPTextConfig: " + "; ".join(problems) + ".")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  # transformers config keys that this implementation requires at a given value.
  _FIXED = {"attention_dropout": 0.0, "dropout": 0.0, "model_type": "clip_text_model"}
  _ARCHITECTURES = ("CLIPTextModel",)

  @classmethod
  def from_transformers_config(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    """From the dict of a transformers CLIPTextConfig (a diffusers folder's `text_encoder/config.json`). Keys that
    change nothing here (`projection_dim`, `bos_token_id`, `pad_token_id`, `initializer_*`, `torch_dtype`, versions and
    transformers' generic config keys) are ignored; every value this implementation does not support (another
    activation, dropout, a projection head, a whole CLIPModel config, ...) is named in one CLIPTextInputError."""
    if not isinstance(config, Mapping):
      raise CLIPTextInputError(f"a CLIP text config must be a dict; got {type(config).__name__}.")
    unsupported = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in cls._FIXED.items()
                   if k in config and config[k] != v]
    architectures = config.get("architectures") or []
    other = [a for a in architectures if a not in cls._ARCHITECTURES]
    if other:
      unsupported.append(f"architectures={list(architectures)!r} (only CLIPTextModel: no text projection)")
    if "text_config" in config or "vision_config" in config:
      unsupported.append("text_config / vision_config (a whole CLIPModel config: pass its text tower's "
                         "text_encoder/config.json)")
    if config.get("hidden_act", "gelu") not in ACTIVATIONS:
      unsupported.append(f"hidden_act={config['hidden_act']!r} (supported: {' / '.join(ACTIVATIONS)})")
    if unsupported:
      raise CLIPTextInputError("this CLIP text config uses what the Flax CLIP text encoder does not implement: "
                               + "; ".join(unsupported) + ". It implements transformers' CLIPTextModel (SD 1.x / "
                               "2.x text encoders) only.")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields and v is not None}
    return cls(**kwargs)


SD2 = CLIPTextConfig()  # SD 2.x: OpenCLIP ViT-H/14 text tower as stored, 23 layers (340,387,840 parameters)
SD1 = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     hidden_act="quick_gelu")  # SD 1.x: OpenAI CLIP ViT-L/14 text tower (123,060,480)
CONFIGS = {"sd2": SD2, "sd1": SD1}


def config_for(variant: str) -> CLIPTextConfig:
  """The full-size config of a released text encoder: 'sd2' (SD 2.x) or 'sd1' (SD 1.x)."""
  if variant not in CONFIGS:
    raise CLIPTextInputError(f"unknown SD text encoder variant {variant!r}; expected one of {sorted(CONFIGS)}.")
  return CONFIGS[variant]


def quick_gelu(x):
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
  return quick_gelu if name == "quick_gelu" else (lambda x: nn.gelu(x, approximate=False))


def _precision_name(precision) -> str | None:
  if precision is None:
    return None
  if isinstance(precision, str):
    return precision
  return jax.lax.Precision(precision).name.lower()


class CLIPTextOutput(NamedTuple):
  last_hidden_state: jax.Array  # (N, L, hidden) float32, after final_layer_norm: SD's conditioning
  pooler_output: jax.Array  # (N, hidden) float32, the EOS token's row of last_hidden_state
  hidden_states: tuple | None = None  # embeddings + each layer's output (before the final norm), float32


class _Layers(nn.Module):
  config: CLIPTextConfig = SD2
  dtype: Any = jnp.float32
  precision: Any = None

  def dense(self, features, name):
    return nn.Dense(features, dtype=self.dtype, precision=self.precision, name=name)

  def layer_norm(self, name):
    # Two-pass variance in float32, as PyTorch's LayerNorm computes it.
    return nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name=name)


class CLIPTextEmbeddings(_Layers):
  """token_embedding(ids) + position_embedding(positions 0 .. L-1)."""

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.config
    tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPAttention(_Layers):
  """Causal multi-head self-attention: q_proj / k_proj / v_proj (with bias), jax.nn.dot_product_attention (scale
  1/sqrt(head dim), softmax in float32), out_proj. `mask` (N, 1, 1, L) bool: False keys are not attended to."""

  implementation: str | None = None
  explicit_causal_mask: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    n, length, c = x.shape
    heads = self.config.num_attention_heads
    shape = lambda a: a.reshape(n, length, heads, c // heads)  # noqa: E731
    q = shape(self.dense(c, "q_proj")(x))
    k = shape(self.dense(c, "k_proj")(x))
    v = shape(self.dense(c, "v_proj")(x))
    is_causal = not self.explicit_causal_mask
    if self.explicit_causal_mask:
      causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
      mask = causal if mask is None else jnp.logical_and(mask, causal)

    def attend():
      return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=self.implementation)

    precision = _precision_name(self.precision)
    if precision is not None:  # the products inside at the requested precision (HIGHEST: full float32)
      with jax.default_matmul_precision(precision):
        out = attend()
    else:
      out = attend()
    return self.dense(c, "out_proj")(out.reshape(n, length, c))


class CLIPMLP(_Layers):
  """fc1 (hidden -> intermediate), the activation, fc2 (back to hidden)."""

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = _activation(cfg.hidden_act)(self.dense(cfg.intermediate_size, "fc1")(x))
    return self.dense(cfg.hidden_size, "fc2")(h)


class CLIPEncoderLayer(_Layers):
  """x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

  implementation: str | None = None
  explicit_causal_mask: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    x = x + CLIPAttention(self.config, self.dtype, self.precision, self.implementation, self.explicit_causal_mask,
                          name="self_attn")(self.layer_norm("layer_norm1")(x), mask)
    return x + CLIPMLP(self.config, self.dtype, self.precision, name="mlp")(self.layer_norm("layer_norm2")(x))


class CLIPEncoder(_Layers):
  """The transformer layers `layers_<i>`; returns every layer's output (the first `num_layers` layers only)."""

  implementation: str | None = None
  explicit_causal_mask: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask=None, num_layers=None):
    layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
    outputs = []
    for i in range(self.config.num_hidden_layers if num_layers is None else num_layers):
      x = layer(self.config, self.dtype, self.precision, self.implementation, self.explicit_causal_mask,
                name=f"layers_{i}")(x, mask)
      outputs.append(x)
    return outputs


class CLIPTextModel(nn.Module):
  """The CLIP text encoder. `__call__(input_ids, attention_mask=None)` -> CLIPTextOutput (float32 arrays).

  input_ids: (N, L) integer token ids, L <= max_position_embeddings (SD: 77). attention_mask: optional (N, L), 1 for
  tokens to attend to and 0 for padding, combined with the causal mask as transformers does (SD 1.x / 2.x pass
  none). `output_hidden_states=True` also returns transformers' hidden_states tuple. `clip_skip=k` (diffusers'
  meaning): last_hidden_state is final_layer_norm(hidden_states[-(k + 1)]), and only the layers it needs run (the
  pooled output is then taken from that state).

  `dtype` is the compute dtype (params stay float32; LayerNorm statistics and the attention softmax in float32,
  outputs float32). `precision`: the matmul precision (None: the backend's default; 'highest' for full float32 on
  TPUs and TF32 GPUs). `attention`: jax.nn.dot_product_attention's implementation (None: XLA chooses; 'xla';
  'cudnn'). `explicit_causal_mask`: build the (L, L) lower-triangular mask instead of passing is_causal=True (the same
  result; tests/test_clip_text.py checks that on CPU). `remat` recomputes each layer in the backward pass.
  """

  config: CLIPTextConfig = SD2
  dtype: Any = jnp.float32
  precision: Any = None
  attention: str | None = None
  explicit_causal_mask: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False,
               clip_skip: int | None = None) -> CLIPTextOutput:
    cfg = self.config
    input_ids, mask = self._check(input_ids, attention_mask, clip_skip)
    layers = cfg.num_hidden_layers - (clip_skip or 0)
    h = CLIPTextEmbeddings(cfg, self.dtype, self.precision, name="embeddings")(input_ids)
    outputs = CLIPEncoder(cfg, self.dtype, self.precision, self.attention, self.explicit_causal_mask, self.remat,
                          name="encoder")(h, mask, num_layers=layers)
    final = outputs[-1] if outputs else h
    last = self._final_layer_norm()(final).astype(jnp.float32)
    if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    hidden = tuple(a.astype(jnp.float32) for a in [h] + outputs) if output_hidden_states else None
    return CLIPTextOutput(last, pooled, hidden)

  def _final_layer_norm(self):
    return nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype, use_fast_variance=False,
                        name="final_layer_norm")

  def _check(self, input_ids, attention_mask, clip_skip):
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise CLIPTextInputError(f"input_ids must be integer token ids (N, L); got shape {input_ids.shape}, dtype "
                               f"{input_ids.dtype}.")
    if not 1 <= input_ids.shape[1] <= cfg.max_position_embeddings:
      raise CLIPTextInputError(f"the sequence length must be 1 .. {cfg.max_position_embeddings} (the position "
                               f"embeddings); got {input_ids.shape[1]}.")
    if clip_skip is not None and (not isinstance(clip_skip, int) or not 0 <= clip_skip < cfg.num_hidden_layers):
      raise CLIPTextInputError(f"clip_skip must be an int in 0 .. {cfg.num_hidden_layers - 1}; got {clip_skip!r}.")
    mask = None
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
      if attention_mask.shape != input_ids.shape:
        raise CLIPTextInputError(f"attention_mask must have the shape of input_ids {input_ids.shape}; got "
                                 f"{attention_mask.shape}.")
      mask = (attention_mask != 0)[:, None, None, :]
    return input_ids.astype(jnp.int32), mask
