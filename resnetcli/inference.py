"""The torch side of `predict`, settled before the pipeline starts: device, preprocessing, fast path.

`load_torch_classifier(arch, weights, ...)` is the one way `resnet predict` and each `resnetcli.ray`
actor make it from predict's options. `torch_classifier(loaded, ...)` turns a loaded torchvision
model into the frozen `predict.Classifier` the pipeline runs: its preprocessing chosen once (the
weights' own, another weights' with `--preprocess`, other sizes with `--input-size`/`--resize`), its
inference plan chosen once (`fastpath.optimize_for_inference`). Nothing of `loaded` is changed
afterwards, and the pipeline never sees torch. torch is imported inside the functions.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Sequence

from resnetcli.errors import UsageError
from resnetcli.images import check_resize
from resnetcli.predict import Classifier

if TYPE_CHECKING:  # pragma: no cover
    from resnetcli.factory import LoadedModel

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> str:
    """A torch device name for `--device`: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.

    Raises UsageError for a device this machine does not have.
    """
    import torch

    wanted = spec.strip().lower()
    mps_available = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if wanted == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available else "cpu"
    if wanted == "cpu":
        return "cpu"
    if wanted == "mps":
        if not mps_available:
            raise UsageError("--device mps: Apple's MPS backend is not available on this machine")
        return "mps"
    if wanted == "cuda" or wanted.startswith("cuda:"):
        index_text = wanted.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise UsageError(f"--device {spec}: expected cuda or cuda:N")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(index_text) if index_text else 0
        if index >= count:
            seen = "no CUDA device" if count == 0 else f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            raise UsageError(f"--device {spec}: not available (torch sees {seen})")
        return wanted
    raise UsageError(f"--device {spec}: choose auto, cpu, cuda, cuda:N or mps")


def preprocessing_weights(arch: str, name: str):
    """The weights of `arch` called `name` (`--preprocess`), whose transforms to use; UsageError if none is."""
    from resnetcli.factory import DEFAULT_WEIGHTS, resolve_architecture, weights_enum

    arch = resolve_architecture(arch)
    enum = weights_enum(arch)
    member = name.strip().upper()
    if member == DEFAULT_WEIGHTS:
        return enum.DEFAULT
    if member in enum.__members__:
        return enum[member]
    names = ", ".join(enum.__members__)  # the weights names and their DEFAULT alias
    raise UsageError(f"--preprocess {name}: not a weights name of {arch}; choose one of {names}")


def choose_transforms(loaded: LoadedModel, weights=None, *, input_size: int | None = None, resize: int | None = None):
    """The preprocessing to use: `loaded.transforms`, or those of `weights` (from `preprocessing_weights`),
    with other sizes. A new object; `loaded` is not changed.

    `input_size` is the centre crop fed to the model; `resize` the size the shorter side is resized
    to first. Given only `input_size`, the resize keeps the weights' resize-to-crop ratio. Mean,
    std and interpolation always come from the weights' transforms object.
    """
    base = weights.transforms() if weights is not None else loaded.transforms
    if input_size is None and resize is None:
        return base
    if not all(hasattr(base, name) for name in ("crop_size", "resize_size", "mean", "std")):
        raise UsageError(f"the preprocessing of {loaded.arch} has no crop and resize sizes to change")
    base_crop, base_resize = base.crop_size[0], base.resize_size[0]
    crop = input_size if input_size is not None else base_crop
    if resize is None:
        resize = round(crop * base_resize / base_crop)
    return type(base)(
        crop_size=crop,
        resize_size=resize,
        mean=base.mean,
        std=base.std,
        interpolation=base.interpolation,
        antialias=base.antialias,
    )


def load_torch_classifier(
    arch: str | None,
    weights: str,
    *,
    labels: Sequence[str] | None,
    preprocess: str | None,
    input_size: int | None,
    resize: int | None,
    device: str,
    threads: int | None,
    batch_size: int,
    expected_count: int | None,
    settings: Any,
    trust_checkpoint: bool,
    downloads: Callable[[], AbstractContextManager] = nullcontext,
    note: Callable[[str], None] = log.warning,
) -> Classifier:
    """The pipeline's Classifier of a model loaded through the factory, its inference plan settled once.

    In order: the device is resolved and torch's threads set (`fastpath.configure_threads`); a
    `--preprocess` is checked against a named `arch` before anything is downloaded (else against the
    loaded model's); the model is loaded inside `downloads()`, whose value is the download progress
    callback (the CLI's bar); each of the factory's notes goes to `note`; `torch_classifier` settles
    the plan (`expected_count`: the number of inputs when known; None: many, so that a plan with
    set-up costs pays back).
    """
    from resnetcli.factory import load_model
    from resnetcli.fastpath import configure_threads

    chosen_device = resolve_device(device)
    preprocess_with = preprocessing_weights(arch, preprocess) if preprocess is not None and arch else None
    configure_threads(threads)
    with downloads() as on_progress:
        loaded = load_model(
            arch, weights, labels=labels, settings=settings, on_progress=on_progress, trust_checkpoint=trust_checkpoint
        )
    if preprocess is not None and arch is None:
        preprocess_with = preprocessing_weights(loaded.arch, preprocess)
    for text in loaded.notes:
        note(text)
    return torch_classifier(
        loaded,
        transforms=choose_transforms(loaded, preprocess_with, input_size=input_size, resize=resize),
        device=chosen_device,
        batch_size=batch_size,
        expected_count=expected_count,
    )


def torch_classifier(
    loaded: LoadedModel,
    *,
    transforms: Any = None,
    device: str = "cpu",
    batch_size: int = 16,
    expected_count: int | None = None,
) -> Classifier:
    """The pipeline's Classifier for a loaded torchvision model, with its inference plan settled now.

    `transforms` defaults to `loaded.transforms`. The model is handed to
    `fastpath.optimize_for_inference` (which may move or convert it: use the Classifier from then
    on); `expected_count`, the number of inputs when it is known, helps choose the plan. Images
    whose resize step would make more pixels than Pillow's limit are refused (`images.check_resize`).
    """
    import torch

    from resnetcli.fastpath import optimize_for_inference

    transforms = transforms if transforms is not None else loaded.transforms
    crop = getattr(transforms, "crop_size", None) or [224]
    resize = getattr(transforms, "resize_size", None)
    short_side = min(resize) if resize else None
    model = optimize_for_inference(
        loaded.model, device=device, example_shape=(batch_size, 3, crop[0], crop[-1]), images=expected_count
    )
    log.debug("inference on %s with levers %s", device, list(model.levers))

    def preprocess(image) -> torch.Tensor:
        if short_side is not None:
            check_resize(image.size, short_side)
        return transforms(image)

    def classify(tensors: Sequence[torch.Tensor]):
        with torch.inference_mode():
            logits = model(torch.stack(list(tensors)))
            return torch.softmax(logits.float(), dim=1).cpu()

    def rank(probabilities: torch.Tensor, k: int):
        values, indices = torch.topk(probabilities, k, dim=1)
        return values.numpy(), indices.numpy()

    return Classifier(
        arch=loaded.arch,
        weights=loaded.weights.name,
        categories=tuple(loaded.categories),
        preprocess=preprocess,
        classify=classify,
        rank=rank,
        details={"device": device, "transforms": transforms, "model": model},
    )
