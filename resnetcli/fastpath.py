"""The inference fast path: what makes a classifier answer sooner without changing its answers.

Every lever here was kept because `bench/bench_predict.py` measured that it pays on a CPU (the
README's Performance section has the figures); the ones that did not pay are not here. The output
is the same model function: top-5 labels match the plain eager pipeline and probabilities agree
within 1e-3 (tests/test_fastpath.py).

- `optimize_for_inference(model, device=..., example_shape=...)`: on a CPU, channels-last memory
  format and a TorchScript graph frozen with its batch norms folded into the convolutions and run
  through oneDNN Graph fusion (falling back to eager channels-last for models that cannot be
  traced); on CUDA, half precision and channels-last. The returned module takes the same float32
  NCHW batches as the original and returns float32 logits.
- `configure_threads(threads)`: one intra-op thread per CPU this process may use, one inter-op
  thread, so that several processes sharing a machine do not oversubscribe it.
- `load_for_size(path, short_side)`: decodes a JPEG at a reduced DCT scale when it is much larger
  than the preprocessing's resize target (Pillow's draft mode), several times faster for photos of
  several megapixels.

torch, torchvision and PIL are imported inside the functions so that importing this module is cheap.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from resnetcli.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

#: Draft-mode decoding keeps at least this many times the resize target on the short side, so the
#: final (antialiased) resize still downsamples and results stay within the 1e-3 tolerance.
DRAFT_MARGIN = 2


@dataclass(frozen=True)
class InferencePlan:
    """Which levers `optimize_for_inference` applies for a device.

    `dtype` is the parameter and input precision ("float32" or "float16"); `channels_last` the
    memory format; `torchscript_onednn` traces, freezes (folding batch norm into the convolutions)
    and runs the graph through oneDNN Graph fusion, a CPU-only lever; `fold_batchnorm` folds batch
    norm into the convolutions in eager mode (torch.fx), for when the TorchScript path is off.
    """

    device: str
    dtype: str = "float32"
    channels_last: bool = True
    torchscript_onednn: bool = True
    fold_batchnorm: bool = False


def plan_for(device: str = "cpu") -> InferencePlan:
    """The levers that pay on `device` ("cpu", "cuda", "cuda:1", ...): CPU-only ones stay off elsewhere."""
    import torch

    kind = torch.device(device).type
    if kind == "cpu":
        return InferencePlan(device=device)
    # On a GPU, half precision is what uses the tensor cores; the oneDNN and thread levers are CPU
    # things. Batch norm is folded in eager mode there (in float32, before the cast to half).
    return InferencePlan(device=device, dtype="float16", channels_last=True, torchscript_onednn=False, fold_batchnorm=True)


class InferenceModel:
    """A model prepared by `optimize_for_inference`, called like the original on float32 NCHW batches.

    It moves each batch to the plan's device, precision and memory format, and returns float32
    logits (on the plan's device). Call it under `torch.inference_mode()` or `torch.no_grad()`.
    """

    def __init__(self, core: Any, plan: InferencePlan, levers: Sequence[str]):
        self.core = core
        self.plan = plan
        #: The levers actually applied (a model that cannot be traced falls back to eager).
        self.levers = tuple(levers)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        batch = batch.to(device=self.plan.device, dtype=getattr(torch, self.plan.dtype))
        if self.plan.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.core(batch).float()

    def __repr__(self) -> str:
        return f"InferenceModel(device={self.plan.device!r}, levers={list(self.levers)})"


def optimize_for_inference(
    model: torch.nn.Module,
    *,
    device: str = "cpu",
    example_shape: Sequence[int] = (1, 3, 224, 224),
    plan: InferencePlan | None = None,
) -> InferenceModel:
    """Prepare an eval-mode classifier for fast inference on `device`; the result is called like the model.

    `example_shape` is the (N, C, H, W) shape of the batches it will see (the crop size of the
    weights' transforms); it is used to trace the graph, and other batch sizes work too. The model
    is modified in place (moved, converted); keep using the returned object instead.
    """
    import torch

    plan = plan or plan_for(device)
    model = model.eval()
    levers: list[str] = []
    if plan.fold_batchnorm:
        model, folded = fold_batchnorm(model)
        if folded:
            levers.append("fold_batchnorm")
    model = model.to(device=plan.device, dtype=getattr(torch, plan.dtype))
    if plan.dtype != "float32":
        levers.append(plan.dtype)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
        levers.append("channels_last")
    core: Any = model
    if plan.torchscript_onednn:
        scripted = _freeze_for_onednn(model, example_shape, plan)
        if scripted is not None:
            core = scripted
            levers.append("torchscript_onednn")
    return InferenceModel(core, plan, levers)


def fold_batchnorm(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """Fold every Conv2d -> BatchNorm2d pair of the module graph into the convolution (torch.fx).

    Returns the folded module and True, or the model unchanged and False when its forward cannot
    be traced symbolically (data-dependent control flow, as in some transformers).
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=True), True
    except Exception:  # noqa: BLE001 - torch.fx raises many kinds of errors for untraceable code
        return model, False


def _freeze_for_onednn(model: torch.nn.Module, example_shape: Sequence[int], plan: InferencePlan):
    """Trace, freeze (folds batch norm, inlines weights) and enable oneDNN Graph fusion.

    Returns None when the model cannot be traced, or when its trace does not reproduce the eager
    model on a batch of another size (tracing records Python-side values, such as a batch size
    turned into an int, as constants).
    """
    import torch

    dtype = getattr(torch, plan.dtype)
    example = torch.zeros((1, *example_shape[1:]), device=plan.device, dtype=dtype)
    probe = torch.randn((2, *example_shape[1:]), generator=torch.Generator().manual_seed(0)).to(plan.device, dtype)
    if plan.channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
        probe = probe.contiguous(memory_format=torch.channels_last)
    # TorchScript is deprecated in favour of torch.compile/torch.export, but those cost tens of
    # seconds of compilation per process here, while tracing costs well under a second: the
    # deprecation warnings are expected and silenced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                frozen = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False).eval())
                expected, traced = model(probe), frozen(probe)
        except Exception:  # noqa: BLE001 - tracing fails in many ways on dynamic models
            return None
    if not isinstance(traced, torch.Tensor) or traced.shape != expected.shape:
        return None
    if not torch.allclose(traced, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
        return None
    torch.jit.enable_onednn_fusion(True)
    return frozen


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads` (default: the CPUs this process may run on) and
    inter-op threads to 1; returns the intra-op count.

    The default counts the CPUs of the process's affinity mask (taskset, cgroups cpusets), not the
    machine's, so processes confined to a share of the machine do not oversubscribe it.
    """
    import torch

    count = threads if threads is not None else usable_cpu_count()
    if count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already fixed once parallel work has run; the intra-op setting is what matters
    return count


def usable_cpu_count() -> int:
    """How many CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def draft_short_side(transforms: Any) -> int | None:
    """The short side a photo must keep for `transforms` (a torchvision weights' `transforms()`):
    `DRAFT_MARGIN` times its resize target, or None when it has no resize step to read."""
    resize = getattr(transforms, "resize_size", None)
    if not resize:
        return None
    return DRAFT_MARGIN * min(resize)


def load_for_size(source: str | Path, short_side: int | None) -> Image.Image:
    """Open an image as an upright RGB `PIL.Image` like `resnetcli.images.load_image`, decoding a JPEG
    at a reduced scale (1/2, 1/4 or 1/8) when its short side still stays at least `short_side`.

    Non-JPEG files and `short_side=None` decode at full size. Errors are the same `InputError`s as
    `load_image` (the file and what is wrong); Pillow's decompression-bomb guard stays on.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from resnetcli.images import to_rgb

    path = Path(source)
    name = str(source)
    if path.is_dir():
        raise InputError(name, "is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)
                if short_side and image.format == "JPEG":
                    _draft(image, short_side)
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise InputError(name, "no such file") from None
    except PermissionError:
        raise InputError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise InputError(name, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(name, f"refused as a possible decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(name, f"cannot decode image: {error}") from None


def _draft(image: Image.Image, short_side: int) -> None:
    # draft() picks the largest DCT scale (1/8, 1/4, 1/2) whose result is still at least the size
    # asked for (or none), so asking for the photo's aspect ratio at `short_side` keeps both sides at
    # or above it. EXIF rotation only swaps the sides: the short side is the same after it.
    width, height = image.size
    scale = short_side / min(width, height)
    image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
