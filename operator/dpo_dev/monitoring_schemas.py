"""The Prometheus operator's own schemas for ServiceMonitor, PodMonitor and PrometheusRule, which kubernetes-validate
does not ship (they are CRDs): the validators the npm package @kubernetes-models/prometheus-operator generates
from prometheus-operator's CRDs, installed once with npm into the cache and run with node.

    validate(objects) -> one list of problems per object (empty: valid)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from .build import cache_dir

PACKAGE = "@kubernetes-models/prometheus-operator@6.0.0"
KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
_CHECK = """
import { readFileSync } from "node:fs";
const results = [];
for (const obj of JSON.parse(readFileSync(0, "utf8"))) {
  const models = await import(`@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${obj.kind}`);
  try {
    new models[obj.kind](obj).validate();
    results.push([]);
  } catch (error) {
    results.push([String(error.message || error)]);
  }
}
console.log(JSON.stringify(results));
"""


def ensure_validators(cache: Path | None = None) -> Path:
    """The directory holding the npm package and the check script (npm install the first time)."""
    home = (cache or cache_dir()) / "npm" / PACKAGE.replace("/", "+")
    if not (home / "node_modules" / "@kubernetes-models" / "prometheus-operator").is_dir():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(home), "--no-audit", "--no-fund", "--ignore-scripts", PACKAGE],
            check=True,
            capture_output=True,
            timeout=300,
        )
    (home / "check.mjs").write_text(_CHECK)
    return home


def validate(objects: list[dict[str, Any]], cache: Path | None = None) -> list[list[str]]:
    """Each object's problems by its kind's schema (types, required fields, enums); [] where valid."""
    unknown = sorted({o.get("kind", "?") for o in objects} - set(KINDS))
    if unknown:
        raise ValueError(f"no Prometheus operator schema for {unknown}")
    home = ensure_validators(cache)
    result = subprocess.run(
        ["node", str(home / "check.mjs")], input=json.dumps(objects), capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"node failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout)
