"""Irregular-mask generators, registered by name, and the deterministic ``make_mask`` entry point.

Every mask holefill stores is produced here. A mask is a ``(H, W)`` ``uint8`` array with values
``{0, 255}``, **255 = hole**; the same ``(seed, key, generator config)`` always gives the same array, on
any machine and in any process, because the random stream is derived from a blake2b digest of those
inputs (never from Python's salted ``hash()``).

Generators
----------
``lama_{thin,medium,thick}_{256,512}``
    LaMa's evaluation generators: random thick-line strokes (irregular) or, with some probability,
    random axis-aligned boxes; one kind is drawn per mask, weighted by ``irregular_proba`` and
    ``box_proba``.
``lama_train_mix``
    LaMa's training mix at 256 px: irregular strokes or boxes, 50/50.
``deepfill_v2``
    DeepFill v2 free-form masks: 1-3 brush strokes with round joints, united with a 128x128 box shrunk
    by a random margin on each side.
``lbam_random_field``
    LBAM's ``generateMask.py`` idea: a coarse uniform random field, bilinearly up-sampled and
    thresholded at ``density``, cropped, accepted when its area is in ``accept_ratio``.

Every generator is defined at a *nominal* square size (256 or 512). At another size, lengths, widths
and box sides are scaled by ``min(H, W) / nominal`` and counts by the aspect factor
``H * W / min(H, W) ** 2``, so the expected hole ratio stays about the same on non-square images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field, ValidationError, model_validator

from pipeline.config import Config, deep_merge, first_error

__all__ = [
    "BoxSettings",
    "DeepFillV2Settings",
    "IrregularSettings",
    "LamaSettings",
    "LbamRandomFieldSettings",
    "MaskGenerator",
    "MaskSettings",
    "describe",
    "generator_names",
    "get_generator",
    "HoleRatioStats",
    "hole_ratio",
    "hole_ratio_stats",
    "make_mask",
    "nominal_size",
]

HOLE: int = 255


# --------------------------------------------------------------------------------------------------
# Typed parameters of each generator family
# --------------------------------------------------------------------------------------------------


class IrregularSettings(Config):
    """LaMa random strokes: ``randint(min_times, max_times + 1)`` strokes of 1-5 thick line segments."""

    min_times: int = Field(ge=0)
    max_times: int = Field(ge=0)
    max_width: int = Field(gt=0, description="brush width is 5 + randint(max_width) px at nominal size")
    max_len: int = Field(gt=0, description="segment length is 10 + randint(max_len) px at nominal size")
    max_angle: int = Field(gt=0, description="segment angle is 0.01 + randint(max_angle) radians")

    @model_validator(mode="after")
    def _times_ordered(self) -> "IrregularSettings":
        if self.max_times < self.min_times:
            raise ValueError("max_times must be >= min_times")
        return self


class BoxSettings(Config):
    """LaMa random boxes: ``randint(min_times, max_times + 1)`` boxes with sides in [bbox_min, bbox_max)."""

    margin: int = Field(ge=0)
    bbox_min: int = Field(gt=0)
    bbox_max: int = Field(gt=0)
    min_times: int = Field(ge=0)
    max_times: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "BoxSettings":
        if self.bbox_max <= self.bbox_min:
            raise ValueError("bbox_max must be > bbox_min")
        if self.max_times < self.min_times:
            raise ValueError("max_times must be >= min_times")
        return self


class LamaSettings(Config):
    """LaMa mixed generator: per mask, strokes with weight ``irregular_proba`` or boxes with ``box_proba``."""

    nominal_size: int = Field(gt=0)
    irregular_proba: float = Field(ge=0.0)
    irregular: IrregularSettings
    box_proba: float = Field(ge=0.0)
    box: BoxSettings | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "LamaSettings":
        if self.irregular_proba + self.box_proba <= 0:
            raise ValueError("irregular_proba + box_proba must be > 0")
        if self.box_proba > 0 and self.box is None:
            raise ValueError("box_proba > 0 needs box parameters")
        return self


class DeepFillV2Settings(Config):
    """DeepFill v2 free-form strokes united with a shrunk box (``inpaint_ops.py`` brush_stroke_mask)."""

    nominal_size: int = Field(default=256, gt=0)
    min_strokes: int = Field(default=1, ge=0)
    max_strokes: int = Field(default=3, ge=0)
    min_vertices: int = Field(default=4, ge=1)
    max_vertices: int = Field(default=12, ge=1)
    mean_angle: float = 2 * math.pi / 5
    angle_range: float = Field(default=2 * math.pi / 15, ge=0.0)
    min_width: float = Field(default=12.0, gt=0.0)
    max_width: float = Field(default=40.0, gt=0.0)
    box_size: int = Field(default=128, ge=0, description="side of the box at nominal size; 0 disables it")
    box_max_shrink: int = Field(default=16, ge=0, description="each box side moves in by up to this")

    @model_validator(mode="after")
    def _ordered(self) -> "DeepFillV2Settings":
        if self.max_strokes < self.min_strokes:
            raise ValueError("max_strokes must be >= min_strokes")
        if self.max_vertices < self.min_vertices:
            raise ValueError("max_vertices must be >= min_vertices")
        if self.max_width < self.min_width:
            raise ValueError("max_width must be >= min_width")
        return self


class LbamRandomFieldSettings(Config):
    """LBAM ``generateMask.py``: thresholded, bilinearly up-sampled coarse random field.

    Polarity decision: the official script paints the *pattern* (field below ``density``) black on
    white and its loader reads white as hole, which would give 75-93 % holes. holefill treats the
    pattern as the hole: that is the region the 20-30 % acceptance band was written for, and a mask that
    hides almost all of the image is not what the paper trains on.
    """

    nominal_size: int = Field(default=256, gt=0, description="side of the crop taken from the field")
    field_size: int = Field(default=350, gt=0, description="side of the up-sampled field (>= nominal)")
    resolution: float = Field(default=0.025, gt=0.0, le=1.0, description="coarse cells per field pixel")
    density: float = Field(default=0.25, gt=0.0, lt=1.0, description="field values below this are holes")
    accept_min: float = Field(default=0.20, ge=0.0, le=1.0)
    accept_max: float = Field(default=0.30, ge=0.0, le=1.0)
    max_tries: int = Field(default=2, ge=1, description="draws before the last draw is kept as is")

    @model_validator(mode="after")
    def _ordered(self) -> "LbamRandomFieldSettings":
        if self.field_size < self.nominal_size:
            raise ValueError("field_size must be >= nominal_size")
        if self.accept_max < self.accept_min:
            raise ValueError("accept_max must be >= accept_min")
        return self


# --------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scale:
    """How a generator defined at ``nominal`` px maps onto an ``height x width`` canvas."""

    height: int
    width: int
    nominal: int

    @property
    def length(self) -> float:
        """Factor for lengths, widths and box sides."""
        return min(self.height, self.width) / self.nominal

    @property
    def count(self) -> float:
        """Factor for numbers of strokes/boxes: keeps the hole ratio on non-square canvases."""
        short = min(self.height, self.width)
        return self.height * self.width / (short * short)

    def times(self, n: int) -> int:
        return int(round(n * self.count))


def _draw_round_line(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: float) -> None:
    """Draw a polyline ``width`` px thick with round caps and joints (a disc at every vertex)."""
    w = max(1, int(round(width)))
    if len(points) >= 2:
        draw.line(points, fill=HOLE, width=w)
    r = w / 2.0
    for x, y in points:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=HOLE)


_OPENCV_EDGE_PX = 1.0


def _lama_irregular(rng: np.random.Generator, p: IrregularSettings, scale: _Scale) -> np.ndarray:
    """LaMa random strokes: each stroke is a chain of 1-5 thick segments from a uniform start point."""
    h, w = scale.height, scale.width
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    s = scale.length
    n_strokes = int(rng.integers(scale.times(p.min_times), scale.times(p.max_times) + 1))
    for stroke in range(n_strokes):
        x, y = float(rng.integers(w)), float(rng.integers(h))
        for _ in range(1 + int(rng.integers(5))):
            angle = 0.01 + int(rng.integers(p.max_angle))
            if stroke % 2 == 0:
                # LaMa mirrors the angle on every other stroke so strokes do not all curl one way.
                angle = 2 * math.pi - angle
            length = (10 + int(rng.integers(p.max_len))) * s
            # LaMa draws with OpenCV, whose thick-line rasteriser covers the pixels on both edges: a
            # stroke of thickness t is about t + 1 px across. The extra pixel keeps holefill's hole
            # ratios on LaMa's measured ones (thin_256 mean 0.29 rather than 0.27).
            brush = (5 + int(rng.integers(p.max_width))) * s + _OPENCV_EDGE_PX
            end_x = min(max(x + length * math.sin(angle), 0.0), float(w))
            end_y = min(max(y + length * math.cos(angle), 0.0), float(h))
            _draw_round_line(draw, [(x, y), (end_x, end_y)], brush)
            x, y = end_x, end_y
    return np.asarray(canvas, dtype=np.uint8)


def _lama_boxes(rng: np.random.Generator, p: BoxSettings, scale: _Scale) -> np.ndarray:
    """LaMa random boxes: sides in [bbox_min, bbox_max), placed ``margin`` px from the border."""
    h, w = scale.height, scale.width
    s = scale.length
    mask = np.zeros((h, w), np.uint8)
    margin = int(round(p.margin * s))
    lo = max(1, int(round(p.bbox_min * s)))
    hi = min(int(round(p.bbox_max * s)), h - 2 * margin, w - 2 * margin)
    if hi <= lo:  # canvas too small for the configured boxes: no box fits, leave it empty
        return mask
    for _ in range(int(rng.integers(scale.times(p.min_times), scale.times(p.max_times) + 1))):
        bw, bh = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
        x0 = int(rng.integers(margin, w - margin - bw + 1))
        y0 = int(rng.integers(margin, h - margin - bh + 1))
        mask[y0 : y0 + bh, x0 : x0 + bw] = HOLE
    return mask


def _lama_mixed(rng: np.random.Generator, p: LamaSettings, height: int, width: int) -> np.ndarray:
    scale = _Scale(height, width, p.nominal_size)
    total = p.irregular_proba + p.box_proba
    if rng.random() * total < p.irregular_proba:
        return _lama_irregular(rng, p.irregular, scale)
    assert p.box is not None  # guaranteed by LamaSettings validation when box_proba > 0
    return _lama_boxes(rng, p.box, scale)


def _deepfill_v2(rng: np.random.Generator, p: DeepFillV2Settings, height: int, width: int) -> np.ndarray:
    """Free-form brush strokes (zig-zag polylines, round joints) united with a randomly shrunk box."""
    scale = _Scale(height, width, p.nominal_size)
    s = scale.length
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    # DeepFill sizes segments by the canvas diagonal; at nominal size that is nominal * sqrt(2) / 8.
    radius = math.hypot(height, width) / 8.0
    for _ in range(int(rng.integers(scale.times(p.min_strokes), scale.times(p.max_strokes) + 1))):
        n_vertex = int(rng.integers(p.min_vertices, p.max_vertices + 1))
        angle_lo = p.mean_angle - rng.uniform(0, p.angle_range)
        angle_hi = p.mean_angle + rng.uniform(0, p.angle_range)
        points = [(float(rng.integers(width)), float(rng.integers(height)))]
        for i in range(n_vertex):
            angle = rng.uniform(angle_lo, angle_hi)
            if i % 2 == 0:
                angle = 2 * math.pi - angle  # alternate turning direction: the zig-zag look
            r = float(np.clip(rng.normal(radius, radius / 2), 0, 2 * radius))
            x = min(max(points[-1][0] + r * math.cos(angle), 0.0), float(width))
            y = min(max(points[-1][1] + r * math.sin(angle), 0.0), float(height))
            points.append((x, y))
        _draw_round_line(draw, points, rng.uniform(p.min_width, p.max_width) * s)
    mask = np.array(canvas, dtype=np.uint8)
    if rng.random() < 0.5:
        mask = mask[:, ::-1]
    if rng.random() < 0.5:
        mask = mask[::-1, :]
    mask = np.ascontiguousarray(mask)
    side = int(round(p.box_size * s))
    if side > 0:
        bh, bw = min(side, height), min(side, width)
        y0 = int(rng.integers(0, height - bh + 1))
        x0 = int(rng.integers(0, width - bw + 1))
        shrink = max(0, int(round(p.box_max_shrink * s)))
        top, bottom, left, right = (int(v) for v in rng.integers(0, shrink + 1, size=4))
        mask[y0 + top : y0 + bh - bottom, x0 + left : x0 + bw - right] = HOLE
    return mask


def _lbam_random_field(rng: np.random.Generator, p: LbamRandomFieldSettings, height: int, width: int) -> np.ndarray:
    """Threshold a bilinearly up-sampled coarse uniform field; keep a draw whose area is in range."""
    s = min(height, width) / p.nominal_size
    margin = p.field_size - p.nominal_size  # the crop wanders over this many px at nominal size
    field_h = height + int(round(margin * s))
    field_w = width + int(round(margin * s))
    # Coarse cells are sized in field pixels at nominal scale, so the blob size scales with the image.
    cell = 1.0 / (p.resolution * s)
    coarse_h = max(2, int(math.ceil(field_h / cell)) + 1)
    coarse_w = max(2, int(math.ceil(field_w / cell)) + 1)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(p.max_tries):
        coarse = rng.random((coarse_h, coarse_w), dtype=np.float32)
        field = np.asarray(
            Image.fromarray(coarse, mode="F").resize((field_w, field_h), Image.Resampling.BILINEAR)
        )
        y0 = int(rng.integers(0, field_h - height + 1))
        x0 = int(rng.integers(0, field_w - width + 1))
        crop = field[y0 : y0 + height, x0 : x0 + width]
        mask = np.where(crop < p.density, HOLE, 0).astype(np.uint8)
        if p.accept_min <= hole_ratio(mask) <= p.accept_max:
            break
    return mask


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskGenerator:
    """A named mask generator: its typed parameters (with defaults) and its drawing function."""

    name: str
    params_type: type[Config]
    defaults: Mapping[str, Any]
    draw: Callable[[np.random.Generator, Any, int, int], np.ndarray]

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> Config:
        """Validate ``defaults`` deep-merged with ``overrides`` into the generator's params type."""
        merged = deep_merge(dict(self.defaults), dict(overrides or {}))
        try:
            return self.params_type.model_validate(merged)
        except ValidationError as exc:
            key, msg = first_error(exc, self.params_type)
            raise ValueError(f"mask generator {self.name!r} param {key}: {msg}") from None


