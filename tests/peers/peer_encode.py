"""Run by tests/peers/test_interop_peers.py with the peer environment's Python (never imported by
paperlib or collected by pytest): load each exported SAE with the real library's own loader, encode
the given inputs and decode the codes, and write both back for the test to compare with paperlib's.

    python peer_encode.py JOBS.json OUT_DIR

JOBS.json: {"inputs": path of a safetensors file with "x" [B, d], "jobs": [{"id", "layout", "dir"}]}.
Writes OUT_DIR/<id>.safetensors ("codes" [B, n], "recon" [B, d]) and OUT_DIR/results.json with the
library versions and, per job, the class that loaded it or the error it raised.
"""

import json
import sys
import traceback
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def saelens(path: str, x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    from sae_lens import SAE

    sae = SAE.load_from_disk(path)
    with torch.no_grad():
        codes = sae.encode(x.to(sae.dtype))
        return type(sae).__name__, codes, sae.decode(codes)


def sparsify(path: str, x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(path)
    with torch.no_grad():
        top_acts, top_indices, _ = sae.encode(x.to(sae.dtype))
        # sparsify returns the k largest per row; scattered into dense codes for the comparison
        codes = torch.zeros(x.shape[0], sae.num_latents, dtype=top_acts.dtype).scatter_(-1, top_indices, top_acts)
        return type(sae).__name__, codes, sae.decode(top_acts, top_indices)


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    x = load_file(spec["inputs"])["x"]
    results = {"versions": {name: version(name) for name in ("sae-lens", "eai-sparsify", "torch")}, "jobs": {}}
    for job in spec["jobs"]:
        try:
            loader = {"saelens": saelens, "sparsify": sparsify}[job["layout"]]
            cls, codes, recon = loader(job["dir"], x)
            save_file({"codes": codes.contiguous(), "recon": recon.contiguous()}, str(out / f"{job['id']}.safetensors"))
            results["jobs"][job["id"]] = {"class": cls}
        except Exception as exc:  # reported per job, so one failure does not hide the others
            results["jobs"][job["id"]] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
