"""The inference fast path: what makes a classifier answer sooner without changing its answers.

Every lever here was measured by `bench/bench_predict.py` (the README's Performance section has
the figures). The default path keeps the model function: top-5 labels match the plain eager
pipeline and probabilities agree within 1e-3 (tests/test_fastpath.py).

- `optimize_for_inference(model, device=..., example_shape=..., images=...)`: on a CPU, for
  enough images, a TorchScript graph frozen with its batch norms folded into the convolutions and
  run through oneDNN Graph fusion (adopted only once it reproduced the eager model); fewer images
  run the eager model as it is. On CUDA: batch norm folded, half precision and channels-last. The
  returned object takes the same float32 NCHW batches as the original and returns float32 logits.
- `configure_threads(threads)`: one intra-op thread per CPU this process may use, one inter-op
  thread, so that processes confined to a share of the machine do not oversubscribe it.
- `draft_short_side(transforms)` for `images.load_image(..., draft_short_side=...)`: opt-in. Decodes
  a JPEG at a reduced DCT scale when it is much
  larger than the preprocessing's resize target (Pillow's draft mode): several times faster for
  photos of several megapixels, with the same top-5 labels on the test photos, but probabilities
  that move by up to about 1e-2, more than the 1e-3 the default path keeps.

torch, torchvision and PIL are imported inside the functions so that importing this module is cheap.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: Draft-mode decoding keeps at least this many times the resize target on the short side, so the
#: final antialiased resize still downsamples by 2x or more: on the test photos a margin of 1 moved
#: probabilities by up to 2.6e-2, a margin of 2 by up to 1.3e-2.
DRAFT_MARGIN = 2

#: From this many images on, the TorchScript graph pays back its set-up (tracing, about 0.2 s, and
#: its first checking and profiling batches, about 0.8 s): on resnet50 with 2 CPUs, batches of 16,
#: graph and eager tie at 48 images (2.2 s), and the graph wins at 64 (2.7 vs 3.2 s) and 96
#: (3.2 vs 4.7 s).
GRAPH_MIN_IMAGES = 64
#: Runs of a traced graph compared with the eager model before it is adopted: the profiling run,
#: and the runs after which the executor has compiled its fused kernels.
GRAPH_CHECK_RUNS = 3


@dataclass(frozen=True)
class InferencePlan:
    """Which levers `optimize_for_inference` applies.

    `dtype` is the parameter and input precision ("float32" or "float16"); `channels_last` the
    memory format; `torchscript_onednn` traces and freezes the model (which folds batch norm into
    the convolutions) and runs the graph through oneDNN Graph fusion, a CPU-only lever;
    `fold_batchnorm` folds batch norm in eager mode (torch.fx), for when the graph is off.
    """

    device: str
    dtype: str = "float32"
    channels_last: bool = True
    torchscript_onednn: bool = True
    fold_batchnorm: bool = False


def plan_for(device: str = "cpu", *, images: int | None = None) -> InferencePlan:
    """The levers that pay on `device` ("cpu", "cuda", "cuda:1", ...) for `images` images (None: unknown, many).

    CPU-only levers stay off on other devices; the TorchScript graph is used only for enough
    images to pay back its set-up (`GRAPH_MIN_IMAGES`).
    """
    import torch

    if torch.device(device).type == "cpu":
        # Channels-last stays off: the oneDNN graph is as fast without it, and an eager
        # channels-last model is many times slower on batches of one.
        return InferencePlan(
            device=device, channels_last=False, torchscript_onednn=images is None or images >= GRAPH_MIN_IMAGES
        )
    # On a GPU, half precision is what uses the tensor cores; batch norm is folded in float32
    # before the cast, so the folded weights are rounded once.
    return InferencePlan(
        device=device, dtype="float16", channels_last=True, torchscript_onednn=False, fold_batchnorm=True
    )


class InferenceModel:
    """A model prepared by `optimize_for_inference`, called like the original on float32 NCHW batches.

    It moves each batch to the plan's device, precision and memory format, and returns float32
    logits (on the plan's device). Call it under `torch.inference_mode()` or `torch.no_grad()`.

    A traced graph is adopted only after it reproduced the eager model on the first batch whose
    size differs from the traced one: a trace records Python-side values (a batch size turned
    into an int, a branch taken) as constants. That batch's answer is the eager model's.
    """

    def __init__(
        self, model: Any, plan: InferencePlan, levers: Sequence[str], graph: Any = None, traced_batch: int = 1
    ):
        self.model = model
        self._eager = model
        self.plan = plan
        self._levers = list(levers)
        self._pending_graph = graph
        self._traced_batch = traced_batch

    @property
    def levers(self) -> tuple[str, ...]:
        """The levers in use (the graph's once adopted)."""
        return tuple(self._levers)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        batch = batch.to(device=self.plan.device, dtype=getattr(torch, self.plan.dtype))
        if self.plan.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self._pending_graph is not None and batch.shape[0] != self._traced_batch:
            return self._check_graph(batch).float()
        if self.model is self._eager:
            return self.model(batch).float()
        try:
            with onednn_fusion():
                return self.model(batch).float()
        except Exception as error:
            log.debug(
                "the traced graph failed (%s: %s); running the eager model from now on", type(error).__name__, error
            )
            self.model = self._eager
            self._levers.remove("torchscript_onednn")
            return self.model(batch).float()

    def _check_graph(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        expected = self.model(batch)
        graph, self._pending_graph = self._pending_graph, None
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        # TorchScript's profiling executor only swaps in the fused (oneDNN) kernels after the first
        # runs, so the graph is checked on every run up to and including its optimised form.
        for run in range(GRAPH_CHECK_RUNS):
            try:
                with onednn_fusion():
                    got = graph(batch)
            except Exception as error:
                log.debug(
                    "the traced graph failed on run %d (%s: %s); staying eager", run + 1, type(error).__name__, error
                )
                return expected
            matches = isinstance(got, torch.Tensor) and got.shape == expected.shape
            if not (matches and torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * scale)):
                log.debug("the traced graph's answer differs from the eager model's on run %d; staying eager", run + 1)
                return expected
        self.model = graph
        self._levers.append("torchscript_onednn")
        return expected

    def __repr__(self) -> str:
        return f"InferenceModel(device={self.plan.device!r}, levers={list(self.levers)})"


def optimize_for_inference(
    model: torch.nn.Module,
    *,
    device: str = "cpu",
    example_shape: Sequence[int] = (1, 3, 224, 224),
    images: int | None = None,
    plan: InferencePlan | None = None,
) -> InferenceModel:
    """Prepare an eval-mode classifier for fast inference; the result is called like the model.

    `device` and `images` (how many images it will classify, None if unknown) choose the plan
    (`plan_for`) unless `plan` is given. `example_shape` is the (N, C, H, W) shape of the batches
    (C, H, W from the crop size of the weights' transforms); any batch size works. The model is
    modified in place (moved, converted): use the returned object instead.
    """
    import torch

    plan = plan or plan_for(device, images=images)
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
    graph = _freeze_for_onednn(model, example_shape, plan) if plan.torchscript_onednn else None
    return InferenceModel(model, plan, levers, graph=graph, traced_batch=1)


def fold_batchnorm(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """Fold every Conv2d -> BatchNorm2d pair of the module graph into the convolution (torch.fx).

    Returns the folded module and True, or the model unchanged and False when its forward cannot
    be traced symbolically (data-dependent control flow, as in some transformers).
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=True), True
    except Exception as error:
        log.debug("batch norm not folded: torch.fx cannot trace the model (%s: %s)", type(error).__name__, error)
        return model, False


def _freeze_for_onednn(model: torch.nn.Module, example_shape: Sequence[int], plan: InferencePlan):
    """Trace a batch of one, freeze (folds batch norm, inlines weights) and switch on oneDNN Graph
    fusion; None when the model cannot be traced."""
    import torch

    example = torch.zeros((1, *example_shape[1:]), device=plan.device, dtype=getattr(torch, plan.dtype))
    if plan.channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    # TorchScript is deprecated in favour of torch.compile/torch.export, but those cost tens of
    # seconds of compilation per process here, while tracing costs well under a second: the
    # deprecation warnings are expected and silenced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                frozen = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False).eval())
        except Exception as error:
            log.debug("no traced graph: tracing failed (%s: %s); the eager model runs", type(error).__name__, error)
            return None
    return frozen


@contextmanager
def onednn_fusion() -> Iterator[None]:
    """oneDNN Graph fusion on while a traced graph runs, and the previous setting restored after.

    The switch is process-wide in torch; it is turned on only around the graph's calls (the
    pipeline makes them from one thread), so other models in the process are not affected.
    """
    import torch

    before = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(before)


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
        log.debug("inter-op threads already fixed (parallel work has run); only intra-op threads set")
    log.debug("torch uses %d intra-op thread(s)", count)
    return count


#: Where cgroup v2 is mounted on Linux.
CGROUP_ROOT = "/sys/fs/cgroup"


def usable_cpu_count(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> int:
    """How many CPUs this process may use: its affinity mask (taskset, cpusets, SLURM), further
    limited by a cgroup v2 CPU quota (`cpu.max`, as `docker --cpus` and Kubernetes limits set),
    rounded up: a quota of 1.5 CPUs gives 2 threads.

    `cgroup_root` and `proc_cgroup` say where to read the cgroup hierarchy and this process's place
    in it; the quota of the process's cgroup and of every ancestor up to the root counts.
    """
    count = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None and quota < count:
        log.debug("cgroup CPU quota %.2f CPUs limits threads below the %d CPUs of the affinity mask", quota, count)
        count = max(1, math.ceil(quota))
    return count


def cgroup_cpu_quota(cgroup_root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The smallest cgroup v2 CPU quota (in CPUs) over this process's cgroup and its ancestors, or
    None when there is none (no cgroup v2, `max`, unreadable files)."""
    try:
        with open(proc_cgroup, encoding="utf-8") as lines:
            relative = next((line.strip()[3:] for line in lines if line.startswith("0::")), None)
    except OSError as error:
        log.debug("no cgroup information (%s)", error)
        return None
    if relative is None:
        return None
    parts = [part for part in relative.split("/") if part and part not in (".", "..")]
    quotas = []
    for depth in range(len(parts), -1, -1):
        path = os.path.join(cgroup_root, *parts[:depth], "cpu.max")
        try:
            with open(path, encoding="ascii") as file:
                fields = file.read(100).split()
        except (OSError, UnicodeDecodeError):
            continue
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                log.debug("ignored %s: not a cpu.max quota", path)
                continue
            if quota > 0 and period > 0:
                quotas.append(quota / period)
    return min(quotas) if quotas else None


def draft_short_side(transforms: Any) -> int | None:
    """The short side a photo must keep for `transforms` (a torchvision weights' `transforms()`):
    `DRAFT_MARGIN` times its resize target, or None when it has no resize step to read."""
    resize = getattr(transforms, "resize_size", None)
    if not resize:
        return None
    return DRAFT_MARGIN * min(resize)