def _irregular(min_times: int, max_times: int, max_width: int, max_len: int, max_angle: int) -> dict:
    return dict(min_times=min_times, max_times=max_times, max_width=max_width, max_len=max_len, max_angle=max_angle)


def _box(margin: int, bbox_min: int, bbox_max: int, min_times: int, max_times: int) -> dict:
    return dict(margin=margin, bbox_min=bbox_min, bbox_max=bbox_max, min_times=min_times, max_times=max_times)


def _lama(nominal: int, irregular: dict, box_proba: float, box: dict | None, irregular_proba: float = 1.0) -> dict:
    return dict(nominal_size=nominal, irregular_proba=irregular_proba, irregular=irregular, box_proba=box_proba, box=box)


# LaMa's eval configs (configs/data_gen/random_*.yaml) and its 256-px training mix.
_REGISTRY: dict[str, MaskGenerator] = {
    g.name: g
    for g in (
        MaskGenerator("lama_thin_256", LamaSettings, _lama(256, _irregular(4, 50, 10, 40, 4), 0.0, None), _lama_mixed),
        MaskGenerator(
            "lama_medium_256", LamaSettings, _lama(256, _irregular(4, 5, 50, 100, 4), 0.3, _box(0, 10, 50, 1, 5)), _lama_mixed
        ),
        MaskGenerator(
            "lama_thick_256", LamaSettings, _lama(256, _irregular(1, 5, 100, 200, 4), 0.3, _box(10, 30, 150, 1, 3)), _lama_mixed
        ),
        MaskGenerator("lama_thin_512", LamaSettings, _lama(512, _irregular(4, 70, 20, 100, 4), 0.0, None), _lama_mixed),
        MaskGenerator(
            "lama_medium_512", LamaSettings, _lama(512, _irregular(4, 10, 100, 200, 4), 0.3, _box(0, 30, 150, 1, 5)), _lama_mixed
        ),
        MaskGenerator(
            "lama_thick_512", LamaSettings, _lama(512, _irregular(1, 5, 250, 450, 4), 0.3, _box(10, 30, 300, 1, 4)), _lama_mixed
        ),
        MaskGenerator(
            "lama_train_mix", LamaSettings, _lama(256, _irregular(1, 5, 100, 200, 4), 1.0, _box(10, 30, 150, 1, 4)), _lama_mixed
        ),
        MaskGenerator("deepfill_v2", DeepFillV2Settings, {}, _deepfill_v2),
        MaskGenerator("lbam_random_field", LbamRandomFieldSettings, {}, _lbam_random_field),
    )
}


