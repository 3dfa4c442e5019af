"""examples/sweep: kustomize renders three valid DPOJobs from one base that differ in DPO only, so they share one
SFT model (the end-to-end run of the sweep is tests/operator/test_operator_e2e.py::test_a_sweep_trains_sft_once)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jsonschema
import yaml

from dpo_dev import crd
from dpo_trainer.sft_cache import sft_identity
from dpojob_api.spec import DPOJobSpec, digest, training_hash

SWEEP = Path(__file__).resolve().parents[2] / "examples" / "sweep"


def render_sweep() -> list[dict]:
    """`kubectl kustomize examples/sweep`: what `kubectl apply -k` (or Argo CD, Flux) applies."""
    rendered = subprocess.run(["kubectl", "kustomize", str(SWEEP)], capture_output=True, text=True, check=True)
    return [document for document in yaml.safe_load_all(rendered.stdout) if document]


def test_the_sweep_renders_three_valid_dpojobs_over_beta_and_loss_type() -> None:
    documents = render_sweep()
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft4Validator(schema)
    for document in documents:
        assert not [e.message for e in validator.iter_errors(document)], document["metadata"]["name"]
    specs = {d["metadata"]["name"]: DPOJobSpec.model_validate(d["spec"]) for d in documents}
    assert {name: (s.dpo.beta, s.dpo.loss_type) for name, s in specs.items()} == {
        "llama2-sweep-beta-01": (0.1, ["sigmoid"]),
        "llama2-sweep-beta-05": (0.5, ["sigmoid"]),
        "llama2-sweep-ipo": (0.1, ["ipo"]),
    }
    assert len({s.output.hub.repo_id for s in specs.values() if s.output.hub}) == 3, "each pushes to its own repo"
    claims = {s.runtime.checkpoint_volume.claim_name for s in specs.values() if s.runtime.checkpoint_volume}
    assert claims == {"dpo-checkpoints"} and all(s.sft.reuse for s in specs.values()), "one shared volume"


def test_the_variants_share_their_sft_identity_and_nothing_else() -> None:
    specs = [DPOJobSpec.model_validate(d["spec"]) for d in render_sweep()]
    resolved = {
        "model": {"name": "meta-llama/Llama-2-7b-hf", "revision": "main", "sha": "a" * 40},
        "datasets": [{"name": "lvwerra/stack-exchange-paired", "revision": "main", "sha": "b" * 40}],
    }
    identities = {digest(sft_identity(spec, resolved)) for spec in specs}
    assert len(identities) == 1, "one SFT model for the whole sweep"
    assert len({training_hash(spec) for spec in specs}) == 3, "three work directories: three DPO runs"
