"""Classes for images from an export directory: ``edgevit predict`` and :class:`Predictor` share this code.

Images are preprocessed as export.json records (``input.preprocessing``, through the same
:func:`edgevit.data.transforms.image_to_tensor` the datasets use) and run by one of ``edgevit profile``'s
backends (``ort``, ``trt``, ``torch``), so a folder of test images gives the top-1 that ``edgevit profile``
reports for the same export. A graph that normalises itself (profile ``input: {normalize: in_graph}``) gets
raw pixels in its dtype, range and layout: the ``ort``/``trt`` backends convert (``Artifact.graph_input``).
A folder of class sub-folders named like the export's classes is also scored:
top-1, per-class accuracy and a confusion matrix.
"""

from __future__ import annotations

import csv
import glob
import io
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgevit.bench.backends import open_artifact, open_backend
from edgevit.data.datasets import IMAGE_SUFFIXES
from edgevit.data.transforms import image_to_tensor, normalize
from edgevit.errors import EdgeVitError
from edgevit.vit.bundle import Preprocessing, atomic_write_bytes

ImageLike = str | Path | Image.Image | np.ndarray
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # PIL's RGB -> L weights (ITU-R 601-2)
CHUNK = 256  # images decoded at once by predict_files: bounded memory on large folders


@dataclass(frozen=True)
class Prediction:
    """The top classes for one image, most probable first."""

    label: str
    probability: float
    top_k: list[tuple[str, float]]
    source: str | None = None


class Predictor:
    """An export directory, ready to classify images.

    Args:
        out: an export directory (``edgevit export``'s OUT).
        backend: ``ort`` (deploy ONNX, CPU), ``trt`` (``engine.plan``, built on this device) or ``torch``.
        threads: CPU threads of the runtime.
        device: the torch backend's device (default: CUDA when available).

    Example:
        >>> from edgevit import Predictor
        >>> Predictor("build/base/orin-int8").predict("part.png").label
    """

    def __init__(self, out: str | Path, backend: str = "ort", threads: int = 1, device: str | None = None) -> None:
        artifact = open_artifact(out)
        if artifact.export is None:
            raise EdgeVitError(f"{out} is a bundle, not an export directory; run `edgevit export` first")
        self.export = artifact.export
        self.classes: list[str] = list(self.export["output"]["classes"])
        recorded = self.export["input"]["preprocessing"]  # + the graph's input keys (edgevit.export.preprocess)
        self.pre = Preprocessing.model_validate({k: v for k, v in recorded.items() if k in Preprocessing.model_fields})
        self.backend = open_backend(artifact, backend, threads, device)
        fixed = self.export["input"]["shape"][0]
        batch = self.export["profile"]["batch"]
        # a static graph or engine takes exactly its batch; a dynamic one its tuned (opt) size
        self.batch = fixed if fixed > 0 else (batch if isinstance(batch, int) else batch["opt"])

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image -> the model's ``C x size x size`` float32 input.

        ``image``: a path, a PIL image, a uint8 array (``H x W`` or ``H x W x C`` pixels) or a float array of
        the same layout with values in [0, 1].
        """
        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as opened:
                    return image_to_tensor(opened, self.pre).numpy()
            except (UnidentifiedImageError, OSError) as err:
                raise EdgeVitError(f"cannot read image {image}: {err}") from None
        if isinstance(image, Image.Image):
            return image_to_tensor(image, self.pre).numpy()
        if isinstance(image, np.ndarray):
            return self._from_array(image)
        raise EdgeVitError(f"cannot classify a {type(image).__name__}; pass a path, a PIL image or an array")

    def _from_array(self, array: np.ndarray) -> np.ndarray:
        one_image = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))
        if not one_image or not (array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating)):
            raise EdgeVitError(
                f"an image array is H x W or H x W x C (C = 1, 3 or 4), uint8 or float in [0, 1]; got {array.dtype} "
                f"{array.shape} (pass a list of arrays for a batch)"
            )
        if array.dtype == np.uint8:
            return image_to_tensor(
                Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array), self.pre
            ).numpy()
        import torch

        planes = array[..., None] if array.ndim == 2 else array[..., :3]  # alpha is dropped, as convert() does
        if planes.shape[-1] != self.pre.channels:  # gray <-> RGB with PIL's convert() weights
            planes = planes @ LUMA[:, None] if self.pre.channels == 1 else np.repeat(planes, 3, -1)
        size = (self.pre.size, self.pre.size)
        if planes.shape[:2] != size:  # PIL's float-mode resize: the filter image_to_tensor uses, unquantised
            resample = getattr(Image.Resampling, self.pre.interpolation.upper())
            planes = np.stack(
                [
                    np.asarray(Image.fromarray(planes[..., c].astype(np.float32), "F").resize(size, resample))
                    for c in range(planes.shape[-1])
                ],
                -1,
            )
        x = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32)).permute(2, 0, 1)
        return normalize(x, self.pre).numpy()

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Logits for preprocessed ``N x C x H x W`` inputs, run ``self.batch`` at a time (the last batch
        padded with copies of its final image, which are dropped)."""
        rows = []
        for start in range(0, len(inputs), self.batch):
            chunk = inputs[start : start + self.batch]
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            native = self.backend.to_native(np.ascontiguousarray(chunk, dtype=np.float32))
            rows.append(self.backend.logits(self.backend.infer(native))[:n])
        return np.concatenate(rows) if rows else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 1) -> Prediction | list[Prediction]:
        """Classify one image (returns a :class:`Prediction`) or a list of them (returns a list)."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if not images:
            return []
        logits = self.logits(np.stack([self.preprocess(image) for image in images]))
        probs = _softmax(logits)
        order = np.argsort(-probs, axis=1, kind="stable")[:, : max(1, min(top_k, len(self.classes)))]
        predictions = [
            Prediction(
                label=self.classes[row[0]],
                probability=float(p[row[0]]),
                top_k=[(self.classes[i], float(p[i])) for i in row],
                source=str(image) if isinstance(image, (str, Path)) else None,
            )
            for image, p, row in zip(images, probs, order, strict=True)
        ]
        return predictions[0] if single else predictions


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def expand_images(specs: Iterable[str]) -> list[Path]:
    """Image files from files, folders (searched recursively) and globs, in a stable order."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise EdgeVitError(f"no files match {spec}")
            found += matches
        else:
            raise EdgeVitError(f"{spec} does not exist")
    if not found:
        raise EdgeVitError(f"no images found in {', '.join(specs)}")
    return found


