"""Writes fixture.npz: what pytorch-fid's own FID InceptionV3 computes with seeded random weights, for the parity test.

Run once, from the repository root, in a virtual environment that has torch, torchvision and pytorch-fid (CPU is
enough; this file needs neither jax nor the project installed):

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0
    /tmp/refvenv/bin/python third_party/fid_inception/parity/make_fixture.py

Nothing is downloaded: the network is built by pytorch-fid's `fid_inception_v3()` (torchvision's Inception3 with
1008 classes, no auxiliary classifier, `init_weights=False`, and pytorch-fid's FIDInceptionA / C / E_1 / E_2
blocks), but its `load_state_dict_from_url` is replaced by one that returns the seeded random state dict of
`random_state_dict` (loaded strictly, as pytorch-fid loads its weights), and torch's own URL loaders are made to
refuse. The rule of `random_state_dict` depends on the sorted PyTorch names and shapes and on numpy only, so
tests/test_fid_inception.py rebuilds the same tensors from `convert.expected_shapes()` without torch.

The fixture holds:
  seed, keys, shapes            the seed and the sorted state-dict names / shapes ('32x3x3x3') of the torch network
                                (num_batches_tracked left out: the converter ignores them, they were loaded as 0);
  checksums                     the float64 sum of every generated tensor, in key order (a numpy whose random stream
                                differed would be reported as that, not as a network mismatch);
  images                        (2, 48, 48, 3) float32 NHWC in [-1, 1], what `model.InceptionV3` is given; torch gets
                                them as NCHW through pytorch-fid's `InceptionV3(resize_input=True,
                                normalize_input=False)`, i.e. its own bilinear resize to 299 and no rescaling;
  pool, logits                  pytorch-fid's pool3 features (2, 2048) and fc of them (2, 1008), float32 (logits are
                                also checked here against torchvision's Inception3.forward on the resized images);
  pool_f64, logits_f64          the same network run in float64 (the float32 rounding of either side is then visible);
  resize_{up,down}_{in,out}     torch's F.interpolate(bilinear, align_corners=False) of small NHWC arrays to 29x29 and
                                17x17, the resize pytorch-fid applies, for `model.preprocess`;
  *_version                     the versions used.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Mapping

import numpy as np

SEED = 20151205
NUM_IMAGES = 2
IMAGE_SIZE = 48
RESIZE_CASES = {"up": ((1, 13, 11, 3), 29), "down": ((1, 40, 36, 3), 17)}  # NHWC input shape, output side
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture.npz")


def random_state_dict(shapes: Mapping[str, tuple[int, ...]], seed: int = SEED) -> dict[str, np.ndarray]:
  """Float32 tensors for every (PyTorch name, shape), drawn in sorted-name order from default_rng(seed):
  conv weights normal with He's std sqrt(2 / fan_in), fc.weight normal with std 1 / sqrt(fan_in), BatchNorm
  weight and running_var uniform(0.5, 1.5), BatchNorm bias, running_mean and fc.bias normal(0, 0.1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key in sorted(shapes):
    shape = tuple(int(n) for n in shapes[key])
    if key.endswith(".conv.weight"):
      value = rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[1:])), shape)
    elif key == "fc.weight":
      value = rng.normal(0.0, 1.0 / math.sqrt(shape[1]), shape)
    elif key.endswith((".bn.weight", ".bn.running_var")):
      value = rng.uniform(0.5, 1.5, shape)
    elif key.endswith((".bn.bias", ".bn.running_mean")) or key == "fc.bias":
      value = rng.normal(0.0, 0.1, shape)
    else:
      raise ValueError(f"no rule for the state-dict entry {key!r} {shape}")
    out[key] = value.astype(np.float32)
  return out


def checksums(state_dict: Mapping[str, np.ndarray]) -> np.ndarray:
  """The float64 sum of each tensor, in sorted-name order."""
  return np.array([np.asarray(state_dict[k], np.float64).sum() for k in sorted(state_dict)], np.float64)


