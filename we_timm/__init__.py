"""we_timm: Weight Evolution (Lin et al., ACM MM 2021) for timm models.

Public API (see WE_SPEC.md): `WEConfig`, `WeightEvolution`, `selection_rate`.
"""
from .config import WEConfig
from .evolution import WEStats, WeightEvolution
from .plan import WEPlan
from .schedule import selection_rate

__all__ = ["WEConfig", "WeightEvolution", "WEStats", "WEPlan", "selection_rate"]
__version__ = "0.1.0"