def generator_names() -> tuple[str, ...]:
    """Names of all registered mask generators, in registration order."""
    return tuple(_REGISTRY)


def get_generator(name: str) -> MaskGenerator:
    """The registered generator called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mask generator {name!r}; known: {', '.join(_REGISTRY)}") from None


class MaskSettings(Config):
    """Which generator to use and overrides of its parameters (validated against its own params type)."""

    name: str = "lama_train_mix"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_and_valid(self) -> "MaskSettings":
        get_generator(self.name).resolve(self.params)
        return self

    def resolved(self) -> Config:
        """The generator's full typed parameters: its defaults with these overrides applied."""
        return get_generator(self.name).resolve(self.params)


def _as_settings(settings: MaskSettings | str) -> MaskSettings:
    if isinstance(settings, MaskSettings):
        return settings
    if isinstance(settings, str):
        return MaskSettings(name=settings)
    raise ValueError(f"mask settings must be a MaskSettings or a generator name, got {type(settings).__name__}")


def describe(settings: MaskSettings | str) -> dict[str, Any]:
    """``{"name": ..., "params": {...}}`` with every parameter resolved: recorded in each sample's JSON."""
    settings = _as_settings(settings)
    return {"name": settings.name, "params": settings.resolved().model_dump(mode="json")}