def shape_string(shape) -> str:
  return "x".join(str(int(n)) for n in shape)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", default=FIXTURE)
  args = parser.parse_args()

  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415
  import torchvision  # noqa: PLC0415
  from importlib.metadata import version  # noqa: PLC0415
  from pytorch_fid import inception as fid  # noqa: PLC0415

  def refuse(*args, **kwargs):
    raise AssertionError(f"make_fixture must not download anything (asked for {args[:1]})")

  torch.hub.load_state_dict_from_url = refuse
  torch.utils.model_zoo.load_url = refuse

  # The torch network's own names and shapes are the reference layout; the random weights follow them.
  probe = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, init_weights=False)
  shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items() if not k.endswith("num_batches_tracked")}
  weights = random_state_dict(shapes)
  loaded = {k: torch.from_numpy(weights[k]) if k in weights else torch.zeros_like(v)
            for k, v in probe.state_dict().items()}  # num_batches_tracked: 0

  calls = []

  def fake_load_state_dict_from_url(url, *args, **kwargs):
    assert url == fid.FID_WEIGHTS_URL, url
    calls.append(url)
    return {k: v.clone() for k, v in loaded.items()}

  fid.load_state_dict_from_url = fake_load_state_dict_from_url
  net = fid.fid_inception_v3().eval()  # the full network (fc included); load_state_dict is strict
  wrapper = fid.InceptionV3([fid.InceptionV3.DEFAULT_BLOCK_INDEX], resize_input=True, normalize_input=False).eval()
  assert len(calls) == 2
  assert set(net.state_dict()) == set(loaded)
  assert isinstance(net.Mixed_7c, fid.FIDInceptionE_2) and isinstance(net.Mixed_5b, fid.FIDInceptionA)

  images = np.random.default_rng([SEED, 1]).uniform(-1.0, 1.0, (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3))
  images = images.astype(np.float32)
  fixture = {
      "seed": np.array(SEED, np.int64),
      "keys": np.array(sorted(shapes)),
      "shapes": np.array([shape_string(shapes[k]) for k in sorted(shapes)]),
      "checksums": checksums(weights),
      "images": images,
  }

  def run(dtype):
    with torch.no_grad():
      w, n = wrapper.to(dtype), net.to(dtype)
      x = torch.from_numpy(images.transpose(0, 3, 1, 2)).to(dtype)
      pool = w(x)[0]
      assert pool.shape == (NUM_IMAGES, 2048, 1, 1), pool.shape
      pool = pool[:, :, 0, 0]
      logits = n.fc(pool)
      # The same logits through torchvision's forward (avgpool, eval-mode dropout, fc) on pytorch-fid's resize.
      full = n(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
      torch.testing.assert_close(full, logits, rtol=1e-5, atol=1e-5)
    return pool.numpy(), logits.numpy()

  torch.manual_seed(0)
  fixture["pool"], fixture["logits"] = run(torch.float32)
  fixture["pool_f64"], fixture["logits_f64"] = run(torch.float64)

  for name, (shape, size) in RESIZE_CASES.items():
    x = np.random.default_rng([SEED, 2, shape[1]]).uniform(-1.0, 1.0, shape).astype(np.float32)
    y = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(size, size), mode="bilinear",
                      align_corners=False)
    fixture[f"resize_{name}_in"], fixture[f"resize_{name}_out"] = x, y.numpy().transpose(0, 2, 3, 1)

  for package in ("torch", "torchvision", "pytorch-fid", "numpy"):
    fixture[f"{package.replace('-', '_')}_version"] = np.array(version(package))
  np.savez_compressed(args.out, **fixture)

  for name in ("pool", "logits"):
    f32, f64 = fixture[name].astype(np.float64), fixture[f"{name}_f64"]
    print(f"{name}: max |value| {np.abs(f64).max():.4g}, torch float32 vs float64: max abs diff "
          f"{np.abs(f32 - f64).max():.3g}")
  print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
  main()
