"""Exports loaded back by the real libraries: SAELens (``SAE.load_from_disk``) and sparsify
(``SparseCoder.load_from_disk``) in their own virtual environment (``make test-peers`` builds it from
requirements/bench-train-peers.txt), encoding the same inputs as the paperlib bank.

Each architecture is trained briefly (so BatchTopK and Matryoshka have a learned inference
threshold), then every parameter is moved off its trained value and JumpReLU's thresholds are set
to cut about half of each latent's positive pre-activations, so that a tensor exported under the
wrong name or left at its default would change the codes. One subprocess in the peer environment
(tests/peers/peer_encode.py) loads every export and writes its codes and reconstructions back.
"""

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from paperlib.interop import SAELENS_VERSION, SPARSIFY_VERSION, export_sae
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train

pytestmark = pytest.mark.peers

ROOT = Path(__file__).resolve().parents[2]
PEER_VENV = ROOT / "benchmarks" / ".venv-peers-interop"
PEER_PYTHON = PEER_VENV / "bin" / "python"
PINS = ROOT / "requirements" / "bench-train-peers.txt"
D, N, SEEDS, K = 32, 192, 2, 8

SETTINGS = {
    "relu": dict(l1_coeff=0.01),
    "relu_dnorm": dict(l1_coeff=0.01),
    "panneal": dict(l1_coeff=0.01),
    "topk": dict(k=K),
    "batchtopk": dict(k=K),
    "matryoshka": dict(k=K),
    "jumprelu": dict(l0_coeff=0.01, init_threshold=0.05),
    "gated": dict(l1_coeff=0.01),
}
# (case id, paperlib architecture, layout, dtype, the class the peer should load it as)
CASES = [
    (f"saelens-{a}", a, "saelens", torch.float32, cls)
    for a, cls in (
        ("relu", "StandardSAE"),
        ("relu_dnorm", "StandardSAE"),
        ("panneal", "StandardSAE"),
        ("topk", "TopKSAE"),
        ("batchtopk", "JumpReLUSAE"),
        ("matryoshka", "JumpReLUSAE"),
        ("jumprelu", "JumpReLUSAE"),
        ("gated", "GatedSAE"),
    )
] + [
    ("saelens-topk-float64", "topk", "saelens", torch.float64, "TopKSAE"),
    ("sparsify-topk", "topk", "sparsify", torch.float32, "SparseCoder"),
]
THRESHOLDED = {"batchtopk", "matryoshka", "jumprelu"}  # relu(pre) above a threshold


def _data(rows: int, seed: int) -> torch.Tensor:
    """Sparse combinations of 96 fixed directions plus noise (the directions are the same for every seed)."""
    directions = torch.randn(96, D, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    codes = (torch.rand(rows, 96, generator=gen) < 0.05) * torch.rand(rows, 96, generator=gen) * 3
    return codes @ directions + 0.05 * torch.randn(rows, D, generator=gen)


def _bank(architecture: str, x_train: torch.Tensor) -> SAEBank:
    bank = SAEBank(SAEConfig(architecture, D, N, n_seeds=SEEDS, seed=3, init_scale=0.5, **SETTINGS[architecture]))
    train(bank, x_train, TrainConfig(steps=40, lr=3e-3, batch_size=256, log_every=40), progress=False)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        if architecture == "jumprelu":  # per latent: about the median of its positive pre-activations
            pre = bank.pre_activations(x_train)
            median = torch.where(pre > 0, pre, float("nan")).nanmedian(dim=1).values.nan_to_num(1.0)
            bank.log_threshold.copy_(median.clamp_min(1e-3).log() + 0.2 * torch.randn(median.shape, generator=gen))
    return bank


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """Our banks, the test inputs, and what the peer libraries made of the exports."""
    if not PEER_PYTHON.exists():
        pytest.skip(
            f"peer environment {PEER_VENV.relative_to(ROOT)} is missing: run `make test-peers`, which builds it"
        )
    tmp = tmp_path_factory.mktemp("interop")
    x_train, x = _data(4096, seed=1), _data(512, seed=2)
    banks = {a: _bank(a, x_train) for a in SETTINGS}
    save_file({"x": x}, str(tmp / "x.safetensors"))
    jobs, ours = [], {}
    for case, architecture, layout, dtype, _ in CASES:
        bank = copy.deepcopy(banks[architecture]).to(dtype)
        with torch.no_grad():
            recon, codes = bank(x.to(dtype))
            pre = bank.pre_activations(x.to(dtype))
        for i, path in enumerate(export_sae(bank, tmp / case, layout)):
            jobs.append({"id": f"{case}.{i}", "layout": layout, "dir": str(path)})
            ours[f"{case}.{i}"] = (codes[i], recon[i], pre[i])
    (tmp / "jobs.json").write_text(json.dumps({"inputs": str(tmp / "x.safetensors"), "jobs": jobs}))
    proc = subprocess.run(
        [str(PEER_PYTHON), str(Path(__file__).with_name("peer_encode.py")), str(tmp / "jobs.json"), str(tmp)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"peer_encode.py failed:\n{proc.stderr[-4000:]}"
    results = json.loads((tmp / "results.json").read_text())
    return ours, results, tmp


def _pin(name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)$", PINS.read_text(), re.MULTILINE)
    assert match, f"{PINS} pins no {name}"
    return match.group(1)


def test_peer_environment_has_the_pinned_releases(peers):
    _, results, _ = peers
    versions = results["versions"]
    assert versions["sae-lens"] == _pin("sae-lens") == SAELENS_VERSION
    assert versions["eai-sparsify"] == _pin("eai-sparsify") == SPARSIFY_VERSION
    assert versions["torch"].split("+")[0] == _pin("torch")


@pytest.mark.parametrize("case, architecture, layout, dtype, peer_class", CASES, ids=[c[0] for c in CASES])
def test_peer_loads_the_export_and_encodes_as_we_do(peers, case, architecture, layout, dtype, peer_class):
    ours, results, tmp = peers
    for i in range(SEEDS):
        job = f"{case}.{i}"
        result = results["jobs"][job]
        assert "error" not in result, f"{layout} could not load {tmp / case / f'seed_{i}'}: {result.get('traceback')}"
        assert result["class"] == peer_class
        theirs = load_file(str(tmp / f"{job}.safetensors"))
        codes, recon, pre = ours[job]
        assert theirs["codes"].dtype == dtype
        # the same latents fire, with the same values, and decode to the same reconstructions
        assert torch.equal(theirs["codes"] > 0, codes > 0), f"seed {i}: different active latents"
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(theirs["codes"], codes, **tol)
        torch.testing.assert_close(theirs["recon"], recon, **tol)
        # codes that could not come out right by accident: sparse but not empty; for the thresholded
        # architectures some positive pre-activations cut (a threshold exported as zero would keep
        # them); for gated, magnitudes that are not the gate's (b_mag, r_mag matter)
        active = (codes > 0).float().mean().item()
        assert 0.01 < active < 0.9, f"seed {i}: {active:.0%} of codes active"
        if architecture == "topk":
            assert torch.equal((codes > 0).sum(-1), torch.full((codes.shape[0],), K))
        if architecture in THRESHOLDED:
            cut = ((pre > 0) & (codes == 0)).float().mean().item()
            assert cut > 0.01, f"seed {i}: the threshold cuts only {cut:.2%} of pre-activations"
        if architecture == "gated":
            fired = codes > 0
            assert (codes[fired] - pre[fired]).abs().mean() > 0.01, f"seed {i}: magnitudes equal the gate's"
