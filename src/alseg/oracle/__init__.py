"""Who labels the regions: the simulated oracle (ground truth) or people (work packages and ``alseg import``).

The runner gets its oracle from :data:`ORACLES` by the config's ``oracle`` key and never branches on the kind.
"""

from __future__ import annotations

from alseg.oracle.base import Annotation, Oracle, Waiting
from alseg.oracle.human import HumanOracle
from alseg.oracle.simulated import SimulatedOracle

ORACLES: dict[str, type] = {cls.kind: cls for cls in (SimulatedOracle, HumanOracle)}

__all__ = ["ORACLES", "Annotation", "HumanOracle", "Oracle", "SimulatedOracle", "Waiting"]