@dataclass(frozen=True)
class _CompiledMasks:
    """What mask settings resolve to, computed once per distinct settings rather than once per mask.

    Validating the params and rendering them into the digest payload cost more than drawing a typical
    mask; both depend only on the settings, so :func:`_compiled` caches them.
    """

    generator: MaskGenerator
    params: Config
    payload_tail: str  # the digest payload after seed and key: ``repr(name) + ", " + repr(sorted items)``

    def rng(self, seed: int, key: str) -> np.random.Generator:
        """The random stream of one mask: a blake2b digest of seed, key, generator name and resolved params.

        The params are part of the digest so that changing a generator's settings changes its masks even
        for the same key; Python's ``hash()`` is never used (it is salted per process).
        """
        # Byte for byte ``repr((seed, key, name, items))``: masks stay identical to earlier releases.
        payload = f"({int(seed)!r}, {str(key)!r}, {self.payload_tail})".encode()
        digest = hashlib.blake2b(payload, digest_size=16, person=b"holefill.mask").digest()
        return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def _compiled(settings: MaskSettings) -> _CompiledMasks:
    try:
        cache_key = json.dumps(settings.params, sort_keys=True)
    except (TypeError, ValueError):  # params that JSON cannot key (never from a YAML config): no cache
        return _compile(settings.name, settings.params)
    return _compile_cached(settings.name, cache_key)


