"""The paper's greedy layer-by-layer search (Algorithms 1 and 2).

For each layer in topological order: cluster for every K in [kmin, kmax], rank the candidates with the estimator,
fully score the best ``filter`` fraction, keep the one with the lowest accuracy loss (ties towards smaller K), fix
that layer in the network and move on.
"""

from __future__ import annotations

import logging

from axcnn.explore import Exploration, Explorer, LayerDecision
from axcnn.model import LayerSpec

log = logging.getLogger(__name__)


def greedy(explorer: Explorer, layers: list[LayerSpec]) -> Exploration:
    """Run the greedy exploration over ``layers`` (topological order)."""
    decisions: list[LayerDecision] = []
    skipped: list[tuple[str, str]] = []
    for i, spec in enumerate(layers):
        result = explorer.explore_layer(spec, i, len(layers))
        if isinstance(result, str):
            log.info("leaving %s dense: %s", spec.name, result)
            skipped.append((spec.name, result))
            explorer.progress("layer", index=i, total=len(layers), name=spec.name, candidates=0)
        else:
            decisions.append(result)
    return Exploration(tuple(decisions), tuple(skipped), explorer.reference_correct, len(explorer.labels),
                       explorer.t_pass_s, explorer.config.estimator)