def true_class(path: Path, roots: list[Path], classes: list[str]) -> str | None:
    """The class a file is labelled with: the name of its first folder below a given folder, if a class."""
    for root in roots:
        if root.is_dir() and path.is_relative_to(root):
            parts = path.relative_to(root).parts
            if len(parts) > 1 and parts[0] in classes:
                return parts[0]
    return None


def evaluate(predictions: list[Prediction], truths: list[str | None], classes: list[str]) -> dict[str, Any] | None:
    """Top-1, per-class accuracy and the confusion matrix (rows: true class, columns: predicted) over the images
    that have a true class; None when none has one."""
    pairs = [(t, p.label) for t, p in zip(truths, predictions, strict=True) if t is not None]
    if not pairs:
        return None
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for truth, label in pairs:
        matrix[index[truth], index[label]] += 1
    per_class = {c: float(matrix[i, i] / matrix[i].sum()) for i, c in enumerate(classes) if matrix[i].sum()}
    return {
        "images": len(pairs),
        "top1": float(np.trace(matrix) / len(pairs)),
        "per_class": per_class,
        "classes": classes,
        "confusion": matrix.tolist(),
    }


def predict_files(
    out: str | Path, specs: Sequence[str], backend: str = "ort", top_k: int = 1, threads: int = 1
) -> dict[str, Any]:
    """``edgevit predict``: classify the images in ``specs`` (files, folders, globs) with the export in ``out``.

    Returns ``{"predictions": [...], "evaluation": {...} | None}``; an image that cannot be decoded is a
    clear error naming it (nothing is skipped silently).
    """
    files = expand_images(specs)
    predictor = Predictor(out, backend, threads)
    predictions: list[Prediction] = []
    for start in range(0, len(files), CHUNK):
        predictions += predictor.predict(files[start : start + CHUNK], top_k)
    roots = [Path(s) for s in specs]
    truths = [true_class(f, roots, predictor.classes) for f in files]
    return {
        "export": str(out),
        "backend": backend,
        "predictions": [asdict(p) for p in predictions],
        "truths": truths,
        "evaluation": evaluate(predictions, truths, predictor.classes),
    }


def write_csv(result: dict[str, Any], path: str | Path) -> None:
    """One row per image: file, true class (when known), predicted class, probability, then the top-k."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "true_class", "label", "probability", "top_k"])
    for p, truth in zip(result["predictions"], result["truths"], strict=True):
        writer.writerow(
            [
                p["source"],
                truth or "",
                p["label"],
                f"{p['probability']:.6f}",
                " ".join(f"{c}:{q:.6f}" for c, q in p["top_k"]),
            ]
        )
    atomic_write_bytes(Path(path), buffer.getvalue().encode())


def format_result(result: dict[str, Any]) -> str:
    """``edgevit predict``'s text: one line per image, then the scores when the images have classes."""
    lines = [f"{p['source']}  " + "  ".join(f"{c} {q:.4f}" for c, q in p["top_k"]) for p in result["predictions"]]
    ev = result["evaluation"]
    if ev:
        lines.append(f"top-1 {ev['top1']:.4f} on {ev['images']} labelled images ({result['backend']})")
        lines.append("per class: " + ", ".join(f"{c} {a:.4f}" for c, a in ev["per_class"].items()))
        width = max(len(c) for c in ev["classes"])
        lines.append("confusion (rows: true, columns: predicted)")
        lines.append(" " * (width + 1) + " ".join(f"{c:>{width}}" for c in ev["classes"]))
        lines += [
            f"{c:>{width}} " + " ".join(f"{n:>{width}d}" for n in row)
            for c, row in zip(ev["classes"], ev["confusion"], strict=True)
        ]
    return "\n".join(lines)