@functools.lru_cache(maxsize=64)
def _compile_cached(name: str, params_json: str) -> _CompiledMasks:
    return _compile(name, json.loads(params_json))


def _compile(name: str, overrides: Mapping[str, Any]) -> _CompiledMasks:
    generator = get_generator(name)
    params = generator.resolve(overrides)
    items = sorted(_flat_items(params.model_dump(mode="json")))
    return _CompiledMasks(generator, params, f"{name!r}, {items!r}")


def _flat_items(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            items.extend(_flat_items(v, f"{prefix}{k}."))
        else:
            items.append((f"{prefix}{k}", v))
    return items


def make_mask(settings: MaskSettings | str, seed: int, key: str, height: int, width: int) -> np.ndarray:
    """Draw the mask of sample ``key``: ``(height, width)`` uint8 in {0, 255}, 255 = hole.

    Deterministic in ``(seed, key, generator name, resolved params, height, width)``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    settings = _as_settings(settings)
    compiled = _compiled(settings)
    mask = compiled.generator.draw(compiled.rng(seed, key), compiled.params, int(height), int(width))
    if mask.shape != (height, width) or mask.dtype != np.uint8:  # internal contract of every generator
        raise AssertionError(f"{settings.name} drew {mask.shape} {mask.dtype}, expected ({height}, {width}) uint8")
    return mask


def hole_ratio(mask: np.ndarray) -> float:
    """Fraction of hole pixels of a mask (uint8 255 = hole, bool, or float with 1 = hole)."""
    mask = np.asarray(mask)
    if mask.size == 0:
        raise ValueError("hole_ratio of an empty mask is undefined")
    if mask.dtype == np.uint8:
        return float(np.count_nonzero(mask > 127)) / mask.size
    return float(np.count_nonzero(mask > 0.5)) / mask.size


def nominal_size(settings: MaskSettings | str) -> int:
    """The square size a generator is defined at (its LaMa config's image size)."""
    return int(getattr(_as_settings(settings).resolved(), "nominal_size"))


@dataclass(frozen=True)
class HoleRatioStats:
    """Summary of a generator's hole ratios over ``samples`` draws."""

    name: str
    samples: int
    mean: float
    p10: float
    p90: float
    over_half: float  # share of masks with more than 50 % holes (LaMa drops those from its eval sets)


def hole_ratio_stats(
    settings: MaskSettings | str, samples: int, *, seed: int = 0, height: int | None = None, width: int | None = None
) -> HoleRatioStats:
    """Hole-ratio mean / p10 / p90 of ``samples`` masks (keys ``"0"``, ``"1"``, ...) at the given size.

    The size defaults to the generator's nominal square size, where LaMa measured its own numbers.
    """
    if samples <= 0:
        raise ValueError(f"samples must be > 0, got {samples}")
    settings = _as_settings(settings)
    side = nominal_size(settings)
    h, w = height or side, width or side
    ratios = np.array([hole_ratio(make_mask(settings, seed, str(i), h, w)) for i in range(samples)])
    p10, p90 = np.percentile(ratios, [10, 90])
    return HoleRatioStats(settings.name, samples, float(ratios.mean()), float(p10), float(p90), float((ratios > 0.5).mean()))
