"""ZipCacheConfig: one frozen, validating dataclass; presets live in ``configs/*.yaml``."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


def _config_dir() -> Path:
    """``configs/`` of the source tree, or the copy installed as ``zipcache_vllm.configs``."""
    repo = Path(__file__).resolve().parents[2] / "configs"
    if repo.is_dir():
        return repo
    import importlib.resources

    return Path(str(importlib.resources.files("zipcache_vllm.configs")))


CONFIG_DIR = _config_dir()


class Normalizer(str, enum.Enum):
    """Divisor of the probe score sums (method doc §6, ZC-8)."""

    CAUSAL_COUNT = "causal_count"  # N_i = l - i + 1, as the released code
    PROBE_NNZ = "probe_nnz"  # N_i = number of probes that can see token i


class Saliency(str, enum.Enum):
    NORMALIZED = "normalized"  # ZC-6 / ZC-8 (ZipCache)
    ACCUMULATED = "accumulated"  # ZC-5 (H2O / MiKV)
    RANDOM = "random"  # ablation: salient tokens drawn at random


class Selection(str, enum.Enum):
    GLOBAL = "global"  # top-k per (layer, KV head) over the segment, as in the paper
    QUOTA = "quota"  # top quota_count(block_size, r) per block: the constraint of a fixed-size page


class Granularity(str, enum.Enum):
    """Unit of compression and of key/value statistics."""

    SEGMENT = "segment"  # the whole prompt, then each decode window of ``window`` tokens (paper)
    BLOCK = "block"  # each complete block of ``block_size`` tokens (vLLM paged semantics)


class KeyScheme(str, enum.Enum):
    CHANNELWISE = "channelwise"  # ZC-3: per channel, per precision group (paper)
    CST = "cst"  # ZC-2 applied to keys as well


_ENUMS = {
    "normalizer": Normalizer,
    "saliency": Saliency,
    "selection": Selection,
    "granularity": Granularity,
    "key_scheme": KeyScheme,
}


def salient_count(n: int, salient_ratio: float) -> int:
    """Number of salient tokens among ``n``: ceil(r * n), robust to float noise (0.6 * 10 -> 6, not 7)."""
    return min(n, max(0, math.ceil(salient_ratio * n - 1e-6)))


QUOTA_ROWS = 16  # page layout v2: per-block quotas are multiples of this many rows (one 16-row kernel tile)


def quota_count(n: int, salient_ratio: float) -> int:
    """Per-block salient quota of a block (page) of ``n`` tokens, page layout v2.

    If ``n`` is a multiple of 16: the multiple of 16 nearest to ``r * n``, ties upward
    (``16 * floor(r * n / 16 + 0.5)``, robust to float noise like :func:`salient_count`), clipped to
    ``[0, n]``, so every 16-row tile of a page holds rows of one key and one value bit width. Otherwise the
    old rule, ``ceil(r * n)`` (:func:`salient_count`): partial blocks and odd block sizes.

    n = 128: r = 0.6 -> 80 (ceil: 77), 0.8 -> 96 (103), 0.2 -> 32 (26), 1.0 -> 128, 0.0 -> 0; n = 24: 0.6 -> 15.
    The global selection (the paper's top ``ceil(r * l)`` per segment) keeps :func:`salient_count`.
    """
    if n % QUOTA_ROWS:
        return salient_count(n, salient_ratio)
    tiles = math.floor((salient_ratio * n + 1e-6) / QUOTA_ROWS + 0.5)
    return min(n, max(0, QUOTA_ROWS * tiles))


@dataclass(frozen=True)
class ZipCacheConfig:
    """All ZipCache tunables. Defaults are the paper's setting (r = 0.6, 4/2 bits, probes 5 % + 5 %)."""

    bits_high: int = 4
    bits_low: int = 2
    salient_ratio: float = 0.6  # share of tokens at bits_high (keys, and values unless value_salient_ratio)
    value_salient_ratio: float | None = None  # separate share for values; None = salient_ratio
    probe_recent: float = 0.05  # share of the prompt used as recent probes (1.0 = all tokens, exact ZC-6)
    probe_random: float = 0.05  # share drawn at random from the rest
    probe_seed: int = 0
    probe_compat: bool = False  # released code's rules: random probes with replacement, floor counts
    normalizer: Normalizer = Normalizer.CAUSAL_COUNT
    saliency: Saliency = Saliency.NORMALIZED
    selection: Selection = Selection.GLOBAL
    granularity: Granularity = Granularity.SEGMENT
    key_scheme: KeyScheme = KeyScheme.CHANNELWISE
    block_size: int = 128  # tokens per paged block (quota and block granularity)
    window: int = 100  # decode tokens kept unquantized before a segment is compressed (segment granularity)
    # per layer (key, value) salient shares, overriding salient_ratio / value_salient_ratio layer by layer; every
    # layer keeps the base quotas' total of salient rows (keys + values), so pages keep one size and the same bytes
    layer_salient_ratios: tuple[tuple[float, float], ...] | None = None
    # a salient-split calibration (configs/calibration/NAME.json, or a path) that fills layer_salient_ratios for
    # the model's shape (for_model); written by ``python -m zipcache_vllm.eval.calibrate``
    calibration: str | None = None
    # bits of each stored quantization parameter: 16 (fp16) or 8 (one byte under fp16 region scales,
    # method/params8.py; pages read by the twins and the CPU kernels, not yet by the Triton kernels)
    param_bits: int = 16
    # values stored in a Hadamard basis (method/rotation.py): per-token quantization of rotated values loses less;
    # attention outputs are rotated back, keys are not rotated
    value_rotation: bool = False

    def __post_init__(self) -> None:
        for name, cls in _ENUMS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                try:
                    object.__setattr__(self, name, cls(value))
                except ValueError:
                    allowed = ", ".join(m.value for m in cls)
                    raise ValueError(f"{name}={value!r} is invalid; choose one of: {allowed}") from None
        for name in ("bits_high", "bits_low"):
            v = getattr(self, name)
            if type(v) is not int or v not in (2, 4, 8):
                raise ValueError(f"{name} must be 2, 4 or 8 (an integer), got {v!r}")
        if self.bits_high < self.bits_low:
            raise ValueError(f"bits_high ({self.bits_high}) must be >= bits_low ({self.bits_low})")
        for name in ("salient_ratio", "value_salient_ratio", "probe_recent", "probe_random"):
            v = getattr(self, name)
            if v is None and name == "value_salient_ratio":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        if self.probe_recent + self.probe_random <= 0:
            raise ValueError("probe_recent + probe_random must be > 0 (at least one probe token)")
        for name in ("block_size", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if type(self.probe_seed) is not int:
            raise ValueError(f"probe_seed must be an integer, got {self.probe_seed!r}")
        if not isinstance(self.probe_compat, bool):
            raise ValueError(f"probe_compat must be true or false, got {self.probe_compat!r}")
        if self.block_size % 8:
            raise ValueError(f"block_size must be a multiple of 8 (bit packing), got {self.block_size}")
        if not isinstance(self.value_rotation, bool):
            raise ValueError(f"value_rotation must be true or false, got {self.value_rotation!r}")
        if isinstance(self.param_bits, bool) or self.param_bits not in (8, 16):
            raise ValueError(f"param_bits must be 16 or 8, got {self.param_bits!r}")
        if self.calibration is not None and (not isinstance(self.calibration, str) or not self.calibration.strip()):
            raise ValueError(f"calibration must be a calibration name or path, got {self.calibration!r}")
        if self.layer_salient_ratios is not None:
            self._check_layer_ratios()

    def _check_layer_ratios(self) -> None:
        raw = self.layer_salient_ratios
        try:
            pairs = tuple((float(k), float(v)) for k, v in raw)
        except (TypeError, ValueError):
            raise ValueError(f"layer_salient_ratios must be a list of [key, value] shares, got {raw!r}") from None
        if not pairs:
            raise ValueError("layer_salient_ratios must name at least one layer")
        for i, (k, v) in enumerate(pairs):
            if not (0.0 <= k <= 1.0 and 0.0 <= v <= 1.0):
                raise ValueError(f"layer_salient_ratios[{i}] = [{k}, {v}]: shares must be in [0, 1]")
        n, total = self.block_size, self.salient_rows
        for i, (k, v) in enumerate(pairs):
            rows = quota_count(n, k) + quota_count(n, v)
            if rows != total:
                raise ValueError(
                    f"layer_salient_ratios[{i}] = [{k}, {v}] gives {rows} salient rows per block of {n}; every "
                    f"layer must keep the base total of {total} (salient_ratio {self.salient_ratio}, "
                    f"value_salient_ratio {self.v_salient_ratio}): one page size, the same bytes"
                )
        object.__setattr__(self, "layer_salient_ratios", pairs)

    # -- derived -------------------------------------------------------------------------------------
    @property
    def v_salient_ratio(self) -> float:
        return self.salient_ratio if self.value_salient_ratio is None else self.value_salient_ratio

    @property
    def salient_rows(self) -> int:
        """Salient rows per block, keys + values, of the base quotas: the byte budget a per-layer split keeps."""
        return quota_count(self.block_size, self.salient_ratio) + quota_count(self.block_size, self.v_salient_ratio)

    def for_layer(self, layer_idx: int) -> ZipCacheConfig:
        """The config layer ``layer_idx`` runs: its (key, value) shares from ``layer_salient_ratios``, if any."""
        if self.layer_salient_ratios is None:
            return self
        if not 0 <= layer_idx < len(self.layer_salient_ratios):
            raise ValueError(f"layer {layer_idx} has no entry in layer_salient_ratios "
                             f"({len(self.layer_salient_ratios)} layers)")
        k, v = self.layer_salient_ratios[layer_idx]
        return dataclasses.replace(self, salient_ratio=k, value_salient_ratio=v, layer_salient_ratios=None,
                                   calibration=None)

    def for_model(self, num_layers: int, num_kv_heads: int, head_size: int) -> ZipCacheConfig:
        """Fill ``layer_salient_ratios`` from ``calibration`` for a model of this shape (no-op without one)."""
        if self.layer_salient_ratios is None and self.calibration is not None:
            from .calibration import layer_ratios

            ratios = layer_ratios(self.calibration, num_layers, num_kv_heads, head_size, self.block_size,
                                  self.salient_rows)
            return dataclasses.replace(self, layer_salient_ratios=ratios)
        if self.layer_salient_ratios is not None and len(self.layer_salient_ratios) != num_layers:
            raise ValueError(f"layer_salient_ratios has {len(self.layer_salient_ratios)} layers, the model "
                             f"{num_layers}")
        return self

    @property
    def segment_len(self) -> int:
        """Tokens per decode-time segment."""
        return self.block_size if self.granularity is Granularity.BLOCK else self.window

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ZipCacheConfig:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ZipCache config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ZipCacheConfig:
        path = Path(path)
        with path.open() as f:
            data = yaml.safe_load(f)
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def load(cls, preset_or_path: str | Path | None = None, **overrides: Any) -> ZipCacheConfig:
        """A preset name (``default``, ``paged``, ...), a YAML path, or None (defaults); then overrides."""
        if preset_or_path is None:
            base = cls()
        else:
            p = Path(preset_or_path)
            if not p.suffix and not p.exists():
                p = CONFIG_DIR / f"{preset_or_path}.yaml"
                if not p.exists():
                    names = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
                    raise ValueError(f"no preset {preset_or_path!r}; presets: {names}")
            base = cls.from_yaml(p)
        return base.replace(**overrides) if overrides else base

    def replace(self, **changes: Any) -> ZipCacheConfig:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown ZipCache config key(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: (v.value if isinstance(v := getattr(self, f.name), enum.Enum) else v) for f in fields(self)}
        if out["layer_salient_ratios"] is not None:
            out["layer_salient_ratios"] = [list(p) for p in out["layer_salient_ratios"]]
        return out
