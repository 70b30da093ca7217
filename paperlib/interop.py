"""Reading and writing SAE weights, ours and those of the common SAE libraries.

Our banks are saved (``save_sae``) one seed per directory in a SAELens-like layout (``cfg.json`` plus
``sae_weights.safetensors`` with ``W_enc`` [d, n], ``b_enc`` [n], ``W_dec`` [n, d], ``b_dec`` [d]) that also
keeps every training buffer (thresholds' running means, dead-latent counters, P-anneal's state) and, in
a ``"paperlib"`` object of ``cfg.json``, our full ``SAEConfig``, so that ``load_bank`` rebuilds the exact
bank from ``save_sae``'s directory, and ``load_sae`` one seed of it (or what ``save_single`` wrote).
SAELens loads state dicts strictly, so it cannot open these; ``export_sae`` writes the inference
weights alone, in the files SAELens (``SAE.load_from_disk``) or sparsify (``SparseCoder.load_from_disk``)
load (one way: ``load_sae`` refuses them, ``read_decoder`` reads them). Layouts by architecture:

=====================================  ==============================================  ============
paperlib architecture                  SAELens 6 (cfg.json ``architecture``)           sparsify 1.3
=====================================  ==============================================  ============
``relu``, ``relu_dnorm``, ``panneal``  ``standard``                                    --
``topk``                               ``topk``                                        ``topk``
``jumprelu``                           ``jumprelu`` (``threshold`` = exp(log θ))       --
``batchtopk``, ``matryoshka``          ``jumprelu``, every latent's ``threshold`` the  --
                                       bank's inference threshold (as SAELens saves
                                       its own BatchTopK and Matryoshka SAEs)
``gated``                              ``gated`` (``b_gate`` = our ``b_enc``)          --
=====================================  ==============================================  ============

Tested (tests/peers, ``make test-peers``) by loading the exports in SAELens 6.54.12 and eai-sparsify
1.3.3 and comparing their codes and reconstructions with the bank's.

For consistency metrics only the decoder directions matter, and ``read_decoder`` takes them from:

* ``paperlib``: directory with ``cfg.json`` (with a ``"paperlib"`` key) + ``sae_weights.safetensors``;
* ``saelens``: directory with ``cfg.json`` + ``sae_weights.safetensors`` (``W_dec`` [d_sae, d_in]),
  or that ``.safetensors`` file itself;
* ``sparsify`` (EleutherAI): directory with ``cfg.json`` + ``sae.safetensors`` (``encoder.weight``
  [n, d], ``encoder.bias`` [n], ``W_dec`` [n, d], ``b_dec`` [d]);
* ``dictionary_learning`` (saprmarks): ``ae.pt`` state dict (or its directory, with an optional
  ``config.json``). ``AutoEncoder``, ``GatedAutoEncoder``, ``AutoEncoderTopK`` and ``BatchTopKSAE``
  keep the decoder as ``nn.Linear(dict_size, activation_dim)``, i.e. ``decoder.weight`` [d, n];
  ``JumpReluAutoEncoder`` and ``MatryoshkaBatchTopKSAE`` keep ``W_dec`` [n, d] as a parameter.

Every failure names the path and what is wrong with it, since these files come from elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from paperlib.atomic import atomic_path
from paperlib.sae.bank import SAEBank, SAEConfig

CFG, WEIGHTS, SPARSIFY_WEIGHTS, DL_WEIGHTS, DL_CONFIG = (
    "cfg.json",
    "sae_weights.safetensors",
    "sae.safetensors",
    "ae.pt",
    "config.json",
)
LAYOUTS = ("paperlib", "saelens", "sparsify", "dictionary_learning")
_ACCEPTED = (
    "accepted layouts: paperlib or SAELens (a directory with cfg.json + sae_weights.safetensors, "
    "or that .safetensors file), sparsify (a directory with cfg.json + sae.safetensors), "
    "dictionary_learning (ae.pt, or a directory holding it)"
)
# SAELens names where SAELens has the architecture; ours otherwise (read back by our own loader).
_SAELENS_ARCH = {
    "relu": "standard",
    "relu_dnorm": "standard",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "matryoshka": "matryoshka_batchtopk",
    "panneal": "standard",
}  # P-anneal's codes are ReLU's; only its training loss differs
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass(frozen=True, eq=False)
class Decoder:
    """An SAE's decoder rows [n_latents, d_model] (float32), where they came from, and the encoder
    [d_model, n_latents] when the file has one (for encoder-side comparisons)."""

    W_dec: np.ndarray
    layout: str
    path: Path
    W_enc: np.ndarray | None = None

    @property
    def n_latents(self) -> int:
        return self.W_dec.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_dec.shape[1]


# --------------------------------------------------------------------------------------- writing


def _seed_config(bank: SAEBank, i: int) -> SAEConfig:
    return dataclasses.replace(bank.cfg, n_seeds=1, seed=bank.cfg.seed + i)


def _save_seed(bank: SAEBank, i: int, path: Path) -> Path:
    """Seed i of the bank, sliced from it directly (``SAEBank.seed`` would rebuild it in float32)."""
    cfg = _seed_config(bank, i)
    # Every parameter and buffer (thresholds, gates, dead-latent counters), one seed's slice each.
    tensors = {name: value.detach()[i].cpu().contiguous() for name, value in bank.state_dict().items()}
    with atomic_path(path / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "d_in": cfg.d_model,
        "d_sae": cfg.n_latents,
        "architecture": _SAELENS_ARCH[cfg.architecture],
        "dtype": str(tensors["W_dec"].dtype).removeprefix("torch."),
        "apply_b_dec_to_input": True,  # our encoder reads x - b_dec
        "normalize_activations": "none",
        **({"k": cfg.k} if cfg.k is not None else {}),
        "paperlib": dataclasses.asdict(cfg),
    }
    with atomic_path(path / CFG) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return path


def save_single(bank: SAEBank, path) -> Path:
    """Write a bank of one into ``path/`` itself (weights first, cfg.json last, each atomically,
    so a directory with cfg.json always has complete weights)."""
    if bank.n_seeds != 1:
        raise ValueError(f"save_single needs a bank of one seed, got {bank.n_seeds}; use save_sae for banks")
    return _save_seed(bank, 0, Path(path))


def save_sae(bank: SAEBank, path) -> list[Path]:
    """Write seed i of the bank to ``path/seed_{i}/`` (its config records seed = cfg.seed + i)."""
    return [_save_seed(bank, i, Path(path) / f"seed_{i}") for i in range(bank.n_seeds)]


# ------------------------------------------------------------------------------------- exporting

EXPORT_LAYOUTS = ("saelens", "sparsify")
# The releases whose on-disk formats export_sae writes and tests/peers loads the exports with.
SAELENS_VERSION, SPARSIFY_VERSION = "6.54.12", "1.3.3"
_EXPORTABLE = (
    "layout='saelens' takes relu, relu_dnorm, panneal, topk, jumprelu, batchtopk, matryoshka and gated; "
    "layout='sparsify' takes topk; save_sae keeps any bank in paperlib's own layout"
)


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _saelens_files(bank: SAEBank, i: int, metadata: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Seed i as the state dict of SAELens's inference class for its architecture (exactly that
    class's parameters: ``SAE.load_from_disk`` loads strictly) and the ``cfg.json`` SAELens 6 writes."""
    cfg = _seed_config(bank, i)
    W_enc, b_enc, W_dec, b_dec = (bank.get_parameter(name)[i] for name in _PARAMS)
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec, "b_enc": b_enc}
    extra: dict[str, Any] = {}
    match cfg.architecture:
        case "relu" | "relu_dnorm" | "panneal":  # ReLU codes: the penalties only shaped training
            architecture = "standard"
        case "topk":
            architecture, extra = "topk", {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
        case "jumprelu":
            architecture, tensors["threshold"] = "jumprelu", bank.get_parameter("log_threshold")[i].exp()
        case "batchtopk" | "matryoshka":
            # At inference a single threshold: relu(pre) where pre > θ, i.e. SAELens's JumpReLU with
            # every latent's threshold at θ (what SAELens's own BatchTopK/Matryoshka trainers save).
            if torch.isnan(bank.threshold[i]):
                raise ValueError(
                    f"{cfg.architecture} SAE (seed={cfg.seed}) has no inference threshold yet (NaN: set by "
                    "training), so SAELens's JumpReLU cannot express it; train it before exporting"
                )
            architecture, tensors["threshold"] = "jumprelu", bank.threshold[i].expand_as(b_enc)
        case "gated":
            architecture = "gated"
            tensors = {
                "W_enc": W_enc,
                "W_dec": W_dec,
                "b_dec": b_dec,
                "b_gate": b_enc,
                "b_mag": bank.get_parameter("b_mag")[i],
                "r_mag": bank.get_parameter("r_mag")[i],
            }
        case other:
            raise ValueError(f"{other} SAEs have no SAELens inference class to export to; {_EXPORTABLE}")
    meta = {
        "d_in": cfg.d_model,
        "d_sae": cfg.n_latents,
        "dtype": _dtype_name(W_dec.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": True,  # our encoder reads x - b_dec
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,  # the format; without it SAELens takes the file as pre-6.0
            "sae_lens_training_version": None,  # not trained by SAELens
            "training_library": "paperlib",
            "training_architecture": cfg.architecture,
            "training_architecture_details": dataclasses.asdict(cfg),
            **metadata,
        },
        "architecture": architecture,
    }
    return {name: _tensor(t) for name, t in tensors.items()}, meta


def _sparsify_files(bank: SAEBank, i: int) -> tuple[dict[str, torch.Tensor], dict]:
    """TopK seed i as sparsify's ``SparseCoder`` state dict (``encoder`` is an ``nn.Linear``, so its
    weight is our ``W_enc`` transposed) and the ``cfg.json`` of ``SparseCoder.save_to_disk``."""
    cfg = bank.cfg
    if cfg.architecture != "topk":
        raise ValueError(
            f"sparsify has TopK SAEs only (per-sample top-k of relu(pre)), so a {cfg.architecture} SAE cannot "
            f"be exported to it; {_EXPORTABLE}"
        )
    W_enc, b_enc, W_dec, b_dec = (bank.get_parameter(name)[i] for name in _PARAMS)
    tensors = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    meta = {  # SparseCoderConfig's fields, then d_in
        "activation": "topk",
        "expansion_factor": max(1, cfg.n_latents // cfg.d_model),  # unused: num_latents takes precedence
        "normalize_decoder": cfg.decoder == "unit",
        "num_latents": cfg.n_latents,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_model,
    }
    return {name: _tensor(t) for name, t in tensors.items()}, meta


def _export_files(bank: SAEBank, i: int, layout: str, metadata: Mapping[str, Any] | None) -> tuple[str, dict, str]:
    """(weights file name, tensors, cfg.json text) of seed i: checked and serialised before anything
    is written."""
    if layout not in EXPORT_LAYOUTS:
        hint = "; save_sae writes paperlib's own layout" if layout == "paperlib" else ""
        raise ValueError(
            f"unknown export layout {layout!r}: choose 'saelens' (SAELens SAE.load_from_disk) or 'sparsify' "
            f"(sparsify SparseCoder.load_from_disk){hint}"
        )
    if layout == "sparsify":
        if metadata:
            raise ValueError("metadata goes into SAELens's cfg.json; sparsify's has no place for it (drop it)")
        tensors, meta = _sparsify_files(bank, i)
        name = SPARSIFY_WEIGHTS
    else:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a mapping (e.g. {{'hook_name': ...}}), got {type(metadata).__name__}")
        tensors, meta = _saelens_files(bank, i, metadata or {})
        name = WEIGHTS
    try:
        text = json.dumps(meta, indent=1) + "\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable for cfg.json ({exc})") from exc
    return name, tensors, text


def _write(path: Path, files: tuple[str, dict, str]) -> Path:
    """Weights first, cfg.json last, each atomically: a directory with cfg.json has complete weights."""
    name, tensors, text = files
    with atomic_path(path / name) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(path / CFG) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def export_single(bank: SAEBank, path, layout: str = "saelens", metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a bank of one into ``path/`` in ``layout`` (``"saelens"`` or ``"sparsify"``, see the module
    docstring): its inference weights, for another library to load. ``metadata`` (SAELens only, e.g.
    ``{"hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2"}``) goes into cfg.json's
    ``metadata``, where SAELens looks for the hook. Use ``save_single`` to keep the bank itself."""
    if bank.n_seeds != 1:
        raise ValueError(f"export_single needs a bank of one seed, got {bank.n_seeds}; use export_sae for banks")
    return _write(Path(path), _export_files(bank, 0, layout, metadata))


def export_sae(bank: SAEBank, path, layout: str = "saelens", metadata: Mapping[str, Any] | None = None) -> list[Path]:
    """Write seed i of the bank to ``path/seed_{i}/`` in ``layout`` (as ``export_single``). Every seed
    is converted before anything is written, so a bank that cannot be exported leaves no files."""
    files = [_export_files(bank, i, layout, metadata) for i in range(bank.n_seeds)]
    return [_write(Path(path) / f"seed_{i}", f) for i, f in enumerate(files)]


# --------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read JSON config ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path, names: tuple[str, ...], required: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` present in the file (only those are read); ``required`` must be there."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file is missing")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            tensors = {n: fh.get_tensor(n) for n in names if n in keys}
    except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({type(exc).__name__}: {exc})") from exc
    missing = [n for n in required if n not in keys]
    if missing:
        raise ValueError(f"{path}: no tensor {', '.join(missing)} (found {', '.join(sorted(keys)) or 'none'})")
    return tensors


def _matrix(t: torch.Tensor, name: str, path: Path) -> np.ndarray:
    if t.ndim != 2:
        raise ValueError(f"{path}: {name} must be a 2-D matrix, got rank {t.ndim} with shape {tuple(t.shape)}")
    return t.detach().to(torch.float32).cpu().numpy()


def _decoder(W_dec: torch.Tensor, layout: str, path: Path, W_enc: np.ndarray | None = None) -> Decoder:
    dec = _matrix(W_dec, "W_dec", path)
    bad = ~np.isfinite(dec).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{path}: decoder has NaN/Inf in {int(bad.sum())} of {len(dec)} latents "
            "(a diverged run?); retrain or drop those latents"
        )
    if W_enc is not None and W_enc.shape != dec.shape[::-1]:
        W_enc = None  # an encoder of another shape (e.g. a transcoder's) is not this decoder's transpose
    return Decoder(dec, layout, path, W_enc)


def _read_saelens(weights: Path, cfg: dict, layout: str) -> Decoder:
    t = _read_safetensors(weights, ("W_dec", "W_enc"), ("W_dec",))
    W_enc = _matrix(t["W_enc"], "W_enc", weights) if "W_enc" in t else None
    out = _decoder(t["W_dec"], layout, weights, W_enc)
    expected = (cfg.get("d_sae"), cfg.get("d_in"))
    if None not in expected and out.W_dec.shape != expected:
        raise ValueError(
            f"{weights}: W_dec has shape {out.W_dec.shape} but cfg.json says d_sae={expected[0]}, "
            f"d_in={expected[1]} (expected [d_sae, d_in])"
        )
    return out


def _read_sparsify(weights: Path) -> Decoder:
    t = _read_safetensors(weights, ("W_dec", "encoder.weight"), ("W_dec",))
    enc = _matrix(t["encoder.weight"], "encoder.weight", weights).T if "encoder.weight" in t else None
    return _decoder(t["W_dec"], "sparsify", weights, enc)


def _unwrap_state_dict(obj, path: Path) -> dict:
    """The module state dict of an ae.pt (also inside a training checkpoint's nested dict)."""
    if isinstance(obj, dict):
        for key in ("ae_state_dict", "state_dict", "ae"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        return obj
    raise ValueError(f"{path}: expected a state dict (a mapping of tensor names), got {type(obj).__name__}")


def _read_dictionary_learning(weights: Path) -> Decoder:
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file is missing")
    try:
        loaded = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle error, or objects weights_only refuses
        raise ValueError(f"{weights}: corrupt or unreadable torch file ({type(exc).__name__}: {exc})") from exc
    state = _unwrap_state_dict(loaded, weights)
    trainer: dict[str, Any] = {}
    if (weights.parent / DL_CONFIG).is_file():
        cfg = _read_json(weights.parent / DL_CONFIG)
        trainer = cfg.get("trainer", cfg) if isinstance(cfg.get("trainer", cfg), dict) else {}
    n, d = trainer.get("dict_size"), trainer.get("activation_dim")
    if "W_dec" in state:  # JumpReluAutoEncoder, MatryoshkaBatchTopKSAE: nn.Parameter [n, d]
        W_dec, name, rows_are_latents = state["W_dec"], "W_dec", True
        enc = state.get("W_enc")
        W_enc = _matrix(enc, "W_enc", weights) if isinstance(enc, torch.Tensor) else None
    elif "decoder.weight" in state:  # AutoEncoder, Gated, TopK, BatchTopK: nn.Linear(n, d) -> [d, n]
        W_dec, name, rows_are_latents = state["decoder.weight"], "decoder.weight", False
        enc = state.get("encoder.weight")
        W_enc = _matrix(enc, "encoder.weight", weights).T if isinstance(enc, torch.Tensor) else None
    else:
        keys = ", ".join(sorted(k for k in state if isinstance(k, str))[:12]) or "none"
        raise ValueError(
            f"{weights}: not a dictionary_learning SAE: neither 'decoder.weight' (nn.Linear decoder) nor "
            f"'W_dec' in its state dict (found {keys})"
        )
    if not isinstance(W_dec, torch.Tensor):
        raise ValueError(f"{weights}: {name} is a {type(W_dec).__name__}, not a tensor")
    if W_dec.ndim != 2:
        raise ValueError(
            f"{weights}: {name} must be a 2-D matrix, got rank {W_dec.ndim} with shape {tuple(W_dec.shape)}"
        )
    stored = tuple(W_dec.shape)
    if not rows_are_latents:
        W_dec = W_dec.T
    # The class convention fixes the orientation; a config (or encoder) that says the opposite,
    # with n != d, means a fork that stored the transpose: follow the sizes then.
    if n is None and W_enc is not None:
        d, n = W_enc.shape
    if n is not None and d is not None and n != d:
        if tuple(W_dec.shape) == (d, n):
            W_dec = W_dec.T
        elif tuple(W_dec.shape) != (n, d):
            raise ValueError(
                f"{weights}: {name} has shape {stored}, which fits neither dict_size={n} x "
                f"activation_dim={d} nor its transpose"
            )
    return _decoder(W_dec.contiguous(), "dictionary_learning", weights, W_enc)


def _hint_for_directory(path: Path) -> str:
    """A pointer to the right argument when ``path`` holds SAEs one level down."""
    children = sorted(p for p in path.iterdir() if p.is_dir() and _layout_files(p) is not None)
    if not children:
        return ""
    names = ", ".join(p.name for p in children[:5]) + (", ..." if len(children) > 5 else "")
    return f"; it holds {len(children)} SAE directories one level down ({names}): pass those instead"


def _layout_files(path: Path) -> tuple[str, Path] | None:
    """(kind, weights file) for a directory in a known layout, else None (no reads of weights)."""
    if (path / CFG).is_file() and (path / WEIGHTS).is_file():
        return "saelens", path / WEIGHTS
    if (path / CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify", path / SPARSIFY_WEIGHTS
    if (path / DL_WEIGHTS).is_file():
        return "dictionary_learning", path / DL_WEIGHTS
    return None


def read_decoder(path) -> Decoder:
    """The decoder of the SAE at ``path``, in any layout of the module docstring (auto-detected)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return _read_dictionary_learning(path)
        if path.name in (CFG, DL_CONFIG):
            return read_decoder(path.parent)
        if path.suffix == ".safetensors" and (path.parent / CFG).is_file():
            if path.name == SPARSIFY_WEIGHTS:
                return _read_sparsify(path)
            cfg = _read_json(path.parent / CFG)
            return _read_saelens(path, cfg, "paperlib" if "paperlib" in cfg else "saelens")
        why = (
            "a .safetensors file without a sibling cfg.json"
            if path.suffix == ".safetensors"
            else "an unknown file type"
        )
        raise ValueError(f"{path}: unknown SAE layout ({why}); {_ACCEPTED}")
    found = _layout_files(path)
    if found is None:
        if (path / CFG).is_file():
            raise FileNotFoundError(
                f"{path}: has cfg.json but no weights file: expected {WEIGHTS} (SAELens/paperlib) "
                f"or {SPARSIFY_WEIGHTS} (sparsify)"
            )
        if (path / DL_CONFIG).is_file():
            raise FileNotFoundError(f"{path}: has config.json but no {DL_WEIGHTS} (dictionary_learning weights)")
        raise ValueError(f"{path}: unknown SAE layout{_hint_for_directory(path)}; {_ACCEPTED}")
    kind, weights = found
    if kind == "sparsify":
        return _read_sparsify(weights)
    if kind == "dictionary_learning":
        return _read_dictionary_learning(weights)
    cfg = _read_json(path / CFG)
    return _read_saelens(weights, cfg, "paperlib" if "paperlib" in cfg else "saelens")


def load_sae(path) -> SAEBank:
    """Rebuild the exact bank of one saved by ``save_single`` / one seed of ``save_sae``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        path = path.parent
    if not (path / CFG).is_file():
        raise FileNotFoundError(
            f"{path}: no {CFG}; load_sae reads one seed's directory (save_single, or one seed_<i> of save_sae; "
            f"load_bank reads a whole save_sae directory){_hint_for_directory(path)}"
        )
    meta = _read_json(path / CFG)
    if not isinstance(meta.get("paperlib"), dict):
        raise ValueError(
            f"{path / CFG}: no 'paperlib' object, so this SAE was not saved by paperlib; "
            "use read_decoder for other layouts"
        )
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    try:
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in meta["paperlib"].items() if k in known
        }
        cfg = SAEConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path / CFG}: invalid 'paperlib' config ({exc})") from exc
    if cfg.n_seeds != 1:
        raise ValueError(f"{path / CFG}: expected a single seed (n_seeds=1), got n_seeds={cfg.n_seeds}")
    bank = SAEBank(cfg)
    state = bank.state_dict()
    tensors = _read_safetensors(path / WEIGHTS, tuple(state), _PARAMS)
    bank = bank.to(tensors["W_dec"].dtype)
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(state[name].shape[1:]):
                raise ValueError(
                    f"{path / WEIGHTS}: {name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(state[name].shape[1:])} from cfg.json"
                )
            state[name] = value[None]
    bank.load_state_dict(state)
    return bank


def load_bank(path) -> SAEBank:
    """Rebuild the exact bank ``save_sae`` wrote to ``path`` (its ``seed_0``, ``seed_1``, ...
    directories): one bank of every seed, in order, in the dtype it was saved in."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory; load_bank reads the directory save_sae wrote")
    found = {int(p.name[5:]): p for p in path.glob("seed_*") if p.is_dir() and p.name[5:].isdigit()}
    if not found:
        raise FileNotFoundError(
            f"{path}: no seed_<i> directories; load_bank reads what save_sae writes (load_sae reads one seed)"
        )
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{path}: seed directories {sorted(found)} are not 0..{len(found) - 1}; a seed is missing")
    seeds = [load_sae(found[i]) for i in range(len(found))]
    first = seeds[0]
    for i, one in enumerate(seeds[1:], 1):
        if dataclasses.replace(one.cfg, seed=first.cfg.seed) != first.cfg or one.cfg.seed != first.cfg.seed + i:
            raise ValueError(
                f"{found[i]}: its config is not seed_0's with seed {first.cfg.seed + i} ({one.cfg} against "
                f"{first.cfg}); these directories do not hold one bank"
            )
        if one.W_dec.dtype != first.W_dec.dtype:
            raise ValueError(f"{found[i]}: saved as {one.W_dec.dtype}, seed_0 as {first.W_dec.dtype}")
    bank = SAEBank(dataclasses.replace(first.cfg, n_seeds=len(seeds))).to(first.W_dec.dtype)
    states = [one.state_dict() for one in seeds]
    bank.load_state_dict({name: torch.cat([state[name] for state in states]) for name in bank.state_dict()})
    return bank
