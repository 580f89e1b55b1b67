"""Generated samples as one more augmentation source: mix pre-generated labelled images into batches.

Images produced offline by a generative model (a class-conditional diffusion model, say) are
augmentations whose labels may be wrong in ways no geometric transform's are. augplug treats them
like any other augmented rows: a :class:`BatchMixer` appends ``k`` generated rows to every real
batch and returns the mask of augmented rows and a per-row source id; the refiner weights (and
optionally relabels) the generated rows against the clean validation set; :class:`SourceAudit`
keeps per-source statistics::

    gen = GeneratedSamples.from_folder("generated/", classes=train_set.classes)
    mixer = BatchMixer({"diffusion": gen}, per_batch=32, seed=0)
    sources = SourceAudit(mixer.source_names)
    for x, y in loader:
        batch = mixer(x, y)
        loss = refiner(model(batch.inputs), batch.targets, augmented=batch.augmented)
        sources.update(refiner.stats, batch.source_ids, batch.targets)
    print(sources.table(format="markdown"))

Stored sets load without pickle: an ``ImageFolder``-style directory (one sub-directory per class),
a ``.npz`` archive, or a ``.pt`` file read with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .errors import ConfigurationError, ShapeError, TargetError
from .options import is_integer
from .report import NAME_SEP, AugmentationAudit
from .rng import is_generator_state

__all__ = ["GeneratedSamples", "BatchMixer", "MixedBatch", "SourceAudit", "REAL"]

#: Source id of the real rows of a mixed batch; generated sources are numbered from 1.
REAL = 0

_IMAGE_KEYS = ("images", "image", "x", "inputs")
_LABEL_KEYS = ("labels", "label", "y", "targets")


def _to_float_images(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images to floats in [0, 1]; add a channel axis to ``(N, H, W)``; floats unchanged."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ShapeError(f"generated images must be (N, H, W) or (N, C, H, W), got {tuple(images.shape)}",
                         "store a stack of images, channels first")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ShapeError(f"generated images must be uint8 or floating point, got {images.dtype}", "")
    return images


class GeneratedSamples(torch.utils.data.Dataset):
    """A labelled set of pre-generated images: ``ds[i] -> (image, label)``.

    Build it from tensors (:meth:`from_arrays`), a ``.npz`` / ``.pt`` file (:meth:`from_file`) or an
    ``ImageFolder``-style directory (:meth:`from_folder`); :meth:`load` picks by path.

    Args:
        images: ``(N, C, H, W)`` float tensor, or a map-style dataset yielding ``(image, label)``.
        labels: ``(N,)`` class ids (with tensor images).
        transform: applied to each image tensor on access (e.g. the normalization of the real data).
        num_classes: when given, labels are checked to lie in ``[0, num_classes)``.
    """

    def __init__(self, images: Union[torch.Tensor, torch.utils.data.Dataset], labels: Optional[torch.Tensor] = None,
                 transform: Optional[Callable] = None, num_classes: Optional[int] = None):
        if torch.is_tensor(images):
            if labels is None:
                raise TargetError("generated images need labels", "pass labels=(N,) class ids")
            labels = torch.as_tensor(labels)
            if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
                raise ShapeError(f"{images.shape[0]} generated images but labels of shape {tuple(labels.shape)}",
                                 "pass one class id per image")
            if labels.is_floating_point():
                if not torch.equal(labels, labels.round()):
                    raise TargetError("generated labels must be integer class ids", "store class indices")
            labels = labels.long()
            if labels.numel() and int(labels.min()) < 0:
                raise TargetError(f"generated labels must be >= 0, found {int(labels.min())}", "")
            if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
                raise TargetError(f"generated label {int(labels.max())} is outside [0, {num_classes})",
                                  "map the generator's classes to the training set's class order")
            images = _to_float_images(images)
        self.images = images
        self.labels = labels
        self.transform = transform
        self.num_classes = num_classes

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_arrays(cls, images, labels, channels_last: Optional[bool] = None, **kwargs) -> "GeneratedSamples":
        """From arrays: ``images`` ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` (uint8 scaled to
        [0, 1], or float), ``labels`` ``(N,)``. ``channels_last``: as in :meth:`from_file` (default:
        guessed when the last axis has 1, 3 or 4 entries and the second does not)."""
        images = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
        labels = torch.as_tensor(np.asarray(labels)) if not torch.is_tensor(labels) else labels
        return cls(_channels_first(images, channels_last), labels, **kwargs)

    @classmethod
    def from_file(cls, path: Union[str, Path], image_key: Optional[str] = None, label_key: Optional[str] = None,
                  channels_last: Optional[bool] = None, **kwargs) -> "GeneratedSamples":
        """From a ``.npz`` archive or a ``.pt`` file holding a dict of an image and a label tensor.

        Keys are found among ``images``/``image``/``x``/``inputs`` and ``labels``/``label``/``y``/
        ``targets`` unless given. ``.pt`` files are read with ``torch.load(weights_only=True)`` and
        ``.npz`` with ``allow_pickle=False``: nothing executable is loaded. ``channels_last``: the
        images are ``(N, H, W, C)`` (default: guessed when the last axis has 1, 3 or 4 entries and
        the second does not).
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"no file at {path}", "pass the path of a .npz or .pt file")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: torch.from_numpy(z[k]) for k in z.files}
        elif path.suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, Mapping):
                raise ConfigurationError(f"{path} holds a {type(data).__name__}, not a dict of tensors",
                                         "save {'images': tensor, 'labels': tensor}")
        else:
            raise ConfigurationError(f"unsupported file type {path.suffix!r}", "use .npz, .pt or a class folder")

        def pick(key, candidates, what):
            keys = [key] if key else [k for k in candidates if k in data]
            if not keys or keys[0] not in data:
                raise ConfigurationError(f"{path} has no {what} array (keys: {sorted(data)})",
                                         f"name it one of {candidates} or pass {what[:-1]}_key=")
            return torch.as_tensor(data[keys[0]])

        images, labels = pick(image_key, _IMAGE_KEYS, "images"), pick(label_key, _LABEL_KEYS, "labels")
        return cls(_channels_first(images, channels_last), labels, **kwargs)

    @classmethod
    def from_folder(cls, root: Union[str, Path], classes: Optional[Sequence[str]] = None, image_mode: str = "RGB",
                    transform: Optional[Callable] = None, **kwargs) -> "GeneratedSamples":
        """From an ``ImageFolder``-style directory: ``root/<class name>/<image>``.

        ``classes``: the training set's class names in label order; each sub-directory is mapped to
        its position there (so the labels agree with the real data even when the generator wrote
        only some classes). Without it, sub-directories are numbered alphabetically, as
        torchvision's ``ImageFolder`` does. Images are read with PIL (``image_mode``), turned into
        float tensors in [0, 1], then ``transform`` is applied.
        """
        from torchvision.datasets import ImageFolder
        from torchvision.transforms.functional import pil_to_tensor

        root = Path(root)
        if not root.is_dir():
            raise ConfigurationError(f"no directory at {root}", "pass a folder with one sub-folder per class")
        try:
            folder = ImageFolder(str(root), loader=lambda p: _open_image(p, image_mode),
                                 transform=lambda im: pil_to_tensor(im).float() / 255.0)
        except FileNotFoundError as e:   # a class folder without images, or no class folders
            raise ConfigurationError(f"the generated images under {root} cannot be read as one folder per class "
                                     f"({e})", "put the images in one sub-folder per class, and remove empty "
                                     "class folders") from None
        if classes is not None:
            classes = [str(c) for c in classes]
            unknown = [c for c in folder.classes if c not in classes]
            if unknown:
                raise TargetError(f"generated class folders {unknown} are not training classes",
                                  f"rename them to one of {classes}")
            mapping = {folder.class_to_idx[c]: classes.index(c) for c in folder.classes}
            folder.target_transform = mapping.__getitem__
            num = len(classes)
        else:
            num = len(folder.classes)
        kwargs.setdefault("num_classes", num)
        ds = cls(folder, transform=transform, **kwargs)
        ds.labels = torch.tensor([folder.target_transform(t) if folder.target_transform else t
                                  for t in folder.targets], dtype=torch.long)
        return ds

    @classmethod
    def load(cls, path: Union[str, Path], **kwargs) -> "GeneratedSamples":
        """:meth:`from_folder` for a directory, :meth:`from_file` for a ``.npz`` / ``.pt`` file."""
        return cls.from_folder(path, **kwargs) if Path(path).is_dir() else cls.from_file(path, **kwargs)

    # ------------------------------------------------------------------ dataset protocol
    def __len__(self) -> int:
        return int(self.labels.shape[0]) if self.labels is not None else len(self.images)

    def __getitem__(self, i: int):
        if torch.is_tensor(self.images):
            x, y = self.images[i], int(self.labels[i])
        else:
            x, y = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, y

    def batch(self, index: torch.Tensor):
        """Stacked ``(images, labels)`` for a 1-D tensor of positions."""
        if torch.is_tensor(self.images) and self.transform is None:
            return self.images[index], self.labels[index]
        items = [self[int(i)] for i in index]
        shapes = sorted({tuple(x.shape) for x, _ in items})
        if len(shapes) > 1:
            raise ShapeError(f"the generated images drawn have several shapes ({', '.join(map(str, shapes[:4]))})",
                             "resize them to the real images' size when loading: GeneratedSamples.load(..., "
                             "transform=torchvision.transforms.v2.Resize((H, W)))")
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def _channels_first(images: torch.Tensor, channels_last: Optional[bool]) -> torch.Tensor:
    """``(N, H, W, C)`` images as ``(N, C, H, W)``: where ``channels_last`` says so, or (None) where the
    last axis has 1, 3 or 4 entries and the second does not."""
    if channels_last is None:
        channels_last = images.dim() == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4)
    if channels_last and images.dim() != 4:
        raise ShapeError(f"channels_last=True needs (N, H, W, C) images, got shape {tuple(images.shape)}",
                         "pass 4-D images, or leave channels_last out")
    return images.permute(0, 3, 1, 2).contiguous() if channels_last else images


def _open_image(path: str, mode: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


@dataclass
class MixedBatch:
    """A real batch with generated rows appended.

    Attributes:
        inputs: ``(B + k, ...)`` real inputs followed by the generated ones.
        targets: ``(B + k,)`` class ids, or ``(B + k, C)`` probabilities when the real targets were soft
            (the generated rows then get one-hot rows).
        augmented: ``(B + k,)`` bool: which rows the refiner should refine (``augmented=`` of the call).
        source_ids: ``(B + k,)`` long: ``REAL`` (0) for real rows, ``j`` for rows from the j-th source.
        index: ``(B + k,)`` long: the row's position in its own source (the real loader's ``index``
            when given, else -1 for real rows).
        num_real: ``B``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    augmented: torch.Tensor
    source_ids: torch.Tensor
    index: torch.Tensor
    num_real: int


def _check_source_names(names: Sequence[str]) -> None:
    """A source name holding the audit's name separator would be read as several sources."""
    bad = [n for n in names if NAME_SEP in n or not n]
    if bad:
        raise ConfigurationError(f"source names must be non-empty and must not contain {NAME_SEP!r} (the audit reads "
                                 f"it as a separator of several names), got {bad}",
                                 f"rename them, e.g. {bad[0].replace(NAME_SEP, '_')!r}")


class BatchMixer:
    """Append ``k`` rows from each generated source to every real batch.

    Each source is read in a fresh random order every pass (sampling without replacement, cycling),
    driven by the mixer's own generator: the same seed gives the same rows, whatever else uses the
    global RNG.

    Args:
        sources: a :class:`GeneratedSamples` (or any map-style dataset of ``(image, label)``), a
            sequence of them, or a dict ``name -> dataset``.
        per_batch: rows drawn from each source per batch: an int, or a dict ``name -> int``.
        seed: seed of the mixer's generator.
        real_augmented: whether the real rows are to be refined too (True when the real batch is
            itself augmented and should be weighted; default False: real rows are trained on as given).
        names: source names when ``sources`` is a sequence (default ``generated``, ``generated1``, ...).
    """

    def __init__(self, sources, per_batch: Union[int, Mapping[str, int]] = 16, seed: int = 0,
                 real_augmented: bool = False, names: Optional[Sequence[str]] = None):
        if isinstance(sources, Mapping):
            names, datasets = [str(n) for n in sources], list(sources.values())
        else:
            datasets = [sources] if isinstance(sources, torch.utils.data.Dataset) else list(sources)
            if names is None:
                names = ["generated"] + [f"generated{i}" for i in range(1, len(datasets))]
            names = [str(n) for n in names]
        if not datasets or len(names) != len(datasets):
            raise ConfigurationError(f"{len(datasets)} sources and {len(names)} names",
                                     "pass at least one source, with one name each")
        if "real" in names or len(set(names)) != len(names):
            raise ConfigurationError(f"source names must be distinct and not 'real', got {names}", "rename them")
        _check_source_names(names)
        if isinstance(per_batch, Mapping):
            missing = [n for n in names if n not in per_batch]
            if missing:
                raise ConfigurationError(f"per_batch has no count for {missing}", "give every source a count")
            counts = [per_batch[n] for n in names]
        else:
            counts = [per_batch] * len(names)
        if not all(is_integer(k) and k >= 0 for k in counts):
            raise ConfigurationError(f"per_batch counts must be integers >= 0, got {counts}", "use 0 to skip a source")
        counts = [int(k) for k in counts]
        for n, ds, k in zip(names, datasets, counts):
            if k and len(ds) == 0:
                raise ConfigurationError(f"source {n!r} is empty", "pass a source with at least one sample")
        self.source_names: List[str] = ["real"] + names
        self.datasets = datasets
        self.counts = counts
        self.real_augmented = bool(real_augmented)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self._orders: List[Optional[torch.Tensor]] = [None] * len(datasets)
        self._pos = [0] * len(datasets)

    def _draw(self, j: int, k: int) -> torch.Tensor:
        n = len(self.datasets[j])
        out = []
        while k > 0:
            if self._orders[j] is None or self._pos[j] >= n:
                self._orders[j] = torch.randperm(n, generator=self._gen)
                self._pos[j] = 0
            take = min(k, n - self._pos[j])
            out.append(self._orders[j][self._pos[j]:self._pos[j] + take])
            self._pos[j] += take
            k -= take
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, index: Optional[torch.Tensor] = None) -> MixedBatch:
        """Append the generated rows to ``(inputs, targets)`` (class ids or probabilities)."""
        b = inputs.shape[0]
        targets = torch.as_tensor(targets)
        if targets.shape[0] != b or targets.dim() not in (1, 2):
            raise ShapeError(f"{b} inputs but targets of shape {tuple(targets.shape)}",
                             "pass class ids (B,) or probabilities (B, C)")
        if index is not None and torch.as_tensor(index).shape != (b,):
            raise ShapeError(f"index must have shape ({b},)", "pass the loader's index batch or None")
        xs, ys, srcs, idxs = [], [], [], []
        state = self._gen.get_state(), list(self._orders), list(self._pos)
        try:
            for j, (ds, k) in enumerate(zip(self.datasets, self.counts)):
                if k == 0:
                    continue
                pick = self._draw(j, k)
                if isinstance(ds, GeneratedSamples):
                    x, y = ds.batch(pick)
                else:
                    items = [ds[int(i)] for i in pick]
                    x = torch.stack([torch.as_tensor(it[0]) for it in items])
                    y = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
                if x.shape[1:] != inputs.shape[1:]:
                    channels_only = x.dim() == inputs.dim() >= 3 and x.shape[2:] == inputs.shape[2:]
                    fix = ("resize / normalize the generated images like the real ones (transform=)" if not channels_only
                           else "read the generated images with the real ones' channels: GeneratedSamples.load(..., "
                           "image_mode='L') for grey images, 'RGB' for colour ones (the default)"
                           if isinstance(ds, GeneratedSamples) else
                           "give the source's images the real ones' number of channels")
                    raise ShapeError(f"source {self.source_names[j + 1]!r} yields images of shape {tuple(x.shape[1:])}, "
                                     f"the real batch {tuple(inputs.shape[1:])}", fix)
                if targets.dim() == 2:
                    c = targets.shape[1]
                    if y.numel() and int(y.max()) >= c:
                        raise TargetError(f"generated label {int(y.max())} is outside the {c} classes of the batch",
                                          "map the generator's classes to the training set's class order")
                    y = torch.nn.functional.one_hot(y, c).to(targets.dtype)
                if x.is_floating_point() != inputs.is_floating_point():   # a cast would turn [0, 1] floats into 0s
                    raise ShapeError(f"source {self.source_names[j + 1]!r} yields {x.dtype} images, the real batch is "
                                     f"{inputs.dtype}: casting one into the other changes their values (floats in "
                                     f"[0, 1] become 0 as integers)",
                                     "mix the batch where both are floats (after the real images are converted), "
                                     "or give the source a transform= to the real images' dtype and range")
                xs.append(x.to(inputs.device, inputs.dtype))
                ys.append(y.to(targets.device, targets.dtype if targets.dim() == 2 else torch.long))
                srcs.append(torch.full((len(pick),), j + 1, dtype=torch.long))
                idxs.append(pick)
        except BaseException:
            self._gen.set_state(state[0])
            self._orders, self._pos = state[1], state[2]
            raise
        k_total = sum(len(s) for s in srcs)
        dev = inputs.device
        real_index = (torch.as_tensor(index).long().cpu() if index is not None else torch.full((b,), -1, dtype=torch.long))
        return MixedBatch(
            inputs=torch.cat([inputs] + xs),
            targets=torch.cat([targets if targets.dim() == 2 else targets.long()] + ys),
            augmented=torch.cat([torch.full((b,), self.real_augmented, dtype=torch.bool),
                                 torch.ones(k_total, dtype=torch.bool)]).to(dev),
            source_ids=torch.cat([torch.full((b,), REAL, dtype=torch.long)] + srcs).to(dev),
            index=torch.cat([real_index] + idxs).to(dev),
            num_real=b,
        )

    def state_dict(self) -> Dict[str, Any]:
        """The mixer's position in every source (resume without repeating or skipping rows)."""
        return {"gen": self._gen.get_state(), "orders": [None if o is None else o.clone() for o in self._orders],
                "pos": list(self._pos)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. A state saved over other sources (another count, or a source of
        another size) or a malformed one is a :class:`ConfigurationError` that changes nothing."""
        fix = "load a state saved by a mixer over the same sources (same names, same number of rows each)"
        try:
            pos, orders, gen = list(state["pos"]), list(state["orders"]), state["gen"]
        except (KeyError, TypeError) as e:
            raise ConfigurationError(f"the mixer state is malformed ({type(e).__name__}: {e})", fix) from None
        if len(pos) != len(self.datasets) or len(orders) != len(self.datasets):
            raise ConfigurationError(f"state for {len(pos)} sources, mixer has {len(self.datasets)}", fix)
        if not is_generator_state(gen, self._gen.get_state()):
            raise ConfigurationError("the mixer state's generator state is not a generator state (a uint8 tensor "
                                     f"of {self._gen.get_state().numel()} values)", fix)
        try:   # content torch refuses, on a scratch generator
            torch.Generator().set_state(gen)
        except RuntimeError as e:
            raise ConfigurationError(f"the mixer state's generator state is invalid ({e})", fix) from None
        pos = [int(p) if is_integer(p) else p for p in pos]   # numpy integers, as a sweep's state may hold
        for name, ds, order, p in zip(self.source_names[1:], self.datasets, orders, pos):
            n = len(ds)
            fits = order is None or (isinstance(order, torch.Tensor) and order.dim() == 1 and order.numel() == n
                                     and torch.equal(order.sort().values, torch.arange(n, device=order.device)))
            if not fits or isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= n:
                raise ConfigurationError(f"the state's position in source {name!r} does not fit its {n} rows "
                                         "(saved over a source of another size?)", fix)
        self._gen.set_state(gen)
        self._orders = [None if o is None else o.clone() for o in orders]
        self._pos = pos


class SourceAudit(AugmentationAudit):
    """Per-source statistics of refined rows: mean weight, kept share, relabel rate, agreement.

    An :class:`~augplug.report.AugmentationAudit` whose "transforms" are the sources of a
    :class:`BatchMixer` (``"real"``, then the generated sources by name). Only refined (augmented)
    rows are counted; real rows count when the mixer was built with ``real_augmented=True``.

    ``update(stats, source_ids, labels)``: ``refiner.stats`` of the call, the batch's
    ``source_ids`` and the targets passed to the refiner.
    """

    def __init__(self, source_names: Sequence[str], class_names: Optional[Sequence[str]] = None,
                 num_classes: Optional[int] = None, only_active: bool = True):
        super().__init__(class_names, num_classes, ignore=(), only_active=only_active)
        self.source_names = [str(n) for n in source_names]
        _check_source_names(self.source_names)

    def update(self, stats: Mapping[str, Any], source_ids, labels, rows: Optional[torch.Tensor] = None) -> bool:
        ids = torch.as_tensor(source_ids)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ShapeError(f"source_ids must be integer ids, got {ids.dtype}",
                             "pass MixedBatch.source_ids (not its augmented mask, nor float ids)")
        ids = ids.long().cpu()
        if ids.dim() != 1:
            raise ShapeError(f"source_ids must be 1-D, got shape {tuple(ids.shape)}", "pass MixedBatch.source_ids")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.source_names)):
            raise ShapeError(f"source ids must lie in [0, {len(self.source_names)})",
                             "pass the source_ids of a batch from the mixer these names came from")
        return super().update(stats, [self.source_names[i] for i in ids.tolist()], labels, rows=rows)

    def per_source(self) -> Dict[str, Dict[str, float]]:
        """``{source name: {rows, weight_mean, kept, relabel_rate, agreement_mean}}``."""
        return {r["transform"]: {k: v for k, v in r.items() if k != "transform"} for r in self.records("transform")}

    def table(self, by: str = "source", format: str = "pandas", digits: int = 3, sort: Optional[str] = None):
        """Per source (``by="source"``), per class, or per source and class (``"source_class"``)."""
        inner = {"source": "transform", "class": "class", "source_class": "transform_class"}.get(by)
        if inner is None:
            raise ConfigurationError(f"by must be 'source', 'class' or 'source_class', got {by!r}", "use by='source'")
        out = super().table(inner, format, digits, sort)
        if format == "pandas":
            return out.rename(columns={"transform": "source"})
        if format == "markdown":
            return out.replace("| transform |", "| source |", 1)
        return [{("source" if k == "transform" else k): v for k, v in r.items()} for r in out]
