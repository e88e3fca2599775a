"""Precision and recall of alerts against ground-truth incidents, counted per incident.

An alert is a *true* alert when it falls on a device inside one of its incidents, from ``start_ms -
lead_ms`` to ``end_ms + grace_ms`` (epoch ms): a detector fires on the reading after a change, and a
level shift that ends is a second, legitimate change.  Precision = true alerts / all alerts; recall =
incidents with at least one true alert / all incidents.  One alert per incident is the goal, so a detector
that fires ten times on one incident is punished in precision, not rewarded in recall.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class IncidentScore:
    alerts: int
    true_alerts: int
    incidents: int
    detected: int
    missed_by_kind: dict[str, int] = field(default_factory=dict)
    incidents_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def precision(self) -> float:
        return self.true_alerts / self.alerts if self.alerts else 1.0

    @property
    def recall(self) -> float:
        return self.detected / self.incidents if self.incidents else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"alerts": self.alerts, "true_alerts": self.true_alerts, "incidents": self.incidents,
                "detected_incidents": self.detected, "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "missed_by_kind": self.missed_by_kind,
                "incidents_by_kind": self.incidents_by_kind}


def score_incidents(alerts: Iterable[tuple[str, int]], incidents: Iterable[tuple[str, str, int, int]],
                    *, lead_ms: int = 1_000, grace_ms: int = 30_000) -> IncidentScore:
    """Match ``(device_id, ts_ms)`` alerts to ``(device_id, kind, start_ms, end_ms)`` incidents.

    >>> s = score_incidents([("a", 105), ("a", 900), ("b", 5)], [("a", "spike", 100, 110), ("b", "stuck", 50, 60)],
    ...                     lead_ms=0, grace_ms=10)
    >>> s.alerts, s.true_alerts, s.detected, s.precision, s.recall
    (3, 1, 1, 0.3333333333333333, 0.5)
    """
    by_device: dict[str, list[tuple[int, str, int, int]]] = {}
    incident_list = list(incidents)
    for k, (dev, kind, start, end) in enumerate(incident_list):
        by_device.setdefault(dev, []).append((k, kind, start, end))
    detected: set[int] = set()
    n_alerts = true_alerts = 0
    for dev, ts in alerts:
        n_alerts += 1
        hits = [k for k, _, start, end in by_device.get(dev, ()) if start - lead_ms <= ts <= end + grace_ms]
        if hits:
            true_alerts += 1
            detected.update(hits)
    kinds = Counter(kind for _, kind, _, _ in incident_list)
    missed = Counter(incident_list[k][1] for k in range(len(incident_list)) if k not in detected)
    return IncidentScore(n_alerts, true_alerts, len(incident_list), len(detected), dict(missed), dict(kinds))
